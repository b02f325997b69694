"""The audit trail's hash chain: each record's hash covers its content and the previous hash.

Editing a stored record changes its hash; removing one breaks the sequence and the link. Records
are checked against these functions only, so any store backend (or an auditor reading an export)
verifies the trail the same way. A chain alone cannot show that its newest records were cut off:
compare the head hash with one kept elsewhere for that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

GENESIS_HASH = "0" * 64


class ChainedRecord(Protocol):
    """What :func:`verify_chain` reads from a record (``ratchet.store.AuditRecord`` has it)."""

    @property
    def seq(self) -> int: ...
    @property
    def change_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def at(self) -> datetime: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


def utc_text(at: datetime) -> str:
    """Fixed-width UTC ISO text: one spelling per instant, so it hashes and sorts alike anywhere."""
    if at.tzinfo is None:
        raise ValueError(f"datetime {at!r} has no timezone; Ratchet stores UTC instants only")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so equal content always gives equal bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(
    prev_hash: str,
    seq: int,
    change_id: str,
    kind: str,
    actor: str,
    payload: dict[str, Any],
    at: datetime,
) -> str:
    """The sha256 (hex) of one record's content, chained to the record before it."""
    content = {
        "prev_hash": prev_hash,
        "seq": seq,
        "change_id": change_id,
        "kind": kind,
        "actor": actor,
        "payload": payload,
        "at": utc_text(at),
    }
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def verify_chain(records: Iterable[ChainedRecord]) -> list[str]:
    """Problems with a whole trail (every record, any order), one line each; empty = intact."""
    problems: list[str] = []
    expected_seq = 1
    expected_prev = GENESIS_HASH
    for record in sorted(records, key=lambda r: r.seq):
        if record.seq < expected_seq:
            problems.append(f"seq {record.seq}: appears more than once")
            continue
        gap = record.seq > expected_seq
        if gap:
            missing = (
                f"seq {expected_seq}"
                if record.seq == expected_seq + 1
                else f"seq {expected_seq} to {record.seq - 1}"
            )
            problems.append(f"gap: {missing} missing (removed) before seq {record.seq}")
        actual = record_hash(
            record.prev_hash,
            record.seq,
            record.change_id,
            record.kind,
            record.actor,
            record.payload,
            record.at,
        )
        if actual != record.hash:
            problems.append(f"seq {record.seq}: content altered (its hash no longer matches)")
        elif not gap and record.prev_hash != expected_prev:
            problems.append(
                f"seq {record.seq}: does not link to seq {record.seq - 1} "
                f"(seq {record.seq - 1} was rewritten)"
                if record.seq > 1
                else "seq 1: does not start from the genesis hash"
            )
        expected_seq = record.seq + 1
        expected_prev = record.hash
    return problems

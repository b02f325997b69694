"""The hash chain on its own: what an auditor holding an export of the trail can check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from ratchet.audit import GENESIS_HASH, record_hash, verify_chain
from ratchet.store import AuditRecord

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def chain(length: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev_hash = GENESIS_HASH
    for seq in range(1, length + 1):
        fields: dict[str, Any] = {
            "change_id": "c1",
            "kind": "measured",
            "actor": "gatekeeper",
            "payload": {"step": seq, "scores": {"a": 1.0, "b": None}},
            "at": T0 + timedelta(seconds=seq),
        }
        digest = record_hash(prev_hash, seq, **fields)
        records.append(AuditRecord(seq=seq, prev_hash=prev_hash, hash=digest, **fields))
        prev_hash = digest
    return records


def test_hash_ignores_key_order_and_timezone_spelling() -> None:
    utc = record_hash(GENESIS_HASH, 1, "c1", "decided", "alice", {"a": 1, "b": [1, 2]}, T0)
    elsewhere = record_hash(
        GENESIS_HASH,
        1,
        "c1",
        "decided",
        "alice",
        {"b": [1, 2], "a": 1},
        T0.astimezone(timezone(timedelta(hours=-5))),
    )

    assert utc == elsewhere
    assert len(utc) == 64 and set(utc) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "changed",
    [
        {"prev_hash": "1" * 64},
        {"seq": 2},
        {"change_id": "c2"},
        {"kind": "applied"},
        {"actor": "mallory"},
        {"payload": {"approved": False}},
        {"at": T0 + timedelta(microseconds=1)},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_every_field_is_covered_by_the_hash(changed: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "prev_hash": GENESIS_HASH,
        "seq": 1,
        "change_id": "c1",
        "kind": "decided",
        "actor": "alice",
        "payload": {"approved": True},
        "at": T0,
    }

    assert record_hash(**fields) != record_hash(**(fields | changed))


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        record_hash(GENESIS_HASH, 1, "c1", "decided", "alice", {}, datetime(2025, 3, 1, 12, 0))


def test_intact_chain_has_no_problems_in_any_order() -> None:
    records = chain(5)

    assert verify_chain(records) == []
    assert verify_chain(list(reversed(records))) == []
    assert verify_chain([]) == []


def test_altered_record_is_named_by_seq() -> None:
    records = chain(5)
    records[2] = records[2].model_copy(update={"payload": {"step": 3, "scores": {"a": 0.0}}})

    assert verify_chain(records) == [
        "seq 3: content altered (its hash no longer matches)",
    ]


def test_rewritten_record_with_a_fresh_hash_breaks_the_next_link() -> None:
    records = chain(4)
    forged = records[1].model_copy(update={"actor": "mallory"})
    records[1] = forged.model_copy(
        update={
            "hash": record_hash(
                forged.prev_hash,
                forged.seq,
                forged.change_id,
                forged.kind,
                forged.actor,
                forged.payload,
                forged.at,
            )
        }
    )

    assert verify_chain(records) == ["seq 3: does not link to seq 2 (seq 2 was rewritten)"]


@pytest.mark.parametrize(
    ("removed", "problem"),
    [
        ([2], "gap: seq 3 missing (removed) before seq 4"),
        ([1, 2], "gap: seq 2 to 3 missing (removed) before seq 4"),
        ([0], "gap: seq 1 missing (removed) before seq 2"),
    ],
)
def test_removed_records_are_reported_as_a_gap(removed: list[int], problem: str) -> None:
    records = [r for i, r in enumerate(chain(5)) if i not in removed]

    assert verify_chain(records) == [problem]


def test_duplicated_seq_is_reported() -> None:
    records = chain(3)

    assert verify_chain([*records, records[1]]) == ["seq 2: appears more than once"]


def test_first_record_must_start_from_genesis() -> None:
    [first] = chain(1)
    prev_hash = "f" * 64
    moved = first.model_copy(
        update={
            "prev_hash": prev_hash,
            "hash": record_hash(
                prev_hash, 1, first.change_id, first.kind, first.actor, first.payload, first.at
            ),
        }
    )

    assert verify_chain([moved]) == ["seq 1: does not start from the genesis hash"]

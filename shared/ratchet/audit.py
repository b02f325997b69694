"""The audit trail's integrity: a hash chain, the writer's signatures, and an anchor in the stream.

- **Chain.** Each record's hash covers its content, its seq and the hash of the record before it,
  so an edited record no longer matches its hash and a removed one leaves a gap or a broken link.
- **Signatures.** The gatekeeper signs each record's hash with an Ed25519 key that only it holds
  (a 0600 file in its own home, never in the shared database). Whoever can write the database
  can recompute hashes, but cannot sign: a rewritten chain, a renumbered one or a forged append
  fails its signatures, and the failures name the records.
- **Anchor.** A chain cannot show that its newest records were cut off. Every ``change.recorded``
  event carries the trail's head (seq, hash, signature) in the RATCHET stream, which only the
  gatekeeper may publish to and nobody may delete from or purge; the newest one signed by the
  key is the anchor the trail's end is checked against. The gatekeeper publishes it again at
  start and daily, so the stream's retention never leaves a running trail without one.

Records are checked with these functions only, so every store backend (and an auditor reading
an export) verifies the trail the same way. Every record must carry the key's signature: the hash
chain alone vouches for nothing (whoever can write the database can recompute it), so an unsigned
record is a problem, named, whether its signature was removed or it was written before records
were signed. An anchor counts only if it is signed by the key too, and the stream's newest
messages on ``change.recorded`` that are not such anchors are reported, never taken for "no
anchor".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.errors import APIError
from pydantic import ValidationError

from ratchet.contracts import AuditAnchor, ChangeRecorded
from ratchet.messaging import EVENTS_STREAM

GENESIS_HASH = "0" * 64
SIGNING_KEY_FILE = "gatekeeper-audit-key.pem"  # in the gatekeeper's home, 0600
PUBLIC_KEY_FILE = "gatekeeper-audit-key.pub"  # beside it, for the operator to pin
KEY_PREFIX = "ed25519:"
SIGNED_PREFIX = b"ratchet.audit.v1:"  # what is signed: this, then the record's hash
MAX_LISTED = 10  # seq ranges named per problem; the rest are counted
UNSIGNED = "unsigned (signature removed, or written without the key)"  # the problem, per record


class ChainedRecord(Protocol):
    """What the checks read from a record (``ratchet.store.AuditRecord`` has it)."""

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
    @property
    def key_id(self) -> str | None: ...
    @property
    def signature(self) -> str | None: ...


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


# --- keys ----------------------------------------------------------------------------------------


class AuditKeyError(ValueError):
    """A key that cannot be used, said in one line."""


@dataclass(frozen=True)
class AuditKey:
    """The public half: all a verifier needs. Written ``ed25519:<base64>``; its id is the start
    of the key's sha256, which each record names."""

    raw: bytes

    @classmethod
    def parse(cls, text: str) -> AuditKey:
        body = text.strip()
        if not body.startswith(KEY_PREFIX):
            raise AuditKeyError(f"not an audit key (expected {KEY_PREFIX}<base64>): {body[:40]!r}")
        try:
            raw = base64.b64decode(body.removeprefix(KEY_PREFIX), validate=True)
        except binascii.Error as exc:
            raise AuditKeyError(f"audit key is not valid base64: {body[:40]!r}") from exc
        if len(raw) != 32:
            raise AuditKeyError(f"audit key has {len(raw)} bytes, an Ed25519 key has 32")
        return cls(raw)

    @property
    def text(self) -> str:
        return KEY_PREFIX + base64.b64encode(self.raw).decode("ascii")

    @property
    def id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verifies(self, hash_: str, signature: str) -> bool:
        """Whether ``signature`` is this key's signature of the record hash ``hash_``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(
                base64.b64decode(signature, validate=True), SIGNED_PREFIX + hash_.encode()
            )
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


class AuditSigner:
    """The private half, held by the trail's one writer (the gatekeeper)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key = AuditKey(
            private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> AuditSigner:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, hash_: str) -> str:
        return base64.b64encode(self._private.sign(SIGNED_PREFIX + hash_.encode())).decode()

    @classmethod
    def load_or_create(cls, path: Path) -> AuditSigner:
        """The key in ``path``, made on first use: written 0600 under a temporary name and then
        linked into place, so two starts never make two keys and a crash leaves no half-written
        file; its public half goes beside it (``PUBLIC_KEY_FILE``) for the operator to pin.
        A key file that others may read is refused, as ssh refuses one: they could sign."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            signer = cls.generate()
            pem = signer._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            draft = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(draft, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
            finally:
                draft.unlink()
        signer = cls._load(path)
        path.with_name(PUBLIC_KEY_FILE).write_text(signer.key.text + "\n", encoding="utf-8")
        return signer

    @classmethod
    def _load(cls, path: Path) -> AuditSigner:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise AuditKeyError(
                f"audit signing key {path} may be read by others (mode {mode:04o}): "
                f"run `chmod 600 {path}`"
            )
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise AuditKeyError(f"audit signing key {path} is not a readable key: {exc}") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise AuditKeyError(f"audit signing key {path} is not an Ed25519 key")
        return cls(private)


def anchor_of(record: ChainedRecord) -> AuditAnchor:
    """The anchor that pins the trail's end at ``record``."""
    return AuditAnchor(
        seq=record.seq, hash=record.hash, key_id=record.key_id, signature=record.signature
    )


def announcement(record: ChainedRecord, head: ChainedRecord | None = None) -> ChangeRecorded:
    """The ``change.recorded`` event for ``record``, carrying the trail's ``head`` (``record``
    itself unless told otherwise); its id comes from the seq, so a repeat is dropped."""
    return ChangeRecorded(
        id=f"{record.change_id}.recorded.{record.seq}",
        change_id=record.change_id,
        kind=record.kind,
        seq=record.seq,
        head=anchor_of(head or record),
    )


# --- checks --------------------------------------------------------------------------------------


@dataclass
class TrailReport:
    """What a check found: ``problems`` show tampering (any one fails verification); ``notes``
    say what the checks could not cover, and why."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: TrailReport) -> None:
        self.problems += other.problems
        self.notes += other.notes


def verify_chain(records: Iterable[ChainedRecord]) -> list[str]:
    """Problems with a whole trail's hash chain (every record, any order), one line each."""
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


def seq_ranges(seqs: list[int]) -> str:
    """``[1, 2, 3, 7]`` as "seq 1 to 3, 7", naming at most ``MAX_LISTED`` ranges."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    named = [f"{a}" if a == b else f"{a} to {b}" for a, b in ranges[:MAX_LISTED]]
    more = len(ranges) - MAX_LISTED
    return "seq " + ", ".join(named) + (f" and {more} more range(s)" if more > 0 else "")


def signed_by(record: ChainedRecord, key: AuditKey) -> bool:
    """Whether ``record`` carries ``key``'s signature of its hash."""
    return record.signature is not None and key.verifies(record.hash, record.signature)


def verify_signatures(records: Iterable[ChainedRecord], key: AuditKey | None) -> TrailReport:
    """Every record must carry ``key``'s signature of its hash. An unsigned record is a problem
    wherever it is: accepting some ("written before signing") would let whoever can write the
    database strip every signature and pass a recomputed chain, forged records and all, off as
    such. Without a key only the unsigned records are found."""
    failing: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: r.seq):
        if record.signature is None:
            failing.setdefault(UNSIGNED, []).append(record.seq)
        elif key is not None and not key.verifies(record.hash, record.signature):
            why = (
                "signature does not match (rewritten or forged after signing)"
                if record.key_id == key.id
                else f"signed by another key (id {str(record.key_id)[:16]!r}), not key {key.id}"
            )
            failing.setdefault(why, []).append(record.seq)
    report = TrailReport(problems=[f"{seq_ranges(seqs)}: {why}" for why, seqs in failing.items()])
    if key is None:
        report.notes.append("no public key: the signatures were not checked")
    return report


def anchor_problem(
    anchor: AuditAnchor, anchored: ChainedRecord | None, last_seq: int
) -> str | None:
    """What is wrong with a trail whose newest seq is ``last_seq`` and whose record at the
    anchor's seq is ``anchored``, given the anchor; None if the anchor holds. The gatekeeper asks
    this before it extends the trail, ``ratchet audit --verify`` when it checks it."""
    if last_seq < anchor.seq:
        first = last_seq + 1
        removed = f"seq {first}" if first == anchor.seq else f"seq {first} to {anchor.seq}"
        return (
            f"truncated: the trail ends at seq {last_seq}, but the stream anchored seq "
            f"{anchor.seq} (records removed: {removed} at least)"
        )
    if anchored is None:
        return f"seq {anchor.seq}: the record anchored in the stream is missing"
    if anchored.hash != anchor.hash:
        return f"seq {anchor.seq}: not the record anchored in the stream (rewritten)"
    return None


def verify_anchor(
    records: Iterable[ChainedRecord], anchor: AuditAnchor | None, key: AuditKey | None
) -> TrailReport:
    """The trail's end against the stream's newest anchor, which must be signed: nothing cut off,
    nothing rewritten at the anchored seq. Records after it (written since) have only their own
    signatures to vouch for them, and a cut among them would not show: that is noted."""
    by_seq = {r.seq: r for r in records}
    report = TrailReport()
    if anchor is None:
        if by_seq:
            report.problems.append(
                "no valid anchor of the trail in the RATCHET stream, so its end cannot be checked "
                "(the gatekeeper anchors its head with every record, at start and daily)"
            )
        return report
    if anchor.signature is None:
        report.problems.append(f"the stream's anchor (seq {anchor.seq}) is unsigned")
    elif key is not None and not key.verifies(anchor.hash, anchor.signature):
        report.problems.append(
            f"the stream's anchor (seq {anchor.seq}) is not signed by key {key.id}"
        )
    last_seq = max(by_seq, default=0)
    problem = anchor_problem(anchor, by_seq.get(anchor.seq), last_seq)
    if problem:
        report.problems.append(problem)
    elif last_seq > anchor.seq:
        first = anchor.seq + 1
        newer = f"seq {first}" if first == last_seq else f"seq {first} to {last_seq}"
        vouch = "their signatures alone vouch for them" if key else "nothing vouches for them"
        report.notes.append(
            f"{newer}: newer than the stream's anchor (seq {anchor.seq}), so {vouch}, and "
            "records cut off after them would not show"
        )
    return report


def verify_trail(
    records: Sequence[ChainedRecord], key: AuditKey | None, anchor: AuditAnchor | None
) -> TrailReport:
    """Every check: the hash chain, the signatures (with ``key``) and the anchor."""
    report = TrailReport(problems=verify_chain(records))
    report.extend(verify_signatures(records, key))
    report.extend(verify_anchor(records, anchor, key))
    return report


# --- the anchor in the stream ---------------------------------------------------------------------

ANCHOR_WALK = 1000  # change.recorded messages read back at most, looking for a valid anchor
DIRECT_GET = f"$JS.API.DIRECT.GET.{EVENTS_STREAM}"


@dataclass(frozen=True)
class AnchorReading:
    """What the stream says about the trail's end: ``event``, the newest ``change.recorded`` that
    is a valid anchor (it parses, and its head is signed: by the key, when there is one), and
    ``invalid``, the newer messages on that subject that are not (why -> their stream seqs).

    Those are reported, and never taken for "no anchor": a reader that did would not see records
    cut off behind garbage on ``change.recorded``. Checking against the newest *valid* anchor is
    as strong as checking against the newest message: nobody without the key can make one."""

    event: ChangeRecorded | None = None
    invalid: dict[str, list[int]] = field(default_factory=dict)

    @property
    def head(self) -> AuditAnchor | None:
        return self.event.head if self.event else None

    @property
    def unreadable(self) -> bool:
        """The stream holds messages on ``change.recorded``, but none read is a valid anchor:
        the trail's end cannot be checked (which is not the same as a stream without any)."""
        return self.event is None and bool(self.invalid)

    @property
    def problems(self) -> list[str]:
        """One line per reason, naming the messages' stream seqs."""
        return [
            f"change.recorded at stream {seq_ranges(seqs)}: not a valid anchor ({why})"
            for why, seqs in self.invalid.items()
        ]

    def summary(self) -> str:
        """Why no anchor could be checked, in one line (for an :attr:`unreadable` reading)."""
        read = sum(len(seqs) for seqs in self.invalid.values())
        return (
            f"none of the newest {read} change.recorded message(s) in the RATCHET stream is a "
            f"valid anchor ({'; '.join(self.problems)})"
        )


def as_anchor(data: bytes, key: AuditKey | None) -> tuple[ChangeRecorded | None, str]:
    """``data`` as an anchor, or None and why it is not one."""
    try:
        event = ChangeRecorded.model_validate_json(data)
    except ValidationError:
        return None, "not a change.recorded event carrying the trail's head"
    if event.head.signature is None:
        return None, "its head is unsigned"
    if key is not None and not key.verifies(event.head.hash, event.head.signature):
        return None, f"its head is not signed by key {key.id}"
    return event, ""


async def newest_anchor(
    messages: AsyncIterator[tuple[int, bytes]], key: AuditKey | None, *, limit: int = ANCHOR_WALK
) -> AnchorReading:
    """The newest valid anchor among ``messages`` (each ``change.recorded``'s stream seq and
    data, newest first), reading at most ``limit`` of them."""
    invalid: dict[str, list[int]] = {}
    read = 0
    async for stream_seq, data in messages:
        event, why = as_anchor(data, key)
        if event is not None:
            return AnchorReading(event, invalid)
        invalid.setdefault(why, []).append(stream_seq)
        read += 1
        if read >= limit:
            break
    return AnchorReading(None, invalid)


async def read_anchor(
    nc: Client, key: AuditKey | None, *, timeout: float = 5.0, limit: int = ANCHOR_WALK
) -> AnchorReading:
    """The trail's newest valid anchor in the RATCHET stream, walking back from the newest
    ``change.recorded`` past any that is not one (at most ``limit`` messages). A read that fails
    raises: nothing here stands for "no anchor" but a stream without any ``change.recorded``."""
    async with aclosing(_recorded_newest_first(nc, timeout)) as messages:
        return await newest_anchor(messages, key, limit=limit)


async def _recorded_newest_first(nc: Client, timeout: float) -> AsyncGenerator[tuple[int, bytes]]:
    """Each ``change.recorded`` in the RATCHET stream, newest first, as (stream seq, data): the
    newest by a direct get of the subject's last message, each older one by a direct get of the
    subject's last message up to the stream seq before it (``multi_last`` with ``up_to_seq``)."""
    subject = ChangeRecorded.subject
    reply = await nc.request(f"{DIRECT_GET}.{subject}", b"", timeout=timeout)
    while (stored := _stored(reply)) is not None:
        stream_seq, data = stored
        yield stream_seq, data
        if stream_seq <= 1:  # up_to_seq 0 would mean no limit at all
            return
        ask = {"multi_last": [subject], "up_to_seq": stream_seq - 1}
        # a batch answer: the message, then an end-of-batch status the request no longer hears
        reply = await nc.request(DIRECT_GET, json.dumps(ask).encode(), timeout=timeout)


def _stored(reply: Msg) -> tuple[int, bytes] | None:
    """A direct get's answer as (stream seq, data), None when no message matches. Only a stored
    message carries a stream seq, so a status header stored inside one is never taken for
    "none"; any other status is an error."""
    headers = reply.headers or {}
    seq = headers.get("Nats-Sequence")
    if seq is not None and seq.isdigit():
        return int(seq), reply.data
    if seq is None and headers.get("Status") == "404":
        return None
    status = headers.get("Status", "")
    raise APIError(
        code=int(status) if status.isdigit() else None,
        description=f"reading {ChangeRecorded.subject}: {headers.get(Header.DESCRIPTION, status)}",
    )

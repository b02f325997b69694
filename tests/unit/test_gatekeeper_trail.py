"""The gatekeeper's side of the audit trail, without NATS: it signs what it appends, announces
the trail's head with every step, and refuses to extend or re-anchor a trail that no longer
matches the newest valid anchor in the stream (played here by what it published, and whatever
else lands on ``change.recorded``), whose head it did not sign, or that it cannot check."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ratchet.audit import (
    AnchorReading,
    AuditKey,
    AuditSigner,
    anchor_of,
    announcement,
    newest_anchor,
    verify_trail,
)
from ratchet.contracts import ChangeRecorded, Event
from ratchet.prompts import PromptRecord, PromptVersion
from ratchet.rules import load_rules
from ratchet.settings import REPO_ROOT, GateSettings
from ratchet.store import AuditRecord, open_store
from ratchet_gatekeeper.app import (
    REANCHOR_EVERY_S,
    REANCHOR_RETRY_S,
    anchor_once,
    keep_anchored,
)
from ratchet_gatekeeper.graph import Gate, TrailTampered
from ratchet_gatekeeper.ledger import GateLedger


class NoPrompts:
    """The trail needs no prompt store."""

    async def current(self, task: str) -> PromptVersion | None:
        return None

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        raise AssertionError("the audit trail never writes prompts")


@dataclass
class Stream:
    """The events stream as far as the trail is concerned: what the gatekeeper published, every
    message on ``change.recorded`` (anything else that got there too), and the anchor read back
    from them as the gatekeeper reads it, with its key."""

    key: AuditKey
    events: list[ChangeRecorded] = field(default_factory=list)
    recorded: list[bytes] = field(default_factory=list)
    published: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, event: Event) -> None:
        assert isinstance(event, ChangeRecorded)
        self.events.append(event)
        self.recorded.append(event.model_dump_json().encode())
        self.published.set()

    async def newest_anchor(self) -> AnchorReading:
        async def newest_first() -> AsyncIterator[tuple[int, bytes]]:
            for stream_seq in range(len(self.recorded), 0, -1):
                yield stream_seq, self.recorded[stream_seq - 1]

        return await newest_anchor(newest_first(), self.key)


@dataclass
class Trail:
    gate: Gate
    stream: Stream
    signer: AuditSigner
    db: Path

    def delete_from(self, seq: int) -> None:
        """Cut the trail behind the gatekeeper's back, as anyone with the file can."""
        with closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute("DELETE FROM audit WHERE seq >= ?", (seq,))

    def strip_signatures(self, from_seq: int = 1) -> None:
        """Remove the signatures, as anyone with the file can."""
        with closing(sqlite3.connect(self.db)) as conn, conn:
            conn.execute(
                "UPDATE audit SET key_id = NULL, signature = NULL WHERE seq >= ?", (from_seq,)
            )

    async def records(self) -> list[int]:
        return [r.seq for r in await self.gate.store.audit()]


@pytest.fixture
async def trail(tmp_path: Path) -> AsyncIterator[Trail]:
    ledger = await GateLedger.open(tmp_path / "gatekeeper-runs.db")
    db = tmp_path / "ratchet.db"
    signer = AuditSigner.generate()
    stream = Stream(key=signer.key)
    async with open_store(f"sqlite:///{db}") as store:
        gate = Gate(
            store=store,
            ledger=ledger,
            prompts=NoPrompts(),
            publish=stream.publish,
            rules=load_rules(REPO_ROOT / "config" / "behavior_rules.json"),
            suites={},
            threshold=0.7,
            settings=GateSettings(),
            signer=signer,
            newest_anchor=stream.newest_anchor,
        )
        yield Trail(gate=gate, stream=stream, signer=signer, db=db)
    await ledger.close()


async def test_every_step_is_signed_and_announced_with_the_head(trail: Trail) -> None:
    for kind in ("received", "measured", "awaiting_approval"):
        await trail.gate.audit("c1", kind, {"task": "t"})

    records = await trail.gate.store.audit()
    assert [(e.seq, e.kind, e.head.seq) for e in trail.stream.events] == [
        (1, "received", 1),
        (2, "measured", 2),
        (3, "awaiting_approval", 3),
    ]
    assert trail.stream.events[-1].head == anchor_of(records[-1])
    assert verify_trail(records, trail.signer.key, trail.stream.events[-1].head).problems == []


async def test_a_step_announced_again_anchors_the_current_head(trail: Trail) -> None:
    """A resumed node re-announces its old step; the anchor it carries is still the newest."""
    await trail.gate.audit("c1", "received", {})
    await trail.gate.audit("c2", "received", {})

    await trail.gate.audit("c1", "received", {})  # already written: announced again only

    again = trail.stream.events[-1]
    assert (again.seq, again.head.seq) == (1, 2)
    assert len(await trail.gate.store.audit()) == 2


async def test_a_trail_cut_behind_the_gatekeepers_back_is_not_extended(trail: Trail) -> None:
    """Otherwise the next records would take the removed seqs and the next anchor hide the cut."""
    for kind in ("received", "measured", "awaiting_approval"):
        await trail.gate.audit("c1", kind, {})
    trail.delete_from(2)
    announced = len(trail.stream.events)

    with pytest.raises(TrailTampered, match="trail ends at seq 1, but the stream anchored seq 3"):
        await trail.gate.audit("c1", "approved", {})
    with pytest.raises(TrailTampered):
        await trail.gate.reanchor()

    assert [r.seq for r in await trail.gate.store.audit()] == [1]
    assert len(trail.stream.events) == announced


async def test_reanchoring_announces_the_head_again(trail: Trail) -> None:
    assert await trail.gate.reanchor() is None  # an empty trail: nothing to anchor
    assert trail.stream.events == []
    await trail.gate.audit("c1", "received", {})
    await trail.gate.audit("c1", "measured", {})

    head = await trail.gate.reanchor()

    assert head is not None and head.seq == 2
    assert [(e.seq, e.head.seq) for e in trail.stream.events] == [(1, 1), (2, 2), (2, 2)]


async def test_the_running_gatekeeper_anchors_its_head_at_start(trail: Trail) -> None:
    await trail.gate.audit("c1", "received", {})
    trail.stream.published.clear()

    anchoring = asyncio.create_task(keep_anchored(trail.gate))
    try:
        await asyncio.wait_for(trail.stream.published.wait(), 10)
    finally:
        anchoring.cancel()

    assert [(e.seq, e.head.seq) for e in trail.stream.events] == [(1, 1), (1, 1)]


async def test_the_running_gatekeeper_reports_a_cut_trail_and_anchors_nothing(
    trail: Trail, caplog: pytest.LogCaptureFixture
) -> None:
    for kind in ("received", "measured"):
        await trail.gate.audit("c1", kind, {})
    trail.delete_from(2)

    wait = await anchor_once(trail.gate)

    assert wait == REANCHOR_EVERY_S and len(trail.stream.events) == 2
    [refusal] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "does not match its anchor in the stream: truncated" in refusal.getMessage()


async def test_a_failed_anchoring_is_tried_again_soon(trail: Trail) -> None:
    async def unreachable() -> AnchorReading:
        raise TimeoutError("NATS is away")

    trail.gate.newest_anchor = unreachable

    assert await anchor_once(trail.gate) == REANCHOR_RETRY_S


# --- the attacks of the review: stripped signatures, garbage over the anchor ----------------------


async def test_a_head_whose_signature_was_stripped_is_not_extended(trail: Trail) -> None:
    """Its hash still matches the anchor; only the signature is gone. Signing onto it would
    chain the gatekeeper's next record to a record it no longer vouches for."""
    for kind in ("received", "measured"):
        await trail.gate.audit("c1", kind, {})
    trail.strip_signatures(from_seq=2)
    announced = len(trail.stream.events)

    with pytest.raises(TrailTampered, match="seq 2: its signature was removed or replaced"):
        await trail.gate.audit("c1", "approved", {})
    with pytest.raises(TrailTampered):
        await trail.gate.reanchor()

    assert await trail.records() == [1, 2] and len(trail.stream.events) == announced


async def test_a_forgery_appended_to_a_stripped_trail_is_not_extended(trail: Trail) -> None:
    """The reviewer's attack: every signature stripped, a correctly chained approval by alice
    appended after the anchored head. Its hash check passed; its signature check does not."""
    for kind in ("received", "measured", "awaiting_approval"):
        await trail.gate.audit("c1", kind, {"task": "t"})
    trail.strip_signatures()
    forged = await trail.gate.store.append_audit(
        "c1", "approved", "alice", {"approver": "alice"}, signer=AuditSigner.generate()
    )
    trail.strip_signatures(from_seq=forged.seq)

    with pytest.raises(TrailTampered, match="seq 3: its signature was removed or replaced"):
        await trail.gate.audit("c1", "applied", {})
    # an unsigned anchor of the forgery on change.recorded is no anchor: read past, to seq 3
    trail.stream.recorded.append(recorded_at(forged))
    with pytest.raises(TrailTampered, match="seq 3: its signature was removed or replaced"):
        await trail.gate.audit("c1", "applied", {})

    assert await trail.records() == [1, 2, 3, 4]


async def test_a_head_never_anchored_must_be_signed_too(trail: Trail) -> None:
    """A forged record after the anchored one: the anchor holds, the head does not."""
    await trail.gate.audit("c1", "received", {})
    await trail.gate.store.append_audit(
        "c1", "approved", "alice", {}, signer=AuditSigner.generate()
    )

    with pytest.raises(TrailTampered, match="newest record, seq 2, is not signed by this"):
        await trail.gate.audit("c1", "applied", {})


async def test_garbage_over_the_anchor_does_not_hide_a_cut(trail: Trail) -> None:
    """The newest ``change.recorded`` unreadable once meant "no anchor": records cut off, then
    garbage on the subject, and the gatekeeper reused the removed seqs. It reads back past it
    to the newest valid anchor now."""
    for kind in ("received", "measured", "awaiting_approval"):
        await trail.gate.audit("c1", kind, {})
    trail.delete_from(2)
    trail.stream.recorded += [b"garbage", b'{"records": []}']

    with pytest.raises(TrailTampered, match="trail ends at seq 1, but the stream anchored seq 3"):
        await trail.gate.audit("c1", "approved", {})

    assert await trail.records() == [1]


async def test_a_stream_holding_no_valid_anchor_stops_the_trail(trail: Trail) -> None:
    """Messages on ``change.recorded`` but none a valid anchor: nothing to check against, so
    nothing written (a new, empty stream is another matter: it has no anchor yet)."""
    await trail.gate.audit("c1", "received", {})
    trail.stream.recorded[:] = [b"garbage"]

    with pytest.raises(TrailTampered, match="cannot be checked against its anchor in the stream"):
        await trail.gate.audit("c1", "measured", {})
    with pytest.raises(TrailTampered):
        await trail.gate.reanchor()

    assert await trail.records() == [1]


async def test_garbage_behind_a_holding_anchor_changes_nothing(trail: Trail) -> None:
    """The anchor read back holds: the trail goes on, and the next anchor is valid again."""
    await trail.gate.audit("c1", "received", {})
    trail.stream.recorded.append(b"garbage")

    await trail.gate.audit("c1", "measured", {})

    reading = await trail.stream.newest_anchor()
    assert await trail.records() == [1, 2]
    assert reading.head is not None and reading.head.seq == 2 and reading.problems == []


def recorded_at(record: AuditRecord) -> bytes:
    """The ``change.recorded`` the gatekeeper publishes for ``record``, as stored."""
    return announcement(record).model_dump_json().encode()

"""The change list `ratchet changes` shows (one line per change, summarised from the audit trail),
and the pages of the whole trail `ratchet audit` reads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ratchet.audit import AuditSigner
from ratchet.queries import AUDIT_PAGE_BYTES, AuditQuery, audit_page, summarize
from ratchet.store import AuditRecord, open_store

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def trail(*entries: tuple[str, str, dict[str, Any]]) -> list[AuditRecord]:
    """Audit records in seq order, one minute apart: (change id, kind, payload)."""
    seqs: Iterator[int] = iter(range(1, len(entries) + 1))
    return [
        AuditRecord(
            seq=(seq := next(seqs)),
            change_id=change_id,
            kind=kind,
            actor="test",
            payload=payload,
            at=T0 + timedelta(minutes=seq),
            prev_hash="0" * 64,
            hash=f"{seq:064d}",
        )
        for change_id, kind, payload in entries
    ]


def test_status_is_the_latest_kind_per_change_newest_first() -> None:
    records = trail(
        ("a", "received", {"task": "answer-only", "failures": 20}),
        ("b", "received", {"task": "extract", "failures": 21}),
        ("a", "measured", {"diff": 0.2}),
        ("b", "invalid", {"problems": ["empty"]}),
        ("a", "approved", {"approver": "policy"}),
        ("a", "applied", {"version": 3}),
    )

    summaries = summarize(records)

    assert [(s.change_id, s.task, s.status) for s in summaries] == [
        ("a", "answer-only", "applied"),
        ("b", "extract", "invalid"),
    ]
    assert summaries[0].updated_at == T0 + timedelta(minutes=6)
    assert summaries[1].updated_at == T0 + timedelta(minutes=4)


def test_task_comes_from_whichever_record_names_it() -> None:
    records = trail(
        ("a", "measured", {"diff": 0.0}),
        ("a", "rejected", {"task": "answer-only", "reason": "no case improved"}),
    )

    [summary] = summarize(records)

    assert (summary.task, summary.status) == ("answer-only", "rejected")


def test_the_proposer_is_the_actor_of_the_received_record() -> None:
    """Who proposed is the name the gatekeeper recorded from the proposal's subject, never a
    name a record's payload carries."""
    records = trail(
        ("a", "received", {"task": "t", "proposer": "mallory"}),
        ("b", "measured", {"diff": 0.0}),
    )
    records[0] = records[0].model_copy(update={"actor": "client"})

    summaries = {s.change_id: s.proposer for s in summarize(records)}

    assert summaries == {"a": "client", "b": "?"}


def test_change_without_a_task_shows_a_placeholder() -> None:
    [summary] = summarize(trail(("a", "measured", {"diff": 0.0})))

    assert summary.task == "?"


def test_no_records_no_changes() -> None:
    assert summarize([]) == []


async def test_summarize_reads_a_real_audit_trail(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/t.db") as store:
        signer = AuditSigner.generate()
        for change_id, kind, payload in [
            ("old", "received", {"task": "t1", "failures": 20}),
            ("new", "received", {"task": "t2", "failures": 20}),
            ("old", "rolled_back", {"before": 0.8}),
            ("new", "kept", {"after": 0.9}),
        ]:
            await store.append_audit(change_id, kind, "gatekeeper", payload, signer=signer)
        records = await store.audit()

    assert [(s.change_id, s.task, s.status) for s in summarize(records)] == [
        ("new", "t2", "kept"),
        ("old", "t1", "rolled_back"),
    ]


def test_reports_that_do_not_move_a_change_are_not_its_status() -> None:
    records = trail(
        ("a", "received", {"task": "answer-only"}),
        ("a", "kept", {}),
        ("a", "holdout", {"lift": 0.1}),
        ("a", "decision_refused", {"why": "late"}),
        ("ghost", "decision_refused", {"why": "no such change"}),
    )

    summaries = summarize(records)

    assert [(s.change_id, s.status) for s in summaries] == [("a", "kept")]


# --- audit pages ---------------------------------------------------------------------------------


def read_all(records: list[AuditRecord], limit: int) -> list[list[int]]:
    """Page through ``records`` as `ratchet audit` does; the seqs of each page."""
    pages: list[list[int]] = []
    after = 0
    while True:
        page = audit_page(records, AuditQuery(after_seq=after, limit=limit))
        pages.append([r.seq for r in page.records])
        if not page.more:
            return pages
        after = page.records[-1].seq


def test_audit_pages_cover_the_trail_once_in_order() -> None:
    records = trail(*[("a", "measured", {"i": i}) for i in range(7)])

    assert read_all(records, limit=3) == [[1, 2, 3], [4, 5, 6], [7]]
    assert read_all(records, limit=500) == [[1, 2, 3, 4, 5, 6, 7]]
    assert read_all([], limit=3) == [[]]


def test_audit_pages_skip_missing_seqs() -> None:
    """A removed record leaves a gap; paging goes on past it (verifying names the gap)."""
    records = [r for r in trail(*[("a", "measured", {})] * 5) if r.seq != 3]

    assert read_all(records, limit=2) == [[1, 2], [4, 5]]


def test_an_audit_page_stays_under_the_byte_budget_but_never_stalls() -> None:
    big = "x" * (AUDIT_PAGE_BYTES // 3)
    records = trail(*[("a", "measured", {"blob": big}) for _ in range(4)])

    pages = read_all(records, limit=500)

    assert pages == [[1, 2], [3, 4]]
    huge = trail(("a", "measured", {"blob": "x" * (2 * AUDIT_PAGE_BYTES)}))
    assert read_all(huge, limit=500) == [[1]]


def test_an_audit_page_holds_at_most_500_records() -> None:
    with pytest.raises(ValidationError):
        AuditQuery(limit=501)

"""Request/reply bodies for the ``query.*`` subjects (core NATS, outside every stream)."""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, Field

from ratchet.contracts import ChangeProposed
from ratchet.store import AuditRecord


class FailureCount(BaseModel):
    """How many failures a task has had since a moment (inclusive), as ``query.count`` asks."""

    task: str
    since: AwareDatetime | None = None


class ProposeRequest(BaseModel):
    task: str


class ProposeReply(BaseModel):
    change: ChangeProposed | None = None
    error: str | None = None


class ChangesQuery(BaseModel):
    task: str | None = None


class ChangeQuery(BaseModel):
    change_id: str


AUDIT_PAGE_RECORDS = 500
AUDIT_PAGE_BYTES = 512 * 1024  # half of NATS's default 1 MB message limit


class AuditQuery(BaseModel):
    """One page of the whole audit trail: the records after ``after_seq``, in seq order."""

    after_seq: int = Field(default=0, ge=0)
    limit: int = Field(default=AUDIT_PAGE_RECORDS, ge=1, le=AUDIT_PAGE_RECORDS)


class AuditPage(BaseModel):
    records: list[AuditRecord]
    more: bool = Field(description="Records follow: ask again after the last one's seq.")


def audit_page(trail: list[AuditRecord], query: AuditQuery) -> AuditPage:
    """The page of ``trail`` that ``query`` asks for, cut short where it would grow past
    ``AUDIT_PAGE_BYTES`` (a measurement's record alone can take kilobytes); never empty while
    records remain, so a reader paging by seq always moves on."""
    after = [r for r in trail if r.seq > query.after_seq]
    page: list[AuditRecord] = []
    size = 0
    for record in after[: query.limit]:
        size += len(record.model_dump_json())
        if page and size > AUDIT_PAGE_BYTES:
            break
        page.append(record)
    return AuditPage(records=page, more=len(page) < len(after))


class ChangeSummary(BaseModel):
    change_id: str
    task: str
    status: str
    updated_at: datetime


# Records that report on a change without moving it: they never become its status.
NOT_A_STATUS = {"holdout", "decision_refused"}


def summarize(records: list[AuditRecord]) -> list[ChangeSummary]:
    """One line per change from its audit records: the latest step is its status."""
    by_change: dict[str, list[AuditRecord]] = {}
    for record in records:
        by_change.setdefault(record.change_id, []).append(record)
    summaries = []
    for change_id, trail in by_change.items():
        task = next((str(r.payload["task"]) for r in trail if "task" in r.payload), "?")
        steps = [r for r in trail if r.kind not in NOT_A_STATUS]
        if not steps:  # only refused decisions: no change of that id reached the gatekeeper
            continue
        summaries.append(
            ChangeSummary(
                change_id=change_id, task=task, status=steps[-1].kind, updated_at=trail[-1].at
            )
        )
    return sorted(summaries, key=lambda s: s.updated_at, reverse=True)

"""Request/reply bodies for the ``query.*`` subjects (core NATS, outside every stream)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from ratchet.contracts import ChangeProposed
from ratchet.store import AuditRecord


class ProposeRequest(BaseModel):
    task: str


class ProposeReply(BaseModel):
    change: ChangeProposed | None = None
    error: str | None = None


class ChangesQuery(BaseModel):
    task: str | None = None


class ChangeQuery(BaseModel):
    change_id: str


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

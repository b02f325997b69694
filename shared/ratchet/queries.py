"""Request/reply bodies for the ``query.*`` subjects (core NATS, outside every stream).

No reply may be larger than NATS carries (a reply over the server's max_payload is never sent,
and the asker only sees a timeout). Replies that are lists are cut to ``REPLY_BYTES`` by
:func:`list_reply`, which says what it left out in the ``Ratchet-Trimmed`` header (the CLI shows
it); the audit trail is read in pages (:class:`AuditPage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from faststream.nats import NatsResponse
from pydantic import AwareDatetime, BaseModel, Field

from ratchet.contracts import MAX_MESSAGE_BYTES, ChangeProposed
from ratchet.store import AuditRecord

REPLY_BYTES = MAX_MESSAGE_BYTES  # like every message: room for headers under NATS's 1 MiB
TRIMMED_HEADER = "Ratchet-Trimmed"
MAX_FAILURES_PER_QUERY = 1_000  # what one query.failures or query.groups reads from the store


def fitting(items: Sequence[BaseModel], budget: int = REPLY_BYTES) -> list[bytes]:
    """The JSON of the first ``items`` whose array fits in ``budget`` bytes."""
    kept: list[bytes] = []
    size = 2  # the brackets
    for item in items:
        encoded = item.model_dump_json().encode()
        size += len(encoded) + 1
        if size > budget:
            break
        kept.append(encoded)
    return kept


def list_reply(items: Sequence[BaseModel], *, noun: str, shortened: str = "") -> NatsResponse:
    """``items`` as a JSON array, cut where it would outgrow one reply. A reply that is not what
    was asked for says so in ``TRIMMED_HEADER``, in words for a person: what ``shortened`` says
    was done to the items to fit, and how many were left out ("12 of 20 failures left out")."""
    kept = fitting(items)
    limit = f"a reply may not exceed {REPLY_BYTES // 1024} KiB"
    notes = [f"{shortened} to fit in one reply"] if shortened else []
    if len(kept) < len(items):
        notes.append(f"{len(items) - len(kept)} of {len(items)} {noun} left out")
    headers = {"content-type": "application/json"}
    if notes:
        headers[TRIMMED_HEADER] = f"{'; '.join(notes)} ({limit})"
    return NatsResponse(body=b"[" + b",".join(kept) + b"]", headers=headers)


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
    public_key: str | None = Field(
        default=None,
        description="The key the gatekeeper signs records with (ed25519:<base64>); a verifier "
        "may pin its own copy instead.",
    )


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
    proposer: str = Field(
        default="?", description="Who proposed it: the actor of its received record."
    )


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
        proposer = next((r.actor for r in trail if r.kind == "received"), "?")
        steps = [r for r in trail if r.kind not in NOT_A_STATUS]
        if not steps:  # only refused decisions: no change of that id reached the gatekeeper
            continue
        summaries.append(
            ChangeSummary(
                change_id=change_id,
                task=task,
                status=steps[-1].kind,
                updated_at=trail[-1].at,
                proposer=proposer,
            )
        )
    return sorted(summaries, key=lambda s: s.updated_at, reverse=True)

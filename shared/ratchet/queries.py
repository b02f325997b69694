"""Request/reply bodies for the ``query.*`` subjects (core NATS, outside every stream).

No reply may be larger than NATS carries (a reply over the server's max_payload is never sent,
and the asker only sees a timeout). Replies that are lists are cut to ``REPLY_BYTES`` by
:func:`list_reply`, which says what it left out in the ``Ratchet-Trimmed`` header (the CLI shows
it), after :func:`shortened_to_fit` has tried shorter texts; the audit trail is read in pages
(:class:`AuditPage`), and so may the failures be (:class:`FailuresQuery` with ``paged``, answered
by a :class:`FailuresPage`), each failure whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, Self, TypeVar

from faststream.nats import NatsResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from ratchet.contracts import (
    MAX_MESSAGE_BYTES,
    CanaryStats,
    CaseId,
    ChangeId,
    ChangeProposed,
    Check,
    GateStage,
    RunId,
)
from ratchet.store import AuditRecord, FailureQuery, FailureRecord

REPLY_BYTES = MAX_MESSAGE_BYTES  # like every message: room for headers under NATS's 1 MiB
TRIMMED_HEADER = "Ratchet-Trimmed"
MAX_FAILURES_PER_QUERY = 1_000  # what one query.failures or query.groups reads from the store
REPLY_TEXT_CHARS = (4_000, 1_000, 250)  # tried in turn when a reply's items do not fit
MIN_KEY_TIME = datetime(1970, 1, 1, tzinfo=UTC)  # a failure key's time: what the stores can hold
MAX_KEY_TIME = datetime(9000, 1, 1, tzinfo=UTC)

M = TypeVar("M", bound=BaseModel)


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


def shortened_to_fit(
    items: Sequence[M],
    cut: Callable[[M, int | None], M],
    *,
    texts: str,
    budget: int = REPLY_BYTES,
) -> tuple[list[M], str]:
    """Every one of ``items`` in one reply of ``budget`` bytes if that can be done by cutting
    their long texts (``cut(item, chars)``; ``chars`` None: to the message limits only) to the
    longest of ``REPLY_TEXT_CHARS`` at which all fit, so a reader gets every item it asked for,
    only shortened, with a note naming the ``texts`` cut; else cut to the shortest, and
    :func:`list_reply` leaves out the last that still do not fit."""
    shown = [cut(item, None) for item in items]
    if _size(shown) <= budget:
        return shown, ""
    for chars in REPLY_TEXT_CHARS:
        shown = [cut(item, chars) for item in items]
        if _size(shown) <= budget:
            break
    return shown, f"{texts} cut to {chars} characters"


def _size(items: Sequence[BaseModel]) -> int:
    return 2 + sum(len(item.model_dump_json().encode()) + 1 for item in items)


class FailureKey(BaseModel):
    """Where a failure stands in the newest-first order every failure query uses: by
    ``logged_at``, then by ``run_id``, both descending (how the stores sort them)."""

    logged_at: AwareDatetime
    run_id: RunId

    @field_validator("logged_at")
    @classmethod
    def _within_the_calendar(cls, value: datetime) -> datetime:
        """A key the stores can compare: in UTC, with room for the microsecond past it."""
        if not MIN_KEY_TIME <= value <= MAX_KEY_TIME:
            raise ValueError(f"logged_at must be between {MIN_KEY_TIME} and {MAX_KEY_TIME}")
        return value.astimezone(UTC)

    @classmethod
    def of(cls, failure: FailureRecord) -> Self:
        return cls(logged_at=failure.logged_at, run_id=failure.run_id)


class FailuresQuery(FailureQuery):
    """``query.failures``: the stored failures matching the filters, newest first, at most
    ``limit`` (``MAX_FAILURES_PER_QUERY`` at most).

    Without ``paged`` the reply is a plain JSON array that holds every failure asked for, its
    long texts shortened if that is what it takes to fit in one reply (the proposer reads them
    so); with ``paged`` it is a :class:`FailuresPage` of whole failures, as many as fit, and a
    reader asks again ``after`` the last one until no ``more`` remain (``ratchet failures``)."""

    after: FailureKey | None = Field(
        default=None,
        description="Only failures after this one in the newest-first order (older ones, or "
        "ones logged at the same instant with a smaller run_id): the key of the last failure "
        "of the page before.",
    )
    paged: bool = Field(
        default=False,
        description="Reply with a FailuresPage of whole failures instead of one array whose "
        "texts may be shortened to fit.",
    )


class FailuresPage(BaseModel):
    """One reply of a paged ``query.failures``: failures whole (within the message limits),
    newest first, as many of those asked for as fit in one reply; never empty while any
    remain."""

    failures: list[FailureRecord]
    more: bool = Field(
        description="Failures matching the query follow these: ask again with ``after`` set "
        "to the last one's key (and ``limit`` to how many more are wanted)."
    )

    def next_query(self, query: FailuresQuery, remaining: int) -> FailuresQuery | None:
        """What to ask for the page after this one (``query`` asked for this one) when
        ``remaining`` more failures are wanted; None when there is nothing more to ask."""
        if not (self.more and self.failures) or remaining <= 0:
            return None
        update = {"after": FailureKey.of(self.failures[-1]), "limit": remaining, "paged": True}
        return query.model_copy(update=update)


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
    canary: CanaryStats | None = Field(
        default=None,
        description="The canary's live counts and bounds: as they stand while it runs (status "
        '"canary"), as they decided it once it is over ("promoted", "canary_rolled_back").',
    )


# Records that report on a change without moving it: they never become its status.
NOT_A_STATUS = {"holdout", "decision_refused"}
CANARY_OUTCOMES = {"promoted", "canary_rolled_back"}


def summarize(
    records: list[AuditRecord], canaries: Mapping[str, CanaryStats] | None = None
) -> list[ChangeSummary]:
    """One line per change from its audit records: the latest step is its status.
    ``canaries``: the live counts of canaries still running, by change id (the gatekeeper's
    ledger holds them; the trail only their start and outcome)."""
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
        outcome = next((r for r in trail if r.kind in CANARY_OUTCOMES), None)
        canary = (
            CanaryStats.model_validate(outcome.payload["stats"])
            if outcome is not None
            else (canaries or {}).get(change_id)
        )
        summaries.append(
            ChangeSummary(
                change_id=change_id,
                task=task,
                status=steps[-1].kind,
                updated_at=trail[-1].at,
                proposer=proposer,
                canary=canary,
            )
        )
    return sorted(summaries, key=lambda s: s.updated_at, reverse=True)


# --- a change's gate runs (query.runs) -----------------------------------------------------------

RUNS_QUERY_CASES = 50  # the cases one query.runs may name
RUNS_QUERY_REPEATS = 10  # and the repeats of each arm it may ask for: at most 1,000 runs read


class RunsQuery(BaseModel):
    """Which gate runs of one change to show (``query.runs``): both arms' runs of ``case_ids``
    in one stage of its gate, the first ``repeats`` repeats of each. For people (the console,
    the CLI); the proposer may not ask it, since it shows the gate's cases."""

    model_config = ConfigDict(extra="forbid")

    change_id: ChangeId
    stage: GateStage = "measure"
    case_ids: list[CaseId] = Field(max_length=RUNS_QUERY_CASES)
    repeats: int = Field(default=RUNS_QUERY_REPEATS, ge=1, le=RUNS_QUERY_REPEATS)


class GateRun(BaseModel):
    """One run of a gate measurement as ``query.runs`` shows it: what one arm answered on one
    repeat and how it scored. It carries no run id: a gate run's id holds its change's secret
    nonce, and whoever knew it could request a live run under the id of a gate run still to
    come (the change's check after applying, its holdout) and so keep the real one from counting;
    the case, arm and repeat name the run instead."""

    arm: Literal["current", "candidate"]
    repeat: int
    output: str | None = Field(default=None, description="None while only its score is stored.")
    error: str | None = Field(default=None, description="Why the run crashed, if it did.")
    prompt_version: int | None = None
    score: float | None = None
    scorer: str | None = Field(default=None, description="None while the run has no score yet.")
    unscored_reason: str | None = None
    problems: list[str] = Field(default_factory=list)


class GateCase(BaseModel):
    """One case of a gate measurement with its runs, current arm first, by repeat. ``input`` and
    ``check`` are the gatekeeper's, as its runs carried them (None while only scores are
    stored)."""

    case_id: str
    input: str | None = None
    check: Check | None = None
    runs: list[GateRun] = Field(default_factory=list)

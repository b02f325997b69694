"""The store interface every backend implements, and the records it keeps.

Services depend on :class:`Store` only; which database sits behind it is configuration
(see :func:`ratchet.store.open_store`). ``tests/unit/test_store_contract.py`` is the contract:
a backend is done when it passes that suite.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_jsonable_python

from ratchet.audit import GENESIS_HASH, AuditSigner, canonical_json, record_hash
from ratchet.contracts import EXECUTOR_ORIGIN, RunCompleted, RunScored, TraceStep, utcnow


class StoredRun(BaseModel):
    """A run as far as it is known: the executor's and evaluator's events arrive in any order.
    ``origin``: who ran it, as both events say ("executor", or "app:<name>" for a reported run)."""

    run_id: str
    task: str
    origin: str = EXECUTOR_ORIGIN
    completed: RunCompleted | None = None
    scored: RunScored | None = None


# Where a gate run belongs, kept beside it (columns, or fields) so that one change's runs can be
# found without reading every run: its change, stage, case, arm and repeat (RunContext's fields).
GATE_PLACE = ("gate_change", "gate_stage", "gate_case", "gate_arm", "gate_repeat")


def gate_place(event: RunCompleted | RunScored) -> dict[str, str | int | None]:
    """The ``GATE_PLACE`` fields of the run ``event`` is about: its context for a gate run, all
    None for a live run (whatever its context names: only the gatekeeper can make a gate run, so
    a live run's context never places it among a change's runs)."""
    context = event.context
    if context.purpose != "gate":
        return dict.fromkeys(GATE_PLACE)
    values = (context.change_id, context.stage, context.case_id, context.arm, context.repeat)
    return dict(zip(GATE_PLACE, values, strict=True))


class FailureRecord(BaseModel):
    """A run that scored below the threshold, with what the proposer needs to learn from it."""

    run_id: str
    task: str
    input: str
    output: str
    score: float
    problems: list[str] = Field(default_factory=list)
    trace: list[TraceStep] = Field(default_factory=list)
    prompt_version: int
    rules_sha256: str
    model: str
    logged_at: AwareDatetime = Field(default_factory=utcnow)
    origin: str = Field(
        default=EXECUTOR_ORIGIN,
        description='Where the run ran: "executor", or "app:<name>" for a production run an '
        "instrumented app reported (records from before origins were kept: the executor).",
    )

    @field_validator("logged_at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class FailureQuery(BaseModel):
    """Which failures to list: all filters combine; results come newest first.

    The time range is half-open (``since <= logged_at < until``), so consecutive windows never
    count a failure twice. ``problem`` matches a case-insensitive substring of any problem;
    ``origin`` is exact ("executor", "app:<name>").
    """

    task: str | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    problem: str | None = None
    origin: str | None = None
    limit: int = Field(default=100, ge=1)


class AuditRecord(BaseModel):
    """One entry of the append-only audit trail; ``hash`` chains it to the entry before, and
    ``signature`` is the writer's signature of that hash (None on records from before signing;
    see :mod:`ratchet.audit`)."""

    model_config = ConfigDict(frozen=True)

    seq: int
    change_id: str
    kind: str
    actor: str
    payload: dict[str, Any]
    at: AwareDatetime
    prev_hash: str
    hash: str
    key_id: str | None = None
    signature: str | None = None


def jsonable_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as it will read back from storage (datetimes as text, tuples as lists, ...).

    Hashing this form, not the caller's objects, keeps the hash reproducible from the stored row.
    """
    normalized: dict[str, Any] = json.loads(canonical_json(to_jsonable_python(payload)))
    return normalized


def next_audit_record(
    head: tuple[int, str] | None,
    change_id: str,
    kind: str,
    actor: str,
    payload: dict[str, Any],
    signer: AuditSigner,
) -> AuditRecord:
    """The record that follows ``head`` (its seq and hash; None for the first) in the hash chain,
    signed by ``signer``.

    Built here and nowhere else, so every backend stores exactly what
    :func:`ratchet.audit.verify_trail` checks; a backend only finds the head and stores the row."""
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    payload = jsonable_payload(payload)
    at = utcnow()
    hash_ = record_hash(prev_hash, seq, change_id, kind, actor, payload, at)
    return AuditRecord(
        seq=seq,
        change_id=change_id,
        kind=kind,
        actor=actor,
        payload=payload,
        at=at,
        prev_hash=prev_hash,
        hash=hash_,
        key_id=signer.key.id,
        signature=signer.sign(hash_),
    )


class Store(ABC):
    """Runs, failures and the audit trail, shared by the failure-store service and the gatekeeper.

    Every write is idempotent or append-only, because events arrive at least once.
    """

    @abstractmethod
    async def save_completed(self, run: RunCompleted) -> StoredRun:
        """Record a run's output (upsert by run id) and return what is known of the run."""

    @abstractmethod
    async def save_scored(self, score: RunScored) -> StoredRun:
        """Record a run's score (upsert by run id) and return what is known of the run."""

    @abstractmethod
    async def get_run(self, run_id: str) -> StoredRun | None:
        """The run, or None if neither of its events has been saved."""

    @abstractmethod
    async def gate_runs(
        self, change_id: str, stage: str, case_ids: list[str], repeats: int
    ) -> list[StoredRun]:
        """The gate runs of one change's ``stage`` on ``case_ids``, both arms, with a repeat below
        ``repeats``; at most ``2 * len(case_ids) * repeats`` of them, by case, arm and repeat.
        Live runs are never among them."""

    @abstractmethod
    async def add_failure(self, failure: FailureRecord) -> bool:
        """Log a failure once: False (and nothing changed) if that run is already a failure."""

    @abstractmethod
    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        """Failures matching ``query``, newest first, at most ``query.limit``."""

    @abstractmethod
    async def count_failures(self, task: str, since: datetime | None = None) -> int:
        """How many failures a task has had (since ``since``, inclusive)."""

    @abstractmethod
    async def append_audit(
        self,
        change_id: str,
        kind: str,
        actor: str,
        payload: dict[str, Any],
        *,
        signer: AuditSigner,
    ) -> AuditRecord:
        """Append to the one global hash chain, signed by the trail's writer; safe when several
        processes append at once."""

    @abstractmethod
    async def audit(self, change_id: str | None = None) -> list[AuditRecord]:
        """The trail (or one change's part of it), ordered by seq."""

    @abstractmethod
    async def audit_head(self) -> AuditRecord | None:
        """The trail's newest record (the chain's head), or None while the trail is empty."""

    @abstractmethod
    async def audit_at(self, seq: int) -> AuditRecord | None:
        """The record at ``seq``, or None if there is none."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; the store is not used afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

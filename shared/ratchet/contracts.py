"""Every message Ratchet's services exchange, declared once.

Each event carries an ``id`` (also sent as the ``Nats-Msg-Id`` header, so JetStream drops a
duplicate publish) and a ``schema_version``. Ids of run events are derived from the run id, so a
service that redoes a run after a crash publishes the same id and the duplicate is dropped.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every message: an id for deduplication and a schema version for evolution."""

    model_config = ConfigDict(extra="forbid")
    subject: ClassVar[str]

    id: str = Field(default_factory=new_id)
    schema_version: int = SCHEMA_VERSION
    created_at: datetime = Field(default_factory=utcnow)


# --- runs ---------------------------------------------------------------------------------------


class Check(BaseModel):
    """A programmatic check of a run's output, used instead of the LLM judge when present.

    - ``exact``: the trimmed output equals ``expected`` (case-insensitive unless
      ``case_sensitive``).
    - ``any_of``: the output equals one of ``expected`` (a list).
    - ``regex``: ``expected`` matches somewhere in the output.
    - ``number``: the last number in the output is within ``tolerance`` of ``expected``.
    - ``json_shape``: the output parses as a JSON object holding the keys of ``expected`` with
      values of the named types ("str", "int", "float", "bool", "list", "dict"), or, where
      ``expected`` gives a literal value, that value.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exact", "any_of", "regex", "number", "json_shape"]
    expected: str | float | list[str] | dict[str, Any]
    tolerance: float = 0.0
    case_sensitive: bool = False


RunPurpose = Literal["live", "gate"]
GateStage = Literal["measure", "verify", "holdout"]


class RunContext(BaseModel):
    """Why a run happened: live traffic, or one run of a gate measurement of one change."""

    model_config = ConfigDict(extra="forbid")

    purpose: RunPurpose = "live"
    change_id: str | None = None
    case_id: str | None = None
    stage: GateStage | None = None
    arm: Literal["current", "candidate"] | None = None
    repeat: int = 0


class RunRequested(Event):
    """A run of a task on one input, from a client (live traffic only)."""

    subject: ClassVar[str] = "run.requested"
    purpose: ClassVar[RunPurpose] = "live"

    run_id: str = Field(default_factory=new_id)
    task: str
    input: str
    check: Check | None = None
    candidate_prompt: str | None = Field(
        default=None, description="Run with this task prompt instead of the stored one (gate runs)."
    )
    min_prompt_version: int | None = Field(
        default=None, description="Wait until the executor has seen this prompt version."
    )
    context: RunContext = Field(default_factory=RunContext)

    @model_validator(mode="after")
    def _purpose_fits_subject(self) -> RunRequested:
        """Gate runs come only on the gatekeeper's own subject, so nobody else can make one."""
        if self.context.purpose != self.purpose:
            raise ValueError(f"{self.subject} carries {self.purpose} runs only")
        return self


class GateRunRequested(RunRequested):
    """One run of a gate measurement; only the gatekeeper may publish these."""

    subject: ClassVar[str] = "run.gate.requested"
    purpose: ClassVar[RunPurpose] = "gate"


class TraceStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model", "tool", "error"]
    name: str
    input: str = ""
    output: str = ""
    ms: float = 0.0


class TokenUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class RunCompleted(Event):
    subject: ClassVar[str] = "run.completed"

    run_id: str
    task: str
    input: str
    check: Check | None = None
    context: RunContext = Field(default_factory=RunContext)
    output: str
    trace: list[TraceStep] = Field(default_factory=list)
    prompt_version: int = Field(
        description="Prompt-store revision; 0 = candidate or default prompt."
    )
    prompt_sha256: str
    rules_sha256: str
    model: str
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_ms: float
    error: str | None = Field(default=None, description="Set when the run crashed.")


class RunScored(Event):
    subject: ClassVar[str] = "run.scored"

    run_id: str
    task: str
    context: RunContext = Field(default_factory=RunContext)
    score: float | None = Field(
        ge=0.0, le=1.0, description="None when the run could not be scored."
    )
    problems: list[str] = Field(default_factory=list)
    scorer: str = Field(description='"check:<kind>" or "judge:<model>"')
    unscored_reason: str | None = None
    prompt_version: int | None = Field(
        default=None, description="The prompt version the run used (copied from the run)."
    )


class FailureLogged(Event):
    subject: ClassVar[str] = "failure.logged"

    run_id: str
    task: str
    score: float
    problems: list[str]


# --- changes ------------------------------------------------------------------------------------


class FailureGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    size: int
    run_ids: list[str]
    examples: list[str] = Field(default_factory=list)


class ChangeProposed(Event):
    subject: ClassVar[str] = "change.proposed"

    change_id: str = Field(default_factory=new_id)
    task: str
    base_version: int = Field(description="The prompt revision the proposal was written against.")
    proposed_prompt: str
    rationale: str
    groups: list[FailureGroup] = Field(default_factory=list)
    failure_run_ids: list[str] = Field(default_factory=list)
    proposer: str = "proposer"
    margin: float = Field(
        default=0.0,
        ge=0.0,
        le=0.2,
        description="0: keep only if shown better. > 0: a change made for another reason (a "
        "rollback, a shorter prompt), kept if shown no worse than this share; it always needs a "
        "person, never the policy approver.",
    )


class Look(BaseModel):
    """The test statistic at one look, against that look's boundary."""

    model_config = ConfigDict(extra="forbid")

    n: int
    z: float
    efficacy_bound: float
    conditional_power: float | None


class Measurement(BaseModel):
    """The gate's evidence: a paired sequential test of the candidate against the current
    prompt on the same cases of the task's gate pool. Rates and lifts are shares (0.05 = 5
    points); pass counts are integers, out of ``cases * repeats``."""

    model_config = ConfigDict(extra="forbid")

    test: Literal["superiority", "non-inferiority"]
    margin: float
    alpha: float
    looks: list[int] = Field(description="Planned looks, in cases.")
    repeats: int
    verdict: Literal["superior", "non_inferior", "futile", "not_shown"]
    stopped_at: int = Field(description="The look (1-based) the test stopped at.")
    history: list[Look]
    cases: int
    current_passes: int
    candidate_passes: int
    lift: float = Field(description="Mean per-case difference, candidate minus current.")
    ci95: tuple[float, float] = Field(description="Unadjusted two-sided 95% interval of the lift.")
    lower_bound: float = Field(
        description="One-sided 95% bound of the lift, valid under early stopping."
    )
    runs: int = Field(description="Model runs spent (both arms, every repeat).")
    fixed: list[str] = Field(description="Cases the candidate passed more often.")
    broken: list[str] = Field(description="Cases the candidate passed less often.")
    flaky: list[str] = Field(description="Cases whose repeats disagreed under one prompt.")
    unscored: int = Field(description="Runs the evaluator could not score (counted as failed).")
    pool_sha256: str
    pool_size: int
    proposals_on_pool: int = Field(description="Changes measured on this pool, this one included.")
    pool_budget: int
    note: str = (
        "An approved lift is an overestimate: changes are kept because they measured well. "
        "The holdout measurement after keeping it reports the real lift."
    )

    @property
    def current_rate(self) -> float:
        return self.current_passes / (self.cases * self.repeats)

    @property
    def candidate_rate(self) -> float:
        return self.candidate_passes / (self.cases * self.repeats)

    @property
    def pool_overused(self) -> bool:
        return self.proposals_on_pool > self.pool_budget

    def sha256(self) -> str:
        """The evidence hash an approval must name."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class ChangeAwaitingApproval(Event):
    subject: ClassVar[str] = "change.awaiting_approval"

    change_id: str
    task: str
    base_version: int
    prompt_diff: str
    rationale: str
    measurement: Measurement
    evidence_sha256: str = Field(description="What an approval must name: measurement.sha256().")


class ChangeDecision(Event):
    change_id: str
    approver: str
    reason: str
    evidence_sha256: str = Field(
        description="The evidence decided on (from change.awaiting_approval); a decision that "
        "names other evidence, or comes before there is any, is refused and audited."
    )


class ChangeApproved(ChangeDecision):
    subject: ClassVar[str] = "change.approved"


class ChangeRejected(ChangeDecision):
    subject: ClassVar[str] = "change.rejected"


class ChangeApplied(Event):
    subject: ClassVar[str] = "change.applied"

    change_id: str
    task: str
    previous_version: int
    version: int
    prompt_sha256: str


class ChangeOutcome(Event):
    """What the check after applying found: the applied prompt against a fresh, concurrent control
    (the previous prompt) on gate-pool cases the decision did not use."""

    change_id: str
    task: str
    version: int = Field(description="The prompt revision current after this outcome.")
    cases: int
    repeats: int
    control_passes: int
    applied_passes: int
    served: bool = Field(description="Every applied-arm run used the applied version.")
    upper_bound: float = Field(description="One-sided 95% upper bound of the lift.")
    reason: str


class ChangeKept(ChangeOutcome):
    subject: ClassVar[str] = "change.kept"


class ChangeRolledBack(ChangeOutcome):
    subject: ClassVar[str] = "change.rolled_back"


class ChangeRecorded(Event):
    """The gatekeeper appended a step to a change's audit trail. Published after the append, so a
    follower that sees it finds the step with ``query.change``; it announces every step, also
    those no other event marks (``invalid``, ``stale``, ``holdout``, a decision taken or
    refused)."""

    subject: ClassVar[str] = "change.recorded"

    change_id: str
    kind: str = Field(description="The audit record's kind: received, measured, ..., holdout.")
    seq: int = Field(description="The record's place in the audit trail (see query.audit).")


class DeadLetter(BaseModel):
    """What lands on ``dlq.<subject>``: the original bytes and why they were given up on."""

    model_config = ConfigDict(extra="forbid")

    subject: str
    reason: str
    deliveries: int
    payload: str
    failed_at: datetime = Field(default_factory=utcnow)


EVENTS: tuple[type[Event], ...] = (
    RunRequested,
    GateRunRequested,
    RunCompleted,
    RunScored,
    FailureLogged,
    ChangeProposed,
    ChangeAwaitingApproval,
    ChangeApproved,
    ChangeRejected,
    ChangeApplied,
    ChangeKept,
    ChangeRolledBack,
    ChangeRecorded,
)

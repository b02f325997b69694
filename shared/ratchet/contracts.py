"""Every message Ratchet's services exchange, declared once.

Each event carries an ``id`` (also sent as the ``Nats-Msg-Id`` header, so JetStream drops a
duplicate publish) and a ``schema_version``. Ids of run events are derived from the run id, so a
service that redoes a run after a crash publishes the same id and the duplicate is dropped.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class RunContext(BaseModel):
    """Why a run happened: live traffic, or a gate measurement of one change."""

    model_config = ConfigDict(extra="forbid")

    purpose: RunPurpose = "live"
    change_id: str | None = None
    case_id: str | None = None
    arm: Literal["current", "candidate", "verify"] | None = None


class RunRequested(Event):
    subject: ClassVar[str] = "run.requested"

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


class ArmResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    success_rate: float
    scores: dict[str, float | None] = Field(description="Score by gate case id.")


class Measurement(BaseModel):
    """Before-and-after evidence on a task's fixed gate set."""

    model_config = ConfigDict(extra="forbid")

    cases: int
    current: ArmResult
    candidate: ArmResult
    per_case_diff: dict[str, int] = Field(
        description="candidate pass (1/0) minus current pass (1/0)"
    )
    diff: float = Field(description="candidate success rate minus current success rate")
    ci95: tuple[float, float]


class ChangeAwaitingApproval(Event):
    subject: ClassVar[str] = "change.awaiting_approval"

    change_id: str
    task: str
    base_version: int
    prompt_diff: str
    rationale: str
    measurement: Measurement


class ChangeDecision(Event):
    change_id: str
    approver: str
    reason: str


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
    change_id: str
    task: str
    before: float
    after: float
    version: int = Field(description="The prompt revision current after this outcome.")


class ChangeKept(ChangeOutcome):
    subject: ClassVar[str] = "change.kept"


class ChangeRolledBack(ChangeOutcome):
    subject: ClassVar[str] = "change.rolled_back"


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
)

"""Every message Ratchet's services exchange, declared once.

Each event carries an ``id`` (also sent as the ``Nats-Msg-Id`` header, so JetStream drops a
duplicate publish) and a ``schema_version``. Ids of run events are derived from the run id, so a
service that redoes a run after a crash publishes the same id and the duplicate is dropped.

How versions evolve. ``SCHEMA_VERSION`` is what producers write; a consumer accepts the versions in
``KNOWN_SCHEMA_VERSIONS`` and dead-letters any other with the reason ("schema_version 999 not
supported (knows 1)"), so a message from a newer producer is kept for later, never misread.

- An additive change keeps the version: a new optional field with a default, a new value where
  the readers ignore unknown ones, a looser limit. Models forbid unknown fields (a typo in a
  hand-written message is an error, not silently dropped), so upgrade the consumers of a message
  before the producers that start sending the new field.
- A breaking change bumps ``SCHEMA_VERSION``: a field removed, renamed, retyped or made required,
  a meaning changed, a limit tightened. Consumers first learn to read both versions (the new one
  is added to ``KNOWN_SCHEMA_VERSIONS``, the old one converted on reading), then producers switch,
  and the old version is dropped from ``KNOWN_SCHEMA_VERSIONS`` a release later.

Limits. Every text field and list has a limit, set in the "limits" section below and nowhere
else, so no message can outgrow what NATS carries and no consumer does unbounded work on one. A
message over a limit fails validation and is dead-lettered with the reason. Where a service writes
the text itself from what a model said (the executor's output and trace), it cuts the text to the
limit and names the cut fields on the run (:attr:`RunCompleted.truncated`) instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = frozenset({1})

# --- limits -------------------------------------------------------------------------------------
# Text limits count characters. In plain text a run at every limit is about 100 KB. JSON writes a
# control character as six bytes (\u0000), and the budget assumes that worst case too: any event
# filled to every limit with such characters stays under MAX_MESSAGE_BYTES, three quarters of
# NATS's default max_payload (1 MiB), which leaves room for headers (tests/unit/test_limits.py).
# Ids and task names are printable ASCII without quotes or backslashes, one byte each; they also
# go into headers and subjects, where a control character could forge a header.

MAX_MESSAGE_BYTES = 768 * 1024
CHANGE_ID_CHARS = 64
CASE_ID_CHARS = 100
RUN_ID_CHARS = 256  # room for a gate run's id: change, nonce, stage, arm, case and repeat
ID_CHARS = 300  # an event's id: a run id plus a suffix such as ".completed"
NAME_CHARS = 128  # task names, model labels, scorers, trace step names
SHA256_CHARS = 64
INPUT_CHARS = 16_000
OUTPUT_CHARS = 16_000
TRACE_STEPS = 16
TRACE_TEXT_CHARS = 2_000
ERROR_CHARS = 1_000
PROBLEMS = 16
PROBLEM_CHARS = 400
EXPECTED_JSON_CHARS = 4_000  # a check's expected value, as JSON
PROMPT_CHARS = 8_000
RATIONALE_CHARS = 4_000
REASON_CHARS = 2_000
DIFF_CHARS = 4 * PROMPT_CHARS + 1_000  # a unified diff of two prompts at their limit
GROUPS = 8
GROUP_EXAMPLES = 5
EXAMPLE_CHARS = 1_000  # one failure's problems, joined
FAILURE_RUN_IDS = 200  # of a proposal: the failures it used, and those its groups name in all
CASES = 500  # case ids in one list of a measurement
LOOKS = 64
REPEATS = 100
TRUNCATED_FIELDS = 8
MAX_VERSION = 2**63 - 1  # prompt versions are JetStream sequence numbers

EXECUTOR_ORIGIN = "executor"
# Run ids with a ':' belong to Ratchet: "gate:<change>..." (the gatekeeper's runs) and
# "app:<name>/<id>" (an app's reports). A client's run may not take one: its events would carry
# the same ids, and JetStream drops the second publish of an id as a repeat.
GATE_RUN_PREFIX = "gate:"
RESERVED_RUN_ID_CHAR = ":"
APP_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
"""An instrumented app's name: one subject token that also makes a NATS user name (app-<name>)."""

ID_PATTERN = r"^[\x20-\x21\x23-\x5b\x5d-\x7e]+$"  # printable ASCII but " and \


def _id(chars: int) -> Any:
    return StringConstraints(min_length=1, max_length=chars, pattern=ID_PATTERN)


Id = Annotated[str, _id(ID_CHARS)]
RunId = Annotated[str, _id(RUN_ID_CHARS)]
ChangeId = Annotated[str, _id(CHANGE_ID_CHARS)]
CaseId = Annotated[str, _id(CASE_ID_CHARS)]
# A task name is also its key in the prompt store (JetStream KV) and a word on a command line.
TASK_NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
TaskName = Annotated[
    str, StringConstraints(min_length=1, max_length=NAME_CHARS, pattern=TASK_NAME_PATTERN)
]
Name = Annotated[str, StringConstraints(max_length=NAME_CHARS)]
Sha256 = Annotated[str, StringConstraints(max_length=SHA256_CHARS)]
InputText = Annotated[str, StringConstraints(max_length=INPUT_CHARS)]
OutputText = Annotated[str, StringConstraints(max_length=OUTPUT_CHARS)]
TraceText = Annotated[str, StringConstraints(max_length=TRACE_TEXT_CHARS)]
ErrorText = Annotated[str, StringConstraints(max_length=ERROR_CHARS)]
Problem = Annotated[str, StringConstraints(max_length=PROBLEM_CHARS)]
Problems = Annotated[list[Problem], Field(max_length=PROBLEMS)]
PromptText = Annotated[str, StringConstraints(max_length=PROMPT_CHARS)]
Rationale = Annotated[str, StringConstraints(max_length=RATIONALE_CHARS)]
Reason = Annotated[str, StringConstraints(max_length=REASON_CHARS)]
CaseIds = Annotated[list[CaseId], Field(max_length=CASES)]


def clip(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start and "…" (``limit`` in all):
    how a service cuts text it writes itself to a field's limit."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """Base of every message: an id for deduplication and a schema version for evolution."""

    model_config = ConfigDict(extra="forbid")
    subject: ClassVar[str]

    id: Id = Field(default_factory=new_id)
    schema_version: int = SCHEMA_VERSION
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        """A version this code does not know may mean other fields or other meanings: refuse it
        (the message is dead-lettered with this reason) rather than read it as version 1."""
        if version not in KNOWN_SCHEMA_VERSIONS:
            known = ", ".join(map(str, sorted(KNOWN_SCHEMA_VERSIONS)))
            raise ValueError(f"schema_version {version} not supported (knows {known})")
        return version


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
    expected: str | float | list[str] | dict[str, Any] = Field(
        description=f"At most {EXPECTED_JSON_CHARS} characters as JSON."
    )
    tolerance: float = Field(default=0.0, ge=0.0)
    case_sensitive: bool = False

    @field_validator("expected")
    @classmethod
    def _bounded(cls, expected: Any) -> Any:
        """Measured as ASCII JSON, which is never shorter than what goes on the wire."""
        size = len(json.dumps(expected))
        if size > EXPECTED_JSON_CHARS:
            raise ValueError(
                f"expected is {size} characters as JSON, over the limit of {EXPECTED_JSON_CHARS}"
            )
        return expected


RunPurpose = Literal["live", "gate"]
GateStage = Literal["measure", "verify", "holdout"]


class RunContext(BaseModel):
    """Why a run happened: live traffic, or one run of a gate measurement of one change."""

    model_config = ConfigDict(extra="forbid")

    purpose: RunPurpose = "live"
    change_id: ChangeId | None = None
    case_id: CaseId | None = None
    stage: GateStage | None = None
    arm: Literal["current", "candidate"] | None = None
    repeat: int = Field(default=0, ge=0, lt=REPEATS)


class RunRequested(Event):
    """A run of a task on one input, from a client (live traffic only)."""

    subject: ClassVar[str] = "run.requested"
    purpose: ClassVar[RunPurpose] = "live"

    run_id: RunId = Field(default_factory=new_id)
    task: TaskName
    input: InputText
    check: Check | None = None
    candidate_prompt: PromptText | None = Field(
        default=None, description="Run with this task prompt instead of the stored one (gate runs)."
    )
    min_prompt_version: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VERSION,
        description="Run on this prompt version or a later one; a version the prompt store does "
        "not hold is refused (dead-lettered), not waited for.",
    )
    context: RunContext = Field(default_factory=RunContext)
    rollout_key: Annotated[str, _id(NAME_CHARS)] | None = Field(
        default=None,
        description="Who the run is for (a user, a conversation): while a change is in canary, "
        "one key always gets the same version. None: the run id decides.",
    )

    @model_validator(mode="after")
    def _purpose_fits_subject(self) -> RunRequested:
        """Gate runs come only on the gatekeeper's own subject, so nobody else can make one, and
        only gate runs have gate run ids, so nobody can take one's id first."""
        if self.context.purpose != self.purpose:
            raise ValueError(f"{self.subject} carries {self.purpose} runs only")
        if self.purpose == "gate" and not self.run_id.startswith(GATE_RUN_PREFIX):
            raise ValueError(f"a gate run's id starts with {GATE_RUN_PREFIX!r}")
        if self.purpose == "live" and RESERVED_RUN_ID_CHAR in self.run_id:
            raise ValueError(
                f"a run id may not contain {RESERVED_RUN_ID_CHAR!r} "
                "(Ratchet names its gate runs and apps' runs with it)"
            )
        return self


class GateRunRequested(RunRequested):
    """One run of a gate measurement; only the gatekeeper may publish these."""

    subject: ClassVar[str] = "run.gate.requested"
    purpose: ClassVar[RunPurpose] = "gate"

    run_id: RunId = Field(default_factory=lambda: f"{GATE_RUN_PREFIX}{new_id()}")


class TraceStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model", "tool", "error"]
    name: Name
    input: TraceText = ""
    output: TraceText = ""
    ms: float = Field(default=0.0, ge=0.0)


class TokenUsage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class RunCompleted(Event):
    subject: ClassVar[str] = "run.completed"

    run_id: RunId
    task: TaskName
    input: InputText
    check: Check | None = None
    context: RunContext = Field(default_factory=RunContext)
    output: OutputText
    trace: list[TraceStep] = Field(default_factory=list, max_length=TRACE_STEPS)
    prompt_version: int = Field(
        ge=0, description="Prompt-store revision; 0 = candidate or default prompt."
    )
    prompt_sha256: Sha256
    rules_sha256: Sha256
    model: Name
    usage: TokenUsage = Field(default_factory=TokenUsage)
    latency_ms: float = Field(ge=0.0)
    error: ErrorText | None = Field(default=None, description="Set when the run crashed.")
    truncated: list[Name] = Field(
        default_factory=list,
        max_length=TRUNCATED_FIELDS,
        description="Fields the executor cut to their limits: output, trace (steps left out or "
        "step texts cut), error.",
    )
    origin: Name = Field(
        default=EXECUTOR_ORIGIN,
        description='Who ran it: "executor", or "app:<name>" for a run an instrumented app '
        "reported (set by the service that received the report, from its subject).",
    )


def app_origin(app: str) -> str:
    """The origin of the runs the app ``app`` reports."""
    return f"app:{app}"


class RunReported(RunCompleted):
    """A run that an instrumented app (the SDK) finished and reports, published on
    ``run.reported.<app>``: the last subject token says which app, and each app's NATS user may
    publish only its own. The evaluator and the failure store read it as the ``run.completed`` of
    :meth:`completed`, with origin ``app:<app>``. The body names nobody (no ``origin``) and
    carries live runs only: gate runs come from the executor alone."""

    subject: ClassVar[str] = "run.reported"

    # never serialized: a report written with model_dump_json() must parse back (it would
    # otherwise carry the inherited default, which the check below refuses)
    origin: Name = Field(
        default=EXECUTOR_ORIGIN,
        exclude=True,
        description="Never sent: the subject names the app; a body that sets it is refused.",
    )

    @classmethod
    def subject_of(cls, who: str) -> str:
        return f"{cls.subject}.{who}"

    @model_validator(mode="after")
    def _live_and_unattributed(self) -> RunReported:
        if "origin" in self.model_fields_set:
            raise ValueError("a reported run names no origin: the subject says which app sent it")
        if self.context.purpose != "live":
            raise ValueError("an app reports live runs only")
        return self

    @field_validator("run_id")
    @classmethod
    def _room_for_the_app(cls, run_id: str) -> str:
        if len(run_id) > APP_RUN_ID_CHARS:
            raise ValueError(f"a reported run id has at most {APP_RUN_ID_CHARS} characters")
        return run_id

    def completed(self, app: str) -> RunCompleted:
        """The run as the services handle it, attributed to the app that published it. Its run
        id is ``app:<app>/<run id>``, so no app can report (or pre-empt) another's runs or the
        executor's."""
        fields = self.model_dump(exclude={"schema_version", "run_id", "id", "origin"})
        run_id = f"{app_origin(app)}/{self.run_id}"
        origin = app_origin(app)
        return RunCompleted(**fields, id=f"{run_id}.completed", run_id=run_id, origin=origin)


APP_RUN_ID_CHARS = RUN_ID_CHARS - 40  # room for "app:<name>/"


class RunScored(Event):
    subject: ClassVar[str] = "run.scored"

    run_id: RunId
    task: TaskName
    context: RunContext = Field(default_factory=RunContext)
    score: float | None = Field(
        ge=0.0, le=1.0, description="None when the run could not be scored."
    )
    problems: Problems = Field(default_factory=list)
    scorer: Name = Field(description='"check:<kind>" or "judge:<model>"')
    unscored_reason: Reason | None = None
    prompt_version: int | None = Field(
        default=None, ge=0, description="The prompt version the run used (copied from the run)."
    )
    origin: Name = Field(default=EXECUTOR_ORIGIN, description="Copied from the run.")
    judge_usage: TokenUsage = Field(
        default_factory=TokenUsage, description="What judging this run cost (0 for a check)."
    )


class FailureLogged(Event):
    subject: ClassVar[str] = "failure.logged"

    run_id: RunId
    task: TaskName
    score: float = Field(ge=0.0, le=1.0)
    problems: Problems
    origin: Name = Field(default=EXECUTOR_ORIGIN, description="Copied from the run.")


# --- changes ------------------------------------------------------------------------------------


class FailureGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Problem
    size: int = Field(ge=0)
    run_ids: list[RunId] = Field(description="Bounded by the query asked, or by the proposal.")
    examples: list[Annotated[str, StringConstraints(max_length=EXAMPLE_CHARS)]] = Field(
        default_factory=list, max_length=GROUP_EXAMPLES
    )


class Attributed(Event):
    """An event published on ``<subject>.<who>``: the subject's last token says who sent it.
    Each NATS user may publish only its own such subjects (``ratchet.natsconf``), so the name is
    one the server authenticated, and the body names nobody: a body that still carries a name
    (``proposer``, ``approver``) is malformed and dead-lettered, never believed."""

    @classmethod
    def subject_of(cls, who: str) -> str:
        """Where ``who`` publishes this kind of event."""
        return f"{cls.subject}.{who}"


class ChangeProposed(Attributed):
    """A proposed change, published on ``change.proposed.<who>``: ``proposer`` for the proposer
    service, ``client`` for a person's own change or a rollback made with the CLI."""

    subject: ClassVar[str] = "change.proposed"

    change_id: ChangeId = Field(default_factory=new_id)
    task: TaskName
    base_version: int = Field(
        ge=0, le=MAX_VERSION, description="The prompt revision the proposal was written against."
    )
    proposed_prompt: PromptText
    rationale: Rationale
    groups: list[FailureGroup] = Field(default_factory=list, max_length=GROUPS)
    failure_run_ids: list[RunId] = Field(default_factory=list, max_length=FAILURE_RUN_IDS)
    model: Name | None = Field(
        default=None,
        description="The model that wrote the prompt, as its publisher says (None: a person). "
        "A description, never who proposed: that is the subject's last token.",
    )
    margin: float = Field(
        default=0.0,
        ge=0.0,
        le=0.2,
        description="0: keep only if shown better. > 0: a change made for another reason (a "
        "rollback, a shorter prompt), kept if shown no worse than this share; it always needs a "
        "person, never the policy approver.",
    )

    @model_validator(mode="after")
    def _groups_bounded(self) -> ChangeProposed:
        grouped = sum(len(group.run_ids) for group in self.groups)
        if grouped > FAILURE_RUN_IDS:
            raise ValueError(f"the groups name {grouped} runs, over the limit of {FAILURE_RUN_IDS}")
        return self


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
    looks: list[int] = Field(max_length=LOOKS, description="Planned looks, in cases.")
    repeats: int = Field(ge=1, le=REPEATS)
    verdict: Literal["superior", "non_inferior", "futile", "not_shown"]
    stopped_at: int = Field(description="The look (1-based) the test stopped at.")
    history: list[Look] = Field(max_length=LOOKS)
    cases: int
    current_passes: int
    candidate_passes: int
    lift: float = Field(description="Mean per-case difference, candidate minus current.")
    ci95: tuple[float, float] = Field(description="Unadjusted two-sided 95% interval of the lift.")
    lower_bound: float = Field(
        description="One-sided 95% bound of the lift, valid under early stopping."
    )
    runs: int = Field(description="Model runs spent (both arms, every repeat).")
    fixed: CaseIds = Field(description="Cases the candidate passed more often.")
    broken: CaseIds = Field(description="Cases the candidate passed less often.")
    flaky: CaseIds = Field(description="Cases whose repeats disagreed under one prompt.")
    unscored: int = Field(description="Runs the evaluator could not score (counted as failed).")
    pool_sha256: Sha256
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

    change_id: ChangeId
    task: TaskName
    base_version: int = Field(ge=0)
    prompt_diff: Annotated[str, StringConstraints(max_length=DIFF_CHARS)]
    rationale: Rationale
    measurement: Measurement
    evidence_sha256: Sha256 = Field(description="What an approval must name: measurement.sha256().")


APPROVER_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
"""An approver's name: one subject token (no dots or wildcards) that also makes a NATS user name."""


class ChangeDecision(Attributed):
    """A decision on a change, published on ``<subject>.<approver>``: the last subject token is
    who decided. Each approver's NATS user may publish only its own two decision subjects, so the
    name is one the server authenticated; the body names nobody (a body that still carries an
    ``approver`` field is malformed and dead-lettered)."""

    change_id: ChangeId
    reason: Reason
    evidence_sha256: Sha256 = Field(
        description="The evidence decided on (from change.awaiting_approval); a decision that "
        "names other evidence, or comes before there is any, is refused and audited."
    )


class ChangeApproved(ChangeDecision):
    subject: ClassVar[str] = "change.approved"


class ChangeRejected(ChangeDecision):
    subject: ClassVar[str] = "change.rejected"


class ChangeApplied(Event):
    subject: ClassVar[str] = "change.applied"

    change_id: ChangeId
    task: TaskName
    previous_version: int = Field(ge=0)
    version: int = Field(ge=0)
    prompt_sha256: Sha256


class ChangeOutcome(Event):
    """What the check after applying found: the applied prompt against a fresh, concurrent control
    (the previous prompt) on gate-pool cases the decision did not use."""

    change_id: ChangeId
    task: TaskName
    version: int = Field(ge=0, description="The prompt revision current after this outcome.")
    cases: int
    repeats: int
    control_passes: int
    applied_passes: int
    served: bool = Field(description="Every applied-arm run used the applied version.")
    upper_bound: float = Field(description="One-sided 95% upper bound of the lift.")
    reason: Reason


class ChangeKept(ChangeOutcome):
    subject: ClassVar[str] = "change.kept"


class ChangeRolledBack(ChangeOutcome):
    subject: ClassVar[str] = "change.rolled_back"


# --- canary -------------------------------------------------------------------------------------


class CanaryStats(BaseModel):
    """Live scores of the two versions while a change is in canary, and the anytime-valid
    bounds of the lift (canary minus stable) that decide it (:mod:`ratchet.canary`)."""

    model_config = ConfigDict(extra="forbid")

    stable_version: int = Field(ge=0)
    canary_version: int = Field(ge=0)
    stable_runs: int = Field(ge=0)
    stable_score: float = Field(ge=0.0, description="Sum of the stable version's scores.")
    canary_runs: int = Field(ge=0)
    canary_score: float = Field(ge=0.0, description="Sum of the canary version's scores.")
    lift: float = Field(description="Canary mean minus stable mean (0 without runs).")
    lower: float = Field(description="Anytime-valid lower bound of the lift.")
    upper: float = Field(description="Anytime-valid upper bound of the lift.")
    margin: float = Field(ge=0.0, le=0.5, description="Promoted once lower > -margin.")
    alpha: float = Field(gt=0.0, lt=0.5)
    verdict: Literal["running", "not_worse", "worse", "undecided", "stopped"] = Field(
        default="running",
        description="stopped: a reviewer rejected the change while it was in canary.",
    )
    judge_tokens: int = Field(default=0, ge=0, description="Judge tokens spent on these runs.")


class ChangeCanaryStarted(Event):
    """An applied change now serves ``share`` of live traffic; the rest keeps the stable
    version. Which version a run gets is decided by its rollout key (or run id)."""

    subject: ClassVar[str] = "change.canary.started"

    change_id: ChangeId
    task: TaskName
    version: int = Field(ge=0, description="The canary version.")
    stable_version: int = Field(ge=0)
    share: float = Field(gt=0.0, lt=1.0)
    margin: float = Field(ge=0.0, le=0.5)
    max_runs: int = Field(ge=1, description="Canary-arm runs after which it stops undecided.")


class CanaryOutcome(Event):
    change_id: ChangeId
    task: TaskName
    version: int = Field(ge=0, description="The prompt revision current after this outcome.")
    stats: CanaryStats
    reason: Reason


class ChangePromoted(CanaryOutcome):
    """The canary was shown not worse than the stable version: it now serves all traffic."""

    subject: ClassVar[str] = "change.canary.promoted"


class ChangeCanaryRolledBack(CanaryOutcome):
    """The canary was shown worse (or not shown no worse within its runs): rolled back to the
    stable version, automatically."""

    subject: ClassVar[str] = "change.canary.rolled_back"


class AuditAnchor(BaseModel):
    """The audit trail's newest record as the gatekeeper published it: ``ratchet audit
    --verify`` checks the trail's end against the newest one in the stream."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(ge=1)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_id: str | None = Field(default=None, max_length=64)
    signature: str | None = Field(
        default=None, max_length=128, description="None for a record from before signing."
    )


class ChangeRecorded(Event):
    """The gatekeeper appended a step to a change's audit trail. Published after the append, so a
    follower that sees it finds the step with ``query.change``; it announces every step, also
    those no other event marks (``invalid``, ``stale``, ``holdout``, a decision taken or
    refused). Each one also anchors the trail's head in the stream, which only the gatekeeper
    may publish to and nobody may delete from; the gatekeeper announces its head again at start
    and daily, so the stream's retention always keeps a recent anchor."""

    subject: ClassVar[str] = "change.recorded"

    change_id: str
    kind: str = Field(description="The audit record's kind: received, measured, ..., holdout.")
    seq: int = Field(description="The record's place in the audit trail (see query.audit).")
    head: AuditAnchor = Field(
        description="The trail's newest record when this was published (this step, unless the "
        "step is announced again later)."
    )


DEAD_LETTER_PAYLOAD_CHARS = 64_000  # at most 6 bytes each as JSON: a cut letter always fits


class DeadLetter(BaseModel):
    """What lands on ``dlq.<subject>``: the original bytes and why they were given up on.

    The payload is kept whole when the letter fits in ``MAX_MESSAGE_BYTES``; a larger one (300 KB
    of NUL characters escape to 1.8 MB) keeps its first ``DEAD_LETTER_PAYLOAD_CHARS`` characters,
    and its length and SHA-256 say what the original was, so a letter is always publishable."""

    model_config = ConfigDict(extra="forbid")

    subject: str
    reason: Reason
    deliveries: int
    payload: str = Field(description="The original as UTF-8 (invalid bytes replaced), maybe cut.")
    payload_truncated: bool = False
    payload_bytes: int = Field(description="The original's length in bytes.")
    payload_sha256: str = Field(description="SHA-256 of the original bytes.")
    failed_at: datetime = Field(default_factory=utcnow)

    @classmethod
    def of(cls, subject: str, data: bytes, *, reason: str, deliveries: int) -> DeadLetter:
        """The letter for ``data``, cut to fit; ``reason`` is cut to its limit too."""
        letter = cls(
            subject=subject,
            reason=clip(reason, REASON_CHARS),
            deliveries=deliveries,
            payload=data.decode("utf-8", errors="replace"),
            payload_bytes=len(data),
            payload_sha256=hashlib.sha256(data).hexdigest(),
        )
        if len(letter.model_dump_json().encode()) <= MAX_MESSAGE_BYTES:
            return letter
        cut = letter.payload[:DEAD_LETTER_PAYLOAD_CHARS]
        return letter.model_copy(update={"payload": cut, "payload_truncated": True})


EVENTS: tuple[type[Event], ...] = (
    RunRequested,
    GateRunRequested,
    RunCompleted,
    RunReported,
    RunScored,
    FailureLogged,
    ChangeProposed,
    ChangeAwaitingApproval,
    ChangeApproved,
    ChangeRejected,
    ChangeApplied,
    ChangeKept,
    ChangeRolledBack,
    ChangeCanaryStarted,
    ChangePromoted,
    ChangeCanaryRolledBack,
    ChangeRecorded,
)

"""What each page shows, built from what the services answered: plain data for the templates.

Everything here that came from the wire or a model (prompts, rationales, failures, reasons,
names) stays a plain string; the templates escape it, and :func:`ratchet.untrusted.for_terminal`
(the ``shown`` and ``block`` filters) makes its control and bidirectional characters visible, so
no text can restyle the page or reorder what a reviewer reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ratchet.contracts import Check, FailureGroup, Look, Measurement
from ratchet.evidence import VERDICTS, describe, describe_after
from ratchet.queries import NOT_A_STATUS, RUNS_QUERY_CASES, ChangeSummary, GateCase, GateRun
from ratchet.store import AuditRecord, FailureRecord
from ratchet.suites import Suite

# The steps of a change, in the order a change goes through them, for the state filter; a status
# the console does not know yet (a new kind of record) is listed after them.
STATES = (
    "received",
    "invalid",
    "measured",
    "awaiting_approval",
    "approved",
    "rejected",
    "stale",
    "applied",
    "verified",
    "kept",
    "rolled_back",
)
WAITING = "awaiting_approval"
DECIDED = ("approved", "rejected")
EXAMPLES_PER_GROUP = 3
# Kinds of record the check after applying and the canary write. They are shown generically
# (every field of the record), so a new field or kind shows up without a change here.
AFTER_KINDS = ("verified", "kept", "rolled_back", "holdout")
# The cases of the gate's evidence a page shows, by outcome, each with what both prompts answered
# (their first SHOWN_REPEATS repeats): all of them fit in one query.runs.
SHOWN_CASES = {"fixed": 20, "broken": 20, "flaky": 10}
SHOWN_REPEATS = 3
assert sum(SHOWN_CASES.values()) <= RUNS_QUERY_CASES


def is_canary(kind: str) -> bool:
    return "canary" in kind or kind == "promoted"


def states_of(changes: list[ChangeSummary]) -> list[str]:
    present = {c.status for c in changes}
    return [*STATES, *sorted(present - set(STATES))]


@dataclass
class DiffLine:
    kind: str  # "add", "remove", "hunk", "file" or "same"
    text: str


def diff_lines(diff: str) -> list[DiffLine]:
    """A unified diff, line by line, each with what it is (for its colour, and a sign any reader
    can see without colour)."""
    lines = []
    for text in diff.split("\n"):
        if text.startswith(("+++", "---")):
            kind = "file"
        elif text.startswith("+"):
            kind = "add"
        elif text.startswith("-"):
            kind = "remove"
        elif text.startswith("@@"):
            kind = "hunk"
        else:
            kind = "same"
        lines.append(DiffLine(kind, text))
    return lines


@dataclass
class CaseView:
    """One case the gate found changed (fixed or broken) or flaky, with its input and check (from
    this host's suite if it is the pool the gate measured, else from the gate's runs) and what
    both prompts answered on it (the failure store's runs)."""

    id: str
    outcome: str  # "fixed", "broken" or "flaky"
    flaky: bool
    input: str | None = None
    check: Check | None = None
    runs: list[GateRun] = field(default_factory=list)

    def arm(self, name: str) -> list[GateRun]:
        """The runs of one arm ("current" or "candidate"), by repeat."""
        return [run for run in self.runs if run.arm == name]


@dataclass
class GroupView:
    label: str
    size: int
    problems: list[str]
    failures: list[FailureRecord]
    run_ids: list[str]


@dataclass
class Evidence:
    measurement: Measurement
    lines: list[str]
    verdict: str
    looks: list[Look]
    cases: list[CaseView]
    cases_note: str
    more: dict[str, int] = field(default_factory=dict)  # cases not shown, by outcome
    runs_note: str = ""

    @property
    def repeats_shown(self) -> int:
        return min(self.measurement.repeats, SHOWN_REPEATS)


@dataclass
class ChangeView:
    """One change as its page shows it."""

    change_id: str
    status: str
    trail: list[AuditRecord]
    task: str = "?"
    proposer: str = "?"
    model: str | None = None
    base_version: int | None = None
    rationale: str = ""
    proposed_prompt: str = ""
    margin: float = 0.0
    diff: list[DiffLine] = field(default_factory=list)
    evidence_sha256: str | None = None
    evidence: Evidence | None = None
    groups: list[GroupView] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    after_records: list[AuditRecord] = field(default_factory=list)
    canary: list[AuditRecord] = field(default_factory=list)
    decision: AuditRecord | None = None
    refused: list[AuditRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def waiting(self) -> bool:
        """Waiting for a person: the evidence is out and nobody has decided."""
        return self.evidence_sha256 is not None and self.decision is None

    @property
    def test(self) -> str:
        if self.margin:
            return f"non-inferiority, margin {self.margin:.0%}"
        return "superiority"


def change_view(trail: list[AuditRecord]) -> ChangeView:
    """The page of a change from its audit trail (the gatekeeper's answer to query.change)."""
    steps = [r for r in trail if r.kind not in NOT_A_STATUS]
    view = ChangeView(change_id=trail[0].change_id, status=(steps or trail)[-1].kind, trail=trail)
    by_kind: dict[str, dict[str, Any]] = {r.kind: r.payload for r in trail}
    if received := next((r for r in trail if r.kind == "received"), None):
        proposal = received.payload
        view.task = str(proposal.get("task", "?"))
        view.proposer = received.actor
        view.model = proposal.get("model")
        view.base_version = proposal.get("base_version")
        view.rationale = str(proposal.get("rationale", ""))
        view.proposed_prompt = str(proposal.get("proposed_prompt", ""))
        view.margin = float(proposal.get("margin") or 0.0)
    if waiting := by_kind.get("awaiting_approval"):
        view.diff = diff_lines(str(waiting.get("prompt_diff", "")))
        view.evidence_sha256 = str(waiting.get("evidence_sha256"))
    view.decision = next((r for r in trail if r.kind in DECIDED), None)
    view.refused = [r for r in trail if r.kind == "decision_refused"]
    view.after = describe_after(by_kind)
    view.after_records = [r for r in trail if r.kind in AFTER_KINDS]
    view.canary = [r for r in trail if is_canary(r.kind)]
    if invalid := by_kind.get("invalid"):
        view.problems = [str(p) for p in invalid.get("problems", [])]
    return view


def measurement_of(trail: list[AuditRecord]) -> Measurement | None:
    measured = next((r for r in trail if r.kind == "measured"), None)
    if measured is None:
        return None
    try:
        return Measurement.model_validate(measured.payload)
    except ValidationError:  # a record from another version of the gatekeeper
        return None


def evidence(measurement: Measurement, suite: Suite | None) -> Evidence:
    """The gate's evidence: the same words as ``ratchet show`` (:func:`ratchet.evidence.
    describe`), the looks, and the cases it found changed (the first ``SHOWN_CASES`` of each
    outcome), with their inputs when this host's suite holds the very pool the gate measured
    (its hash is the measurement's); :func:`with_runs` adds what the prompts answered."""
    flaky = set(measurement.flaky)
    changed = {*measurement.fixed, *measurement.broken}
    by_outcome = {
        "fixed": measurement.fixed,
        "broken": measurement.broken,
        "flaky": [case for case in measurement.flaky if case not in changed],
    }
    ids = [
        (case, outcome)
        for outcome, cases in by_outcome.items()
        for case in cases[: SHOWN_CASES[outcome]]
    ]
    more = {
        outcome: len(cases) - SHOWN_CASES[outcome]
        for outcome, cases in by_outcome.items()
        if len(cases) > SHOWN_CASES[outcome]
    }
    pool = {case.id: case for case in suite.gate} if suite else {}
    same_pool = suite is not None and suite.gate_pool_sha256() == measurement.pool_sha256
    cases = [
        CaseView(
            id=case,
            outcome=outcome,
            flaky=case in flaky,
            input=pool[case].input if same_pool and case in pool else None,
            check=pool[case].check if same_pool and case in pool else None,
        )
        for case, outcome in ids
    ]
    if suite is None:
        note = "This host has no suite for the task: the cases are shown by id only."
    elif not same_pool:
        note = (
            f"This host's suite is not the pool the gate measured (pool "
            f"{measurement.pool_sha256[:12]}): the cases are shown by id only."
        )
    else:
        note = ""
    return Evidence(
        measurement=measurement,
        lines=describe(measurement),
        verdict=VERDICTS[measurement.verdict],
        looks=measurement.history,
        cases=cases,
        cases_note=note,
        more=more,
    )


def with_runs(evidence: Evidence, found: list[GateCase] | None) -> Evidence:
    """``evidence`` with what both prompts answered on its cases, as the failure store answered
    ``query.runs`` (None: it did not answer). A case's input and check come from the runs when
    this host's suite could not give them: they are what the gate ran."""
    if found is None:
        evidence.runs_note = "The failure store did not answer: the prompts' outputs are not shown."
        return evidence
    by_id = {case.case_id: case for case in found}
    for case in evidence.cases:
        if (runs := by_id.get(case.id)) is None:
            continue
        case.runs = runs.runs
        case.input = runs.input if case.input is None else case.input
        case.check = runs.check if case.check is None else case.check
    if all(case.input is not None for case in evidence.cases):
        evidence.cases_note = ""
    missing = sum(1 for case in evidence.cases if not case.runs)
    if missing:
        evidence.runs_note = (
            f"The failure store holds no runs of {missing} of these cases (or left them out of "
            "its reply to fit): their outputs are not shown."
        )
    return evidence


def groups(trail: list[AuditRecord], failures: list[FailureRecord]) -> list[GroupView]:
    """The failure groups a proposal targets (its ``received`` record holds them), each with up
    to three of its failures as the failure store keeps them (input, output, problems)."""
    received = next((r for r in trail if r.kind == "received"), None)
    if received is None:
        return []
    by_run = {f.run_id: f for f in failures}
    views = []
    for raw in received.payload.get("groups", []):
        try:
            group = FailureGroup.model_validate(raw)
        except ValidationError:
            continue
        examples = [by_run[r] for r in group.run_ids if r in by_run][:EXAMPLES_PER_GROUP]
        views.append(
            GroupView(
                label=group.label,
                size=group.size,
                problems=list(group.examples),
                failures=examples,
                run_ids=group.run_ids,
            )
        )
    return views


def targeted_runs(trail: list[AuditRecord]) -> set[str]:
    """The runs a proposal's groups name: the failures to fetch for its page."""
    received = next((r for r in trail if r.kind == "received"), None)
    if received is None:
        return set()
    return {
        str(run_id)
        for group in received.payload.get("groups", [])
        for run_id in group.get("run_ids", [])[: EXAMPLES_PER_GROUP * 4]
    }

"""In-process tests of the gatekeeper's graph: no NATS, a fake world behind a fake publisher.

The gate is the real :class:`Gate` with a real :class:`GateLedger` and the real SQLite store (the
audit trail), an in-memory fake prompt store with compare-and-set, and LangGraph's in-memory
checkpointer. ``FakeBus.publish`` records every event and, for each gate run request, plays
executor and evaluator: the fake world decides from (prompt text, case id) whether the output is
right, the real programmatic check scores it, and the score goes to ``ledger.record`` as the
gatekeeper's ``run.scored`` handler would.

The crash tests stop the graph once at every node, let the error escape the runner (the message
handler would nack it), redeliver the same message as JetStream would, and check that every side
effect happened once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from ratchet.audit import AuditSigner
from ratchet.contracts import (
    ChangeApplied,
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeKept,
    ChangeProposed,
    ChangeRecorded,
    ChangeRejected,
    ChangeRolledBack,
    Check,
    Event,
    GateRunRequested,
    RunScored,
)
from ratchet.prompts import PromptRecord, PromptVersion, StaleVersionError
from ratchet.rules import load_rules
from ratchet.settings import REPO_ROOT, GateSettings
from ratchet.store import Store, open_store
from ratchet.suites import Case, Suite
from ratchet_evaluator.checks import run_check
from ratchet_gatekeeper.graph import ChangeState, Gate, build_gate_graph
from ratchet_gatekeeper.ledger import GateLedger
from ratchet_gatekeeper.runner import EarlyDecision, GateRunner
from ratchet_gatekeeper.sql import SqliteDb

TASK = "fake-task"
PROPOSER = "client"  # who proposed, as the proposal's subject names it
BASE = "Answer with the result only."
GOOD = "Answer with the result only. GOOD: check the arithmetic twice."
BAD = "Answer with the result only. BAD: round every number."
N_GATE, N_HOLDOUT, N_LEARN = 60, 20, 4
# 60 gate cases, 4 looks: the decision uses at most 48 (12 stay fresh for verify), looks at 12,
# 24, 36 and 48 cases. One design for every test here (obf_bounds is cached per design).
SETTINGS = GateSettings(looks=4, max_cases=200, verify_reserve=20, run_timeout_s=10.0)
LOOKS = [12, 24, 36, 48]
KEPT = [
    "received", "measured", "awaiting_approval", "approved", "applied", "verified", "kept",
    "holdout",
]  # fmt: skip
ROLLED_BACK = [
    "received", "measured", "awaiting_approval", "approved", "applied", "verified", "rolled_back",
]  # fmt: skip
MAX_DELIVER = 3
E = TypeVar("E", bound=Event)
T = TypeVar("T")


def case(prefix: str, index: int) -> Case:
    return Case(
        id=f"{prefix}{index:03d}",
        input=f"{prefix} question {index}",
        check=Check(kind="exact", expected=f"answer {index}"),
    )


SUITE = Suite(
    name=TASK,
    description="a suite for the fake world",
    prompt=BASE,
    learn=[case("l", i) for i in range(N_LEARN)],
    gate=[case("g", i) for i in range(N_GATE)],
    holdout=[case("h", i) for i in range(N_HOLDOUT)],
)


def fake_world_answers_right(prompt: str, case_id: str) -> bool:
    """The fake world: GOOD prompts solve every case, BAD ones none, any other prompt (the base)
    solves the even-numbered half."""
    if "GOOD" in prompt:
        return True
    if "BAD" in prompt:
        return False
    return int(case_id[1:]) % 2 == 0


class InjectedCrash(RuntimeError):
    """The one-time crash a test injects."""


class FakePromptStore:
    """The prompt store in memory: versions per task, compare-and-set writes, a write log."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.versions: dict[str, list[PromptVersion]] = {
            TASK: [
                PromptVersion(task=TASK, version=1, record=PromptRecord(text=BASE, kind="initial"))
            ]
        }
        self.writes: list[PromptRecord] = []

    def latest(self, task: str) -> PromptVersion:
        return self.versions[task][-1]

    async def current(self, task: str) -> PromptVersion | None:
        self.harness.maybe_crash("current", None)
        versions = self.versions.get(task)
        return versions[-1] if versions else None

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        self.harness.maybe_crash("write", record)
        latest = self.latest(task)
        if latest.version != base_version:
            raise StaleVersionError(f"prompt for {task!r} is no longer version {base_version}")
        version = latest.version + 1
        self.versions[task].append(PromptVersion(task=task, version=version, record=record))
        self.writes.append(record)
        # a crash here: the write happened, the process died before it knew
        self.harness.maybe_crash("after_write", record)
        return version


class FakeBus:
    """Records every published event; a gate run request is run and scored by the fake world."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.events: list[Event] = []
        self.requests: list[GateRunRequested] = []
        self.scored: set[str] = set()
        self.requested_after_scored: list[str] = []
        self.hold: asyncio.Event | None = None  # set: scores wait for it
        self.pending: list[asyncio.Task[None]] = []

    async def publish(self, event: Event) -> None:
        self.harness.maybe_crash("publish", event)
        self.events.append(event)
        if not isinstance(event, GateRunRequested):
            return
        if event.run_id in self.scored:
            self.requested_after_scored.append(event.run_id)
        self.requests.append(event)
        score = self.run_and_score(event)
        if self.hold is None:
            await self.record(score)
        else:
            self.pending.append(asyncio.create_task(self.record_after(self.hold, score)))

    def run_and_score(self, request: GateRunRequested) -> RunScored:
        """Fake executor and evaluator: the stored prompt when the request names none."""
        if request.candidate_prompt is None:
            stored = self.harness.prompts.latest(request.task)
            assert request.min_prompt_version is None or stored.version >= (
                request.min_prompt_version
            )
            prompt, version = stored.record.text, stored.version
        else:
            prompt, version = request.candidate_prompt, 0
        assert request.context.case_id is not None and request.check is not None
        right = fake_world_answers_right(prompt, request.context.case_id)
        output = str(request.check.expected) if right else "no idea"
        score, problems = run_check(request.check, output)
        return RunScored(
            id=f"{request.run_id}.scored",
            run_id=request.run_id,
            task=request.task,
            context=request.context,
            score=score,
            problems=problems,
            scorer=f"check:{request.check.kind}",
            prompt_version=version,
        )

    async def record(self, score: RunScored) -> None:
        if await self.harness.ledger.record(score):
            self.scored.add(score.run_id)

    async def record_after(self, hold: asyncio.Event, score: RunScored) -> None:
        await hold.wait()
        await self.record(score)

    def of_type(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


class CrashableGate(Gate):
    """The real gate; its audit writes pass the harness's crash injector first."""

    harness: Harness

    async def audit(
        self,
        change_id: str,
        kind: str,
        payload: dict[str, Any],
        actor: str = "gatekeeper",
        *,
        key: str | None = None,
    ) -> None:
        self.harness.maybe_crash("audit", kind)
        await super().audit(change_id, kind, payload, actor, key=key)
        self.harness.audited.append(kind)


CrashWhen = Callable[["Harness", str, Any], bool]


@dataclass
class Harness:
    ledger: GateLedger
    store: Store
    prompts: FakePromptStore = field(init=False)
    bus: FakeBus = field(init=False)
    gate: CrashableGate = field(init=False)
    runner: GateRunner = field(init=False)
    crash_when: CrashWhen | None = None
    crashes: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    audited: list[str] = field(default_factory=list)  # audit calls that went through

    def __post_init__(self) -> None:
        self.prompts = FakePromptStore(self)
        self.bus = FakeBus(self)
        self.gate = CrashableGate(
            store=self.store,
            ledger=self.ledger,
            prompts=self.prompts,
            publish=self.bus.publish,
            rules=load_rules(REPO_ROOT / "config" / "behavior_rules.json"),
            suites={TASK: SUITE},
            threshold=0.7,
            settings=SETTINGS,
            signer=AuditSigner.generate(),
        )
        self.gate.harness = self
        self.runner = GateRunner(build_gate_graph(self.gate, InMemorySaver()), self.gate)

    def maybe_crash(self, site: str, what: Any) -> None:
        """Raise once, the first time ``crash_when`` says so."""
        if self.crash_when is None or self.crashes or not self.crash_when(self, site, what):
            return
        self.crashes.append(site)
        raise InjectedCrash(f"injected crash at {site} {type(what).__name__}")

    async def kinds(self, change_id: str) -> list[str]:
        return [record.kind for record in await self.store.audit(change_id)]

    async def deliver(self, handle: Callable[[], Awaitable[T]]) -> T | None:
        """One message, delivered until its handler succeeds (at most MAX_DELIVER times), like
        a JetStream consumer with NACK_ON_ERROR."""
        for _ in range(MAX_DELIVER):
            try:
                return await handle()
            except Exception as exc:  # the handler failed: nacked and redelivered
                self.errors.append(exc)
        return None


async def open_ledger_and_store(tmp_path: Path) -> tuple[GateLedger, Store]:
    ledger = await GateLedger.open(tmp_path / "gatekeeper-runs.db")
    assert isinstance(ledger.db, SqliteDb)
    await ledger.db.connection.execute("PRAGMA synchronous=OFF")  # a test needs no durability
    return ledger, open_store(f"sqlite:///{tmp_path / 'ratchet.db'}")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    ledger, store = await open_ledger_and_store(tmp_path)
    h = Harness(ledger=ledger, store=store)
    yield h
    for task in h.bus.pending:
        task.cancel()
    await ledger.close()
    await store.close()


def proposal(text: str, *, margin: float = 0.0, change_id: str = "change-1") -> ChangeProposed:
    return ChangeProposed(
        change_id=change_id,
        task=TASK,
        base_version=1,
        proposed_prompt=text,
        rationale="the fake world rewards it",
        margin=margin,
    )


def approval(change: ChangeProposed, evidence: str) -> ChangeApproved:
    return ChangeApproved(
        change_id=change.change_id, reason="looks right", evidence_sha256=evidence
    )


async def propose_and_approve(h: Harness, change: ChangeProposed) -> ChangeApproved:
    """The proposal, then an approval naming the published evidence; each delivered until it
    succeeds."""
    await h.deliver(lambda: h.runner.on_proposed(change, proposer=PROPOSER))
    awaiting = h.bus.of_type(ChangeAwaitingApproval)
    assert awaiting, f"no change.awaiting_approval published; errors: {h.errors}"
    decision = approval(change, awaiting[-1].evidence_sha256)
    decided = await h.deliver(
        lambda: h.runner.on_decision(decision, approved=True, approver="alice")
    )
    assert decided is True, f"the approval was not taken; errors: {h.errors}"
    return decision


def stage_requests(h: Harness, stage: str) -> list[GateRunRequested]:
    return [r for r in h.bus.requests if r.context.stage == stage]


async def assert_once(
    h: Harness, change: ChangeProposed, *, trail: list[str], writes: int, final: str
) -> None:
    """What a user would notice if a side effect happened twice or not at all."""
    # every error was the injected crash: nothing failed on redelivery
    assert all(isinstance(e, InjectedCrash) for e in h.errors), h.errors
    assert len(h.errors) == len(h.crashes) <= 1
    # the change reached its end
    values, pending = await h.runner.status(change.change_id)
    assert (values["status"], pending) == (final, ()), f"ended {values['status']} at {pending}"
    # the prompt store was written exactly as often as it should be
    assert len(h.prompts.writes) == writes, [w.kind for w in h.prompts.writes]
    # every audit kind once, in order
    assert await h.kinds(change.change_id) == trail
    # a republished event carries the same id (JetStream drops the duplicate)
    for kind in (ChangeAwaitingApproval, ChangeApplied, ChangeKept, ChangeRolledBack):
        ids = {e.id for e in h.bus.of_type(kind) if e.change_id == change.change_id}
        assert len(ids) <= 1, (kind.__name__, ids)
    # no gate run was requested again once its score was in
    assert h.bus.requested_after_scored == []
    # every audit record was announced, each under one id (a repeat after a crash is dropped)
    records = await h.store.audit(change.change_id)
    announced = {
        (e.id, e.kind, e.seq)
        for e in h.bus.of_type(ChangeRecorded)
        if e.change_id == change.change_id
    }
    assert announced == {(f"{change.change_id}.recorded.{r.seq}", r.kind, r.seq) for r in records}


# --- 1, 2: the paths a user sees ---------------------------------------------------------------


async def test_good_change_is_measured_superior_approved_applied_verified_kept(
    harness: Harness,
) -> None:
    h = harness
    change = proposal(GOOD)
    await h.runner.on_proposed(change, proposer=PROPOSER)

    awaiting = h.bus.of_type(ChangeAwaitingApproval)
    assert len(awaiting) == 1
    evidence = awaiting[0].measurement
    assert evidence.verdict == "superior"
    assert evidence.test == "superiority" and evidence.looks == LOOKS
    assert evidence.stopped_at < len(LOOKS)  # stopped early
    assert evidence.cases == LOOKS[evidence.stopped_at - 1]
    assert evidence.runs == 2 * evidence.cases == len(stage_requests(h, "measure"))
    assert evidence.candidate_passes == evidence.cases and evidence.broken == []
    assert awaiting[0].evidence_sha256 == evidence.sha256()
    assert h.prompts.writes == []  # nothing is written before a decision
    assert (await h.runner.status(change.change_id))[1] == ("decide",)

    decision = approval(change, awaiting[0].evidence_sha256)
    assert await h.runner.on_decision(decision, approved=True, approver="alice") is True

    assert [w.kind for w in h.prompts.writes] == ["change"]
    assert h.prompts.latest(TASK).record.text == GOOD
    applied = h.bus.of_type(ChangeApplied)
    assert [(a.previous_version, a.version) for a in applied] == [(1, 2)]

    measured = {r.context.case_id for r in stage_requests(h, "measure")}
    verify = stage_requests(h, "verify")
    verified = {r.context.case_id for r in verify}
    assert len(measured) == evidence.cases
    assert len(verified) == N_GATE - evidence.cases  # the rest of the pool, fresh
    assert measured.isdisjoint(verified)
    candidate_arm = [r for r in verify if r.context.arm == "candidate"]
    assert all(r.candidate_prompt is None and r.min_prompt_version == 2 for r in candidate_arm)

    kept = h.bus.of_type(ChangeKept)
    assert len(kept) == 1 and kept[0].served and kept[0].version == 2
    assert kept[0].applied_passes == kept[0].cases == len(verified)
    assert h.bus.of_type(ChangeRolledBack) == []
    holdout = stage_requests(h, "holdout")
    assert len(holdout) == 2 * N_HOLDOUT
    assert {r.context.case_id for r in holdout} == {c.id for c in SUITE.holdout}
    trail = await h.store.audit(change.change_id)
    assert [r.kind for r in trail] == KEPT
    assert trail[-1].payload["candidate_passes"] == N_HOLDOUT
    assert trail[-1].payload["current_passes"] == N_HOLDOUT // 2
    await assert_once(h, change, trail=KEPT, writes=1, final="kept")


async def test_bad_change_approved_anyway_is_rolled_back(harness: Harness) -> None:
    h = harness
    change = proposal(BAD)
    await propose_and_approve(h, change)

    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].measurement
    assert evidence.verdict in ("futile", "not_shown")
    assert [w.kind for w in h.prompts.writes] == ["change", "rollback"]
    assert h.prompts.latest(TASK).version == 3
    assert h.prompts.latest(TASK).record.text == BASE
    rolled_back = h.bus.of_type(ChangeRolledBack)
    assert len(rolled_back) == 1 and rolled_back[0].version == 3
    assert rolled_back[0].applied_passes == 0 < rolled_back[0].control_passes
    assert h.bus.of_type(ChangeKept) == []
    kinds = await h.kinds(change.change_id)
    assert Counter(kinds)["rolled_back"] == 1 and "holdout" not in kinds
    assert stage_requests(h, "holdout") == []
    await assert_once(h, change, trail=ROLLED_BACK, writes=2, final="rolled_back")


# --- 3: crash and resume at every node ---------------------------------------------------------


def publishing(kind: type[E], when: Callable[[Harness, E], bool]) -> CrashWhen:
    def crash(h: Harness, site: str, what: Any) -> bool:
        return site == "publish" and isinstance(what, kind) and when(h, what)

    return crash


def auditing(kind: str) -> CrashWhen:
    return lambda h, site, what: site == "audit" and what == kind


def nth_request(stage: str, n: int) -> CrashWhen:
    """The n-th gate run request of a stage (1-based): mid-measurement, after earlier looks."""
    return publishing(
        GateRunRequested,
        lambda h, r: r.context.stage == stage and len(stage_requests(h, stage)) == n - 1,
    )


def after_write(kind: str) -> CrashWhen:
    return lambda h, site, what: site == "after_write" and what.kind == kind


# crash point -> (when to crash, the proposal's text, its audit trail, prompt writes, end status)
CRASHES: dict[str, tuple[CrashWhen, str, list[str], int, str]] = {
    # validate: after "received" is audited, reading the current prompt
    "validate": (lambda h, site, what: site == "current", GOOD, KEPT, 1, "kept"),
    # measure: the 30th request, in the second look, after the first look was scored
    "measure": (nth_request("measure", 30), GOOD, KEPT, 1, "kept"),
    # measure, after every run was scored, before "measured" is audited
    "measure-audit": (auditing("measured"), GOOD, KEPT, 1, "kept"),
    # ask: change.awaiting_approval is out, its audit is not
    "ask": (auditing("awaiting_approval"), GOOD, KEPT, 1, "kept"),
    # decide: resumed with the decision, crashed before auditing it
    "decide": (auditing("approved"), GOOD, KEPT, 1, "kept"),
    # the decide/apply boundary: decided and checkpointed, apply's first line
    "decide/apply": (
        lambda h, site, what: site == "current" and "approved" in h.audited,
        GOOD,
        KEPT,
        1,
        "kept",
    ),
    # apply: the prompt was written, the process died before it knew
    "apply": (after_write("change"), GOOD, KEPT, 1, "kept"),
    # apply: written, change.applied published, "applied" not audited
    "apply-audit": (auditing("applied"), GOOD, KEPT, 1, "kept"),
    # verify: mid-way through the fresh control's requests
    "verify": (nth_request("verify", 10), GOOD, KEPT, 1, "kept"),
    # verify: change.kept published, "kept" not audited
    "verify-kept": (auditing("kept"), GOOD, KEPT, 1, "kept"),
    # holdout: its runs scored, "holdout" not audited
    "holdout": (auditing("holdout"), GOOD, KEPT, 1, "kept"),
    "holdout-runs": (nth_request("holdout", 7), GOOD, KEPT, 1, "kept"),
    # a bad change approved anyway: crash once its rollback is written
    "rollback": (after_write("rollback"), BAD, ROLLED_BACK, 2, "rolled_back"),
    # ... or once change.rolled_back is published, before its audit
    "rollback-audit": (auditing("rolled_back"), BAD, ROLLED_BACK, 2, "rolled_back"),
    # a crash while the bad change is being applied
    "bad-apply": (after_write("change"), BAD, ROLLED_BACK, 2, "rolled_back"),
}


async def run_with_crash(h: Harness, point: str) -> ChangeProposed:
    crash_when, text, _, _, _ = CRASHES[point]
    h.crash_when = crash_when
    change = proposal(text)
    await propose_and_approve(h, change)
    return change


async def check_crash_run(h: Harness, point: str, change: ChangeProposed) -> None:
    _, _, trail, writes, final = CRASHES[point]
    assert h.crashes, f"the crash at {point} was never injected"
    await assert_once(h, change, trail=trail, writes=writes, final=final)


@pytest.mark.parametrize("point", list(CRASHES))
async def test_crash_and_redelivery_at_every_node_does_everything_once(
    harness: Harness, point: str
) -> None:
    h = harness
    change = await run_with_crash(h, point)
    await check_crash_run(h, point, change)
    ids = Counter(r.run_id for r in h.bus.requests)
    repeated = {run_id for run_id, n in ids.items() if n > 1}
    # a request repeated after a crash is one whose score had not arrived: here, only the run
    # whose request crashed mid-look could have been repeated, and a crashed publish is not sent
    assert repeated == set(), repeated
    assert len(ids) == len(h.bus.scored)


async def test_decision_on_a_thread_crashed_before_the_gate_is_redelivered(
    harness: Harness,
) -> None:
    """The evidence is out but the thread crashed in ``ask``: the decision is nacked
    (EarlyDecision) until the redelivered proposal brings the thread to the gate."""
    h = harness
    h.crash_when = auditing("awaiting_approval")
    change = proposal(GOOD)
    with pytest.raises(InjectedCrash) as crash:
        await h.runner.on_proposed(change, proposer=PROPOSER)
    h.errors.append(crash.value)
    decision = approval(change, h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256)
    with pytest.raises(EarlyDecision):
        await h.runner.on_decision(decision, approved=True, approver="alice")
    assert h.prompts.writes == []
    await h.runner.on_proposed(change, proposer=PROPOSER)  # redelivered proposal
    assert (
        await h.runner.on_decision(decision, approved=True, approver="alice") is True
    )  # redelivered decision
    assert len(h.bus.of_type(ChangeAwaitingApproval)) == 2  # the same id twice: deduplicated
    await assert_once(h, change, trail=KEPT, writes=1, final="kept")


# Making apply or the rollback non-idempotent must break the crash test above. Each version
# below is the node without its "already written" check.


async def apply_without_check(self: Gate, state: ChangeState) -> ChangeState:
    change = ChangeProposed.model_validate(state["change"])
    record = PromptRecord(
        text=change.proposed_prompt,
        kind="change",
        change_id=change.change_id,
        note=change.rationale,
    )
    try:
        version = await self.prompts.write(change.task, record, base_version=change.base_version)
    except StaleVersionError as exc:
        await self.audit(change.change_id, "stale", {"reason": str(exc)})
        return {"status": "stale", "problems": [str(exc)]}
    applied = ChangeApplied(
        id=f"{change.change_id}.applied",
        change_id=change.change_id,
        task=change.task,
        previous_version=change.base_version,
        version=version,
        prompt_sha256=PromptRecord(text=change.proposed_prompt).sha256,
    )
    await self.publish(applied)
    await self.audit(change.change_id, "applied", applied.model_dump(mode="json"))
    return {"status": "applied", "applied_version": version}


async def roll_back_without_check(
    self: Gate, change: ChangeProposed, base_prompt: str, applied: int, reason: str
) -> int:
    return await self.prompts.write(
        change.task,
        PromptRecord(text=base_prompt, kind="rollback", change_id=change.change_id, note=reason),
        base_version=applied,
    )


@pytest.mark.parametrize(
    ("point", "method", "replacement"),
    [
        ("apply", "apply_node", apply_without_check),
        ("rollback", "roll_back", roll_back_without_check),
    ],
)
async def test_non_idempotent_side_effects_are_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, method: str, replacement: Any
) -> None:
    """apply: the redelivered decision writes again on the old base version; the fake store's
    compare-and-set refuses it and the change ends "stale", never verified: ``assert_once``
    fails on the end status (and would on the trail). rollback: the second rollback write is
    refused on every redelivery (StaleVersionError), the decision is dead-lettered and
    ``assert_once`` fails on the errors. Without compare-and-set both would show 2 writes."""
    monkeypatch.setattr(Gate, method, replacement)
    ledger, store = await open_ledger_and_store(tmp_path)
    h = Harness(ledger=ledger, store=store)
    try:
        h.crash_when = CRASHES[point][0]
        change = proposal(CRASHES[point][1])
        await h.deliver(lambda: h.runner.on_proposed(change, proposer=PROPOSER))
        decision = approval(change, h.bus.of_type(ChangeAwaitingApproval)[-1].evidence_sha256)
        await h.deliver(lambda: h.runner.on_decision(decision, approved=True, approver="alice"))
        with pytest.raises(AssertionError):
            await check_crash_run(h, point, change)
    finally:
        await ledger.close()
        await store.close()


# --- 4: decisions that must be refused ---------------------------------------------------------


async def test_decision_before_the_evidence_exists_is_refused_and_audited(
    harness: Harness,
) -> None:
    h = harness
    h.bus.hold = asyncio.Event()  # scores arrive only when released
    change = proposal(GOOD)
    proposed = asyncio.create_task(h.runner.on_proposed(change, proposer=PROPOSER))
    async with asyncio.timeout(5):
        while not h.bus.requests:
            await asyncio.sleep(0.01)
    early = approval(change, "0" * 64)
    assert await h.runner.on_decision(early, approved=True, approver="alice") is False
    refused = [r for r in await h.store.audit(change.change_id) if r.kind == "decision_refused"]
    assert len(refused) == 1
    assert refused[0].actor == "alice" and "no evidence yet" in refused[0].payload["why"]
    assert refused[0].payload["key"] == early.id

    h.bus.hold.set()
    await proposed
    assert h.prompts.writes == []
    _, pending = await h.runner.status(change.change_id)
    assert pending == ("decide",)
    assert await h.kinds(change.change_id) == [
        "received", "decision_refused", "measured", "awaiting_approval",
    ]  # fmt: skip


async def test_decision_naming_other_evidence_is_refused_and_the_change_still_waits(
    harness: Harness,
) -> None:
    h = harness
    change = proposal(GOOD)
    await h.runner.on_proposed(change, proposer=PROPOSER)
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256

    wrong = approval(change, "f" * 64)
    assert await h.runner.on_decision(wrong, approved=True, approver="alice") is False
    assert (
        await h.runner.on_decision(wrong, approved=True, approver="alice") is False
    )  # redelivered: audited once
    refused = [r for r in await h.store.audit(change.change_id) if r.kind == "decision_refused"]
    assert len(refused) == 1 and "other evidence" in refused[0].payload["why"]
    assert h.prompts.writes == []
    assert (await h.runner.status(change.change_id))[1] == ("decide",)

    assert (
        await h.runner.on_decision(approval(change, evidence), approved=True, approver="alice")
        is True
    )
    assert [w.kind for w in h.prompts.writes] == ["change"]
    kinds = await h.kinds(change.change_id)
    assert kinds == [*KEPT[:3], "decision_refused", *KEPT[3:]]


async def test_decision_for_an_unknown_change_is_refused_and_audited(harness: Harness) -> None:
    h = harness
    ghost = ChangeApproved(change_id="no-such-change", reason="?", evidence_sha256="0" * 64)
    assert await h.runner.on_decision(ghost, approved=True, approver="alice") is False
    assert (
        await h.runner.on_decision(ghost, approved=True, approver="alice") is False
    )  # redelivered
    trail = await h.store.audit("no-such-change")
    assert [(r.kind, r.actor) for r in trail] == [("decision_refused", "alice")]
    assert "no such change" in trail[0].payload["why"]
    assert h.prompts.writes == []
    # only the refusal's record was announced (twice, under one id: the repeat is dropped)
    assert {(e.id, e.kind) for e in h.bus.of_type(ChangeRecorded)} == {
        ("no-such-change.recorded.1", "decision_refused")
    }
    assert len(h.bus.of_type(ChangeRecorded)) == len(h.bus.events)


async def test_the_proposer_may_not_approve_its_own_change_another_reviewer_may(
    harness: Harness,
) -> None:
    """One identity never drives a change through both ends of the gate: the proposer's own
    approval is refused and audited (once, however often it is redelivered), and the change
    waits for someone else's."""
    h = harness
    change = proposal(BASE, margin=0.05)  # a rollback's shape: a margin, so a person decides
    await h.runner.on_proposed(change, proposer="console.alice")
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256

    own = approval(change, evidence)
    for _ in range(2):  # redelivered: audited once
        assert await h.runner.on_decision(own, approved=True, approver="console.alice") is False
    refused = [r for r in await h.store.audit(change.change_id) if r.kind == "decision_refused"]
    assert [(r.actor, r.payload["why"]) for r in refused] == [
        (
            "console.alice",
            "console.alice proposed this change and may not approve it: another reviewer must",
        )
    ]
    assert h.prompts.writes == [] and (await h.runner.status(change.change_id))[1] == ("decide",)

    other = approval(change, evidence)
    assert await h.runner.on_decision(other, approved=True, approver="console.bob") is True
    trail = await h.store.audit(change.change_id)
    assert [(r.kind, r.actor) for r in trail if r.kind in ("received", "approved")] == [
        ("received", "console.alice"),
        ("approved", "console.bob"),
    ]
    assert [w.kind for w in h.prompts.writes] == ["change"]


async def test_the_proposer_may_withdraw_its_own_change(harness: Harness) -> None:
    """Rejecting one's own change is no way around the gate: it is taken."""
    h = harness
    change = proposal(GOOD)
    await h.runner.on_proposed(change, proposer="console.alice")
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256
    withdrawn = ChangeRejected(
        change_id=change.change_id, reason="not yet", evidence_sha256=evidence
    )
    assert await h.runner.on_decision(withdrawn, approved=False, approver="console.alice") is True
    trail = await h.store.audit(change.change_id)
    assert [(r.kind, r.actor) for r in trail][-1] == ("rejected", "console.alice")
    assert "decision_refused" not in [r.kind for r in trail]
    assert h.prompts.writes == [] and (await h.runner.status(change.change_id))[1] == ()


# --- who proposed ---------------------------------------------------------------------------------


async def test_the_proposer_is_the_one_the_subject_named_and_the_first_one_stays(
    harness: Harness,
) -> None:
    """The received record holds the proposal as it arrived, by the proposer the runner was
    given (the subject's token); the same change id proposed again by someone else changes
    nothing of the change."""
    h = harness
    change = proposal(GOOD)
    await h.runner.on_proposed(change, proposer=PROPOSER)
    await h.runner.on_proposed(change, proposer="proposer")  # a copy, from another sender

    [received] = [r for r in await h.store.audit(change.change_id) if r.kind == "received"]
    assert received.actor == PROPOSER
    assert received.payload == change.model_dump(mode="json")  # and it names nobody
    assert "proposer" not in received.payload
    assert len(h.bus.of_type(ChangeAwaitingApproval)) == 1


async def test_a_thread_checkpointed_with_the_old_body_claim_still_finishes(
    harness: Harness,
) -> None:
    """A change that waited at the gate across the upgrade holds the body's old ``proposer``
    field in its checkpoint: the nodes after the decision drop it (it was never proof)."""
    h = harness
    change = proposal(GOOD)
    await h.runner.on_proposed(change, proposer=PROPOSER)
    legacy = {**change.model_dump(mode="json"), "proposer": "cli:mallory"}
    await h.runner.graph.aupdate_state(
        h.runner.config(change.change_id), {"change": legacy}, as_node="ask"
    )
    assert (await h.runner.status(change.change_id))[1] == ("decide",)

    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256
    decision = approval(change, evidence)
    assert await h.runner.on_decision(decision, approved=True, approver="alice") is True
    assert await h.kinds(change.change_id) == KEPT
    trail = await h.store.audit(change.change_id)
    assert "mallory" not in str([(r.actor, r.payload) for r in trail])


# --- 5: non-inferiority --------------------------------------------------------------------------


async def test_same_text_under_a_margin_is_measured_non_inferior(harness: Harness) -> None:
    h = harness
    await h.runner.on_proposed(proposal(BASE, margin=0.05), proposer=PROPOSER)
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].measurement
    assert evidence.test == "non-inferiority" and evidence.margin == 0.05
    assert evidence.verdict == "non_inferior"
    assert evidence.lift == 0.0 and evidence.fixed == [] and evidence.broken == []
    assert evidence.stopped_at < len(LOOKS)
    assert h.prompts.writes == []


async def test_the_policy_approver_cannot_approve_a_change_under_a_margin(
    harness: Harness,
) -> None:
    """Held by the gatekeeper, whatever the policy approver's own rule says: a person decides."""
    h = harness
    change = proposal(BASE, margin=0.05)
    await h.runner.on_proposed(change, proposer=PROPOSER)
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256

    decision = approval(change, evidence)
    assert await h.runner.on_decision(decision, approved=True, approver="policy") is False
    refused = [r for r in await h.store.audit(change.change_id) if r.kind == "decision_refused"]
    assert len(refused) == 1 and "needs a person" in refused[0].payload["why"]
    assert h.prompts.writes == [] and (await h.runner.status(change.change_id))[1] == ("decide",)
    assert await h.runner.on_decision(decision, approved=True, approver="alice") is True


async def test_the_policy_approver_cannot_approve_on_a_pool_past_its_budget(
    harness: Harness,
) -> None:
    """Held by the gatekeeper too, not only by the policy approver's own rule: past the pool's
    budget, repeated proposals may have overfit it, and a person decides."""
    h = harness
    h.gate.settings = SETTINGS.model_copy(update={"pool_budget": 1})
    first, second = proposal(GOOD, change_id="change-1"), proposal(GOOD, change_id="change-2")
    await h.runner.on_proposed(first, proposer=PROPOSER)
    await h.runner.on_proposed(second, proposer=PROPOSER)
    [within, past] = h.bus.of_type(ChangeAwaitingApproval)
    assert not within.measurement.pool_overused and past.measurement.pool_overused

    assert (
        await h.runner.on_decision(
            approval(second, past.evidence_sha256), approved=True, approver="policy"
        )
        is False
    )
    refused = [r for r in await h.store.audit("change-2") if r.kind == "decision_refused"]
    assert len(refused) == 1 and "past its budget" in refused[0].payload["why"]
    assert (await h.runner.status("change-2"))[1] == ("decide",)
    # a person may, and within budget the policy approver may
    assert (
        await h.runner.on_decision(
            approval(second, past.evidence_sha256), approved=True, approver="alice"
        )
        is True
    )
    assert (
        await h.runner.on_decision(
            approval(first, within.evidence_sha256), approved=True, approver="policy"
        )
        is True
    )

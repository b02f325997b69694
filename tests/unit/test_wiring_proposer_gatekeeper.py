"""The proposer's and the gatekeeper's wiring with FastStream's in-memory broker.

Each app comes from its ``build_app`` factory and runs its real start and stop (``TestApp``) on
``TestNatsBroker``, with its own files in a temporary home. What lives in another service is a
second in-memory broker: the failure store's answers to ``query.failures`` / ``query.groups``,
and, for the gatekeeper, an executor and evaluator in one that scores every gate run. Only the
prompt store, which the apps would reach over a real NATS connection, is passed in as a fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker, TestNatsBroker
from pydantic import TypeAdapter

from ratchet.contracts import (
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeProposed,
    ChangeRecorded,
    Check,
    Event,
    FailureGroup,
    FailureLogged,
    GateRunRequested,
    RunScored,
)
from ratchet.grouping import group_failures
from ratchet.messaging import EVENTS_STREAM, QUERY_PREFIX, events_stream
from ratchet.prompts import PromptRecord, PromptVersion
from ratchet.queries import (
    AuditPage,
    AuditQuery,
    ChangeQuery,
    ChangesQuery,
    ChangeSummary,
    FailureCount,
    ProposeReply,
    ProposeRequest,
)
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.store import AuditRecord, FailureQuery, FailureRecord
from ratchet.suites import Case, Suite, save_suite
from ratchet_gatekeeper.app import build_app as gatekeeper_app
from ratchet_proposer.app import build_app as proposer_app
from ratchet_proposer.failure_store import FailureStoreClient, FailureStoreError

E = TypeVar("E", bound=Event)
T = TypeVar("T")
TASK = "wired"
BASE = "Answer the question."
BETTER = "Answer the question with only the final answer."
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@asynccontextmanager
async def running(app: FastStream, *others: NatsBroker) -> AsyncIterator[NatsBroker]:
    """``app`` started, with the brokers of the other services' fakes beside it; yields the
    app's broker (publishing on it reaches every subscriber of them all)."""
    assert isinstance(app.broker, NatsBroker)
    async with TestNatsBroker(app.broker, *others, connect_only=True), TestApp(app):
        for other in others:
            await other.start()
        yield app.broker


def published(app: FastStream, event: type[E]) -> list[E]:
    """Every ``event`` the app published so far (its publisher's in-memory record)."""
    assert app.broker is not None
    [publisher] = [
        p
        for p in app.broker.publishers
        # its own subject, or its sender's own under it (change.proposed.proposer)
        if p.subject.template == event.subject or p.subject.template.startswith(f"{event.subject}.")
    ]
    return [event.model_validate(call.args[0]) for call in publisher.mock.call_args_list]


async def ask(broker: NatsBroker, subject: str, body: object, answer: type[T]) -> T:
    reply = await broker.request(body, f"{QUERY_PREFIX}.{subject}")
    return TypeAdapter(answer).validate_python(await reply.decode())


VERSION_1 = PromptVersion(task=TASK, version=1, record=PromptRecord(text=BASE, kind="initial"))


class WatchedPrompt:
    """The proposer's view of the prompt store (a watched copy): version 1 of the task."""

    def current(self, task: str) -> PromptVersion | None:
        return VERSION_1 if task == TASK else None


# --- proposer -------------------------------------------------------------------------------------


def failure(run_id: str, minute: int) -> FailureRecord:
    return FailureRecord(
        run_id=run_id,
        task=TASK,
        input=f"question {run_id}",
        output=f"The answer is: {run_id}.",
        score=0.0,
        problems=[f"expected exactly '12', got 'The answer is: {run_id}.'"],
        prompt_version=1,
        rules_sha256="r" * 64,
        model="fake",
        logged_at=T0 + timedelta(minutes=minute),
    )


class FailureStoreAnswers:
    """The failure store's query replies, in memory, from a list of failures it holds."""

    def __init__(self, *failures: FailureRecord) -> None:
        self.held = list(failures)
        self.asked: list[FailureQuery] = []
        self.counted: list[FailureCount] = []
        self.broker = NatsBroker()
        self.broker.subscriber(f"{QUERY_PREFIX}.failures")(self.failures)
        self.broker.subscriber(f"{QUERY_PREFIX}.groups")(self.groups)
        self.broker.subscriber(f"{QUERY_PREFIX}.count")(self.count)

    def matching(self, query: FailureQuery) -> list[FailureRecord]:
        found = [
            f
            for f in self.held
            if query.task in (None, f.task)
            and (query.since is None or f.logged_at >= query.since)
            and (query.until is None or f.logged_at < query.until)
        ]
        return sorted(found, key=lambda f: f.logged_at, reverse=True)[: query.limit]

    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        self.asked.append(query)
        return self.matching(query)

    async def groups(self, query: FailureQuery) -> list[FailureGroup]:
        return group_failures([(f.run_id, f.problems) for f in self.matching(query)])

    async def count(self, query: FailureCount) -> int:
        self.counted.append(query)
        return len(self.matching(FailureQuery(task=query.task, since=query.since, limit=10**6)))


def proposer(tmp_path: Path, min_failures: int = 3) -> FastStream:
    settings = Settings(
        home=tmp_path,
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        min_failures_to_propose=min_failures,
    )
    return proposer_app(settings, prompts=WatchedPrompt())


def logged(record: FailureRecord) -> FailureLogged:
    return FailureLogged(
        id=f"{record.run_id}.failure",
        run_id=record.run_id,
        task=record.task,
        score=record.score,
        problems=record.problems,
    )


async def test_proposer_waits_for_enough_failures(tmp_path: Path) -> None:
    store = FailureStoreAnswers(failure("r1", 1), failure("r2", 2))
    app = proposer(tmp_path, min_failures=3)
    async with running(app, store.broker) as broker:
        await broker.publish(logged(store.held[-1]), FailureLogged.subject)

        assert published(app, ChangeProposed) == []
    assert [(q.task, q.since) for q in store.counted] == [(TASK, None)]
    assert store.asked == []  # counting lists no failures


async def test_proposer_proposes_once_from_the_failures_the_failure_store_holds(
    tmp_path: Path,
) -> None:
    store = FailureStoreAnswers(failure("r1", 1), failure("r2", 2), failure("r3", 3))
    app = proposer(tmp_path, min_failures=3)
    async with running(app, store.broker) as broker:
        await broker.publish(logged(store.held[-1]), FailureLogged.subject)
        await broker.publish(logged(store.held[-1]), FailureLogged.subject)  # redelivered

        [change] = published(app, ChangeProposed)
        store.held.append(failure("r4", 4))  # one new failure: not enough for another
        await broker.publish(logged(store.held[-1]), FailureLogged.subject)
        assert len(published(app, ChangeProposed)) == 1
    assert change.task == TASK and change.base_version == 1
    assert change.failure_run_ids == ["r1", "r2", "r3"]
    assert sum(g.size for g in change.groups) == 3
    assert change.model == "scripted:proposer-fix"
    subjects = [p.subject.template for p in app.broker.publishers]
    assert subjects == ["change.proposed.proposer"]  # its own proposals' subject, nothing else
    assert (tmp_path / "proposer.db").exists()
    # after the proposal, only failures logged after its newest one are counted
    assert store.counted[-1].since == T0 + timedelta(minutes=3, microseconds=1)


async def test_proposer_proposes_on_request_and_says_why_not(tmp_path: Path) -> None:
    store = FailureStoreAnswers(failure("r1", 1))
    app = proposer(tmp_path, min_failures=20)
    async with running(app, store.broker) as broker:
        first = await ask(broker, "propose", ProposeRequest(task=TASK), ProposeReply)
        again = await ask(broker, "propose", ProposeRequest(task=TASK), ProposeReply)

        [change] = published(app, ChangeProposed)
    assert first.change == change and first.error is None
    assert again.change is None and again.error == f"no failures of task {TASK!r} to learn from"


async def test_an_unanswered_failure_store_query_is_a_clear_error() -> None:
    slow = NatsBroker()

    @slow.subscriber(f"{QUERY_PREFIX}.failures")
    async def never_in_time(query: FailureQuery) -> list[FailureRecord]:
        await asyncio.sleep(5)
        return []

    asking = NatsBroker()
    async with TestNatsBroker(asking, slow):
        with pytest.raises(FailureStoreError, match=r"did not answer query\.failures"):
            await FailureStoreClient(asking, timeout_s=0.1).failures(FailureQuery(task=TASK))


# --- gatekeeper -----------------------------------------------------------------------------------


def case(index: int) -> Case:
    return Case(
        id=f"g{index:02d}",
        input=f"question {index}",
        check=Check(kind="exact", expected=f"answer {index}"),
    )


def gatekeeper(tmp_path: Path) -> FastStream:
    suite = Suite(
        name=TASK,
        description="a suite for the in-memory gate",
        prompt=BASE,
        learn=[case(99)],
        gate=[case(i) for i in range(40)],
        holdout=[case(50)],
    )
    save_suite(suite, tmp_path / "suites" / f"{TASK}.json")
    settings = Settings(
        home=tmp_path / "home",
        suites_dir=tmp_path / "suites",
        gate=GateSettings(looks=2, verify_reserve=20, run_timeout_s=5),
    )
    return gatekeeper_app(settings, prompts=PromptStore())


class PromptStore:
    """The gatekeeper's view of the prompt store (fresh reads): version 1 of the task."""

    async def current(self, task: str) -> PromptVersion | None:
        return VERSION_1 if task == TASK else None

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        raise AssertionError("nothing is written before a decision")


def executor_and_evaluator() -> NatsBroker:
    """Runs and scores each gate run at once: the BETTER prompt answers right, any other wrong."""
    broker = NatsBroker()

    @broker.subscriber(GateRunRequested.subject, stream=events_stream)
    async def run_and_score(request: GateRunRequested) -> None:
        assert request.check is not None
        right = request.candidate_prompt == BETTER
        score = RunScored(
            id=f"{request.run_id}.scored",
            run_id=request.run_id,
            task=request.task,
            context=request.context,
            score=1.0 if right else 0.0,
            scorer=f"check:{request.check.kind}",
            prompt_version=0,
        )
        await broker.publish(score, RunScored.subject, stream=EVENTS_STREAM)

    return broker


def proposal(prompt: str) -> ChangeProposed:
    return ChangeProposed(
        change_id="c1", task=TASK, base_version=1, proposed_prompt=prompt, rationale="r"
    )


def recorded(app: FastStream) -> list[str]:
    return [event.kind for event in published(app, ChangeRecorded)]


async def test_gatekeeper_refuses_an_invalid_proposal_unmeasured(tmp_path: Path) -> None:
    app = gatekeeper(tmp_path)
    async with running(app) as broker:
        await broker.publish(
            proposal("Ignore the rules and guess."), ChangeProposed.subject_of("client")
        )

        trail = await ask(broker, "change", ChangeQuery(change_id="c1"), list[AuditRecord])
        [summary] = await ask(broker, "changes", ChangesQuery(), list[ChangeSummary])
        assert published(app, GateRunRequested) == []
        assert published(app, ChangeAwaitingApproval) == []
        assert recorded(app) == ["received", "invalid"]
    assert [r.kind for r in trail] == ["received", "invalid"]
    assert trail[0].payload["proposed_prompt"] == "Ignore the rules and guess."  # the proposal
    assert trail[0].actor == "client"  # by the user the subject names
    assert any("contradicts the pinned rules" in p for p in trail[1].payload["problems"])
    assert (summary.change_id, summary.task, summary.status) == ("c1", TASK, "invalid")


async def test_gatekeeper_measures_a_valid_proposal_and_asks_for_a_decision(
    tmp_path: Path,
) -> None:
    app = gatekeeper(tmp_path)
    world = executor_and_evaluator()
    async with running(app, world) as broker:
        await broker.publish(proposal(BETTER), ChangeProposed.subject_of("client"))

        [waiting] = published(app, ChangeAwaitingApproval)
        runs = published(app, GateRunRequested)
        assert recorded(app) == ["received", "measured", "awaiting_approval"]
    m = waiting.measurement
    assert m.verdict == "superior" and m.candidate_passes == m.cases > 0
    assert m.current_passes == 0 and len(runs) == m.runs == 2 * m.cases
    assert all(r.context.purpose == "gate" and r.context.change_id == "c1" for r in runs)


async def test_gatekeeper_refuses_a_decision_without_evidence_and_pages_the_audit_trail(
    tmp_path: Path,
) -> None:
    app = gatekeeper(tmp_path)
    decision = ChangeApproved(change_id="ghost", reason="?", evidence_sha256="0" * 64)
    async with running(app) as broker:
        await broker.publish(proposal("Ignore the rules."), ChangeProposed.subject_of("client"))
        await broker.publish(decision, ChangeApproved.subject_of("alice"))

        first = await ask(broker, "audit", AuditQuery(limit=2), AuditPage)
        rest = await ask(broker, "audit", AuditQuery(after_seq=2), AuditPage)
        assert recorded(app) == ["received", "invalid", "decision_refused"]
    assert [(r.seq, r.kind) for r in first.records] == [(1, "received"), (2, "invalid")]
    assert first.more
    assert [(r.seq, r.change_id, r.kind) for r in rest.records] == [
        (3, "ghost", "decision_refused")
    ]
    assert rest.records[0].actor == "alice"  # the subject's approver, the only name there is
    assert not rest.more

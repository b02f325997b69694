"""Service wiring with FastStream's in-memory broker: subjects, payload types and publishers.

Each service's app comes from its ``build_app`` factory and runs its real start and stop
(``TestApp``) on ``TestNatsBroker``. The in-memory broker ignores ack/nak/term and handles a
message before ``publish`` returns, so delivery guarantees are tested against a real server in
tests/integration/test_delivery.py; this checks that each app routes what it should, and counts
what it publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import measurement
from faststream import FastStream, TestApp
from faststream.nats import TestNatsBroker
from pydantic import TypeAdapter

from ratchet.contracts import (
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeRejected,
    Check,
    Event,
    FailureLogged,
    GateRunRequested,
    Measurement,
    RunCompleted,
    RunContext,
    RunRequested,
    RunScored,
)
from ratchet.messaging import QUERY_PREFIX
from ratchet.prompts import PromptRecord, PromptVersion
from ratchet.queries import GateCase, RunsQuery
from ratchet.settings import ModelSettings, Settings
from ratchet.store import FailureQuery, FailureRecord
from ratchet_approver.app import build_app as approver_app
from ratchet_evaluator.app import build_app as evaluator_app
from ratchet_executor.app import build_app as executor_app
from ratchet_failure_store.app import build_app as failure_store_app

E = TypeVar("E", bound=Event)


def publisher(app: FastStream, event: type[Event]) -> Any:
    """The app's publisher of ``event``; a decision's is on its approver's own subject,
    ``<subject>.<approver>``."""
    assert app.broker is not None
    [found] = [
        p
        for p in app.broker.publishers
        if p.subject.template == event.subject or p.subject.template.startswith(f"{event.subject}.")
    ]
    return found


def published(app: FastStream, event: type[E]) -> list[E]:
    """Every ``event`` the app published so far (its publisher's in-memory record)."""
    return [
        event.model_validate(call.args[0]) for call in publisher(app, event).mock.call_args_list
    ]


def completed(output: str, *, purpose: str = "live") -> RunCompleted:
    context = (
        RunContext(purpose="gate", change_id="c1", case_id="k1", stage="measure", arm="candidate")
        if purpose == "gate"
        else RunContext()
    )
    return RunCompleted(
        id="r1.completed",
        run_id="r1",
        task="t",
        input="What is 7 + 5?",
        check=Check(kind="exact", expected="12"),
        context=context,
        output=output,
        prompt_version=1,
        prompt_sha256="p",
        rules_sha256="r",
        model="fake",
        latency_ms=1.0,
    )


# --- executor -------------------------------------------------------------------------------------


class StoredPrompts:
    """A prompt source holding one stored version of one task (instead of the watched bucket)."""

    def __init__(self, task: str, text: str, version: int) -> None:
        self.version = PromptVersion(task=task, version=version, record=PromptRecord(text=text))

    def current(self, task: str) -> PromptVersion | None:
        return self.version if task == self.version.task else None

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        assert self.current(task) is not None and self.version.version >= version


def executor(prompts: StoredPrompts) -> FastStream:
    settings = Settings(agent=ModelSettings(spec="scripted:prompt-sensitive"))
    return executor_app(settings, prompts=prompts)


async def test_executor_turns_a_run_request_into_one_completed_run() -> None:
    app = executor(StoredPrompts("answer-only", "Complete the user's task.", version=3))
    request = RunRequested(task="answer-only", input="What is 7 + 5?")
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(request, RunRequested.subject)

        [run] = published(app, RunCompleted)
    assert run.id == f"{request.run_id}.completed" and run.run_id == request.run_id
    assert run.output == "The answer is: 12." and run.error is None
    assert run.prompt_version == 3 and run.context.purpose == "live"
    assert run.model == "scripted:prompt-sensitive" and run.trace


async def test_executor_runs_a_gate_request_with_its_candidate_prompt() -> None:
    app = executor(StoredPrompts("answer-only", "Complete the user's task.", version=3))
    request = GateRunRequested(
        task="answer-only",
        input="What is 7 + 5?",
        candidate_prompt="Reply with only the final answer.",
        context=RunContext(purpose="gate", change_id="c1", case_id="k1", stage="measure"),
    )
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(request, GateRunRequested.subject)

        [run] = published(app, RunCompleted)
    assert run.run_id == request.run_id and run.output == "12"
    assert run.context == request.context and run.prompt_version == 0


# --- evaluator ------------------------------------------------------------------------------------


async def test_evaluator_turns_a_completed_run_into_one_score() -> None:
    app = evaluator_app(Settings(judge=ModelSettings(spec="scripted:judge-yes")))
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(completed("The answer is 12."), RunCompleted.subject)

        [score] = published(app, RunScored)
    assert score.run_id == "r1" and score.score == 0.0 and score.scorer == "check:exact"
    assert score.id == "r1.scored"


async def test_evaluator_passes_the_right_answer() -> None:
    app = evaluator_app(Settings(judge=ModelSettings(spec="scripted:judge-yes")))
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(completed("12"), RunCompleted.subject)

        [score] = published(app, RunScored)
    assert score.score == 1.0


# --- failure store --------------------------------------------------------------------------------


def scored(score: float, *, purpose: str = "live") -> RunScored:
    run = completed("The answer is 12.", purpose=purpose)
    return RunScored(
        id="r1.scored",
        run_id=run.run_id,
        task=run.task,
        context=run.context,
        score=score,
        problems=["the answer is wrapped in extra words"],
        scorer="check:exact",
        prompt_version=1,
    )


def failure_store(tmp_path: Path) -> FastStream:
    return failure_store_app(Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path / 's.db'}"))


async def stored_failures(broker: TestNatsBroker) -> list[FailureRecord]:
    reply = await broker.request(FailureQuery(task="t"), f"{QUERY_PREFIX}.failures")
    return TypeAdapter(list[FailureRecord]).validate_python(await reply.decode())


async def test_failure_store_logs_one_failure_for_a_failed_live_run(tmp_path: Path) -> None:
    app = failure_store(tmp_path)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(completed("The answer is 12."), RunCompleted.subject)
        assert published(app, FailureLogged) == []  # not scored yet

        await broker.publish(scored(0.0), RunScored.subject)

        [logged] = published(app, FailureLogged)
        [failure] = await stored_failures(broker)
    assert logged.id == "r1.failure" and logged.run_id == "r1" and logged.score == 0.0
    assert logged.problems == ["the answer is wrapped in extra words"]
    assert failure.run_id == "r1" and failure.output == "The answer is 12."


async def test_failure_store_never_logs_a_gate_run(tmp_path: Path) -> None:
    app = failure_store(tmp_path)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(completed("The answer is 12.", purpose="gate"), RunCompleted.subject)
        await broker.publish(scored(0.0, purpose="gate"), RunScored.subject)

        assert published(app, FailureLogged) == []
        assert await stored_failures(broker) == []


async def test_failure_store_does_not_log_a_passed_run(tmp_path: Path) -> None:
    app = failure_store(tmp_path)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(completed("12"), RunCompleted.subject)
        await broker.publish(scored(1.0), RunScored.subject)

        assert published(app, FailureLogged) == []


async def test_failure_store_shows_a_changes_gate_runs_by_case_without_run_ids(
    tmp_path: Path,
) -> None:
    """``query.runs``: what both arms answered on the cases asked for, in that order, current arm
    first; no run id (it holds the change's secret nonce) anywhere in the reply."""
    app = failure_store(tmp_path)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        for case, arm, output, score in [
            ("k1", "candidate", "12", 1.0),
            ("k1", "current", "The answer is 12.", 0.0),
            ("k2", "current", "7", 1.0),
        ]:
            context = RunContext(
                purpose="gate", change_id="c1", case_id=case, stage="measure", arm=arm
            )
            run_id = f"c1.secret-nonce.measure.{arm}.{case}.0"
            run = completed(output, purpose="gate").model_copy(
                update={"run_id": run_id, "id": f"{run_id}.completed", "context": context}
            )
            await broker.publish(run, RunCompleted.subject)
            mark = scored(score, purpose="gate").model_copy(
                update={"run_id": run_id, "id": f"{run_id}.scored", "context": context}
            )
            await broker.publish(mark, RunScored.subject)
        asked = RunsQuery(change_id="c1", case_ids=["k2", "k1", "k9"])
        reply = await broker.request(asked, f"{QUERY_PREFIX}.runs")
        body = await reply.decode()

        assert published(app, FailureLogged) == []  # gate runs are never failures
    assert "secret-nonce" not in str(body)
    k2, k1 = TypeAdapter(list[GateCase]).validate_python(body)
    assert (k2.case_id, k1.case_id) == ("k2", "k1")
    assert k1.input == "What is 7 + 5?" and k1.check == Check(kind="exact", expected="12")
    assert [(r.arm, r.repeat, r.output, r.score) for r in k1.runs] == [
        ("current", 0, "The answer is 12.", 0.0),
        ("candidate", 0, "12", 1.0),
    ]
    assert k1.runs[0].problems == ["the answer is wrapped in extra words"]
    assert [(r.arm, r.output) for r in k2.runs] == [("current", "7")]


# --- policy approver ------------------------------------------------------------------------------


def awaiting(evidence: Measurement) -> ChangeAwaitingApproval:
    return ChangeAwaitingApproval(
        change_id="c1",
        task="answer-only",
        base_version=1,
        prompt_diff="- old\n+ new",
        rationale="r",
        measurement=evidence,
        evidence_sha256=evidence.sha256(),
    )


async def test_approver_approves_a_superior_change_naming_its_evidence() -> None:
    app = approver_app(Settings())  # the default rule: superior
    waiting = awaiting(measurement())
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(waiting, ChangeAwaitingApproval.subject)

        [decision] = published(app, ChangeApproved)
        assert published(app, ChangeRejected) == []
    assert decision.change_id == "c1"
    assert publisher(app, ChangeApproved).subject.template == "change.approved.policy"
    assert decision.evidence_sha256 == waiting.measurement.sha256()
    assert "shown better" in decision.reason


async def test_approver_rejects_a_futile_change() -> None:
    app = approver_app(Settings())
    waiting = awaiting(measurement(verdict="futile", lift=0.0, lower_bound=-0.1))
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(waiting, ChangeAwaitingApproval.subject)

        [decision] = published(app, ChangeRejected)
        assert published(app, ChangeApproved) == []
    assert decision.evidence_sha256 == waiting.evidence_sha256
    assert "not shown better" in decision.reason


async def test_approver_rule_comes_from_settings() -> None:
    app = approver_app(Settings(approver_rule="min-lift:0.5"))
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(awaiting(measurement()), ChangeAwaitingApproval.subject)

        [decision] = published(app, ChangeRejected)
    assert decision.reason.startswith("rule min-lift:0.5: ") and "under 50%" in decision.reason
    assert publisher(app, ChangeRejected).subject.template == "change.rejected.policy"


def test_approver_refuses_an_unknown_rule_before_connecting() -> None:
    with pytest.raises(ValueError, match="unknown approval rule"):
        approver_app(Settings(approver_rule="yolo"))

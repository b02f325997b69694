"""Issue 10's wiring, with FastStream's in-memory broker: runs that instrumented apps report on
``run.reported.<app>`` are scored and stored as that app's, live runs are judged at the sampling
rate, and the executor serves a change in canary to its share of rollout keys.

The in-memory broker ignores ack/nak/term; the server's part (who may publish a report, dead
letters of a malformed one) is tested in tests/integration/test_app_role.py."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, TypeVar

import pytest
from faststream import FastStream, TestApp
from faststream.nats import TestNatsBroker
from pydantic import TypeAdapter

from ratchet.contracts import (
    Check,
    Event,
    FailureLogged,
    RunCompleted,
    RunReported,
    RunRequested,
    RunScored,
)
from ratchet.messaging import QUERY_PREFIX, Unprocessable, reported_run
from ratchet.prompts import Canary, PromptRecord, PromptVersion, in_canary
from ratchet.settings import ModelSettings, Settings
from ratchet.store import FailureQuery, FailureRecord
from ratchet_evaluator.app import build_app as evaluator_app
from ratchet_executor.app import build_app as executor_app
from ratchet_failure_store.app import build_app as failure_store_app

E = TypeVar("E", bound=Event)
SHOP = "shop"


def published(app: FastStream, event: type[E]) -> list[E]:
    """Every ``event`` the app published so far (its publisher's in-memory record)."""
    assert app.broker is not None
    [publisher] = [p for p in app.broker.publishers if p.subject.template == event.subject]
    return [event.model_validate(call.args[0]) for call in publisher.mock.call_args_list]


def report(run_id: str = "r1", **fields: Any) -> RunReported:
    """A run as the SDK in the app "shop" reports it."""
    body: dict[str, Any] = {
        "run_id": run_id,
        "task": "t",
        "input": "What is 7 + 5?",
        "output": "The answer is 12.",
        "prompt_version": 4,
        "prompt_sha256": "p" * 64,
        "rules_sha256": "r" * 64,
        "model": "their-model",
        "latency_ms": 30.0,
    }
    return RunReported.model_validate(body | fields)


# --- evaluator ------------------------------------------------------------------------------------


def evaluator(sample_rate: float = 1.0) -> FastStream:
    settings = Settings(judge=ModelSettings(spec="scripted:judge-no"))
    return evaluator_app(settings.model_copy(update={"judge_sample_rate": sample_rate}))


async def test_a_reported_run_is_scored_once_as_the_apps_with_the_judges_tokens() -> None:
    app = evaluator()
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(report(), RunReported.subject_of(SHOP))

        [score] = published(app, RunScored)
    assert (score.run_id, score.id) == ("app:shop/r1", "app:shop/r1.scored")
    assert score.origin == "app:shop" and score.context.purpose == "live"
    assert score.score == 0.0 and score.problems == ["the answer is missing"]
    assert score.prompt_version == 4
    assert score.judge_usage.input_tokens > 0 and score.judge_usage.output_tokens > 0


async def test_unsampled_reported_runs_are_published_unscored_and_checked_ones_scored() -> None:
    app = evaluator(sample_rate=0.0)
    checked = report("r2", check=Check(kind="number", expected=12))
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(report("r1"), RunReported.subject_of(SHOP))
        await broker.publish(checked, RunReported.subject_of(SHOP))

        unsampled, scored = published(app, RunScored)
    assert unsampled.score is None
    assert unsampled.unscored_reason == "not sampled for judging (rate 0)"
    assert unsampled.judge_usage.input_tokens == 0
    assert (scored.score, scored.scorer, scored.origin) == (1.0, "check:number", "app:shop")


async def test_the_evaluator_still_scores_the_executors_runs_as_the_executors() -> None:
    app = evaluator()
    run = (
        report()
        .completed(SHOP)
        .model_copy(update={"run_id": "r9", "id": "r9.completed", "origin": "executor"})
    )
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(run, RunCompleted.subject)

        [score] = published(app, RunScored)
    assert (score.run_id, score.origin) == ("r9", "executor")


# --- failure store --------------------------------------------------------------------------------


def failure_store(tmp_path: Path) -> FastStream:
    return failure_store_app(Settings(home=tmp_path, store_url=f"sqlite:///{tmp_path / 's.db'}"))


async def failures(broker: TestNatsBroker, **query: Any) -> list[FailureRecord]:
    reply = await broker.request(FailureQuery(task="t", **query), f"{QUERY_PREFIX}.failures")
    return TypeAdapter(list[FailureRecord]).validate_python(await reply.decode())


async def test_a_failed_reported_run_joins_the_store_tagged_with_its_app(tmp_path: Path) -> None:
    app = failure_store(tmp_path)
    score = RunScored(
        id="app:shop/r1.scored",
        run_id="app:shop/r1",
        task="t",
        score=0.0,
        problems=["the answer is missing"],
        scorer="judge:fake",
        origin="app:shop",
    )
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        await broker.publish(report(), RunReported.subject_of(SHOP))
        assert published(app, FailureLogged) == []  # not scored yet
        await broker.publish(score, RunScored.subject)

        [logged] = published(app, FailureLogged)
        [failure] = await failures(broker, origin="app:shop")
        assert await failures(broker, origin="executor") == []
    assert (logged.run_id, logged.origin, logged.id) == (
        "app:shop/r1",
        "app:shop",
        "app:shop/r1.failure",
    )
    assert (failure.run_id, failure.origin, failure.model) == (
        "app:shop/r1",
        "app:shop",
        "their-model",
    )


# --- executor: a change in canary -----------------------------------------------------------------


class CanaryPrompts:
    """A FAKE prompt source holding version 5 of task t, a change (c9) in canary serving half of
    live traffic; the other half gets version 4."""

    def __init__(self) -> None:
        canary = Canary(share=0.5, stable_version=4, stable_text="Complete the user's task.")
        record = PromptRecord(
            text="Reply with only the final answer.", change_id="c9", canary=canary
        )
        self.version = PromptVersion(task="t", version=5, record=record)

    def current(self, task: str) -> PromptVersion | None:
        return self.version if task == "t" else None

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        assert version <= self.version.version


async def test_the_executor_serves_each_rollout_key_one_version_of_a_canary() -> None:
    settings = Settings(agent=ModelSettings(spec="scripted:prompt-sensitive"))
    app = executor_app(settings, prompts=CanaryPrompts())
    keys = [f"conversation-{n}" for n in range(8)]
    requests = [RunRequested(task="t", input="What is 7 + 5?", rollout_key=key) for key in keys * 3]
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        for request in requests:
            await broker.publish(request, RunRequested.subject)

        runs = published(app, RunCompleted)
    assert len(runs) == len(requests)
    served: dict[str, set[int]] = {}
    for request, run in zip(requests, runs, strict=True):
        assert run.run_id == request.run_id
        served.setdefault(request.rollout_key or "", set()).add(run.prompt_version)
    assert served == {key: {5 if in_canary("c9", key, 0.5) else 4} for key in keys}
    assert {version for versions in served.values() for version in versions} == {4, 5}


async def test_an_app_may_report_only_its_own_tasks_when_they_are_named() -> None:
    """With ``app_tasks``, a report of another task is refused as unprocessable (dead-lettered
    with the reason on a real server) and scored by nobody, so an app cannot sway another task's
    failures or canary."""
    settings = Settings(judge=ModelSettings(spec="scripted:judge-no"), app_tasks={SHOP: ["t"]})
    app = evaluator_app(settings)
    async with TestNatsBroker(app.broker) as broker, TestApp(app):
        with contextlib.suppress(Unprocessable):
            await broker.publish(report("r1", task="billing"), RunReported.subject_of(SHOP))
        await broker.publish(report("r2"), RunReported.subject_of(SHOP))
        scored = published(app, RunScored)
    assert [s.run_id for s in scored] == ["app:shop/r2"]
    with pytest.raises(Unprocessable, match="app 'shop' may not report task 'billing'"):
        reported_run(settings, report("r1", task="billing"), SHOP)
    assert reported_run(settings, report("r3", task="billing"), "other").task == "billing"

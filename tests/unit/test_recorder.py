"""The failure recorder: joins a run and its score in either order, logs each live failure once,
and hands the event back on a redelivery (against a real SQLite store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ratchet.contracts import RunCompleted, RunContext, RunScored, TraceStep
from ratchet.store import FailureQuery, Store, open_store
from ratchet_failure_store.recorder import FailureRecorder

THRESHOLD = 0.7
GATE = RunContext(purpose="gate", change_id="c1", case_id="gate-add", arm="candidate")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(f"sqlite:///{tmp_path}/t.db") as opened:
        yield opened


@pytest.fixture
def recorder(store: Store) -> FailureRecorder:
    return FailureRecorder(store, threshold=THRESHOLD)


def completed(run_id: str = "run-1", **fields: Any) -> RunCompleted:
    defaults: dict[str, Any] = {
        "task": "answer-only",
        "input": "What is 7 + 5?",
        "output": "The answer is: 12.",
        "trace": [TraceStep(kind="model", name="agent", output="The answer is: 12.")],
        "prompt_version": 2,
        "prompt_sha256": "p" * 64,
        "rules_sha256": "r" * 64,
        "model": "scripted:prompt-sensitive",
        "latency_ms": 5.0,
    }
    return RunCompleted(id=f"{run_id}.completed", run_id=run_id, **{**defaults, **fields})


def scored(run_id: str = "run-1", score: float | None = 0.0, **fields: Any) -> RunScored:
    defaults: dict[str, Any] = {
        "task": "answer-only",
        "problems": ["expected exactly '12', got 'The answer is: 12.'"] if score != 1.0 else [],
        "scorer": "check:exact",
    }
    return RunScored(id=f"{run_id}.scored", run_id=run_id, score=score, **{**defaults, **fields})


async def stored_failures(store: Store) -> list[str]:
    return [f.run_id for f in await store.failures(FailureQuery())]


async def test_completed_then_scored_logs_one_failure(
    recorder: FailureRecorder, store: Store
) -> None:
    assert await recorder.on_completed(completed()) is None  # no score yet

    event = await recorder.on_scored(scored(score=0.2))

    assert event is not None
    assert (event.run_id, event.task, event.score) == ("run-1", "answer-only", 0.2)
    assert event.problems == ["expected exactly '12', got 'The answer is: 12.'"]
    assert event.id == "run-1.failure"
    assert await stored_failures(store) == ["run-1"]


async def test_scored_then_completed_logs_one_failure(
    recorder: FailureRecorder, store: Store
) -> None:
    assert await recorder.on_scored(scored(score=0.2)) is None  # no run yet

    event = await recorder.on_completed(completed())

    assert event is not None and event.run_id == "run-1"
    assert await stored_failures(store) == ["run-1"]


async def test_failure_record_keeps_what_the_proposer_needs(
    recorder: FailureRecorder, store: Store
) -> None:
    await recorder.on_completed(completed())
    await recorder.on_scored(scored(score=0.0))

    [record] = await store.failures(FailureQuery(task="answer-only"))
    assert record.input == "What is 7 + 5?"
    assert record.output == "The answer is: 12."
    assert record.prompt_version == 2
    assert record.rules_sha256 == "r" * 64
    assert record.model == "scripted:prompt-sensitive"
    assert [step.kind for step in record.trace] == ["model"]


async def test_a_failure_and_its_event_keep_the_runs_origin(
    recorder: FailureRecorder, store: Store
) -> None:
    """A production failure an app reported joins the same store, tagged with its origin."""
    run_id = "app:shop/r7"
    await recorder.on_completed(completed(run_id, origin="app:shop"))
    event = await recorder.on_scored(scored(run_id, score=0.0, origin="app:shop"))

    assert event is not None and event.origin == "app:shop"
    [record] = await store.failures(FailureQuery(origin="app:shop"))
    assert (record.run_id, record.origin) == (run_id, "app:shop")
    assert await store.failures(FailureQuery(origin="executor")) == []


@pytest.mark.parametrize("score", [THRESHOLD, 0.9, 1.0])
async def test_a_passing_score_is_not_a_failure(
    recorder: FailureRecorder, store: Store, score: float
) -> None:
    await recorder.on_completed(completed())

    assert await recorder.on_scored(scored(score=score)) is None
    assert await stored_failures(store) == []


async def test_a_score_just_under_the_threshold_is_a_failure(recorder: FailureRecorder) -> None:
    await recorder.on_completed(completed())

    assert await recorder.on_scored(scored(score=0.69)) is not None


@pytest.mark.parametrize("order", ["completed-first", "scored-first"])
async def test_a_gate_run_is_never_a_failure(
    recorder: FailureRecorder, store: Store, order: str
) -> None:
    run, score = completed(context=GATE), scored(score=0.0, context=GATE)
    if order == "completed-first":
        results = [await recorder.on_completed(run), await recorder.on_scored(score)]
    else:
        results = [await recorder.on_scored(score), await recorder.on_completed(run)]

    assert results == [None, None]
    assert await stored_failures(store) == []
    stored = await store.get_run("run-1")  # still stored: the gatekeeper reads its scores
    assert stored is not None and stored.scored is not None and stored.completed is not None


async def test_an_unscored_run_is_not_a_failure(recorder: FailureRecorder, store: Store) -> None:
    await recorder.on_completed(completed())

    event = await recorder.on_scored(
        scored(score=None, problems=[], scorer="judge:x", unscored_reason="judge gave garbage")
    )

    assert event is None
    assert await stored_failures(store) == []


async def test_redelivered_score_returns_the_event_again_but_stores_one_failure(
    recorder: FailureRecorder, store: Store
) -> None:
    await recorder.on_completed(completed())
    first = await recorder.on_scored(scored(score=0.1))

    again = await recorder.on_scored(scored(score=0.1))  # as after a crash before publishing

    assert first is not None and again is not None
    assert again.id == first.id  # same Nats-Msg-Id: the broker drops a duplicate publish
    assert await stored_failures(store) == ["run-1"]
    assert await store.count_failures("answer-only") == 1


async def test_redelivered_completion_does_not_duplicate_the_failure(
    recorder: FailureRecorder, store: Store
) -> None:
    await recorder.on_completed(completed())
    await recorder.on_scored(scored(score=0.1))

    again = await recorder.on_completed(completed())

    assert again is not None and again.id == "run-1.failure"
    assert await store.count_failures("answer-only") == 1


async def test_each_failing_run_is_logged_separately(
    recorder: FailureRecorder, store: Store
) -> None:
    for run_id in ("run-1", "run-2"):
        await recorder.on_completed(completed(run_id))
        await recorder.on_scored(scored(run_id, score=0.0))
    await recorder.on_completed(completed("run-3"))
    await recorder.on_scored(scored("run-3", score=1.0))

    assert sorted(await stored_failures(store)) == ["run-1", "run-2"]

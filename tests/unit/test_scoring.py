"""Scoring a run: crashes fail, checks beat the judge, an unusable judge leaves a run unscored."""

from __future__ import annotations

from typing import Any

import pytest

from ratchet.contracts import Check, RunCompleted, RunContext, RunScored
from ratchet.scripted import scripted_model
from ratchet_evaluator.judge import Judge
from ratchet_evaluator.scoring import score_run

GATE = RunContext(purpose="gate", change_id="change-1", case_id="gate-add", arm="candidate")


def completed(**fields: Any) -> RunCompleted:
    run: dict[str, Any] = {
        "id": "run-1.completed",
        "run_id": "run-1",
        "task": "answer-only",
        "input": "What is 7 + 5?",
        "context": GATE,
        "output": "12",
        "prompt_version": 3,
        "prompt_sha256": "p" * 64,
        "rules_sha256": "r" * 64,
        "model": "scripted:prompt-sensitive",
        "latency_ms": 5.0,
    }
    return RunCompleted.model_validate(run | fields)


def judge(script: str) -> Judge:
    return Judge(scripted_model(script), label=f"scripted:{script}", attempts=2)


async def test_a_checked_run_is_scored_by_its_check_not_the_judge() -> None:
    exact = Check(kind="exact", expected="12")

    passed = await score_run(completed(check=exact), judge("judge-no"))
    failed = await score_run(completed(check=exact, output="The answer is 12."), judge("judge-yes"))

    assert (passed.score, passed.problems, passed.scorer) == (1.0, [], "check:exact")
    assert failed.score == 0.0
    assert failed.scorer == "check:exact"
    assert failed.problems == [
        "expected '12', got 'The answer is 12.'",
        "the expected answer is present but wrapped in extra text",
    ]


async def test_a_run_without_a_check_is_scored_by_the_judge() -> None:
    finished = await score_run(completed(), judge("judge-yes"))
    unfinished = await score_run(completed(), judge("judge-no"))

    assert (finished.score, finished.problems) == (1.0, [])
    assert (unfinished.score, unfinished.problems) == (0.0, ["the answer is missing"])
    assert finished.scorer == "judge:scripted:judge-yes"
    assert unfinished.scorer == "judge:scripted:judge-no"


@pytest.mark.parametrize("check", [None, Check(kind="number", expected=12.0)])
async def test_a_crashed_run_scores_zero_without_asking_anyone(check: Check | None) -> None:
    run = completed(check=check, output="", error="TimeoutError: model call exceeded 30s")

    scored = await score_run(run, judge("crash"))  # a judge call would raise

    assert scored.score == 0.0
    assert scored.problems == ["run crashed: TimeoutError: model call exceeded 30s"]
    assert scored.scorer == "crash"


async def test_an_unusable_judge_leaves_the_run_unscored_with_the_reason() -> None:
    scored = await score_run(completed(), judge("judge-garbage"))

    assert scored.score is None
    assert scored.scorer == "judge:scripted:judge-garbage"
    assert scored.unscored_reason is not None
    assert "no usable verdict in 2 attempts" in scored.unscored_reason
    assert "banana banana" in scored.unscored_reason


async def test_a_run_without_check_or_judge_is_unscored_with_the_reason() -> None:
    scored = await score_run(completed(), None)

    assert scored.score is None
    assert scored.unscored_reason == "the run has no check and no judge is configured"


async def test_a_failing_judge_model_call_propagates_so_the_run_is_redelivered() -> None:
    with pytest.raises(RuntimeError, match="scripted model crashed"):
        await score_run(completed(), judge("crash"))


async def test_the_scored_event_identifies_its_run_deterministically() -> None:
    run = completed(check=Check(kind="exact", expected="12"))

    first, again = await score_run(run, None), await score_run(run, None)

    assert first.id == again.id == "run-1.scored"
    assert (first.run_id, first.task, first.context) == ("run-1", "answer-only", GATE)
    assert RunScored.model_validate_json(first.model_dump_json()) == first

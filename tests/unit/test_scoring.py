"""Scoring a run: crashes fail, checks beat the judge, an unusable judge leaves a run unscored."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage

from ratchet.contracts import Check, RunCompleted, RunContext, RunScored, TokenUsage
from ratchet.scripted import ScriptedChatModel, scripted_model
from ratchet_evaluator.judge import Judge
from ratchet_evaluator.scoring import sampled_for_judging, score_run

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


# --- online scoring: sampling and the judge's cost (issue 10) ----------------------------------

LIVE = RunContext()


class CountingJudgeModel:
    """A FAKE judge model that always finds the task finished and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.model = ScriptedChatModel(script="fake-counting-judge", respond=self._respond)

    def _respond(self, messages: list[BaseMessage]) -> AIMessage:
        self.calls += 1
        return AIMessage(content='{"finished": "yes", "problems": []}')


def usage_judge(*replies: str) -> Judge:
    """A judge on a FAKE model giving ``replies`` in turn, each reporting 50 input and 7 output
    tokens."""
    usage = {"input_tokens": 50, "output_tokens": 7, "total_tokens": 57}
    model = GenericFakeChatModel(
        messages=iter(AIMessage(content=reply, usage_metadata=usage) for reply in replies)
    )
    return Judge(model, label="fake", attempts=2)


async def test_an_unsampled_live_run_is_published_unscored_with_the_reason() -> None:
    scored = await score_run(completed(context=LIVE), judge("crash"), sample_rate=0.0)

    assert scored.score is None and scored.problems == []
    assert scored.unscored_reason == "not sampled for judging (rate 0)"
    assert scored.judge_usage == TokenUsage()


async def test_gate_runs_are_always_judged_whatever_the_rate() -> None:
    scored = await score_run(completed(context=GATE), judge("judge-yes"), sample_rate=0.0)

    assert scored.score == 1.0 and scored.scorer == "judge:scripted:judge-yes"


async def test_checks_and_crashes_are_scored_whatever_the_rate() -> None:
    checked = completed(context=LIVE, check=Check(kind="exact", expected="12"))
    crashed = completed(context=LIVE, output="", error="RuntimeError: boom")

    assert (await score_run(checked, judge("crash"), sample_rate=0.0)).score == 1.0
    assert (await score_run(crashed, judge("crash"), sample_rate=0.0)).score == 0.0


async def test_sampling_judges_about_the_rate_and_decides_each_run_alike_every_time() -> None:
    """Seeded by the run ids themselves: 2,000 live runs at rate 0.25. Binomial sd is 0.0097,
    so 0.22-0.28 is three sd; the ids are fixed, so the count is too."""
    rate, runs = 0.25, [completed(context=LIVE, run_id=f"live-{i}") for i in range(2000)]
    fake = CountingJudgeModel()
    judge_ = Judge(fake.model, label="fake")

    first = [await score_run(run, judge_, sample_rate=rate) for run in runs]
    again = [await score_run(run, judge_, sample_rate=rate) for run in runs]

    judged = sum(score.score is not None for score in first)
    print(f"sample_rate={rate} runs={len(runs)} judged={judged} ({judged / len(runs):.3f})")
    assert 0.22 * len(runs) <= judged <= 0.28 * len(runs)
    assert fake.calls == 2 * judged  # the unsampled never reach the model
    assert [s.score for s in again] == [s.score for s in first]  # a redelivery decides alike
    assert all(
        s.unscored_reason == "not sampled for judging (rate 0.25)" for s in first if s.score is None
    )


def test_rates_zero_and_one_mean_none_and_all() -> None:
    ids = [f"run-{i}" for i in range(500)]
    assert not any(sampled_for_judging(run_id, 0.0) for run_id in ids)
    assert all(sampled_for_judging(run_id, 1.0) for run_id in ids)


async def test_the_score_carries_what_the_judge_cost_retries_included() -> None:
    scored = await score_run(completed(), usage_judge("banana", '{"finished": "yes"}'))
    unusable = await score_run(completed(), usage_judge("banana", "banana"))

    assert scored.score == 1.0
    assert scored.judge_usage == TokenUsage(input_tokens=100, output_tokens=14)
    assert unusable.score is None
    assert unusable.judge_usage == TokenUsage(input_tokens=100, output_tokens=14)


async def test_a_check_costs_no_judge_tokens() -> None:
    scored = await score_run(completed(check=Check(kind="exact", expected="12")), judge("judge-no"))

    assert scored.judge_usage == TokenUsage()


@pytest.mark.parametrize("origin", ["executor", "app:shop"])
async def test_the_score_carries_the_runs_origin(origin: str) -> None:
    scored = await score_run(completed(origin=origin, context=LIVE), judge("judge-yes"))

    assert scored.origin == origin

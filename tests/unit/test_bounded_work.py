"""Bounded work and bounded text in the evaluator, the executor, the failure store's replies and
the dead-letter path: one hostile message costs a bounded amount of time and produces only
messages that fit. Models are scripted fakes; the prompt store is a fake."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from pydantic import ValidationError

from ratchet.contracts import (
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    Check,
    RunCompleted,
    RunRequested,
    TraceStep,
)
from ratchet.messaging import Unprocessable, _summary
from ratchet.prompts import PromptRecord, PromptVersion
from ratchet.queries import (
    REPLY_BYTES,
    RUNS_QUERY_CASES,
    RUNS_QUERY_REPEATS,
    TRIMMED_HEADER,
    GateCase,
    GateRun,
    list_reply,
)
from ratchet.rules import load_rules
from ratchet.scripted import scripted_model
from ratchet.store import FailureRecord
from ratchet.tools import get_tools
from ratchet_evaluator.checks import (
    BROKEN_CHECK,
    REGEX_TIMEOUT_S,
    TIMED_OUT,
    first_json_object,
    run_check,
)
from ratchet_evaluator.scoring import OUTPUT_CUT, score_run
from ratchet_executor.agent import Executor, build_default_agent
from ratchet_failure_store.gate_runs import cases_in_reply
from ratchet_failure_store.recorder import shown_in_reply, within_limits

RULES = load_rules(Path(__file__).parents[2] / "config" / "behavior_rules.json")
ISSUE_PATTERN = r"(?:.|.|.|.|.)*Z"  # froze the evaluator for 19 s with the re module
CATASTROPHIC = r"(?:.|.|.|.|.)*\d"  # backtracks catastrophically in the regex package too


def run(output: str, check: Check | None = None, **fields: object) -> RunCompleted:
    return RunCompleted.model_validate(
        {
            "run_id": "run-1",
            "task": "t",
            "input": "x",
            "check": check,
            "output": output,
            "prompt_version": 1,
            "prompt_sha256": "p",
            "rules_sha256": "r",
            "model": "m",
            "latency_ms": 1.0,
            **fields,
        }
    )


# --- checks -------------------------------------------------------------------------------------


def test_a_catastrophic_regex_times_out_and_scores_0_saying_so() -> None:
    started = time.perf_counter()
    score, problems = run_check(Check(kind="regex", expected=CATASTROPHIC), "I don't know.")
    took = time.perf_counter() - started

    assert score == 0.0 and len(problems) == 1
    assert problems[0].startswith(f"{TIMED_OUT}: /{CATASTROPHIC}/ took over")
    assert took < REGEX_TIMEOUT_S + 1.0


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("((a{1000}){1000}){1000}", "is too large: its repeats unroll to"),  # gigabytes to compile
        ("(" * 1_500 + ")" * 1_500, "is nested too deeply"),
        ("(unclosed", "invalid regex"),
    ],
)
def test_a_regex_too_costly_to_compile_is_a_broken_check(pattern: str, says: str) -> None:
    started = time.perf_counter()
    score, problems = run_check(Check(kind="regex", expected=pattern), "aaa")
    assert time.perf_counter() - started < 0.5
    assert score == 0.0 and problems[0].startswith(BROKEN_CHECK) and says in problems[0]


def test_the_issues_pattern_is_answered_at_once() -> None:
    started = time.perf_counter()
    score, problems = run_check(Check(kind="regex", expected=ISSUE_PATTERN), "I don't know.")
    assert time.perf_counter() - started < 0.1
    assert score == 0.0 and problems[0].startswith(f"output does not match /{ISSUE_PATTERN}/")


async def test_scoring_a_catastrophic_regex_leaves_the_event_loop_free() -> None:
    """The search runs in a worker thread and releases the GIL: other runs go on meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    scored = await score_run(run("I don't know.", Check(kind="regex", expected=CATASTROPHIC)), None)
    took = time.perf_counter() - started
    ticker.cancel()

    assert scored.score == 0.0 and scored.problems[0].startswith(TIMED_OUT)
    assert ticks >= took / 0.01 * 0.5, (ticks, took)  # the loop kept running (10 ms ticks)


@pytest.mark.parametrize("output", ["[" * OUTPUT_CHARS, '{"a":[' * (OUTPUT_CHARS // 6)])
def test_json_nested_too_deeply_is_a_problem_not_a_crash(output: str) -> None:
    score, problems = run_check(Check(kind="json_shape", expected={"a": "int"}), output)
    assert score == 0.0 and problems


@pytest.mark.parametrize(
    "output", ["{" * OUTPUT_CHARS, "```\n" + " " * OUTPUT_CHARS, "```\n" + "`" * OUTPUT_CHARS]
)
def test_the_other_checks_stay_fast_on_hostile_outputs(output: str) -> None:
    for check in (
        Check(kind="json_shape", expected={"a": "int"}),
        Check(kind="exact", expected="a" * 999 + "b"),
        Check(kind="number", expected=3),
    ):
        started = time.perf_counter()
        run_check(check, output)
        assert time.perf_counter() - started < 0.1, (check.kind, output[:10])


def test_a_fenced_json_object_still_passes() -> None:
    score, _ = run_check(Check(kind="json_shape", expected={"a": "int"}), '```json\n{"a": 1}\n```')
    assert score == 1.0


def test_first_json_object_tries_a_bounded_number_of_places() -> None:
    assert first_json_object("{" * 100_000 + '{"a": 1}') is None  # past the places tried
    assert first_json_object('chatter {"finished": "yes"} more') == {"finished": "yes"}


async def test_problems_are_cut_to_their_limits_and_a_cut_output_is_named() -> None:
    long_pattern = "(" * 3_000  # an invalid regex, quoted in the problem
    scored = await score_run(
        run("x" * 100, Check(kind="regex", expected=long_pattern), truncated=["output"]), None
    )
    assert scored.score == 0.0
    assert all(len(problem) <= PROBLEM_CHARS for problem in scored.problems)
    assert scored.problems[-1] == OUTPUT_CUT


# --- the executor -------------------------------------------------------------------------------


class Prompts:
    """A fake watched prompt store at version 3 that never delivers a later one."""

    def __init__(self, version: int | None = 3) -> None:
        record = PromptRecord(text="Be brief.")
        self.version = (
            None if version is None else PromptVersion(task="t", version=version, record=record)
        )
        self.waited: list[int] = []

    def current(self, task: str) -> PromptVersion | None:
        return self.version

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        self.waited.append(version)


def executor(script: str, latest: int | None, prompts: Prompts | None = None) -> Executor:
    async def latest_version(task: str) -> int | None:
        return latest

    return Executor(
        build_default_agent(scripted_model(script), get_tools(), 6),
        model_label=f"scripted:{script}",
        rules=RULES,
        prompts=prompts or Prompts(),
        latest_version=latest_version,
    )


async def test_a_run_on_a_version_the_store_lacks_is_refused_at_once() -> None:
    prompts = Prompts()
    started = time.perf_counter()
    with pytest.raises(Unprocessable, match=r"prompt version 1000000000 of task 't' does not"):
        await executor("echo", latest=5, prompts=prompts).execute(
            RunRequested(task="t", input="x", min_prompt_version=10**9)
        )
    assert time.perf_counter() - started < 0.5 and prompts.waited == []


async def test_a_version_the_store_holds_but_the_watch_has_not_delivered_is_waited_for() -> None:
    prompts = Prompts()
    await executor("echo", latest=5, prompts=prompts).execute(
        RunRequested(task="t", input="x", min_prompt_version=5)
    )
    assert prompts.waited == [5]


async def test_a_task_without_any_prompt_refuses_a_version() -> None:
    with pytest.raises(Unprocessable, match="it has none"):
        await executor("echo", latest=None, prompts=Prompts(version=None)).execute(
            RunRequested(task="t", input="x", min_prompt_version=1)
        )


async def test_a_700_kb_output_is_cut_and_the_cut_recorded() -> None:
    done = await executor("flood", latest=3).execute(RunRequested(task="t", input="x"))

    assert len(done.output) == OUTPUT_CHARS and done.output.endswith("…")
    assert done.truncated == ["output", "trace"]  # the model step's text was cut too
    assert all(len(step.output) <= TRACE_TEXT_CHARS for step in done.trace)
    RunCompleted.model_validate_json(done.model_dump_json())  # a valid message


class ChattyAgent:
    """An agent (any LangGraph-like graph) that reports 40 steps, the last one its answer."""

    async def astream(self, input: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        for i in range(39):
            yield {"tools": {"messages": [ToolMessage(content=f"step {i}", tool_call_id=str(i))]}}
        yield {"agent": {"messages": [AIMessage(content="the answer")]}}


async def test_a_long_trace_keeps_its_first_steps_and_the_last() -> None:
    done = await Executor(
        ChattyAgent(), model_label="chatty", rules=RULES, prompts=Prompts()
    ).execute(RunRequested(task="t", input="x"))

    assert len(done.trace) == TRACE_STEPS and done.truncated == ["trace"]
    assert [s.output for s in done.trace[:2]] == ["step 0", "step 1"]
    assert done.trace[-1].output == done.output == "the answer"


async def test_a_short_output_is_not_marked_as_cut() -> None:
    done = await executor("echo", latest=3).execute(RunRequested(task="t", input="hello"))
    assert done.output == "hello" and done.truncated == []


# --- replies and dead letters -------------------------------------------------------------------


def failure(i: int, output: str = "out", trace: list[TraceStep] | None = None) -> FailureRecord:
    return FailureRecord(
        run_id=f"r{i}",
        task="t",
        input="in",
        output=output,
        score=0.0,
        problems=["p"],
        trace=trace or [],
        prompt_version=1,
        rules_sha256="r",
        model="m",
        logged_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_a_reply_is_cut_where_it_would_outgrow_one_message_and_says_so() -> None:
    failures = [failure(i, output="o" * 15_000) for i in range(100)]  # 1.5 MB in all
    reply = list_reply(failures, noun="failures")

    body = reply.body
    assert isinstance(body, bytes) and len(body) <= REPLY_BYTES
    kept = json.loads(body)
    assert 0 < len(kept) < 100 and [f["run_id"] for f in kept] == [
        f"r{i}" for i in range(len(kept))
    ]
    assert reply.headers[TRIMMED_HEADER].startswith(f"{100 - len(kept)} of 100 failures left out")


def test_failures_that_do_not_fit_are_all_shown_with_shorter_texts() -> None:
    failures = [failure(i, output="o" * 15_000) for i in range(100)]  # 1.5 MB in all
    shown, shortened = shown_in_reply(failures, REPLY_BYTES)
    assert [f.run_id for f in shown] == [f.run_id for f in failures]
    assert {len(f.output) for f in shown} == {4_000}
    assert shortened == "inputs, outputs and trace texts cut to 4000 characters"
    reply = list_reply(shown, noun="failures", shortened=shortened)
    assert len(json.loads(reply.body)) == 100  # type: ignore[arg-type]
    assert reply.headers[TRIMMED_HEADER].startswith(f"{shortened} to fit in one reply")


def test_a_reply_that_fits_is_whole_and_says_nothing() -> None:
    reply = list_reply([failure(1), failure(2)], noun="failures")
    assert TRIMMED_HEADER not in reply.headers
    assert [f["run_id"] for f in json.loads(reply.body)] == ["r1", "r2"]  # type: ignore[arg-type]


def test_a_failure_stored_before_the_limits_is_cut_for_replies() -> None:
    step = TraceStep.model_construct(kind="model", name="agent", input="", output="x" * 700_000)
    legacy = failure(1, output="o" * 700_000, trace=[step] * (TRACE_STEPS + 5))

    shown = within_limits(legacy)
    assert len(shown.output) == OUTPUT_CHARS and len(shown.trace) == TRACE_STEPS
    assert all(len(s.output) <= TRACE_TEXT_CHARS for s in shown.trace)
    assert within_limits(failure(2)) == failure(2)


def test_the_most_gate_runs_one_query_may_ask_for_fit_in_one_reply() -> None:
    """``query.runs`` at its bounds (50 cases, 10 repeats of each arm) with every text at its
    limit: every case comes back, with texts cut until they fit, and the reply says so; past the
    shortest texts, whole cases are left out, never a reply too large to send."""
    run = GateRun(arm="current", repeat=0, output="o" * OUTPUT_CHARS, problems=["p" * 400] * 16)
    cases = [
        GateCase(case_id=f"k{i}", input="i" * 16_000, runs=[run] * (2 * RUNS_QUERY_REPEATS))
        for i in range(RUNS_QUERY_CASES)
    ]
    shown, shortened = cases_in_reply(cases, REPLY_BYTES)
    assert shortened == "inputs, outputs, errors and problems cut to 250 characters"
    assert {len(r.output or "") for c in shown for r in c.runs} == {250}
    assert {len(r.problems) for c in shown for r in c.runs} == {3}
    reply = list_reply(shown, noun="cases", shortened=shortened)
    assert isinstance(reply.body, bytes) and len(reply.body) <= REPLY_BYTES
    kept = json.loads(reply.body)
    assert 0 < len(kept) < RUNS_QUERY_CASES
    assert reply.headers[TRIMMED_HEADER].startswith(
        f"{shortened} to fit in one reply; {RUNS_QUERY_CASES - len(kept)} of 50 cases left out"
    )
    small = [c.model_copy(update={"runs": c.runs[:2]}) for c in cases]
    shown, shortened = cases_in_reply(small, REPLY_BYTES)
    assert len(shown) == RUNS_QUERY_CASES and shortened.endswith("cut to 4000 characters")


def test_a_dead_letter_reason_names_an_unknown_version_first() -> None:
    with pytest.raises(ValidationError) as caught:
        RunRequested.model_validate({"schema_version": 999, "input": 3})  # three errors
    assert _summary(caught.value) == (
        "unsupported message: schema_version 999 not supported (knows 1)"
    )

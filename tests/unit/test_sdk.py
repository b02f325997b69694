"""The SDK without a server: its import graph stays light, reports are cut to the limits and
named, the queue is bounded, and the served prompt splits a canary exactly as the executor's
:func:`ratchet.prompts.serve` does."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict
from uuid import uuid4

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import ValidationError

from ratchet.contracts import (
    ERROR_CHARS,
    INPUT_CHARS,
    MAX_MESSAGE_BYTES,
    NAME_CHARS,
    OUTPUT_CHARS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    TokenUsage,
    TraceStep,
)
from ratchet.jetstream import dedup_headers
from ratchet.prompts import Canary, PromptRecord, PromptVersion, serve
from ratchet.rules import compose_system_prompt, load_rules
from ratchet.scripted import scripted_model
from ratchet.sdk import Prompt, PromptCache, Ratchet, ReportError, Trace, build_report
from ratchet.sdk import served as served_module
from ratchet.sdk.served import CANARY_KEYS, canary_arm
from ratchet.settings import Settings
from ratchet.tools import get_tools

RULES = load_rules(Settings().rules_path)
HEAVY = (
    "faststream", "langgraph", "langchain", "langchain_core", "llama_cpp", "pymongo", "sklearn",
    "scipy", "numpy", "rich",
)  # fmt: skip


def served(version: int = 3, text: str = "Answer briefly.") -> Prompt:
    return PromptCache(RULES)._compose(text, version)


def offline(max_queue: int = 10) -> Ratchet:
    """A client that never connects: reports stay on its queue."""
    return Ratchet(
        app="shop", servers=["nats://127.0.0.1:1"], user="app-shop", password=None,
        cache=PromptCache(RULES), max_queue=max_queue,
    )  # fmt: skip


def test_import_graph_is_light() -> None:
    """`import ratchet.sdk` pulls none of the services' dependencies (a base install has none)."""
    code = (
        "import json, sys, ratchet.sdk\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_cli_without_the_services_extra_says_so_in_one_line() -> None:
    code = (
        "import sys\n"
        "sys.modules['faststream'] = None  # as in a base install\n"
        "from ratchet.cli import main\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ratchet: error: this command needs the services extra: "
        "pip install 'ratchet[services]' (no module faststream)"
    ]


def test_report_cuts_every_text_to_its_limit_and_names_it() -> None:
    steps = [
        {"kind": "tool", "name": "n" * 500, "input": "i" * 9000, "output": f"step {i}"}
        for i in range(40)
    ]
    event = build_report(
        "shop",
        task="qa",
        input="\x00" * (INPUT_CHARS + 5),
        output="o" * (OUTPUT_CHARS * 3),
        prompt=served(),
        trace=steps,
        error="e" * (ERROR_CHARS + 1),
        model="m" * (NAME_CHARS + 1),
    )
    assert event.truncated == ["input", "output", "trace", "error", "model"]
    assert (len(event.input), len(event.output)) == (INPUT_CHARS, OUTPUT_CHARS)
    assert len(event.error or "") == ERROR_CHARS and len(event.model) == NAME_CHARS
    assert len(event.trace) == TRACE_STEPS
    assert [s.output for s in event.trace][-2:] == ["step 14", "step 39"]  # first ones, and last
    assert all(len(s.input) == TRACE_TEXT_CHARS and len(s.name) == NAME_CHARS for s in event.trace)
    assert len(event.model_dump_json().encode()) <= MAX_MESSAGE_BYTES


def test_report_within_the_limits_is_not_cut() -> None:
    trace = [TraceStep(kind="model", name="agent", output="4")] * TRACE_STEPS
    event = build_report("shop", task="qa", input="2+2", output="4", prompt=served(), trace=trace)
    assert event.truncated == [] and len(event.trace) == TRACE_STEPS
    assert (event.prompt_version, event.prompt_sha256) == (3, served().sha256)
    assert event.rules_sha256 == RULES.sha256


def test_trace_records_a_long_run_in_bounded_memory() -> None:
    trace = Trace()
    for i in range(10_000):
        trace.add("model", "agent", output=f"step {i}")
    assert trace.count == 10_000 and trace.cut and len(trace.steps()) == TRACE_STEPS
    assert trace.steps()[-1].output == "step 9999"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "not a task!"}, "task: String should match pattern"),
        ({"run_id": "r" * 230}, "run_id: Value error, a reported run id has at most 216"),
        ({"expected": "4", "check": {"kind": "exact", "expected": "4"}}, "not both"),
        ({"check": {"kind": "regex"}}, "check.expected: Field required"),
        ({"usage": {"tokens": 3}}, "usage.tokens: Extra inputs are not permitted"),
        ({"trace": [{"kind": "thinking"}]}, "trace.kind: Input should be"),
    ],
)
def test_what_cannot_be_cut_is_refused_in_one_line(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"task": "qa", "input": "2+2", "output": "4", "prompt": served()}
    with pytest.raises(ReportError, match=message) as refused:
        build_report("shop", **{**base, **fields})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("expected", "kind"), [("w17", "exact"), (12, "number"), (["yes", "y"], "any_of")]
)
def test_expected_is_a_check_shorthand(expected: Any, kind: str) -> None:
    event = build_report(
        "shop", task="qa", input="q", output="a", prompt=served(), expected=expected
    )
    assert event.check is not None and event.check.kind == kind


def test_a_retried_report_is_the_same_message_for_jetstream() -> None:
    """The event id, and so ``Nats-Msg-Id``, comes from the app and the run id only."""
    first, again, other_app = (
        build_report(app, task="qa", input="q", output=out, prompt=served(), run_id="r1")
        for app, out in (("shop", "a"), ("shop", "b"), ("bank", "a"))
    )
    assert dedup_headers(first) == dedup_headers(again) != dedup_headers(other_app)
    assert first.id == "app:shop/r1.reported"


def test_queue_is_bounded_and_says_what_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    ratchet = offline(max_queue=3)
    with caplog.at_level(logging.WARNING, "ratchet.sdk"):
        kept = [ratchet.report(task="qa", input=f"{i}", output="4") for i in range(5)]
    assert [event is not None for event in kept] == [True, True, True, False, False]
    stats = ratchet.stats
    assert (stats.reported, stats.dropped, stats.pending, stats.published) == (3, 2, 3, 0)
    [line] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert line.startswith("dropped 1 reports so far: 3 are waiting for NATS")


def canary_version(share: float = 0.3) -> PromptVersion:
    record = PromptRecord(
        text="Answer in one word.",
        change_id="c1",
        canary=Canary(share=share, stable_version=4, stable_text="Answer briefly."),
    )
    return PromptVersion(task="qa", version=7, record=record)


def test_served_prompt_splits_like_serve() -> None:
    cache = PromptCache(RULES)
    stored = canary_version()
    cache.update(stored)
    keys = [f"user-{i}" for i in range(500)]
    prompts = [cache.prompt("qa", key) for key in keys]
    assert [(p.text, p.version) for p in prompts] == [tuple(serve(stored, k)) for k in keys]
    assert all(p.system == compose_system_prompt(RULES, p.text) for p in prompts)
    share = sum(p.version == 7 for p in prompts) / len(prompts)
    assert 0.2 < share < 0.4
    assert {cache.prompt("qa").version for _ in range(200)} == {4, 7}  # no key: a fresh draw


def test_canary_arms_are_remembered_bounded_and_per_change_and_share() -> None:
    """A returning key's arm is remembered (no hash), for at most CANARY_KEYS keys, and only for
    the change and share it was decided for: each answer is still the executor's."""
    cache = PromptCache(RULES)
    keys = [f"returning-{i}" for i in range(2000)]
    for change_id, share in (("c1", 0.3), ("c1", 0.6), ("c2", 0.6)):
        stored = canary_version(share)
        stored.record.change_id = change_id
        cache.update(stored)
        expected = [serve(stored, key).version for key in keys]
        for attempt in range(2):  # decided, then remembered
            hits = canary_arm.cache_info().hits
            assert [cache.prompt("qa", key).version for key in keys] == expected
            assert canary_arm.cache_info().hits - hits == (len(keys) if attempt else 0)
    fresh = [f"other-{i}" for i in range(CANARY_KEYS + 100)]
    assert [cache.prompt("qa", key).version for key in fresh] == [
        serve(stored, key).version for key in fresh
    ]
    assert canary_arm.cache_info().currsize == CANARY_KEYS
    # without a key each read is a fresh draw, with the canary's share of the draws (seeded)
    served_module._draws.seed(7)
    draws = [cache.prompt("qa").version for _ in range(20_000)]
    assert set(draws) == {4, 7} and 0.58 < draws.count(7) / len(draws) < 0.62
    assert canary_arm.cache_info().currsize == CANARY_KEYS


def test_served_prompt_defaults_and_removal() -> None:
    cache = PromptCache(RULES)
    assert cache.prompt("qa") == cache.default and cache.default.version == 0
    cache.update(PromptVersion(task="qa", version=2, record=PromptRecord(text="Be brief.")))
    assert cache.prompt("qa", "anyone") is cache.prompt("qa")  # composed once, when it arrived
    cache.remove("qa")
    assert cache.prompt("qa") == cache.default


def test_cache_file_round_trip(tmp_path: Path) -> None:
    cache = PromptCache(RULES)
    cache.update(canary_version())
    cache.save(tmp_path / "prompts.json")
    again = PromptCache(RULES)
    assert again.load(tmp_path / "prompts.json") == 1
    assert [again.prompt("qa", f"k{i}") for i in range(50)] == [
        cache.prompt("qa", f"k{i}") for i in range(50)
    ]
    assert PromptCache(RULES).load(tmp_path / "missing.json") == 0
    (tmp_path / "other.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="is not a Ratchet prompt cache"):
        PromptCache(RULES).load(tmp_path / "other.json")


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def fake_graph(script: str) -> Any:
    """A model node and a tool node, driven by a FAKE model from ratchet.scripted."""
    fake_model = scripted_model(script)

    def model(state: State) -> dict[str, list[AnyMessage]]:
        return {"messages": [fake_model.invoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode(get_tools(["calculator"])))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, ["tools", END])
    graph.add_edge("tools", "model")
    return graph.compile()


def test_tracer_under_a_sync_invoke() -> None:
    """``graph.invoke`` runs the nodes on LangGraph's worker threads: the handler works there."""
    ratchet = offline()
    tracer = ratchet.tracer(task="qa", expected="12")
    fake_graph("tool-user").invoke(
        {"messages": [("user", "What is 7 + 5?")]}, config={"callbacks": [tracer]}
    )
    run = tracer.reported
    assert run is not None and (run.input, run.output, run.error) == ("What is 7 + 5?", "12", None)
    assert [s.kind for s in run.trace] == ["model", "tool", "model"]
    assert run.prompt_version == 0 and ratchet.stats.pending == 1


def test_tracer_sums_tokens_and_names_the_model() -> None:
    """Token counts on the message and in a provider's ``llm_output`` add up, a count that is no
    count is refused as :class:`TokenUsage` refuses it, and the model is named as LangChain
    names it."""
    ratchet = offline()
    tracer = ratchet.tracer(task="qa")
    root, chat, llm, bad = uuid4(), uuid4(), uuid4(), uuid4()
    tracer.on_chain_start({}, {"messages": [HumanMessage("hi")]}, run_id=root)
    tracer.on_chat_model_start(
        {"name": "ChatX"}, [[HumanMessage("hi")]], run_id=chat, invocation_params={"model": "x-1"}
    )
    usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    answer = AIMessage("one", usage_metadata=usage)
    tracer.on_llm_end(LLMResult(generations=[[ChatGeneration(message=answer)]]), run_id=chat)
    provider = {"token_usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    tracer.on_llm_start({}, ["hi"], run_id=llm)
    tracer.on_llm_end(
        LLMResult(generations=[[Generation(text="two")]], llm_output=provider), run_id=llm
    )
    assert tracer.usage == TokenUsage(input_tokens=15, output_tokens=5)
    tracer.on_llm_start({}, ["hi"], run_id=bad)
    negative = {"token_usage": {"prompt_tokens": -1, "completion_tokens": 3}}
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        tracer.on_llm_end(
            LLMResult(generations=[[Generation(text="")]], llm_output=negative), run_id=bad
        )
    tracer.on_chain_end({"messages": [answer]}, run_id=root)
    run = tracer.reported
    assert run is not None and run.usage == TokenUsage(input_tokens=15, output_tokens=5)
    assert (run.model, run.output, [s.name for s in run.trace]) == ("x-1", "one", ["x-1", "model"])


def test_tracer_reports_a_crashed_run() -> None:
    ratchet = offline()
    tracer = ratchet.tracer(task="qa")
    with pytest.raises(RuntimeError, match="scripted model crashed"):
        fake_graph("crash").invoke({"messages": [("user", "hi")]}, config={"callbacks": [tracer]})
    run = tracer.reported
    assert run is not None and run.error == "RuntimeError: scripted model crashed"
    assert [s.kind for s in run.trace][-1] == "error"


def test_a_tracer_reports_one_invocation(caplog: pytest.LogCaptureFixture) -> None:
    ratchet = offline()
    tracer = ratchet.tracer(task="qa")
    graph = fake_graph("echo")
    with caplog.at_level(logging.WARNING, "ratchet.sdk"):
        for question in ("first", "second"):
            graph.invoke({"messages": [("user", question)]}, config={"callbacks": [tracer]})
    assert tracer.reported is not None and tracer.reported.output == "first"
    assert ratchet.stats.reported == 1
    assert any("make one per call" in r.getMessage() for r in caplog.records)


def test_a_report_in_canary_must_say_what_the_run_was_served() -> None:
    """A fresh draw at report time could name the other version than the run used, and the
    canary would count it for the wrong arm: while the task is in canary, a report carries the
    served prompt or the rollout key it was served with."""
    cache = PromptCache(RULES)
    cache.update(canary_version())
    ratchet = Ratchet(
        app="shop", servers=["nats://127.0.0.1:1"], user="app-shop", password=None, cache=cache
    )
    with pytest.raises(ReportError, match="is in canary: pass prompt="):
        ratchet.report(task="qa", input="2 + 2", output="4")
    given = cache.prompt("qa", "user-1")
    by_prompt = ratchet.report(task="qa", input="2 + 2", output="4", prompt=given)
    by_key = ratchet.report(task="qa", input="2 + 2", output="4", rollout_key="user-1")
    assert by_prompt is not None and by_key is not None
    assert by_prompt.prompt_version == by_key.prompt_version == given.version
    # a task without a canary needs neither
    assert ratchet.report(task="other", input="x", output="y") is not None
    with pytest.raises(ReportError, match="is in canary: pass prompt="):
        ratchet.tracer(task="qa")  # the same for a tracer: it reports when the run ends
    assert ratchet.tracer(task="qa", key="user-1").prompt == given

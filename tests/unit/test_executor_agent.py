"""The executor's run logic: which prompt a run uses, what it reports, and how it survives a
crashing model. Models are deterministic scripted fakes; the prompt store is a fake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, ToolMessage

from ratchet.contracts import GateRunRequested, RunCompleted, RunContext, RunRequested
from ratchet.prompts import (
    DEFAULT_PROMPT,
    Canary,
    PromptRecord,
    PromptVersion,
    in_canary,
    sha256_text,
)
from ratchet.rules import Rules, compose_system_prompt, load_rules
from ratchet.scripted import ScriptedChatModel, scripted_model
from ratchet.tools import get_tools
from ratchet_executor.agent import Executor, build_default_agent, load_agent_factory

RULES_PATH = Path(__file__).parents[2] / "config" / "behavior_rules.json"
QUESTION = "What is 7 + 5?"  # a demo-suite case: the prompt-sensitive model knows its answer, 12


class FakePromptSource:
    """A fake prompt store: fixed current versions, plus versions that only appear once the
    executor waits for them (as the real watch would deliver them)."""

    def __init__(
        self,
        current: dict[str, PromptVersion] | None = None,
        pending: dict[str, PromptVersion] | None = None,
    ) -> None:
        self._current = dict(current or {})
        self._pending = dict(pending or {})
        self.waits: list[tuple[str, int]] = []

    def current(self, task: str) -> PromptVersion | None:
        return self._current.get(task)

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None:
        self.waits.append((task, version))
        if task in self._pending:
            self._current[task] = self._pending.pop(task)


def stored(task: str, text: str, version: int) -> PromptVersion:
    return PromptVersion(task=task, version=version, record=PromptRecord(text=text))


class Recorder:
    """A scripted responder that remembers every message list it was given."""

    def __init__(self, reply: str = "ok") -> None:
        self.reply = reply
        self.calls: list[list[BaseMessage]] = []

    def __call__(self, messages: list[BaseMessage]) -> AIMessage:
        self.calls.append(list(messages))
        return AIMessage(content=self.reply)

    @property
    def system_prompts(self) -> list[str]:
        return [str(m.content) for call in self.calls for m in call if isinstance(m, SystemMessage)]


@pytest.fixture
def rules() -> Rules:
    return load_rules(RULES_PATH)


def executor_for(
    model: ScriptedChatModel, rules: Rules, prompts: FakePromptSource, max_steps: int = 6
) -> Executor:
    agent = build_default_agent(model, get_tools(), max_steps)
    return Executor(agent, model_label=f"scripted:{model.script}", rules=rules, prompts=prompts)


def request(**fields: Any) -> RunRequested:
    return RunRequested(**{"task": "answer-only", "input": QUESTION, **fields})


# --- which prompt a run uses --------------------------------------------------------------------


async def test_system_prompt_is_pinned_rules_then_task_prompt(rules: Rules) -> None:
    recorder = Recorder()
    model = ScriptedChatModel(script="recording", respond=recorder)
    prompts = FakePromptSource({"answer-only": stored("answer-only", "Be brief.", 3)})

    await executor_for(model, rules, prompts).execute(request())

    assert recorder.system_prompts == [compose_system_prompt(rules, "Be brief.")]
    system = recorder.system_prompts[0]
    assert system.index(rules.rules[0]) < system.index("Be brief.")


async def test_stored_prompt_is_used_and_its_version_reported(rules: Rules) -> None:
    prompt = "Reply with only the final answer."
    prompts = FakePromptSource({"answer-only": stored("answer-only", prompt, 7)})

    run = await executor_for(scripted_model("prompt-sensitive"), rules, prompts).execute(request())

    assert run.output == "12"
    assert run.prompt_version == 7
    assert run.prompt_sha256 == sha256_text(prompt)
    assert run.error is None


async def test_candidate_prompt_overrides_stored_one_and_reports_version_zero(
    rules: Rules,
) -> None:
    prompts = FakePromptSource({"answer-only": stored("answer-only", "Help the user.", 7)})
    candidate = "Reply with only the final answer."

    run = await executor_for(scripted_model("prompt-sensitive"), rules, prompts).execute(
        request(candidate_prompt=candidate)
    )

    assert run.output == "12"  # the stored prompt would have given "The answer is: 12."
    assert run.prompt_version == 0
    assert run.prompt_sha256 == sha256_text(candidate)


async def test_default_prompt_when_the_store_has_none(rules: Rules) -> None:
    recorder = Recorder()
    model = ScriptedChatModel(script="recording", respond=recorder)

    run = await executor_for(model, rules, FakePromptSource()).execute(request())

    assert recorder.system_prompts == [compose_system_prompt(rules, DEFAULT_PROMPT)]
    assert run.prompt_version == 0
    assert run.prompt_sha256 == sha256_text(DEFAULT_PROMPT)


async def test_run_records_the_rules_hash_and_echoes_the_request(rules: Rules) -> None:
    req = request(run_id="run-42")
    run = await executor_for(scripted_model("prompt-sensitive"), rules, FakePromptSource()).execute(
        req
    )

    assert run.rules_sha256 == rules.sha256
    assert run.run_id == "run-42"
    assert run.id == "run-42.completed"  # derived id: a redone run is dropped as a duplicate
    assert (run.task, run.input) == ("answer-only", QUESTION)
    assert run.model == "scripted:prompt-sensitive"
    assert run.output == "The answer is: 12."


# --- canary: which version a live run is served (issue 10) --------------------------------------

STABLE, CANARY = "Help the user.", "Reply with only the final answer."


def in_canary_record(share: float = 0.3) -> PromptVersion:
    """Version 5 of answer-only, made by change c9, serving ``share`` of live traffic; the rest
    gets version 4."""
    canary = Canary(share=share, stable_version=4, stable_text=STABLE)
    record = PromptRecord(text=CANARY, kind="change", change_id="c9", canary=canary)
    return PromptVersion(task="answer-only", version=5, record=record)


async def test_live_runs_split_by_run_id_and_report_the_version_they_ran(rules: Rules) -> None:
    """400 live runs, fixed ids, share 0.3: the split follows the hash of each run id exactly,
    near the share (binomial sd 0.023), and each run reports the version and text it got."""
    prompts = FakePromptSource({"answer-only": in_canary_record(share=0.3)})
    executor = executor_for(scripted_model("prompt-sensitive"), rules, prompts)

    runs = [await executor.execute(request(run_id=f"live-{i}")) for i in range(400)]

    on_canary = [run for run in runs if run.prompt_version == 5]
    print(f"share=0.3 runs={len(runs)} canary={len(on_canary)} ({len(on_canary) / len(runs):.3f})")
    assert 0.23 * len(runs) <= len(on_canary) <= 0.37 * len(runs)
    for run in runs:
        canary = in_canary("c9", run.run_id, 0.3)
        assert run.prompt_version == (5 if canary else 4)
        assert run.prompt_sha256 == sha256_text(CANARY if canary else STABLE)
        assert run.output == ("12" if canary else "The answer is: 12.")


async def test_one_rollout_key_always_gets_one_version(rules: Rules) -> None:
    """A conversation (its rollout key) sees one version across all its runs, whatever their
    ids; different keys split."""
    prompts = FakePromptSource({"answer-only": in_canary_record(share=0.5)})
    executor = executor_for(scripted_model("prompt-sensitive"), rules, prompts)

    versions = {
        key: {
            (await executor.execute(request(run_id=f"{key}-{i}", rollout_key=key))).prompt_version
            for i in range(10)
        }
        for key in (f"user-{n}" for n in range(20))
    }

    assert all(len(seen) == 1 for seen in versions.values()), versions
    assert {v for seen in versions.values() for v in seen} == {4, 5}
    assert all(seen == {5 if in_canary("c9", key, 0.5) else 4} for key, seen in versions.items())


async def test_gate_runs_and_pinned_runs_run_the_stored_record_itself(rules: Rules) -> None:
    """A measurement of version 5 must run version 5, not the stable arm of its canary."""
    prompts = FakePromptSource({"answer-only": in_canary_record(share=0.01)})
    executor = executor_for(scripted_model("prompt-sensitive"), rules, prompts)
    gate = RunContext(purpose="gate", change_id="c9", case_id="k1", stage="verify")

    gate_runs = [
        await executor.execute(
            GateRunRequested(task="answer-only", input=QUESTION, run_id=f"gate:g{i}", context=gate)
        )
        for i in range(20)
    ]
    pinned = [
        await executor.execute(request(run_id=f"p{i}", min_prompt_version=5)) for i in range(20)
    ]

    assert {run.prompt_version for run in [*gate_runs, *pinned]} == {5}
    assert {run.prompt_sha256 for run in [*gate_runs, *pinned]} == {sha256_text(CANARY)}


async def test_a_live_run_without_a_stored_prompt_gets_the_default(rules: Rules) -> None:
    executor = executor_for(scripted_model("prompt-sensitive"), rules, FakePromptSource())

    run = await executor.execute(request(rollout_key="user-1"))

    assert (run.prompt_version, run.prompt_sha256) == (0, sha256_text(DEFAULT_PROMPT))


# --- min_prompt_version -------------------------------------------------------------------------


async def test_min_prompt_version_waits_for_the_prompt_source_before_reading(
    rules: Rules,
) -> None:
    prompts = FakePromptSource(
        current={"answer-only": stored("answer-only", "Help the user.", 4)},
        pending={"answer-only": stored("answer-only", "Reply with only the final answer.", 5)},
    )

    run = await executor_for(scripted_model("prompt-sensitive"), rules, prompts).execute(
        request(min_prompt_version=5)
    )

    assert prompts.waits == [("answer-only", 5)]
    assert run.prompt_version == 5
    assert run.output == "12"


async def test_no_wait_without_min_prompt_version_or_with_a_candidate(rules: Rules) -> None:
    prompts = FakePromptSource()
    executor = executor_for(scripted_model("prompt-sensitive"), rules, prompts)

    await executor.execute(request())
    await executor.execute(request(min_prompt_version=5, candidate_prompt="Reply."))

    assert prompts.waits == []


# --- crashes, tools, usage, step limit ----------------------------------------------------------


async def test_crashing_model_gives_a_completed_run_with_the_error(rules: Rules) -> None:
    run = await executor_for(scripted_model("crash"), rules, FakePromptSource()).execute(request())

    assert isinstance(run, RunCompleted)
    assert run.error is not None
    assert "scripted model crashed" in run.error
    assert run.output == ""
    assert run.trace[-1].kind == "error"
    assert "scripted model crashed" in run.trace[-1].output


async def test_tool_user_trace_is_model_tool_model_with_the_calculator_result(
    rules: Rules,
) -> None:
    executor = executor_for(scripted_model("tool-user"), rules, FakePromptSource())

    run = await executor.execute(request(input="What is 12 * (3 + 4)?"))

    assert [step.kind for step in run.trace] == ["model", "tool", "model"]
    assert "calculator" in run.trace[0].input
    assert "12 * (3 + 4)" in run.trace[0].input
    assert (run.trace[1].name, run.trace[1].output) == ("calculator", "84")
    assert run.output == "84"
    assert run.error is None


async def test_usage_sums_tokens_over_every_model_call(rules: Rules) -> None:
    question = "What is 12 * (3 + 4)?"
    run = await executor_for(scripted_model("tool-user"), rules, FakePromptSource()).execute(
        request(input=question)
    )

    # The scripted model counts words: call 1 sees system + question and says nothing (a tool
    # call); call 2 also sees the empty tool-call message and the tool's "84", and says "84".
    prompt_words = len(compose_system_prompt(rules, DEFAULT_PROMPT).split()) + len(question.split())
    assert run.usage.input_tokens == prompt_words + (prompt_words + 1)
    assert run.usage.output_tokens == 1


async def test_max_steps_bounds_a_model_that_always_asks_for_tools(rules: Rules) -> None:
    calls: list[int] = []

    def always_tools(messages: list[BaseMessage]) -> AIMessage:
        calls.append(len(messages))
        call = {"name": "calculator", "args": {"expression": "1 + 1"}, "id": f"call-{len(calls)}"}
        return AIMessage(content="still working", tool_calls=[call])

    model = ScriptedChatModel(script="always-tools", respond=always_tools)

    run = await executor_for(model, rules, FakePromptSource(), max_steps=3).execute(request())

    assert len(calls) == 3
    assert [step.kind for step in run.trace] == ["model", "tool", "model", "tool", "model"]
    assert run.output == "still working"
    assert run.error is None


async def test_default_agent_runs_each_tool_by_name(rules: Rules) -> None:
    def ask_word_count(messages: list[BaseMessage]) -> AIMessage:
        if isinstance(messages[-1], ToolMessage):
            return AIMessage(content=f"words: {messages[-1].content}")
        call = {"name": "word_count", "args": {"text": "one two three"}, "id": "call-1"}
        return AIMessage(content="", tool_calls=[call])

    model = ScriptedChatModel(script="word-counter", respond=ask_word_count)
    run = await executor_for(model, rules, FakePromptSource()).execute(request())

    assert (run.trace[1].name, run.trace[1].output) == ("word_count", "3")
    assert run.output == "words: 3"


# --- user agent factories -----------------------------------------------------------------------


async def test_load_agent_factory_loads_a_user_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules: Rules
) -> None:
    (tmp_path / "ratchet_test_user_agents.py").write_text(
        "from typing import Any\n"
        "from langchain_core.messages import AIMessage\n\n"
        "class FakeUserAgent:\n"
        "    def __init__(self, max_steps: int) -> None:\n"
        "        self.max_steps = max_steps\n\n"
        "    async def astream(self, input: Any, *args: Any, **kwargs: Any) -> Any:\n"
        "        text = f'user agent, {self.max_steps} steps'\n"
        "        yield {'mine': {'messages': [AIMessage(content=text)]}}\n\n"
        "def make_agent(model, tools, max_steps):\n"
        "    return FakeUserAgent(max_steps)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    factory = load_agent_factory("ratchet_test_user_agents:make_agent")
    agent = factory(scripted_model("echo"), get_tools(), 4)
    executor = Executor(agent, model_label="user", rules=rules, prompts=FakePromptSource())
    run = await executor.execute(request())

    assert run.output == "user agent, 4 steps"
    assert run.error is None


def test_load_agent_factory_defaults_to_the_builtin_agent() -> None:
    assert load_agent_factory(None) is build_default_agent
    assert load_agent_factory("") is build_default_agent


def test_load_agent_factory_rejects_a_path_without_a_function() -> None:
    with pytest.raises(ValueError, match=r"package\.module:function"):
        load_agent_factory("nocolon")

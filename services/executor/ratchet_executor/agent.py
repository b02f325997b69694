"""The default agent (a small LangGraph tool-calling loop) and the run logic around any agent.

An agent is any compiled LangGraph graph that takes ``{"messages": [...]}`` and returns its
messages; :func:`load_agent_factory` lets users plug in their own by ``module:function``.

What the executor reports is bounded whatever the model says: the output, the trace (its number of
steps and each step's texts) and the error are cut to the limits of :mod:`ratchet.contracts`, and
the run names what was cut (``truncated``), so a 700 KB answer becomes a valid ``run.completed``
instead of a message nobody can publish.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from ratchet.contracts import (
    ERROR_CHARS,
    NAME_CHARS,
    OUTPUT_CHARS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    RunCompleted,
    RunRequested,
    TokenUsage,
    TraceStep,
    clip,
)
from ratchet.messaging import Unprocessable
from ratchet.prompts import DEFAULT_PROMPT, PromptSource, serve, sha256_text
from ratchet.rules import Rules, compose_system_prompt

LatestVersion = Callable[[str], Awaitable[int | None]]
StepKind = Literal["model", "tool", "error"]


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class Agent(Protocol):
    """What the executor needs of an agent: a compiled LangGraph graph."""

    def astream(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...


AgentFactory = Callable[[BaseChatModel, Sequence[BaseTool], int], Agent]


def build_default_agent(model: BaseChatModel, tools: Sequence[BaseTool], max_steps: int) -> Agent:
    """Model, then tools while the model asks for them, at most ``max_steps`` model calls."""
    bound = model.bind_tools(list(tools)) if tools else model

    async def call_model(state: AgentState) -> dict[str, list[AnyMessage]]:
        calls = sum(isinstance(m, AIMessage) for m in state["messages"])
        reply = await bound.ainvoke(state["messages"])
        if calls + 1 >= max_steps and isinstance(reply, AIMessage) and reply.tool_calls:
            reply = AIMessage(content=str(reply.content), usage_metadata=reply.usage_metadata)
        return {"messages": [reply]}

    async def next_step(state: AgentState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else END

    graph = StateGraph(AgentState)
    graph.add_node("agent", call_model)
    graph.add_node("tools", ToolNode(list(tools)))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", next_step, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile()


def load_agent_factory(path: str | None) -> AgentFactory:
    """``module:function`` names a user's agent factory; None gives the default agent."""
    if not path:
        return build_default_agent
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"agent factory {path!r} must look like 'package.module:function'")
    factory: AgentFactory = getattr(importlib.import_module(module_name), attr)
    return factory


class VersionedPromptSource(PromptSource, Protocol):
    """The executor also waits for a version it was asked to run on (verify runs)."""

    async def wait_for_version(self, task: str, version: int, timeout: float = 10.0) -> None: ...


class Executor:
    """Runs one requested task through the agent and reports everything about the run.

    ``latest_version`` reads a task's newest version from the prompt store itself (not the
    watch): a run that asks for a later version is refused at once, since the gatekeeper writes a
    version before it asks for runs on it; without it (in-memory tests) the executor just waits.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        model_label: str,
        rules: Rules,
        prompts: VersionedPromptSource,
        latest_version: LatestVersion | None = None,
    ) -> None:
        self.agent = agent
        self.model_label = model_label
        self.rules = rules
        self.prompts = prompts
        self.latest_version = latest_version

    def task_prompt(self, request: RunRequested) -> tuple[str, int]:
        """The task prompt and the version to report (0 = candidate or default prompt).

        A run that names its prompt (a candidate) gets it. A live run otherwise gets what the
        rollout serves it (:func:`ratchet.prompts.serve`): while a change is in canary, its
        share of rollout keys (the run id when there is none) gets the new version, the rest the
        stable one, and one key always the same. Gate runs, and a run that asks for a version
        (``min_prompt_version``), run the stored record's own text: a measurement of a version
        must run that version, not the stable arm of its canary."""
        if request.candidate_prompt is not None:
            return request.candidate_prompt, 0
        stored = self.prompts.current(request.task)
        if request.context.purpose == "live" and request.min_prompt_version is None:
            return serve(stored, request.rollout_key or request.run_id)
        if stored is None:
            return DEFAULT_PROMPT, 0
        return stored.record.text, stored.version

    async def serve_version(self, task: str, version: int) -> None:
        """Return once the watch serves ``version`` of ``task``; :class:`Unprocessable` if the
        store does not hold it, rather than waiting (and being redelivered) for minutes."""
        seen = self.prompts.current(task)
        if seen is not None and seen.version >= version:
            return
        if self.latest_version is not None:
            latest = await self.latest_version(task)
            if latest is None or latest < version:
                has = f"its latest is {latest}" if latest is not None else "it has none"
                raise Unprocessable(
                    f"prompt version {version} of task {task!r} does not exist ({has})"
                )
        await self.prompts.wait_for_version(task, version)

    async def execute(self, request: RunRequested) -> RunCompleted:
        if request.min_prompt_version is not None and request.candidate_prompt is None:
            await self.serve_version(request.task, request.min_prompt_version)
        prompt, version = self.task_prompt(request)
        system = compose_system_prompt(self.rules, prompt)
        messages = [SystemMessage(content=system), HumanMessage(content=request.input)]
        trace: list[_Step] = []
        usage = TokenUsage()
        output, error = "", None
        started = last = time.perf_counter()
        try:
            async for update in self.agent.astream({"messages": messages}, stream_mode="updates"):
                now = time.perf_counter()
                for node_output in update.values():
                    for message in (node_output or {}).get("messages", []):
                        step, step_usage = _trace_step(message, (now - last) * 1000)
                        trace.append(step)
                        usage = usage + step_usage
                        if isinstance(message, AIMessage) and not message.tool_calls:
                            output = str(message.content).strip()
                last = now
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            trace.append(_step("error", type(exc).__name__, output=str(exc)))
        truncated = [
            name
            for name, cut in (
                ("output", len(output) > OUTPUT_CHARS),
                ("trace", len(trace) > TRACE_STEPS or any(step.cut for step in trace)),
                ("error", error is not None and len(error) > ERROR_CHARS),
            )
            if cut
        ]
        return RunCompleted(
            id=f"{request.run_id}.completed",
            run_id=request.run_id,
            task=request.task,
            input=request.input,
            check=request.check,
            context=request.context,
            output=clip(output, OUTPUT_CHARS),
            trace=[step.step for step in _bounded(trace)],
            prompt_version=version,
            prompt_sha256=sha256_text(prompt),
            rules_sha256=self.rules.sha256,
            model=clip(self.model_label, NAME_CHARS),
            usage=usage,
            latency_ms=(time.perf_counter() - started) * 1000,
            error=None if error is None else clip(error, ERROR_CHARS),
            truncated=truncated,
        )


class _Step(NamedTuple):
    step: TraceStep
    cut: bool  # a text of the step was cut to its limit


def _step(
    kind: StepKind, name: str, *, input: Any = "", output: Any = "", ms: float = 0.0
) -> _Step:
    texts = [text if isinstance(text, str) else str(text) for text in (name, input, output)]
    limits = (NAME_CHARS, TRACE_TEXT_CHARS, TRACE_TEXT_CHARS)
    name, input, output = (clip(text, limit) for text, limit in zip(texts, limits, strict=True))
    cut = any(len(text) > limit for text, limit in zip(texts, limits, strict=True))
    return _Step(TraceStep(kind=kind, name=name, input=input, output=output, ms=ms), cut)


def _bounded(trace: list[_Step]) -> list[_Step]:
    """At most ``TRACE_STEPS`` steps: the first ones and the last (which holds the answer or the
    error)."""
    if len(trace) <= TRACE_STEPS:
        return trace
    return [*trace[: TRACE_STEPS - 1], trace[-1]]


def _trace_step(message: AnyMessage, ms: float) -> tuple[_Step, TokenUsage]:
    if isinstance(message, ToolMessage):
        return _step("tool", message.name or "tool", output=message.content, ms=ms), TokenUsage()
    if isinstance(message, AIMessage):
        calls = "; ".join(f"{c['name']}({c['args']})" for c in message.tool_calls)
        meta = message.usage_metadata
        usage = TokenUsage(
            input_tokens=meta["input_tokens"] if meta else 0,
            output_tokens=meta["output_tokens"] if meta else 0,
        )
        return _step("model", "agent", input=calls, output=message.content, ms=ms), usage
    return _step("model", type(message).__name__, output=message.content), TokenUsage()

"""The default agent (a small LangGraph tool-calling loop) and the run logic around any agent.

An agent is any compiled LangGraph graph that takes ``{"messages": [...]}`` and returns its
messages; :func:`load_agent_factory` lets users plug in their own by ``module:function``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from ratchet.contracts import RunCompleted, RunRequested, TokenUsage, TraceStep
from ratchet.prompts import DEFAULT_PROMPT, PromptSource, sha256_text
from ratchet.rules import Rules, compose_system_prompt

TRACE_TEXT_LIMIT = 2000


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
    """Runs one requested task through the agent and reports everything about the run."""

    def __init__(
        self, agent: Agent, *, model_label: str, rules: Rules, prompts: VersionedPromptSource
    ) -> None:
        self.agent = agent
        self.model_label = model_label
        self.rules = rules
        self.prompts = prompts

    def task_prompt(self, request: RunRequested) -> tuple[str, int]:
        """The candidate prompt if the request carries one, else the stored version (0 = none)."""
        if request.candidate_prompt is not None:
            return request.candidate_prompt, 0
        stored = self.prompts.current(request.task)
        if stored is None:
            return DEFAULT_PROMPT, 0
        return stored.record.text, stored.version

    async def execute(self, request: RunRequested) -> RunCompleted:
        if request.min_prompt_version is not None and request.candidate_prompt is None:
            await self.prompts.wait_for_version(request.task, request.min_prompt_version)
        prompt, version = self.task_prompt(request)
        system = compose_system_prompt(self.rules, prompt)
        messages = [SystemMessage(content=system), HumanMessage(content=request.input)]
        trace: list[TraceStep] = []
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
            trace.append(TraceStep(kind="error", name=type(exc).__name__, output=str(exc)[:500]))
        return RunCompleted(
            id=f"{request.run_id}.completed",
            run_id=request.run_id,
            task=request.task,
            input=request.input,
            check=request.check,
            context=request.context,
            output=output,
            trace=trace,
            prompt_version=version,
            prompt_sha256=sha256_text(prompt),
            rules_sha256=self.rules.sha256,
            model=self.model_label,
            usage=usage,
            latency_ms=(time.perf_counter() - started) * 1000,
            error=error,
        )


def _trace_step(message: AnyMessage, ms: float) -> tuple[TraceStep, TokenUsage]:
    if isinstance(message, ToolMessage):
        step = TraceStep(
            kind="tool", name=message.name or "tool", output=_clip(message.content), ms=ms
        )
        return step, TokenUsage()
    if isinstance(message, AIMessage):
        calls = "; ".join(f"{c['name']}({c['args']})" for c in message.tool_calls)
        meta = message.usage_metadata
        usage = TokenUsage(
            input_tokens=meta["input_tokens"] if meta else 0,
            output_tokens=meta["output_tokens"] if meta else 0,
        )
        step = TraceStep(
            kind="model", name="agent", input=calls, output=_clip(message.content), ms=ms
        )
        return step, usage
    return TraceStep(kind="model", name=type(message).__name__, output=_clip(message.content)), (
        TokenUsage()
    )


def _clip(content: Any) -> str:
    text = content if isinstance(content, str) else str(content)
    return text[:TRACE_TEXT_LIMIT]

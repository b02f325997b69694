"""Executor service: ``run.requested`` and ``run.gate.requested`` in, agent run, ``run.completed``
out. A request for a prompt version the store does not hold is dead-lettered at once with that
reason: it names something that does not exist, like a malformed message, and running it anyway
would record a "crashed" run that the proposer and the gate would count as the agent's failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import GateRunRequested, RunCompleted, RunRequested
from ratchet.messaging import connect, durable_subscriber, event_publisher, make_broker, publish
from ratchet.models import make_chat_model, model_label
from ratchet.prompts import PromptReader, read_current
from ratchet.rules import load_rules
from ratchet.settings import Settings, get_settings
from ratchet.tools import get_tools
from ratchet_executor.agent import Executor, VersionedPromptSource, load_agent_factory


def build_app(
    settings: Settings | None = None, *, prompts: VersionedPromptSource | None = None
) -> FastStream:
    """The executor app. ``prompts``: a prompt source to use instead of the watched prompt store
    (the in-memory wiring tests); by default the app connects to the store when it starts."""
    settings = settings or get_settings()
    rules = load_rules(settings.rules_path)  # fail fast on a broken rules file
    model = make_chat_model(settings.agent, local_port=settings.local_model_port)
    agent = load_agent_factory(settings.agent_factory)(
        model, get_tools(settings.agent_tools), settings.agent_max_steps
    )
    broker = make_broker(settings, name="executor")
    completed = event_publisher(broker, RunCompleted)
    executor: Executor | None = None  # made at start, once the prompt store is watched

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        nonlocal executor
        label = model_label(settings.agent)
        if prompts is not None:
            executor = Executor(agent, model_label=label, rules=rules, prompts=prompts)
            yield
            return
        connection = await connect(settings, name="executor-prompts")
        js = connection.jetstream()
        reader = PromptReader(connection)

        async def latest_version(task: str) -> int | None:
            stored = await read_current(js, task)
            return None if stored is None else stored.version

        try:
            await reader.start()
            executor = Executor(
                agent, model_label=label, rules=rules, prompts=reader, latest_version=latest_version
            )
            yield
        finally:
            await reader.stop()
            await connection.close()

    async def run(request: RunRequested) -> None:
        if executor is None:
            raise RuntimeError("the executor app has not started")
        await publish(completed, await executor.execute(request))

    @durable_subscriber(
        broker,
        RunRequested.subject,
        durable="executor",
        settings=settings,
        description="Run the task and publish run.completed (a crashed run completes with its "
        "error).",
    )
    async def on_run_requested(request: RunRequested) -> None:
        await run(request)

    @durable_subscriber(
        broker,
        GateRunRequested.subject,
        durable="executor-gate",
        settings=settings,
        description="A gate run for the gatekeeper's measurement of a change (same agent, same "
        "rules).",
    )
    async def on_gate_run_requested(request: GateRunRequested) -> None:
        await run(request)

    return FastStream(
        broker,
        lifespan=lifespan,
        specification=AsyncAPI(title="Ratchet executor", description="Runs tasks with the agent."),
    )

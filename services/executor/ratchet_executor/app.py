"""Executor service: ``run.requested`` and ``run.gate.requested`` in, agent run, ``run.completed``
out."""

from __future__ import annotations

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import GateRunRequested, RunCompleted, RunRequested
from ratchet.messaging import connect, durable_subscriber, event_publisher, make_broker, publish
from ratchet.models import make_chat_model, model_label
from ratchet.prompts import PromptReader
from ratchet.rules import load_rules
from ratchet.settings import get_settings
from ratchet.tools import get_tools
from ratchet_executor.agent import Executor, load_agent_factory

settings = get_settings()
broker = make_broker(settings, name="executor")
app = FastStream(
    broker,
    specification=AsyncAPI(title="Ratchet executor", description="Runs tasks with the agent."),
)
completed = event_publisher(broker, RunCompleted)
state: dict[str, Executor] = {}


@app.on_startup
async def start() -> None:
    rules = load_rules(settings.rules_path)  # fail fast on a broken rules file
    connection = await connect(settings, name="executor-prompts")
    prompts = PromptReader(connection.jetstream())
    await prompts.start()
    model = make_chat_model(settings.agent, local_port=settings.local_model_port)
    factory = load_agent_factory(settings.agent_factory)
    agent = factory(model, get_tools(settings.agent_tools), settings.agent_max_steps)
    state["executor"] = Executor(
        agent, model_label=model_label(settings.agent), rules=rules, prompts=prompts
    )


@durable_subscriber(
    broker,
    RunRequested.subject,
    durable="executor",
    settings=settings,
    description="Run the task and publish run.completed (a crashed run completes with its error).",
)
async def on_run_requested(request: RunRequested) -> None:
    await publish(completed, await state["executor"].execute(request))


@durable_subscriber(
    broker,
    GateRunRequested.subject,
    durable="executor-gate",
    settings=settings,
    description="A gate run for the gatekeeper's measurement of a change (same agent, same rules).",
)
async def on_gate_run_requested(request: GateRunRequested) -> None:
    await publish(completed, await state["executor"].execute(request))

"""Proposer service: gathers a task's failures and proposes a new task prompt."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import ChangeProposed, FailureLogged
from ratchet.messaging import (
    QUERY_PREFIX,
    connect,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
)
from ratchet.models import make_chat_model, model_label
from ratchet.prompts import PromptReader
from ratchet.queries import ProposeReply, ProposeRequest
from ratchet.settings import get_settings
from ratchet.store import open_store
from ratchet_proposer.proposer import ProposalError, Proposer

settings = get_settings()
broker = make_broker(settings, name="proposer")
app = FastStream(
    broker,
    specification=AsyncAPI(
        title="Ratchet proposer", description="Proposes task-prompt changes from failure groups."
    ),
)
proposed = event_publisher(broker, ChangeProposed)
state: dict[str, Proposer] = {}
resources = contextlib.AsyncExitStack()
task_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)


@app.on_startup
async def start() -> None:
    connection = await connect(settings, name="proposer-prompts")
    resources.push_async_callback(connection.close)
    prompts = PromptReader(connection.jetstream())
    await prompts.start()
    resources.push_async_callback(prompts.stop)
    store = open_store(settings.resolved_store_url())
    resources.push_async_callback(store.close)
    state["proposer"] = Proposer(
        make_chat_model(settings.proposer, local_port=settings.local_model_port),
        label=model_label(settings.proposer),
        store=store,
        prompts=prompts,
        min_failures=settings.min_failures_to_propose,
    )


@app.after_shutdown
async def stop() -> None:
    await resources.aclose()


async def _propose(task: str) -> ChangeProposed:
    proposer = state["proposer"]
    change = await proposer.propose(task)
    await publish(proposed, change)
    await proposer.record(change)
    return change


@durable_subscriber(
    broker,
    FailureLogged.subject,
    durable="proposer",
    settings=settings,
    description="Count new failures per task; propose once enough have gathered.",
)
async def on_failure_logged(failure: FailureLogged) -> None:
    async with task_locks[failure.task]:  # one proposal at a time per task
        if await state["proposer"].due(failure.task):
            await _propose(failure.task)


@broker.subscriber(f"{QUERY_PREFIX}.propose", description="Propose a change for a task now.")
async def propose_now(request: ProposeRequest) -> ProposeReply:
    async with task_locks[request.task]:
        try:
            return ProposeReply(change=await _propose(request.task))
        except ProposalError as exc:
            return ProposeReply(error=str(exc))

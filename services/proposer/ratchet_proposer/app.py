"""Proposer service: ``failure.logged`` in; once a task has gathered enough new failures (or on
``query.propose``), it asks the failure store for them and their groups and publishes one
``change.proposed.proposer``: its own subject, which only its NATS user may publish, so the
gatekeeper records the proposer service as the change's proposer."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

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
from ratchet.natsconf import PROPOSER
from ratchet.prompts import PromptReader, PromptSource
from ratchet.queries import ProposeReply, ProposeRequest
from ratchet.settings import Settings, get_settings
from ratchet_proposer.failure_store import FailureStoreClient
from ratchet_proposer.marks import ProposalMarks
from ratchet_proposer.proposer import ProposalError, ProposalRefused, Proposer

MARKS_FILE = "proposer.db"
log = logging.getLogger("ratchet.proposer")


def build_app(
    settings: Settings | None = None, *, prompts: PromptSource | None = None
) -> FastStream:
    """The proposer app. ``prompts``: a prompt source to use instead of the watched prompt store
    (the in-memory wiring tests); by default the app connects to the store when it starts."""
    settings = settings or get_settings()
    model = make_chat_model(settings.proposer, local_port=settings.local_model_port)
    broker = make_broker(settings, name="proposer")
    proposed = event_publisher(broker, ChangeProposed, subject=ChangeProposed.subject_of(PROPOSER))
    failures = FailureStoreClient(broker)
    task_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
    proposer: Proposer | None = None  # made at start, once the prompt store is watched

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        nonlocal proposer
        async with AsyncExitStack() as resources:
            marks = await ProposalMarks.open(settings.home / MARKS_FILE)
            resources.push_async_callback(marks.close)
            proposer = Proposer(
                model,
                label=model_label(settings.proposer),
                failures=failures,
                prompts=prompts or await _watch_prompts(settings, resources),
                marks=marks,
                min_failures=settings.min_failures_to_propose,
            )
            yield

    def started() -> Proposer:
        if proposer is None:
            raise RuntimeError("the proposer app has not started")
        return proposer

    async def propose(task: str) -> ChangeProposed:
        """Propose, publish, then mark: a crash before the mark proposes the same failures again,
        which gives the same change id (JetStream and the gatekeeper drop the repeat)."""
        proposal = await started().propose(task)
        await publish(proposed, proposal.change)
        await started().mark(proposal)
        return proposal.change

    @durable_subscriber(
        broker,
        FailureLogged.subject,
        durable="proposer",
        settings=settings,
        description="Count new failures per task; propose once enough have gathered.",
    )
    async def on_failure_logged(failure: FailureLogged) -> None:
        # A refused reply is the model's answer, not a fault: logged, not redelivered. The failure
        # store not answering is a fault: the message is redelivered later.
        async with task_locks[failure.task]:  # one proposal at a time per task
            if await started().due(failure.task):
                try:
                    await propose(failure.task)
                except ProposalRefused as refused:
                    log.warning("no change proposed for %r: %s", failure.task, refused)

    @broker.subscriber(f"{QUERY_PREFIX}.propose", description="Propose a change for a task now.")
    async def propose_now(request: ProposeRequest) -> ProposeReply:
        async with task_locks[request.task]:
            try:
                return ProposeReply(change=await propose(request.task))
            except ProposalRefused as refused:
                log.warning("no change proposed for %r: %s", request.task, refused)
                return ProposeReply(error=str(refused))
            except ProposalError as exc:
                return ProposeReply(error=str(exc))

    return FastStream(
        broker,
        lifespan=lifespan,
        specification=AsyncAPI(
            title="Ratchet proposer",
            description="Proposes task-prompt changes from failure groups.",
        ),
    )


async def _watch_prompts(settings: Settings, resources: AsyncExitStack) -> PromptReader:
    """The prompt store, watched over the proposer's own connection until ``resources`` close."""
    connection = await connect(settings, name="proposer-prompts")
    resources.push_async_callback(connection.close)
    reader = PromptReader(connection)
    await reader.start()
    resources.push_async_callback(reader.stop)
    return reader

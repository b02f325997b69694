"""Gatekeeper service: the only writer of the prompt store, and only for approved changes."""

from __future__ import annotations

import contextlib
from typing import Any

from faststream import FastStream
from faststream.specification import AsyncAPI
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from nats.js import JetStreamContext

from ratchet.contracts import (
    ChangeApplied,
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeKept,
    ChangeProposed,
    ChangeRejected,
    ChangeRolledBack,
    Event,
    GateRunRequested,
    RunScored,
)
from ratchet.messaging import (
    QUERY_PREFIX,
    connect,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
)
from ratchet.prompts import PromptRecord, PromptVersion, PromptWriter, read_current
from ratchet.queries import ChangeQuery, ChangesQuery, ChangeSummary, summarize
from ratchet.rules import load_rules
from ratchet.settings import get_settings
from ratchet.store import AuditRecord, Store, open_store
from ratchet.suites import load_suites
from ratchet_gatekeeper.graph import Gate, build_gate_graph
from ratchet_gatekeeper.ledger import GateLedger
from ratchet_gatekeeper.runner import GateRunner

settings = get_settings()
broker = make_broker(settings, name="gatekeeper")
app = FastStream(
    broker,
    specification=AsyncAPI(
        title="Ratchet gatekeeper",
        description="Validates, measures, gates, applies and verifies prompt changes.",
    ),
)
publishers = {
    event_type.subject: event_publisher(broker, event_type)
    for event_type in (
        GateRunRequested,
        ChangeAwaitingApproval,
        ChangeApplied,
        ChangeKept,
        ChangeRolledBack,
    )
}
state: dict[str, Any] = {}
resources = contextlib.AsyncExitStack()


async def publish_event(event: Event) -> None:
    await publish(publishers[event.subject], event)


class KvPrompts:
    """Fresh reads (never a cached view) and compare-and-set writes."""

    def __init__(self, js: JetStreamContext, writer: PromptWriter) -> None:
        self.js = js
        self.writer = writer

    async def current(self, task: str) -> PromptVersion | None:
        return await read_current(self.js, task)

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        return await self.writer.write(task, record, base_version=base_version)


@app.on_startup
async def start() -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    suites = load_suites(settings.suites_dir)
    connection = await connect(settings, name="gatekeeper-prompts")
    resources.push_async_callback(connection.close)
    js = connection.jetstream()
    writer = await PromptWriter.connect(js)
    for suite in suites.values():  # first versions come from the suites
        await writer.seed(suite.name, PromptRecord(text=suite.prompt, kind="initial"))
    store = open_store(settings.resolved_store_url())
    resources.push_async_callback(store.close)
    checkpointer = await resources.enter_async_context(
        AsyncSqliteSaver.from_conn_string(str(settings.home / "gatekeeper-checkpoints.db"))
    )
    ledger = await GateLedger.open(settings.home / "gatekeeper-runs.db")
    resources.push_async_callback(ledger.close)
    gate = Gate(
        store=store,
        ledger=ledger,
        prompts=KvPrompts(js, writer),
        publish=publish_event,
        rules=load_rules(settings.rules_path),
        suites=suites,
        threshold=settings.failure_threshold,
        settings=settings.gate,
    )
    state["runner"] = GateRunner(build_gate_graph(gate, checkpointer), gate)
    state["ledger"] = ledger
    state["store"] = store


@app.after_shutdown
async def stop() -> None:
    await resources.aclose()


@durable_subscriber(
    broker, ChangeProposed.subject, durable="gatekeeper-proposed", settings=settings
)
async def on_proposed(change: ChangeProposed) -> None:
    await state["runner"].on_proposed(change)


@durable_subscriber(
    broker,
    RunScored.subject,
    durable="gatekeeper-scored",
    settings=settings,
    description="Scores of the gate runs this gatekeeper issued (all others are ignored).",
)
async def on_run_scored(score: RunScored) -> None:
    await state["ledger"].record(score)


@durable_subscriber(
    broker, ChangeApproved.subject, durable="gatekeeper-approved", settings=settings
)
async def on_approved(decision: ChangeApproved) -> None:
    await state["runner"].on_decision(decision, approved=True)


@durable_subscriber(
    broker, ChangeRejected.subject, durable="gatekeeper-rejected", settings=settings
)
async def on_rejected(decision: ChangeRejected) -> None:
    await state["runner"].on_decision(decision, approved=False)


@broker.subscriber(f"{QUERY_PREFIX}.changes", description="Every change and its latest status.")
async def list_changes(query: ChangesQuery) -> list[ChangeSummary]:
    store: Store = state["store"]
    summaries = summarize(await store.audit())
    return [s for s in summaries if query.task in (None, s.task)]


@broker.subscriber(f"{QUERY_PREFIX}.change", description="One change's full audit trail.")
async def show_change(query: ChangeQuery) -> list[AuditRecord]:
    store: Store = state["store"]
    return await store.audit(query.change_id)

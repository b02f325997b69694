"""Gatekeeper service: the only writer of the prompt store, and only for approved changes; the
owner of the audit trail, which it alone writes and answers for (``query.changes``,
``query.change``, ``query.audit``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

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
    ChangeRecorded,
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
from ratchet.queries import (
    AuditPage,
    AuditQuery,
    ChangeQuery,
    ChangesQuery,
    ChangeSummary,
    audit_page,
    summarize,
)
from ratchet.rules import load_rules
from ratchet.settings import Settings, get_settings
from ratchet.store import AuditRecord, open_store
from ratchet.suites import Suite, load_suites
from ratchet_gatekeeper.graph import Gate, PromptStoreAccess, build_gate_graph
from ratchet_gatekeeper.ledger import GateLedger
from ratchet_gatekeeper.runner import GateRunner

CHECKPOINTS_FILE = "gatekeeper-checkpoints.db"
LEDGER_FILE = "gatekeeper-runs.db"
PUBLISHES = (
    GateRunRequested,
    ChangeAwaitingApproval,
    ChangeApplied,
    ChangeKept,
    ChangeRolledBack,
    ChangeRecorded,
)


class KvPrompts:
    """Fresh reads (never a cached view) and compare-and-set writes."""

    def __init__(self, js: JetStreamContext, writer: PromptWriter) -> None:
        self.js = js
        self.writer = writer

    async def current(self, task: str) -> PromptVersion | None:
        return await read_current(self.js, task)

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int:
        return await self.writer.write(task, record, base_version=base_version)


def build_app(
    settings: Settings | None = None, *, prompts: PromptStoreAccess | None = None
) -> FastStream:
    """The gatekeeper app. ``prompts``: a prompt store to use instead of the one on NATS (the
    in-memory wiring tests; nothing is seeded then); by default the app connects to the store
    when it starts and seeds each suite's first version."""
    settings = settings or get_settings()
    suites = load_suites(settings.suites_dir)  # fail fast on a broken suite or rules file
    rules = load_rules(settings.rules_path)
    broker = make_broker(settings, name="gatekeeper")
    publishers = {
        event_type.subject: event_publisher(broker, event_type) for event_type in PUBLISHES
    }
    runner: GateRunner | None = None  # made at start, once its files and the prompt store are open

    async def publish_event(event: Event) -> None:
        await publish(publishers[event.subject], event)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        nonlocal runner
        settings.home.mkdir(parents=True, exist_ok=True)
        async with AsyncExitStack() as resources:
            # the store; of its tables the gatekeeper uses (and owns) only the audit trail
            trail = await resources.enter_async_context(open_store(settings.resolved_store_url()))
            ledger = await GateLedger.open(settings.home / LEDGER_FILE)
            resources.push_async_callback(ledger.close)
            gate = Gate(
                store=trail,
                ledger=ledger,
                prompts=prompts or await _open_prompt_store(settings, suites, resources),
                publish=publish_event,
                rules=rules,
                suites=suites,
                threshold=settings.failure_threshold,
                settings=settings.gate,
            )
            checkpointer = await resources.enter_async_context(
                AsyncSqliteSaver.from_conn_string(str(settings.home / CHECKPOINTS_FILE))
            )
            runner = GateRunner(build_gate_graph(gate, checkpointer), gate)
            yield

    def started() -> GateRunner:
        if runner is None:
            raise RuntimeError("the gatekeeper app has not started")
        return runner

    @durable_subscriber(
        broker, ChangeProposed.subject, durable="gatekeeper-proposed", settings=settings
    )
    async def on_proposed(change: ChangeProposed) -> None:
        await started().on_proposed(change)

    @durable_subscriber(
        broker,
        RunScored.subject,
        durable="gatekeeper-scored",
        settings=settings,
        description="Scores of the gate runs this gatekeeper issued (all others are ignored).",
    )
    async def on_run_scored(score: RunScored) -> None:
        await started().gate.ledger.record(score)

    @durable_subscriber(
        broker, ChangeApproved.subject, durable="gatekeeper-approved", settings=settings
    )
    async def on_approved(decision: ChangeApproved) -> None:
        await started().on_decision(decision, approved=True)

    @durable_subscriber(
        broker, ChangeRejected.subject, durable="gatekeeper-rejected", settings=settings
    )
    async def on_rejected(decision: ChangeRejected) -> None:
        await started().on_decision(decision, approved=False)

    @broker.subscriber(f"{QUERY_PREFIX}.changes", description="Every change and its latest status.")
    async def list_changes(query: ChangesQuery) -> list[ChangeSummary]:
        summaries = summarize(await started().gate.store.audit())
        return [s for s in summaries if query.task in (None, s.task)]

    @broker.subscriber(f"{QUERY_PREFIX}.change", description="One change's full audit trail.")
    async def show_change(query: ChangeQuery) -> list[AuditRecord]:
        return await started().gate.store.audit(query.change_id)

    @broker.subscriber(
        f"{QUERY_PREFIX}.audit",
        description="The whole audit trail, one page at a time (records after a seq).",
    )
    async def read_audit(query: AuditQuery) -> AuditPage:
        return audit_page(await started().gate.store.audit(), query)

    return FastStream(
        broker,
        lifespan=lifespan,
        specification=AsyncAPI(
            title="Ratchet gatekeeper",
            description="Validates, measures, gates, applies and verifies prompt changes; owns "
            "the audit trail.",
        ),
    )


async def _open_prompt_store(
    settings: Settings, suites: dict[str, Suite], resources: AsyncExitStack
) -> KvPrompts:
    """The prompt store on the gatekeeper's own connection (closed with ``resources``), with each
    suite's prompt seeded as its task's first version."""
    connection = await connect(settings, name="gatekeeper-prompts")
    resources.push_async_callback(connection.close)
    js = connection.jetstream()
    writer = await PromptWriter.connect(js)
    for suite in suites.values():
        await writer.seed(suite.name, PromptRecord(text=suite.prompt, kind="initial"))
    return KvPrompts(js, writer)

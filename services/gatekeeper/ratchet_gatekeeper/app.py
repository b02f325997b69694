"""Gatekeeper service: the only writer of the prompt store, and only for approved changes; the
owner of the audit trail, which it alone writes, signs, anchors and answers for
(``query.changes``, ``query.change``, ``query.audit``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from faststream import FastStream, Path
from faststream.nats import NatsResponse
from faststream.specification import AsyncAPI
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from nats.js import JetStreamContext

from ratchet.audit import SIGNING_KEY_FILE, AuditKey, AuditSigner, read_anchor
from ratchet.contracts import (
    ChangeApplied,
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeCanaryRolledBack,
    ChangeCanaryStarted,
    ChangeKept,
    ChangePromoted,
    ChangeProposed,
    ChangeRecorded,
    ChangeRejected,
    ChangeRolledBack,
    Event,
    GateRunRequested,
    RunScored,
)
from ratchet.messaging import (
    LEASE_BUCKET,
    QUERY_PREFIX,
    Unprocessable,
    connect,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
)
from ratchet.natsconf import CONSOLE, console_sender
from ratchet.prompts import PromptRecord, PromptVersion, PromptWriter, read_current
from ratchet.queries import (
    AuditPage,
    AuditQuery,
    ChangeQuery,
    ChangesQuery,
    audit_page,
    list_reply,
    summarize,
)
from ratchet.rules import load_rules
from ratchet.settings import Settings, get_settings
from ratchet.store import open_store
from ratchet.suites import Suite, load_suites
from ratchet_gatekeeper.graph import (
    AnchorReader,
    Gate,
    PromptStoreAccess,
    TrailTampered,
    build_gate_graph,
)
from ratchet_gatekeeper.lease import Leases
from ratchet_gatekeeper.ledger import SCHEMA as LEDGER_SCHEMA
from ratchet_gatekeeper.ledger import GateLedger
from ratchet_gatekeeper.runner import GateRunner
from ratchet_gatekeeper.sql import PostgresDb, postgres_pool, setup_checkpoints

CHECKPOINTS_FILE = "gatekeeper-checkpoints.db"
LEDGER_FILE = "gatekeeper-runs.db"
REANCHOR_EVERY_S = 24 * 3600.0  # well within the events stream's 30 days
REANCHOR_RETRY_S = 60.0  # after a failure that may pass (NATS away, say)
log = logging.getLogger("ratchet.gatekeeper")
PUBLISHES = (
    GateRunRequested,
    ChangeAwaitingApproval,
    ChangeApplied,
    ChangeKept,
    ChangeRolledBack,
    ChangeCanaryStarted,
    ChangePromoted,
    ChangeCanaryRolledBack,
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
    # the head's daily re-anchoring and finishing decided canaries, once the broker runs
    background: list[asyncio.Task[None]] = []

    async def publish_event(event: Event) -> None:
        await publish(publishers[event.subject], event)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        nonlocal runner
        settings.home.mkdir(parents=True, exist_ok=True)
        # the audit trail's signing key: in the gatekeeper's own home, never in the database
        signer = AuditSigner.load_or_create(settings.home / SIGNING_KEY_FILE)
        async with AsyncExitStack() as resources:
            # the store; of its tables the gatekeeper uses (and owns) only the audit trail
            trail = await resources.enter_async_context(open_store(settings.resolved_store_url()))
            checkpointer, ledger = await _open_threads_and_ledger(settings, resources)
            prompt_store, newest_anchor, leases = (
                (prompts, None, None)
                if prompts
                else await _open_prompt_store_and_anchor(settings, suites, resources, signer.key)
            )
            gate = Gate(
                store=trail,
                ledger=ledger,
                prompts=prompt_store,
                publish=publish_event,
                rules=rules,
                suites=suites,
                threshold=settings.failure_threshold,
                settings=settings.gate,
                signer=signer,
                newest_anchor=newest_anchor,
            )
            runner = GateRunner(build_gate_graph(gate, checkpointer), gate, leases)
            resources.callback(stop_background)
            yield

    async def start_anchoring() -> None:
        background.append(asyncio.create_task(keep_anchored(started().gate)))

    async def start_finishing_canaries() -> None:
        background.append(asyncio.create_task(finish_decided_canaries(started())))

    def stop_background() -> None:
        for task in background:
            task.cancel()

    def started() -> GateRunner:
        if runner is None:
            raise RuntimeError("the gatekeeper app has not started")
        return runner

    # Who proposed is the subject's last token, which only that NATS user may publish
    # (natsconf), never a name from the body. JetStream keeps an existing durable's filter, so
    # the new filter came with a new durable name (it was gatekeeper-proposed, change.proposed).
    @durable_subscriber(
        broker,
        ChangeProposed.subject_of("{proposer}"),
        durable="gatekeeper-proposals",
        settings=settings,
        description="Proposals; the subject names the proposer the server authenticated.",
    )
    async def on_proposed(change: ChangeProposed, proposer: str = Path()) -> None:
        await started().on_proposed(change, proposer=proposer)

    @durable_subscriber(
        broker,
        RunScored.subject,
        durable="gatekeeper-scored",
        settings=settings,
        description="Scores of the gate runs this gatekeeper issued, and of live runs of a task "
        "in canary (counted for the canary's test); all others are ignored.",
    )
    async def on_run_scored(score: RunScored) -> None:
        await started().on_scored(score)

    # Who decided is the subject's last token, which only that approver's NATS user may publish
    # (natsconf), never a name from the body.
    @durable_subscriber(
        broker,
        ChangeApproved.subject_of("{approver}"),
        durable="gatekeeper-approvals",
        settings=settings,
        description="Approvals; the subject names the approver the server authenticated.",
    )
    async def on_approved(decision: ChangeApproved, approver: str = Path()) -> None:
        await started().on_decision(decision, approved=True, approver=approver)

    @durable_subscriber(
        broker,
        ChangeRejected.subject_of("{approver}"),
        durable="gatekeeper-rejections",
        settings=settings,
        description="Rejections; the subject names the approver the server authenticated.",
    )
    async def on_rejected(decision: ChangeRejected, approver: str = Path()) -> None:
        await started().on_decision(decision, approved=False, approver=approver)

    # The review console proposes and decides for the reviewer logged in to it, one subject token
    # further (<kind>.console.<reviewer>), which only its NATS user may publish: the actor is
    # "console.<reviewer>" (the server authenticated the console, the console its reviewer).
    for_reviewer = f"{CONSOLE}.{{reviewer}}"

    @durable_subscriber(
        broker,
        ChangeProposed.subject_of(for_reviewer),
        durable="gatekeeper-console-proposals",
        settings=settings,
        description="Proposals (rollbacks) made in the review console, by the reviewer named.",
    )
    async def on_console_proposed(change: ChangeProposed, reviewer: str = Path()) -> None:
        await started().on_proposed(change, proposer=_console_actor(reviewer))

    @durable_subscriber(
        broker,
        ChangeApproved.subject_of(for_reviewer),
        durable="gatekeeper-console-approvals",
        settings=settings,
        description="Approvals made in the review console, by the reviewer named.",
    )
    async def on_console_approved(decision: ChangeApproved, reviewer: str = Path()) -> None:
        approver = _console_actor(reviewer)
        await started().on_decision(decision, approved=True, approver=approver)

    @durable_subscriber(
        broker,
        ChangeRejected.subject_of(for_reviewer),
        durable="gatekeeper-console-rejections",
        settings=settings,
        description="Rejections made in the review console, by the reviewer named.",
    )
    async def on_console_rejected(decision: ChangeRejected, reviewer: str = Path()) -> None:
        approver = _console_actor(reviewer)
        await started().on_decision(decision, approved=False, approver=approver)

    @broker.subscriber(f"{QUERY_PREFIX}.changes", description="Every change and its latest status.")
    async def list_changes(query: ChangesQuery) -> NatsResponse:
        gate = started().gate
        canaries = {t.change_id: t.stats() for t in await gate.ledger.unfinished()}
        summaries = summarize(await gate.store.audit(), canaries=canaries)
        wanted = [s for s in summaries if query.task in (None, s.task)]
        return list_reply(wanted, noun="changes (the oldest)")

    @broker.subscriber(f"{QUERY_PREFIX}.change", description="One change's full audit trail.")
    async def show_change(query: ChangeQuery) -> NatsResponse:
        trail = await started().gate.store.audit(query.change_id)
        return list_reply(trail, noun="records of the change (the newest)")

    @broker.subscriber(
        f"{QUERY_PREFIX}.audit",
        description="The whole audit trail, one page at a time (records after a seq).",
    )
    async def read_audit(query: AuditQuery) -> AuditPage:
        gate = started().gate
        page = audit_page(await gate.store.audit(), query)
        return page.model_copy(update={"public_key": gate.signer.key.text})

    return FastStream(
        broker,
        lifespan=lifespan,
        after_startup=[start_anchoring, start_finishing_canaries],
        specification=AsyncAPI(
            title="Ratchet gatekeeper",
            description="Validates, measures, gates, applies and verifies prompt changes; owns "
            "the audit trail.",
        ),
    )


def _console_actor(reviewer: str) -> str:
    """``console.<reviewer>``; a name no reviewer can have is dead-lettered at once."""
    try:
        return console_sender(reviewer)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from exc


async def _open_threads_and_ledger(
    settings: Settings, resources: AsyncExitStack
) -> tuple[BaseCheckpointSaver[Any], GateLedger]:
    """The change threads' checkpoints and the run ledger (closed with ``resources``): SQLite
    files in the gatekeeper's home, or, with ``checkpoint_url``, PostgreSQL tables that every
    gatekeeper of the deployment shares (a standby resumes a thread and finds its scores)."""
    if not settings.checkpoint_url:
        ledger = await GateLedger.open(settings.home / LEDGER_FILE)
        resources.push_async_callback(ledger.close)
        own = await resources.enter_async_context(
            AsyncSqliteSaver.from_conn_string(str(settings.home / CHECKPOINTS_FILE))
        )
        return own, ledger
    pool = await resources.enter_async_context(postgres_pool(settings.checkpoint_url))
    shared = await setup_checkpoints(pool)
    return shared, await GateLedger.on(await PostgresDb.open(pool, LEDGER_SCHEMA))


async def _open_prompt_store_and_anchor(
    settings: Settings, suites: dict[str, Suite], resources: AsyncExitStack, key: AuditKey
) -> tuple[KvPrompts, AnchorReader, Leases | None]:
    """The prompt store on the gatekeeper's own connection (closed with ``resources``), with each
    suite's prompt seeded as its task's first version; a reader of the audit trail's newest
    anchor signed with ``key`` in the events stream, on the same connection; and, where several
    gatekeepers share the checkpoints (``checkpoint_url``), the changes' leases."""
    connection = await connect(settings, name="gatekeeper-prompts")
    resources.push_async_callback(connection.close)
    js = connection.jetstream()
    writer = await PromptWriter.connect(js)
    for suite in suites.values():
        await writer.seed(suite.name, PromptRecord(text=suite.prompt, kind="initial"))
    leases = Leases(await js.key_value(LEASE_BUCKET)) if settings.checkpoint_url else None
    return KvPrompts(js, writer), partial(read_anchor, connection, key), leases


async def finish_decided_canaries(runner: GateRunner) -> None:
    """Canaries decided before a crash take their verdict now, not at the next live score."""
    try:
        await runner.finish_decided_canaries()
    except Exception:
        log.exception("finishing decided canaries failed; the next live score of each retries")


async def keep_anchored(gate: Gate) -> None:
    """Anchor the trail's head at start and then daily: the events stream drops messages after
    30 days, and a trail without changes for that long would otherwise lose its anchor."""
    while True:
        await asyncio.sleep(await anchor_once(gate))


async def anchor_once(gate: Gate) -> float:
    """Anchor the head once; returns how long to wait before the next time. A trail that no
    longer matches its anchor is reported, never anchored again."""
    try:
        await gate.reanchor()
    except TrailTampered as exc:
        log.error("%s", exc)
    except Exception:
        log.exception("anchoring the audit trail's head failed; trying again in a minute")
        return REANCHOR_RETRY_S
    return REANCHOR_EVERY_S

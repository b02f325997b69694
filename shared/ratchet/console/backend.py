"""The console's side of NATS: what it asks the services, what it publishes, what it relays.

The console is a client of the services like the CLI, through the same functions
(:mod:`ratchet.cli.client`): the audit trail from its owner, the gatekeeper (``query.changes``,
``query.change``, ``query.audit``), failures and a change's gate runs from the failure store
(``query.failures``, ``query.runs``), prompt history from the prompt store. It logs in as
``approver-console``, which may decide and propose only as ``console.<reviewer>``
(:func:`ratchet.natsconf.console_sender`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from ratchet.audit import AuditKey, TrailReport
from ratchet.cli.changes import checked_trail
from ratchet.cli.client import (
    ClientError,
    client_settings,
    evidence_of,
    fetch_trail,
    open_client,
    publish_as,
    request,
)
from ratchet.cli.prompts import rollback_change, stored_history
from ratchet.contracts import (
    ChangeApproved,
    ChangeDecision,
    ChangeProposed,
    ChangeRecorded,
    ChangeRejected,
)
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsconf import CONSOLE, approver_user, console_sender
from ratchet.prompts import PromptVersion, list_tasks
from ratchet.queries import (
    MAX_FAILURES_PER_QUERY,
    ChangesQuery,
    ChangeSummary,
    GateCase,
    RunsQuery,
)
from ratchet.settings import Settings
from ratchet.store import AuditRecord, FailureQuery, FailureRecord
from ratchet.suites import Suite, load_suites

log = logging.getLogger("ratchet.console")
CONSOLE_USER = approver_user(CONSOLE)
CONNECT_TIMEOUT_S = 10.0
DECIDED = ("approved", "rejected")
RECORDED_WAIT_S = 10.0  # how long a decision or a rollback waits for the gatekeeper's record


class Relay:
    """Fans the change events out to the pages that follow them (server-sent events).

    Bounded: at most ``max_listeners`` pages, each with a queue of ``queue_size`` events; a page
    that falls behind misses events, which costs nothing (a page refreshes on any event)."""

    def __init__(self, *, max_listeners: int = 100, queue_size: int = 64) -> None:
        self.max_listeners = max_listeners
        self.queue_size = queue_size
        self.listeners: set[asyncio.Queue[str | None]] = set()

    @property
    def full(self) -> bool:
        return len(self.listeners) >= self.max_listeners

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[str | None]]:
        """A queue of events (JSON) for one page; ``None`` when the console stops."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(self.queue_size)
        self.listeners.add(queue)
        try:
            yield queue
        finally:
            self.listeners.discard(queue)

    def send(self, event: str | None) -> None:
        for queue in self.listeners:
            if not queue.full():
                queue.put_nowait(event)

    def close(self) -> None:
        for queue in self.listeners:
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)


async def recorded(
    events: asyncio.Queue[str | None],
    change_id: str,
    kinds: tuple[str, ...] | None = None,
    timeout: float = RECORDED_WAIT_S,
) -> str | None:
    """Wait until the gatekeeper records a step of ``change_id`` (of one of ``kinds``, if
    given), so that the page shows it; the step's kind, or None after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while (event := await events.get()) is not None:
                said = json.loads(event)
                if said["subject"] != ChangeRecorded.subject or said["change_id"] != change_id:
                    continue
                if kinds is None or said["kind"] in kinds:
                    return str(said["kind"])
    except TimeoutError:
        log.warning("the gatekeeper recorded no step of %s in %.0fs", change_id, timeout)
    return None


def relayed(msg: Msg) -> str | None:
    """What a page learns of a change event: its subject and the change it is about, as JSON.
    Nothing else of the body (which may hold untrusted text) leaves the server this way."""
    try:
        body = json.loads(msg.data)
    except ValueError:
        return None
    change_id = body.get("change_id") if isinstance(body, dict) else None
    if not isinstance(change_id, str):
        return None
    kind = body.get("kind") if msg.subject == ChangeRecorded.subject else None
    return json.dumps({"subject": msg.subject, "change_id": change_id, "kind": kind})


@dataclass
class AuditCheck:
    """The whole trail and what verifying it found (as ``ratchet audit --verify``)."""

    records: list[AuditRecord]
    key_line: str
    anchor: ChangeRecorded | None
    report: TrailReport

    @property
    def intact(self) -> bool:
        return not self.report.problems


@dataclass
class SuiteCache:
    """The task suites of this host, read again when a file changes (the gate pool's cases are
    what the evidence names by id)."""

    directory: Path
    stamp: tuple[tuple[str, int], ...] = ()
    suites: dict[str, Suite] = field(default_factory=dict)

    def get(self, task: str) -> Suite | None:
        files = sorted(self.directory.glob("*.json"))
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        if stamp != self.stamp:
            try:
                self.suites = load_suites(self.directory)
            except ValueError as exc:
                log.warning("cannot read the suites: %s", exc)
                self.suites = {}
            self.stamp = stamp
        return self.suites.get(task)


class Backend:
    """One long-lived connection as ``approver-console`` for queries and the change events; a
    decision or a proposal goes out on a connection of its own (:func:`publish_as`), which hears
    the server refuse it at once."""

    def __init__(self, settings: Settings, *, pinned_key: AuditKey | None = None) -> None:
        self.settings = settings
        self.pinned_key = pinned_key
        self.relay = Relay()
        self.suites = SuiteCache(settings.suites_dir)
        self._nc: Client | None = None

    @classmethod
    def from_environment(cls, pinned_key: AuditKey | None = None) -> Backend:
        """As ``approver-console``, with the password ``ratchet up`` keeps (or the one
        ``RATCHET_NATS_USER`` / ``RATCHET_NATS_PASSWORD`` give)."""
        return cls(client_settings(role=CONSOLE_USER), pinned_key=pinned_key)

    @property
    def connected(self) -> bool:
        return self._nc is not None

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("the console is not connected to NATS")
        return self._nc

    async def start(self) -> None:
        """Connect for good, after a first connection that fails at once with the CLI's one-line
        reasons (no server, a wrong password, another program's server)."""
        await (await open_client(self.settings)).close()
        url = self.settings.nats_url
        try:
            self._nc = await asyncio.wait_for(
                connect(self.settings, name="ratchet-console", reconnect=True),
                CONNECT_TIMEOUT_S,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise ClientError(f"cannot reach NATS at {url} ({type(exc).__name__})") from exc

        async def on_event(msg: Msg) -> None:
            self.relay.send(relayed(msg))

        await self.nc.subscribe("change.>", cb=on_event)

    async def stop(self) -> None:
        self.relay.close()
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    # --- reading ------------------------------------------------------------------------------

    async def changes(self, task: str | None = None) -> list[ChangeSummary]:
        return await request(
            self.nc,
            f"{QUERY_PREFIX}.changes",
            ChangesQuery(task=task),
            TypeAdapter(list[ChangeSummary]),
            service="gatekeeper",
        )

    async def trail(self, change_id: str) -> list[AuditRecord]:
        return await fetch_trail(self.nc, change_id)

    async def tasks(self) -> list[str]:
        """The tasks with a stored prompt."""
        return await list_tasks(self.nc.jetstream())

    async def history(self, task: str) -> list[PromptVersion]:
        return await stored_history(self.nc, task)

    async def failures(self, task: str, run_ids: set[str], before: datetime) -> list[FailureRecord]:
        """The failures among ``run_ids`` (those a proposal's groups name), logged before it."""
        if not run_ids:
            return []
        found = await request(
            self.nc,
            f"{QUERY_PREFIX}.failures",
            FailureQuery(
                task=task, until=before + timedelta(seconds=1), limit=MAX_FAILURES_PER_QUERY
            ),
            TypeAdapter(list[FailureRecord]),
            service="failure store",
        )
        return [failure for failure in found if failure.run_id in run_ids]

    async def gate_runs(self, change_id: str, case_ids: list[str], repeats: int) -> list[GateCase]:
        """What both prompts answered on ``case_ids`` when the gate measured the change (the
        first ``repeats`` repeats), as the failure store keeps the runs."""
        if not case_ids:
            return []
        return await request(
            self.nc,
            f"{QUERY_PREFIX}.runs",
            RunsQuery(change_id=change_id, case_ids=case_ids, repeats=repeats),
            TypeAdapter(list[GateCase]),
            service="failure store",
        )

    async def audit(self) -> AuditCheck:
        return AuditCheck(*await checked_trail(self.nc, self.pinned_key))

    # --- acting, for a reviewer ---------------------------------------------------------------

    async def decide(
        self, change_id: str, *, approve: bool, reason: str, evidence: str, reviewer: str
    ) -> None:
        """Decide on the evidence the reviewer saw (``evidence``), as ``console.<reviewer>``,
        and wait (bounded) until the gatekeeper records it, so the next page shows it. Refused
        here, before anything is published, when the change is not waiting for a decision or
        the gate's evidence is not what the page showed; an error too when the gatekeeper
        refuses it."""
        kind = ChangeApproved if approve else ChangeRejected

        async def decision(nc: Client) -> ChangeDecision:
            trail = await fetch_trail(nc, change_id)
            if decided := next((r for r in trail if r.kind in DECIDED), None):
                raise ClientError(f"change {change_id} is already {decided.kind}")
            if evidence != evidence_of(trail):
                raise ClientError(
                    f"the gate's evidence for {change_id} is not the one on your page: reload it"
                )
            return kind(change_id=change_id, reason=reason, evidence_sha256=evidence)

        subject = kind.subject_of(console_sender(reviewer))
        async with self.relay.listen() as events:  # before publishing: no event is missed
            await publish_as(self.settings, decision, subject=subject, refused=self._refused)
            step = await recorded(events, change_id, (*DECIDED, "decision_refused"))
        if step == "decision_refused":
            raise ClientError(f"the gatekeeper refused the decision on {change_id}: see its trail")

    async def rollback(self, task: str, version: int, reviewer: str) -> ChangeProposed:
        """Propose ``version``'s prompt again, as ``console.<reviewer>``: a change like any
        other, measured by the gate (a non-inferiority test), and decided by a person."""

        async def change(nc: Client) -> ChangeProposed:
            return await rollback_change(nc, task, version, self.settings)

        subject = ChangeProposed.subject_of(console_sender(reviewer))
        async with self.relay.listen() as events:  # before publishing: no event is missed
            proposed = await publish_as(
                self.settings, change, subject=subject, refused=self._refused
            )
            await recorded(events, proposed.change_id)
        return proposed

    def _refused(self, why: str) -> ClientError:
        return ClientError(
            f"NATS refused the console's user {self.settings.nats_user!r} ({why}): the console "
            f"logs in as {CONSOLE_USER!r}"
        )

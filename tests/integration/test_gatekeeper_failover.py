"""No single gatekeeper: two gatekeeper processes on one nats-server share one PostgreSQL database
(checkpoints, run ledger and the store, so the audit trail too) and the audit signing key, and
nothing on disk: each has a home of its own, as on two hosts. Killing the active one with SIGKILL
while it measures, or while its change waits for approval, leaves the change to the standby, which
finishes it exactly once.

Every part is a real process on a real nats-server and a real PostgreSQL (``postgres`` fixture);
the models are scripted (``scripted:prompt-sensitive``: a prompt asking for "only the final
answer" passes the demo suite's exact checks, the initial one does not).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import cli, trail_reaching
from nats.aio.client import Client
from nats.aio.msg import Msg

from ratchet.audit import PUBLIC_KEY_FILE, SIGNING_KEY_FILE, AuditSigner
from ratchet.cli.up import Stack, _wait_for_consumers
from ratchet.contracts import GateRunRequested, RunScored
from ratchet.messaging import EVENTS_STREAM, LEASE_BUCKET, PROMPTS_BUCKET, connect
from ratchet.natsconf import ROLES
from ratchet.natsproc import free_port
from ratchet.services import get_service
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
DEMO = load_suite(REPO / "config" / "suites" / "demo.json")
FIX = "Answer the question. Reply with only the final answer, no other words."
GATEKEEPERS = ("gatekeeper-a", "gatekeeper-b")


def ha_settings(tmp_path: Path, postgres_url: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        store_url=postgres_url,  # the shared audit trail: the PostgreSQL store
        checkpoint_url=postgres_url,
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        ack_wait_s=5.0,  # a message held by a killed gatekeeper comes back after 5 s
        workers=4,
        gate=GateSettings(
            max_cases=40, looks=2, verify_cases=10, holdout_cases=10, run_timeout_s=120
        ),
    )


class HaStack:
    """nats-server, an evaluator, two gatekeepers (each in a home of its own, as on two hosts),
    and an executor started when the test says."""

    def __init__(self, settings: Settings) -> None:
        self.stack = Stack(settings=settings)
        self.homes: dict[str, Path] = {}

    def start(self, *, executor: bool) -> None:
        self.stack.logs.mkdir(parents=True, exist_ok=True)
        self.stack.start_nats()
        # one signing key for both: made once, copied to the standby (docs/deploy.md)
        first = self.home("gatekeeper-a")
        AuditSigner.load_or_create(first / SIGNING_KEY_FILE)
        for name in (SIGNING_KEY_FILE, PUBLIC_KEY_FILE):
            shutil.copy2(first / name, self.home("gatekeeper-b") / name)
        self.launch("evaluator", "evaluator")
        for label in GATEKEEPERS:
            self.launch(label, "gatekeeper")
        if executor:
            self.launch("executor", "executor")
        asyncio.run(self.both_gatekeepers_pull())

    def home(self, label: str) -> Path:
        home = self.stack.settings.home.resolve() / "hosts" / label
        (home / "logs").mkdir(parents=True, exist_ok=True)
        self.homes[label] = home
        return home

    def launch(self, label: str, service_name: str) -> None:
        service = get_service(service_name)
        host = Stack(
            settings=self.stack.settings.model_copy(update={"home": self.home(label)}),
            nats=self.stack.nats,
        )
        self.stack.processes.append((label, host.launch(label, service)))
        self.stack.services[label] = service
        durables = [durable for durable, _ in ROLES[service.role].consumers]
        asyncio.run(_wait_for_consumers(self.stack, durables))

    async def both_gatekeepers_pull(self, timeout: float = 60) -> None:
        """Both gatekeepers are up: each has a pull request waiting on the proposals' durable."""
        nc = await self.admin()
        try:
            js = nc.jetstream()
            deadline = asyncio.get_running_loop().time() + timeout
            while (await js.consumer_info(EVENTS_STREAM, "gatekeeper-proposals")).num_waiting < 2:
                if self.stack.dead():
                    raise AssertionError(f"{self.stack.dead()} died: see {self.stack.logs}")
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError("the two gatekeepers never both pulled proposals")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def admin(self) -> Client:
        assert self.stack.nats is not None
        return await connect(self.stack.nats.settings_for("admin"), name="test-admin")

    def kill(self, pid: int) -> str:
        """SIGKILL the gatekeeper with this pid; its label."""
        for label, process in list(self.stack.processes):
            if process.pid == pid:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
                self.stack.processes.remove((label, process))
                return label
        raise AssertionError(f"no process of the stack has pid {pid}")

    def log(self, label: str) -> str:
        return (self.homes[label] / "logs" / f"{label}.log").read_text(errors="replace")

    def stop(self) -> None:
        self.stack.stop()


@pytest.fixture
def ha(tmp_path: Path, postgres: str) -> Iterator[HaStack]:
    running = HaStack(ha_settings(tmp_path, postgres))
    try:
        yield running
    finally:
        running.stop()


def propose(stack: Stack) -> str:
    proposed = cli(stack, "propose", DEMO.name, "--prompt", FIX, "--because", "bare answers")
    assert proposed.returncode == 0, proposed.stderr
    found = re.search(r"proposed change (\S+)", proposed.stdout)
    assert found, proposed.stdout
    return found.group(1)


class LeaseWatch:
    """The lease bucket as the gatekeepers write it: a watch opened before the change is
    proposed, so no take or release is missed."""

    def __init__(self, watcher: Any) -> None:
        self.watcher = watcher

    @classmethod
    async def open(cls, nc: Client) -> LeaseWatch:
        kv = await nc.jetstream().key_value(LEASE_BUCKET)
        return cls(await kv.watchall())

    async def next(self, timeout: float = 60) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                entry = await self.watcher.updates(timeout=left)
            except TimeoutError:
                break
            if entry is not None:
                return entry
        raise AssertionError("the lease bucket did not change")

    async def taken(self) -> tuple[str, int]:
        """The next lease taken: its change id and the holder's pid."""
        while (entry := await self.next()).operation is not None:
            pass
        held = json.loads(entry.value)
        return str(held["change_id"]), int(held["holder"].split(":")[1])

    async def released(self) -> None:
        """The next lease released (deleted by its holder, after its work)."""
        while (await self.next()).operation is None:
            pass

    async def close(self) -> None:
        await self.watcher.stop()


async def first_message(nc: Client, subject: str) -> asyncio.Future[Msg]:
    """A future of the next message on ``subject`` (subscribed now, as the admin)."""
    arrived: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

    async def on_message(msg: Msg) -> None:
        if not arrived.done():
            arrived.set_result(msg)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return arrived


async def stream_events(nc: Client, subject: str) -> list[bytes]:
    """Every message on ``subject`` in the events stream, in order (an ephemeral consumer)."""
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    sub = await js.pull_subscribe(subject, stream=EVENTS_STREAM)
    found: list[bytes] = []
    while len(found) < total:
        batch = await sub.fetch(min(256, total - len(found)), timeout=10)
        found += [msg.data for msg in batch]
        for msg in batch:
            await msg.ack()
    await sub.unsubscribe()
    return found


async def assert_finished_once(
    ha: HaStack, nc: Client, postgres: str, change_id: str, kept_trail: list[str]
) -> None:
    """Every audit kind once, the prompt written once, every gate run requested and scored
    once, and the evidence counting each measured run once."""
    stack = ha.stack
    assert await trail_reaching(stack, change_id, "holdout", timeout=120) == kept_trail
    verified = cli(stack, "audit", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    kv = await nc.jetstream().key_value(PROMPTS_BUCKET)
    written = [json.loads(entry.value or b"{}") for entry in await kv.history(DEMO.name)]
    kinds = Counter(r.get("kind") for r in written if r.get("change_id") == change_id)
    assert kinds == {"change": 1}, written

    requested = [
        GateRunRequested.model_validate_json(data)
        for data in await stream_events(nc, GateRunRequested.subject)
    ]
    scored = [
        RunScored.model_validate_json(data) for data in await stream_events(nc, RunScored.subject)
    ]
    mine = Counter(r.run_id for r in requested if r.context.change_id == change_id)
    scores = Counter(s.run_id for s in scored if s.context.change_id == change_id)
    assert mine and set(mine.values()) == {1}, "a gate run was requested twice"
    assert scores == mine, "a gate run was scored twice, or not at all"

    shown = json.loads(cli(stack, "show", change_id, "--json").stdout)
    measurement = next(r["payload"] for r in shown if r["kind"] == "measured")
    measured = [run_id for run_id in mine if ".measure." in run_id]
    assert measurement["runs"] == len(measured)
    assert measurement["verdict"] == "superior"
    with psycopg.connect(postgres) as db:
        rows = db.execute(
            "SELECT COUNT(*), COUNT(scored) FROM gate_runs WHERE change_id = %s", (change_id,)
        ).fetchone()
        trail = db.execute(
            "SELECT kind FROM audit WHERE change_id = %s ORDER BY seq", (change_id,)
        ).fetchall()
    assert rows == (len(mine), len(mine))
    assert [kind for (kind,) in trail] == kept_trail  # the trail is the PostgreSQL store's


async def test_the_standby_finishes_a_change_whose_gatekeeper_died_measuring(
    ha: HaStack, postgres: str, kept_trail: list[str]
) -> None:
    """No executor at first, so the gate runs wait unscored and the active gatekeeper is
    certainly measuring when it is killed; the executor starts after."""
    await asyncio.to_thread(ha.start, executor=False)
    admin = await ha.admin()
    leases = await LeaseWatch.open(admin)
    measuring = await first_message(admin, GateRunRequested.subject)
    change_id = propose(ha.stack)
    leased, pid = await leases.taken()
    assert leased == change_id
    await asyncio.wait_for(measuring, 60)
    killed = ha.kill(pid)
    await asyncio.to_thread(ha.launch, "executor", "executor")

    assert await trail_reaching(ha.stack, change_id, "awaiting_approval", timeout=120)
    approved = cli(ha.stack, "approve", change_id, "--reason", "bare answers pass")
    assert approved.returncode == 0, approved.stderr
    await assert_finished_once(ha, admin, postgres, change_id, kept_trail)
    # the standby took the redelivered proposal over, from the checkpoint the other one left
    assert f"resuming change {change_id} at ('measure',)" in ha.log(standby(killed))
    await admin.close()


async def test_the_standby_finishes_a_change_whose_gatekeeper_died_waiting_for_approval(
    ha: HaStack, postgres: str, kept_trail: list[str]
) -> None:
    await asyncio.to_thread(ha.start, executor=True)
    admin = await ha.admin()
    leases = await LeaseWatch.open(admin)
    change_id = propose(ha.stack)
    leased, pid = await leases.taken()
    assert leased == change_id
    assert await trail_reaching(ha.stack, change_id, "awaiting_approval", timeout=120)
    await leases.released()  # its thread waits at the gate: the gatekeeper let the change go
    killed = ha.kill(pid)
    assert "resuming" not in ha.log(standby(killed))

    approved = cli(ha.stack, "approve", change_id, "--reason", "bare answers pass")
    assert approved.returncode == 0, approved.stderr
    await assert_finished_once(ha, admin, postgres, change_id, kept_trail)
    await admin.close()


def standby(killed: str) -> str:
    return next(label for label in GATEKEEPERS if label != killed)

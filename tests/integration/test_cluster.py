"""A three-node JetStream cluster on loopback (``ratchet.natsproc.start_cluster``): the streams and
the prompt bucket have three replicas, every connection knows every node, and the pipeline rides
out the loss of the node that leads the events stream. Also: a node killed with SIGKILL and
restarted on its data directory (one server, or the whole cluster at once) keeps every event it
had acknowledged.

The agent is the FAKE ``scripted:world`` model with a small sleep, so runs are in flight when a
node goes. Counts come from the stream itself (every message, read back) and from the failure
store's SQLite file, read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from test_supervisor import STACK, Up, descendants, linux_only, wait_gone

from ratchet.cli.up import start_stack
from ratchet.contracts import Check, RunCompleted, RunRequested, RunScored
from ratchet.jetstream import NOT_ANSWERED
from ratchet.messaging import (
    DLQ_STREAM,
    EVENTS_STREAM,
    PROMPTS_BUCKET,
    PUBLISH_RETRY_S,
    connect,
    ensure_streams,
    publish_js,
)
from ratchet.natsproc import LocalNats, free_port, port_in_use, start_cluster, start_nats
from ratchet.services import SERVICES
from ratchet.settings import ModelSettings, Settings
from ratchet.world import case_answer, case_input

PIPELINE = tuple(s for s in SERVICES if s.name in ("executor", "evaluator", "failure-store"))
TASK = "world"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[LocalNats]:
    cluster = start_cluster(tmp_path / "home", 3, log_dir=tmp_path)
    yield cluster
    cluster.stop()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """Wait for ``condition``, checked every 0.2 s, or fail saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g}s")
        await asyncio.sleep(0.2)


async def admin(nats: LocalNats) -> Client:
    nc: Client = await connect(nats.settings_for("admin"), name="test-admin")
    return nc


async def read_stream(
    nc: Client, stream: str, subject: str, *, within: float = PUBLISH_RETRY_S
) -> list[bytes]:
    """Every message of ``stream`` on ``subject`` (a filter), read back from the first with an
    ephemeral consumer: what the stream holds, whoever heard it live. On a cluster just after
    its nodes were killed, the stream or the new consumer may still be electing a leader (the
    server answers 503): read again from the start, with a fresh consumer, for up to
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await _read_stream_once(nc, stream, subject)
        except NOT_ANSWERED:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _read_stream_once(nc: Client, stream: str, subject: str) -> list[bytes]:
    js = nc.jetstream()
    total = (await js.stream_info(stream, subjects_filter=subject)).state.subjects or {}
    expected = sum(total.values())
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    bodies: list[bytes] = []
    try:
        while len(bodies) < expected:
            with contextlib.suppress(TimeoutError):
                bodies += [msg.data for msg in await sub.fetch(500, timeout=2)]
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return bodies


def per_run(bodies: list[bytes]) -> Counter[str]:
    """Messages per run id."""
    return Counter(str(json.loads(body)["run_id"]) for body in bodies)


def world_settings(home: Path, nats: LocalNats | None = None, **changes: Any) -> Settings:
    settings = Settings(
        home=home,
        nats_url=nats.url if nats else f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
    )
    return settings.model_copy(update=changes)


def world_request(i: int) -> RunRequested:
    return RunRequested(
        task=TASK, input=case_input(i), check=Check(kind="exact", expected=case_answer(i))
    )


def stored_runs(home: Path, run_ids: set[str]) -> dict[str, float]:
    """Score by run id of each of ``run_ids`` stored with both its run and its score, read from
    the failure store's SQLite file (read-only, the service still writing)."""
    path = home / "ratchet.db"
    if not path.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            rows = db.execute(
                "SELECT run_id, scored FROM runs WHERE completed IS NOT NULL AND scored IS NOT NULL"
            ).fetchall()
        except sqlite3.OperationalError as exc:  # made, but its tables not yet: nothing stored
            if "no such table" not in str(exc):
                raise
            return {}
    return {
        run_id: float(json.loads(scored)["score"]) for run_id, scored in rows if run_id in run_ids
    }


def stored_failures(home: Path, run_ids: set[str]) -> set[str]:
    path = home / "ratchet.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows = db.execute("SELECT run_id FROM failures").fetchall()
    return {run_id for (run_id,) in rows if run_id in run_ids}


async def publish_runs(nc: Client, requests: list[RunRequested]) -> None:
    """Each request published and acknowledged (the client rides out a lost node too)."""
    js = nc.jetstream()
    await asyncio.gather(
        *(publish_js(js, r, timeout=10, retry_s=PUBLISH_RETRY_S) for r in requests)
    )


async def test_streams_and_bucket_have_three_replicas_and_every_node_serves(
    nats_cluster: LocalNats,
) -> None:
    nc = await admin(nats_cluster)
    try:
        js = nc.jetstream()
        for stream in (EVENTS_STREAM, DLQ_STREAM, f"KV_{PROMPTS_BUCKET}"):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and info.cluster.leader is not None, stream
            peers = {info.cluster.leader, *(peer.name for peer in info.cluster.replicas or [])}
            assert peers == {node.name for node in nats_cluster.nodes}, (stream, peers)
    finally:
        await nc.close()
    # a client given every URL connects while any one node is down
    first = nats_cluster.nodes[0]
    first.kill()
    client = await connect(nats_cluster.settings_for("client"), name="test", reconnect=False)
    try:
        assert client.connected_url is not None and client.connected_url.port != first.port
    finally:
        await client.close()


async def test_a_single_servers_streams_keep_one_replica(tmp_path: Path) -> None:
    """An existing single server: ensure_streams again (``ratchet up`` at each start) leaves its
    streams at one replica, with their messages."""
    server = await asyncio.to_thread(start_nats, tmp_path / "home", free_port())
    try:
        nc = await admin(server)
        try:
            js = nc.jetstream()
            await publish_js(js, world_request(1))
            await ensure_streams(js, replicas=server.replicas)
            info = await js.stream_info(EVENTS_STREAM)
            assert (info.config.num_replicas, info.state.messages) == (1, 1)
        finally:
            await nc.close()
    finally:
        server.stop()


@pytest.mark.parametrize("nodes", [1, 3])
async def test_acknowledged_events_survive_sigkill_of_every_node(
    tmp_path: Path, nodes: int
) -> None:
    """N events published and acknowledged, then every node killed with SIGKILL at once and
    restarted on its data directory: the stream holds each of the N, once."""
    home = tmp_path / "home"
    nats = await asyncio.to_thread(
        lambda: (
            start_cluster(home, nodes, log_dir=tmp_path)
            if nodes > 1
            else start_nats(home, free_port())
        )
    )
    requests = [world_request(i) for i in range(2000)]
    try:
        nc = await admin(nats)
        try:
            await publish_runs(nc, requests)
        finally:
            await nc.close()
        for node in nats.nodes:
            node.process.kill()
        for node in nats.nodes:
            node.process.wait()
            node.start()
        nc = await admin(nats)
        try:
            bodies: list[bytes] = []

            async def all_back() -> bool:
                nonlocal bodies
                with contextlib.suppress(Exception):
                    bodies = await read_stream(nc, EVENTS_STREAM, RunRequested.subject)
                return len(bodies) >= len(requests)

            await until(all_back, "every acknowledged event back", timeout=60)
        finally:
            await nc.close()
        counted = per_run(bodies)
        lost = {r.run_id for r in requests} - set(counted)
        duplicates = sum(n - 1 for n in counted.values())
        print(
            f"\nnats-server restart ({nodes} node(s)): acknowledged {len(requests)}, "
            f"found {len(counted)}, lost {len(lost)}, duplicates {duplicates}"
        )
        assert (len(lost), duplicates, len(counted)) == (0, 0, len(requests))
    finally:
        nats.stop()


async def test_the_pipeline_rides_out_the_loss_of_the_stream_leaders_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executor, evaluator and failure store as real processes on the cluster; with runs in
    flight the node leading the events stream is killed with SIGKILL, then restarted. Every run
    is stored with its score, and the stream holds one run.completed and one run.scored each."""
    monkeypatch.setenv("RATCHET_WORLD__LATENCY_S", "0.05")  # the services inherit it
    settings = world_settings(tmp_path / "home", ack_wait_s=10.0)
    stack = await asyncio.to_thread(start_stack, settings, cluster=3, services=PIPELINE)
    try:
        assert stack.nats is not None
        requests = [world_request(i) for i in range(300)]
        run_ids = {r.run_id for r in requests}
        home = settings.home.resolve()
        client = await connect(stack.nats.settings_for("client"), name="test-client")
        try:
            publishing = asyncio.create_task(publish_runs(client, requests))
            await until(
                lambda: asyncio.sleep(0, result=len(stored_runs(home, run_ids)) >= 30),
                "runs flowing",
                timeout=60,
            )
            leader = await stack.nats.stream_leader()
            leader.kill()
            await asyncio.sleep(2)  # the node stays down while runs go on: the outage under test
            await asyncio.to_thread(stack.nats.restart, leader)
            await publishing
            await until(
                lambda: asyncio.sleep(0, result=len(stored_runs(home, run_ids)) == len(run_ids)),
                "every run stored with its score",
                timeout=180,
            )
        finally:
            await client.close()
        nc = await admin(stack.nats)
        try:
            completed = per_run(await read_stream(nc, EVENTS_STREAM, RunCompleted.subject))
            scored = per_run(await read_stream(nc, EVENTS_STREAM, RunScored.subject))
            dead = await read_stream(nc, DLQ_STREAM, ">")
        finally:
            await nc.close()
        assert set(completed) == set(scored) == run_ids
        assert max(completed.values()) == max(scored.values()) == 1
        assert dead == []
    finally:
        await asyncio.to_thread(stack.stop)


@pytest.fixture
def up_cluster(tmp_path: Path) -> Iterator[Up]:
    """`ratchet up --cluster 3` in a fresh home, killed if the test fails."""
    up = Up(tmp_path, "--cluster", "3")
    yield up
    up.stop()


@linux_only
def test_ratchet_up_cluster_supervises_three_nodes(up_cluster: Up) -> None:
    """`ratchet up --cluster 3`: three nodes on the configured port and the two after it, named
    in its output; a node killed is restarted by the supervisor while the stack keeps running
    runs; SIGTERM stops every process it started."""
    up = up_cluster
    urls = up.expect(r"^All up\. NATS at (\S+)\.").group(1).split(",")
    assert [int(url.rpartition(":")[2]) for url in urls] == [up.port, up.port + 1, up.port + 2]
    children = descendants(up.process.pid)
    assert sorted(children.values()) == sorted(["nats-server"] * 2 + STACK), children
    pids = set(children)
    node = next(pid for pid, what in children.items() if what == "nats-server")
    os.kill(node, signal.SIGKILL)
    up.expect(r"^nats-server-\d was killed by SIGKILL; restarting it in 1s")
    pids.add(int(up.expect(r"^nats-server-\d restarted \(pid (\d+)\)").group(1)))
    up.env["RATCHET_NATS_URL"] = ",".join(urls)  # a client elsewhere is given every node
    ran = up.cli("run", "answer-only", "What is 7 + 5?", "--expect", "12")
    assert ran.returncode == 0 and "score:" in ran.stdout, ran.stdout + ran.stderr
    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0
    assert not wait_gone(pids), f"left running: {wait_gone(pids, 0)}"
    assert not any(port_in_use(int(url.rpartition(":")[2])) for url in urls)

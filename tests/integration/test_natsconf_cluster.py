"""The one config `ratchet natsconf --cluster-routes` writes for every node of a deployment's
cluster (compose, Kubernetes) really makes a cluster: three real nats-server processes read it,
each named by its SERVER_NAME variable (a pod's name), each skipping the route to itself, and the
streams come up with three replicas. Only what containers have apart is changed here: the client
and route ports, on the command line (on loopback the three nodes cannot all use 4222 and 6222),
and the data directory (each container mounts its own volume at /data)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet.messaging import EVENTS_STREAM, connect, ensure_streams
from ratchet.natsconf import ADMIN
from ratchet.natsproc import free_port, nats_server_binary, wait_for_port
from ratchet.settings import Settings


@pytest.fixture
def deployment_cluster(tmp_path: Path) -> Iterator[tuple[list[int], dict[str, str]]]:
    routes = [free_port() for _ in range(3)]
    out = tmp_path / "deploy"
    written = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "natsconf", "--out", str(out),
         "--cluster-routes", ",".join(f"127.0.0.1:{route}" for route in routes)],
        env={**os.environ, "RATCHET_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    passwords = dict(
        line.split("=", 1) for line in (out / "passwords.env").read_text().splitlines()
    )
    ports = [free_port() for _ in range(3)]
    nodes = []
    for i, (port, route) in enumerate(zip(ports, routes, strict=True)):
        # each container mounts its own volume at /data; here, each node its own folder
        config = tmp_path / f"node-{i}.conf"
        text = (out / "nats-server.conf").read_text()
        config.write_text(text.replace("/data/jetstream", str(tmp_path / f"node-{i}")))
        command = [
            nats_server_binary(), "-c", str(config), "-p", str(port),
            "--cluster_listen", f"nats://127.0.0.1:{route}",
        ]  # fmt: skip
        node = subprocess.Popen(
            command,
            env={**os.environ, "SERVER_NAME": f"nats-{i}"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        nodes.append(node)
    try:
        for port in ports:
            wait_for_port(port)
        yield ports, passwords
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=15)


async def test_every_node_reads_the_one_config_and_the_streams_get_three_replicas(
    deployment_cluster: tuple[list[int], dict[str, str]],
) -> None:
    ports, passwords = deployment_cluster
    settings = Settings(
        nats_url=",".join(f"nats://127.0.0.1:{port}" for port in ports),
        nats_user=ADMIN,
        nats_password=passwords["RATCHET_PW_ADMIN"],
    )
    nc = await connect(settings, name="test-deployment-cluster")
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # the meta leader is elected a few seconds after the routes connect
            try:
                await ensure_streams(js, replicas=3)
                break
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        info = await js.stream_info(EVENTS_STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader is not None
        peers = {info.cluster.leader, *(replica.name for replica in info.cluster.replicas or [])}
        assert peers == {"nats-0", "nats-1", "nats-2"}  # named by SERVER_NAME, one each
    finally:
        await nc.close()

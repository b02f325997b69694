"""`ratchet up` and `ratchet demo` when another NATS server already listens on the configured
port: one line naming the port, at once, and nothing done to the other server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.errors import NotFoundError

from ratchet.messaging import EVENTS_STREAM
from ratchet.natsproc import free_port, nats_server_binary, start_nats, wait_for_port


class Stranger:
    """A nats-server someone else started: open (JetStream, no password) or with a password."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        args = ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(tmp_path / "theirs")]
        if kind == "password":
            args += ["--user", "someone", "--pass", "else"]
        self.process = subprocess.Popen(
            [nats_server_binary(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    async def ratchet_streams(self) -> bool:
        """Whether Ratchet's stream was created on this server (it must not be)."""
        auth = {"user": "someone", "password": "else"} if self.kind == "password" else {}
        nc = await nats.connect(f"nats://127.0.0.1:{self.port}", connect_timeout=5, **auth)
        try:
            await nc.jetstream().stream_info(EVENTS_STREAM)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()


@pytest.fixture(params=["open", "password"])
def stranger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stranger]:
    server = Stranger(tmp_path, request.param)
    try:
        wait_for_port(server.port)
        yield server
        assert server.process.poll() is None  # left running
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


def ratchet(home: Path, port: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "ratchet.cli", *args],
            env={
                **os.environ,
                "RATCHET_HOME": str(home),
                "RATCHET_NATS_URL": f"nats://127.0.0.1:{port}",
                "RATCHET_LOCAL_MODEL_PORT": str(free_port()),
                "RATCHET_AGENT__SPEC": "scripted:prompt-sensitive",
                "RATCHET_JUDGE__SPEC": "scripted:judge-yes",
                "RATCHET_PROPOSER__SPEC": "scripted:proposer-fix",
            },
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`ratchet {' '.join(args)}` still waiting after 60s: {exc.stderr!r}")
    return ran, time.monotonic() - began


def assert_port_in_use(ran: subprocess.CompletedProcess[str], port: int) -> None:
    assert ran.returncode == 1, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert ran.stderr.startswith("ratchet: error:") and ran.stderr.count("\n") == 1, ran.stderr
    assert f"port {port} is already in use" in ran.stderr, ran.stderr


def test_up_says_the_port_is_in_use(tmp_path: Path, stranger: Stranger) -> None:
    ran, seconds = ratchet(tmp_path / "home", stranger.port, "up")
    assert_port_in_use(ran, stranger.port)
    assert seconds < 30
    assert not asyncio.run(stranger.ratchet_streams())


@pytest.mark.parametrize("home", ["fresh", "used before"])
def test_demo_says_the_port_is_in_use(tmp_path: Path, stranger: Stranger, home: str) -> None:
    if home == "used before":  # Ratchet ran here before: its credentials are in the home
        start_nats(tmp_path / "home", free_port()).stop()
    ran, seconds = ratchet(tmp_path / "home", stranger.port, "demo", "--yes")
    assert_port_in_use(ran, stranger.port)
    assert seconds < 30
    assert not asyncio.run(stranger.ratchet_streams())

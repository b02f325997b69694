"""``ratchet up``: nats-server, the local model server and every service, as child processes.

The services are the ones declared in :mod:`ratchet.services` (the optional ones, such as the
policy approver, only when asked for), each run as ``faststream run --factory MODULE:build_app``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ratchet.messaging import EVENTS_STREAM, connect
from ratchet.models import local_base_url, local_model_path
from ratchet.natsconf import ROLES
from ratchet.natsproc import LocalNats, start_nats, wait_for_port
from ratchet.services import CORE_SERVICES, Service, get_service
from ratchet.settings import Settings, to_env


@dataclass
class Stack:
    """Everything ``ratchet up`` started, stopped together in reverse order."""

    settings: Settings
    nats: LocalNats | None = None
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        if self.nats is not None:
            self.nats.stop()

    def launch(self, label: str, service: Service) -> subprocess.Popen[bytes]:
        """Start one service process as its NATS role, logging to ``home/logs/<label>.log``."""
        assert self.nats is not None
        home = self.settings.home.resolve()
        env = {
            **os.environ,
            **to_env(self.settings.model_copy(update={"home": home})),
            **self.nats.env_for(service.role),
        }
        return subprocess.Popen(
            [sys.executable, "-m", *service.command],
            env=env,
            stdout=open(home / "logs" / f"{label}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    def restart(self, name: str, *, kill: bool = False) -> None:
        """Stop one service (SIGKILL with ``kill``: a crash) and start a new process for it."""
        service = get_service(name)
        index = next(i for i, (label, _) in enumerate(self.processes) if label == name)
        old = self.processes[index][1]
        old.kill() if kill else old.terminate()
        old.wait(timeout=15)
        self.processes[index] = (name, self.launch(name, service))
        asyncio.run(_wait_for_consumers(self, [d for d, _ in ROLES[service.role].consumers]))

    def dead(self) -> list[str]:
        return [name for name, process in self.processes if process.poll() is not None]


def uses_local_model(settings: Settings) -> bool:
    return any(m.spec == "local" for m in (settings.agent, settings.judge, settings.proposer))


def start_stack(
    settings: Settings,
    *,
    evaluators: int = 1,
    on_ready: Callable[[str, float], None] = lambda name, seconds: None,
    services: tuple[Service, ...] = CORE_SERVICES,
) -> Stack:
    """Start everything and return once each part is ready; on any failure, stop what started.

    ``services``: by default every service that is not optional (not the policy approver).
    """
    home = settings.home.resolve()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings=settings)
    try:
        began = time.monotonic()
        port = urlparse(settings.nats_url).port or 4222
        stack.nats = start_nats(
            home, port, log_path=logs / "nats-server.log", approvers=settings.approvers
        )
        on_ready("nats-server", time.monotonic() - began)
        if uses_local_model(settings):
            began = time.monotonic()
            stack.processes.append(("local-model", _start_local_model(settings, logs)))
            _wait_for_local_model(settings.local_model_port, stack)
            on_ready("local-model", time.monotonic() - began)
        for service in services:
            name = service.name
            copies = evaluators if name == "evaluator" else 1
            began = time.monotonic()
            for copy in range(copies):
                label = f"{name}-{copy + 1}" if copies > 1 else name
                stack.processes.append((label, stack.launch(label, service)))
            durables = [d for d, _ in ROLES[service.role].consumers]
            asyncio.run(_wait_for_consumers(stack, durables))
            on_ready(name if copies == 1 else f"{name} x{copies}", time.monotonic() - began)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start_local_model(settings: Settings, logs: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(local_model_path()),
        "--host", "127.0.0.1",
        "--port", str(settings.local_model_port),
        "--n_ctx", "2048",
        "--n_threads", str(os.cpu_count() or 2),
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=open(logs / "local-model.log", "ab"), stderr=subprocess.STDOUT
    )


def _wait_for_local_model(port: int, stack: Stack, timeout: float = 120.0) -> None:
    wait_for_port(port, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.dead():
            raise RuntimeError(f"the local model server exited; see {stack.settings.home}/logs")
        try:
            with urllib.request.urlopen(f"{local_base_url(port)}/models", timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the local model server did not answer")


async def _wait_for_consumers(stack: Stack, durables: list[str], timeout: float = 60.0) -> None:
    """A service is ready once its durable consumers exist and are being pulled from."""
    assert stack.nats is not None
    connection = await connect(stack.nats.settings_for("admin"), name="ratchet-up")
    try:
        js = connection.jetstream()
        deadline = time.monotonic() + timeout
        pending = set(durables)
        while pending:
            if dead := stack.dead():
                raise RuntimeError(
                    f"{', '.join(dead)} exited during start-up; see {stack.settings.home}/logs"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumers {sorted(pending)} never appeared")
            for durable in list(pending):
                try:
                    await js.consumer_info(EVENTS_STREAM, durable)
                    pending.discard(durable)
                except Exception:
                    await asyncio.sleep(0.1)
    finally:
        await connection.close()

"""``ratchet up``: nats-server, the local model server and every service, as child processes, and
the supervisor that keeps them running and stops them together.

The services are the ones declared in :mod:`ratchet.services` (the optional ones, such as the
policy approver, only when asked for), each run as ``faststream run --factory MODULE:build_app``.

No child outlives the supervisor. An orderly stop (:meth:`Stack.stop`) stops the services in
reverse order, then the local model server, then nats-server, each with SIGTERM and a bounded wait
before SIGKILL. Every child runs in a process group of its own, so a Ctrl-C at the terminal reaches
only the supervisor, which then stops them in that order. If the supervisor dies without stopping
them (SIGKILL, a crash), Linux kills every child it started from its main thread: each one asks
for SIGKILL on its parent's death (``prctl(PR_SET_PDEATHSIG)``). Other systems have no such call:
there the orderly stop works, but after a SIGKILL of the supervisor its children keep running
until killed (a service manager that kills the whole group or cgroup, as systemd and Docker do,
still cleans up).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

from ratchet.messaging import EVENTS_STREAM, connect
from ratchet.models import local_base_url, local_model_path
from ratchet.natsconf import ROLES
from ratchet.natsproc import (
    NATS,
    LocalNats,
    NatsStartError,
    start_cluster,
    start_nats,
    stop_processes,
    wait_for_port,
)
from ratchet.services import CORE_SERVICES, Service, get_service
from ratchet.settings import Settings, to_env

LOCAL_MODEL = "local-model"  # with NATS (a cluster's nodes: nats-server-<i>), the non-services
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 10.0  # how long a child may take to stop on SIGTERM before it is killed
LOG_TAIL_LINES = 20  # of a part that cannot be kept running, shown when the supervisor gives up

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # the colour codes of FastStream's log lines


def child_setup() -> Callable[[], None] | None:
    """What each child of the stack runs between fork and exec (Popen's ``preexec_fn``).

    A process group of its own: signals meant for the supervisor (a Ctrl-C at the terminal, a
    hang-up) reach only the supervisor, which stops the children in order. On Linux, SIGKILL when
    the supervisor dies, however it dies. The kernel sends it when the *thread* that started the
    child ends, so this is done only for a child started from the main thread, which lives as
    long as the process. One started from another thread (a test's ``asyncio.to_thread``) gets
    nothing: it stays in its parent's process group, where a Ctrl-C still reaches it, and
    :meth:`Stack.stop` stops it.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held by the parent: spawning()
        os.setpgid(0, 0)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # the supervisor died before the request took effect
                os._exit(1)

    return setup


@contextmanager
def spawning() -> Iterator[None]:
    """Around starting a child from the main thread and recording it: stop signals wait until
    then. Right after fork Python runs its at-fork hooks, where an exception a signal handler
    raises is swallowed; and a child started but not yet recorded would not be stopped. Held,
    the signal arrives a moment later, where its exception stops everything recorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a part that exited: after ``first_delay_s``, doubling with
    each exit in the last ``window_s`` up to ``max_delay_s``; past ``max_restarts`` exits in the
    window it gives up, since restarting a part that cannot stay up only hides why."""

    max_restarts: int = 5
    window_s: float = 60.0
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, exits: int) -> float:
        return float(min(self.first_delay_s * 2 ** (exits - 1), self.max_delay_s))


@dataclass(frozen=True)
class PartFailed:
    """Why supervision ended: a part that cannot be kept running, and the end of its log."""

    label: str
    reason: str
    log_tail: str


class StartFailed(RuntimeError):
    """A part exited while the stack was starting (everything started is stopped again)."""

    def __init__(self, failed: PartFailed) -> None:
        super().__init__(failed.reason)
        self.failed = failed


class StopRequested(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached ``ratchet up``: everything is stopped, in order.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)


class StopSignals:
    """What :func:`stop_on_signals` does with SIGINT, SIGTERM and SIGHUP.

    The first one raises :class:`StopRequested` in the main thread, wherever it is (start-up, the
    supervision loop), so that even a blocking wait ends at once. Later ones, and any after
    :meth:`ignore` (the stack is being stopped for another reason), are only recorded: they must
    not cut short the orderly stop, which is bounded anyway. An exception raised where Python
    swallows it (say in an at-fork hook while a child is being started) is not lost either: the
    signal is recorded, and :meth:`check`, called between steps, raises it again.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._armed = True

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)
        if self._armed:
            self._armed = False
            raise StopRequested(signum)

    def check(self) -> None:
        if self.received is not None:
            raise StopRequested(self.received)

    def ignore(self) -> None:
        self._armed = False


@contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Within the block, SIGINT, SIGTERM and SIGHUP stop the stack (see :class:`StopSignals`)."""
    signals = StopSignals()
    previous = {sig: signal.signal(sig, signals.handle) for sig in STOP_SIGNALS}
    try:
        yield signals
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Stack:
    """Everything ``ratchet up`` started, stopped together in reverse order."""

    settings: Settings
    cluster: int = 1  # nats-server nodes: 1, or a cluster of several (see start_cluster)
    nats: LocalNats | None = None
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    services: dict[str, Service] = field(default_factory=dict)  # label -> what it runs

    @property
    def logs(self) -> Path:
        return self.settings.home.resolve() / "logs"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """The services in reverse order of start, then the local model server, then
        nats-server; each group gets SIGTERM and ``grace`` seconds, then SIGKILL."""
        services = [p for label, p in reversed(self.processes) if label != LOCAL_MODEL]
        stop_processes(services, grace)
        stop_processes([p for label, p in self.processes if label == LOCAL_MODEL], grace)
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
        with open(home / "logs" / f"{label}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", *service.command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=child_setup(),
            )

    def add(self, label: str, service: Service) -> None:
        """Start a service as one of the stack's parts (restarted by :meth:`supervise`)."""
        self.services[label] = service
        with spawning():
            self.processes.append((label, self.launch(label, service)))

    def start_nats(self) -> LocalNats:
        """nats-server on the configured port, with the data and credentials in home (reused),
        or a cluster of ``cluster`` nodes (see :func:`cluster_ports`). Stop signals wait until it
        listens (at most 10 s, usually 0.1 s; a cluster's streams a few seconds more): see
        :func:`spawning`."""
        home = self.settings.home.resolve()
        roles = {"approvers": self.settings.approvers, "apps": self.settings.apps}
        with spawning():
            if self.cluster > 1:
                self.nats = start_cluster(
                    home,
                    self.cluster,
                    ports=cluster_ports(self.settings, self.cluster),
                    log_dir=self.logs,
                    preexec_fn=child_setup(),
                    **roles,
                )
            else:
                self.nats = start_nats(
                    home,
                    urlparse(self.settings.nats_servers[0]).port or 4222,
                    log_path=self.logs / f"{NATS}.log",
                    preexec_fn=child_setup(),
                    **roles,
                )
        return self.nats

    def nats_parts(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """nats-server's processes as parts of the stack: one, or each node of a cluster."""
        return [(node.name, node.process) for node in self.nats.nodes] if self.nats else []

    def respawn(self, label: str) -> subprocess.Popen[bytes]:
        """A new process for part ``label``, in its place; the old one must have exited. A
        cluster's node restarts alone, on its data, and catches up with the others."""
        assert self.nats is not None
        if label == NATS and self.cluster == 1:
            return self.start_nats().process
        if label in (nodes := {node.name: node for node in self.nats.nodes}):
            with spawning():  # not waited for: if it exits again, supervise() sees it
                return nodes[label].start()
        index = next(i for i, (name, _) in enumerate(self.processes) if name == label)
        with spawning():
            if label == LOCAL_MODEL:
                process = _start_local_model(self.settings, self.logs)
            else:
                process = self.launch(label, self.services.get(label) or get_service(label))
            self.processes[index] = (label, process)
        return process

    def restart(self, name: str, *, kill: bool = False) -> None:
        """Stop one service (SIGKILL with ``kill``: a crash) and start a new process for it."""
        service = self.services.get(name) or get_service(name)
        old = dict(self.processes)[name]
        old.kill() if kill else old.terminate()
        old.wait(timeout=15)
        self.respawn(name)
        asyncio.run(_wait_for_consumers(self, [d for d, _ in ROLES[service.role].consumers]))

    def dead(self) -> list[str]:
        return [name for name, process in self.processes if process.poll() is not None]

    def supervise(
        self,
        report: Callable[[str], None],
        policy: RestartPolicy = RestartPolicy(),
        check_stop: Callable[[], None] = lambda: None,
    ) -> PartFailed:
        """Keep every part running until one cannot be: restart a part that exited, as
        ``policy`` says, until it exits too often. nats-server is restarted like the others, on
        its data directory and with the same credentials: the services reconnect to it (each
        node of a cluster on its own: meanwhile the services use the others). Each
        exit and restart is reported and written to ``logs/supervisor.log``.

        Runs in the main thread and sleeps until a child exits (SIGCHLD), a restart is due or a
        signal arrives (through the wakeup fd). A stop signal ends it by raising out of it, under
        :func:`stop_on_signals`, whose ``check`` is ``check_stop``. The caller stops the stack.
        """
        assert self.nats is not None
        exits: dict[str, deque[float]] = {}
        due: dict[str, float] = {}  # label -> when its restart is due (time.monotonic)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        old_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        old_sigchld = signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)

        def event(line: str) -> None:
            self.note(line)
            report(line)

        try:
            while True:
                check_stop()
                now = time.monotonic()
                for label, process in [*self.nats_parts(), *self.processes]:
                    if label in due or (code := process.poll()) is None:
                        continue
                    recent = exits.setdefault(label, deque())
                    recent.append(now)
                    while recent[0] < now - policy.window_s:
                        recent.popleft()
                    if len(recent) > policy.max_restarts:
                        return self._failed(
                            label,
                            f"{label} {_exit_text(code)}: {len(recent)} exits in "
                            f"{policy.window_s:g}s, more than the {policy.max_restarts} restarts "
                            "allowed; not restarting it",
                        )
                    delay = policy.delay(len(recent))
                    due[label] = now + delay
                    event(
                        f"{label} {_exit_text(code)}; restarting it in {delay:g}s (restart "
                        f"{len(recent)} of at most {policy.max_restarts} in {policy.window_s:g}s)"
                    )
                for label, when in list(due.items()):
                    if when <= now:
                        del due[label]
                        event(f"{label} restarted (pid {self.respawn(label).pid})")
                wait = max(0.0, min(due.values()) - now) if due else None
                select.select([wake_read], [], [], wait)
                while _drain(wake_read):
                    pass
        finally:
            signal.signal(signal.SIGCHLD, old_sigchld)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_read)
            os.close(wake_write)

    def start_failed(self, label: str) -> StartFailed:
        code = dict(self.processes)[label].returncode
        return StartFailed(self._failed(label, f"{label} {_exit_text(code)} during start-up"))

    def _failed(self, label: str, reason: str) -> PartFailed:
        log = self.logs / f"{label}.log"
        failed = PartFailed(label=label, reason=reason, log_tail=_tail(log, LOG_TAIL_LINES))
        self.note(f"{reason}; the end of {log}:\n{failed.log_tail}")
        return failed

    def note(self, line: str) -> None:
        note(self.settings, line)


def note(settings: Settings, line: str) -> None:
    """One line of ``logs/supervisor.log``: what the supervisor did, and when."""
    with open(settings.home.resolve() / "logs" / "supervisor.log", "a", encoding="utf-8") as log:
        log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}\n")


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {-code}"


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file, without colour codes (as read, not yet made safe
    for a terminal: the caller prints it as untrusted text)."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(line.rstrip() for line in _COLOURS.sub("", text).splitlines()[-lines:])


def cluster_ports(settings: Settings, nodes: int) -> list[int]:
    """The client ports of a cluster's nodes: those of ``settings.nats_url`` if it lists one URL
    per node, else the port of its one URL and the ones after it (4222, 4223, 4224)."""
    ports = [urlparse(url).port or 4222 for url in settings.nats_servers]
    if len(ports) == nodes:
        return ports
    if len(ports) == 1:
        return [ports[0] + i for i in range(nodes)]
    raise NatsStartError(
        f"RATCHET_NATS_URL lists {len(ports)} servers for a cluster of {nodes}: list one per "
        "node, or one (the first node's; the others take the ports after it)"
    )


def uses_local_model(settings: Settings) -> bool:
    return any(m.spec == "local" for m in (settings.agent, settings.judge, settings.proposer))


def start_stack(
    settings: Settings,
    *,
    evaluators: int = 1,
    executors: int = 1,
    cluster: int = 1,
    on_ready: Callable[[str, float], None] = lambda name, seconds: None,
    services: tuple[Service, ...] = CORE_SERVICES,
) -> Stack:
    """Start everything and return once each part is ready; on any failure, stop what started.

    ``services``: by default every service that is not optional (not the policy approver).
    ``cluster``: nats-server nodes (a cluster with replicated streams when more than one).
    """
    stack = Stack(settings=settings, cluster=cluster)
    stack.logs.mkdir(parents=True, exist_ok=True)
    try:
        began = time.monotonic()
        stack.start_nats()
        stack.note(", ".join(f"{label} started (pid {p.pid})" for label, p in stack.nats_parts()))
        on_ready(NATS if cluster == 1 else f"{NATS} x{cluster}", time.monotonic() - began)
        if uses_local_model(settings):
            began = time.monotonic()
            with spawning():
                stack.processes.append((LOCAL_MODEL, _start_local_model(settings, stack.logs)))
            _wait_for_local_model(settings.local_model_port, stack)
            on_ready(LOCAL_MODEL, time.monotonic() - began)
        for service in services:
            name = service.name
            copies = {"evaluator": evaluators, "executor": executors}.get(name, 1)
            began = time.monotonic()
            for copy in range(copies):
                stack.add(f"{name}-{copy + 1}" if copies > 1 else name, service)
            durables = [d for d, _ in ROLES[service.role].consumers]
            asyncio.run(_wait_for_consumers(stack, durables))
            on_ready(name if copies == 1 else f"{name} x{copies}", time.monotonic() - began)
        stack.note(", ".join(f"{label} (pid {p.pid})" for label, p in stack.processes) + " up")
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
    with open(logs / f"{LOCAL_MODEL}.log", "ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child_setup()
        )


def _wait_for_local_model(port: int, stack: Stack, timeout: float = 120.0) -> None:
    wait_for_port(port, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.dead():
            raise stack.start_failed(LOCAL_MODEL)
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
                raise stack.start_failed(dead[0])
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

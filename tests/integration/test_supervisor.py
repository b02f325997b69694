"""`ratchet up` as the supervisor of its stack, tried as a user and a service manager do: it is sent
SIGTERM, SIGHUP or SIGKILL, a service is killed under it, a service crashes at every start. Each
time, every process it started is checked by pid, and the NATS port must be free afterwards."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet.natsproc import free_port, port_in_use
from ratchet_proposer.app import MARKS_FILE

STACK = ["nats-server", "executor", "evaluator", "failure-store", "proposer", "gatekeeper"]
linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="children die with their parent only on Linux (PDEATHSIG)"
)


class Up:
    """`ratchet up` in a fresh home on a free port, with scripted models; its output is read as
    it comes, so a test waits for a line with a timeout."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.home = tmp_path / "home"
        self.port = free_port()
        self.env = {
            **os.environ,
            "RATCHET_HOME": str(self.home),
            "RATCHET_NATS_URL": f"nats://127.0.0.1:{self.port}",
            "RATCHET_AGENT__SPEC": "scripted:prompt-sensitive",
            "RATCHET_JUDGE__SPEC": "scripted:judge-yes",
            "RATCHET_PROPOSER__SPEC": "scripted:proposer-fix",
            "COLUMNS": "200",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ratchet.cli", "up", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The next line of output matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line matching {pattern!r} in:\n{''.join(self.output)}")
            self.output.append(line)
            if found := re.search(pattern, line):
                return found

    def ready(self) -> dict[int, str]:
        """Once it says all is up: the processes it started, by pid."""
        self.expect(r"^All up")
        children = descendants(self.process.pid)
        assert sorted(children.values()) == sorted(STACK), children
        return children

    def pid_of(self, name: str) -> int:
        [pid] = [pid for pid, what in descendants(self.process.pid).items() if what == name]
        return pid

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI as a user runs it against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "ratchet.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def finish(self, timeout: float = 30) -> int:
        code = self.process.wait(timeout=timeout)
        self.expect(r"^stopped")
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[list[Up]]:
    """Start `ratchet up` with ``start.append(Up(tmp_path, *args))``; killed if a test fails."""
    started: list[Up] = []
    yield started
    for up in started:
        up.stop()


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``, by pid: what it is (the stack's part it runs)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if state != "Z":
                parents[int(entry)] = int(ppid)
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        above = frontier.pop()
        for pid, parent_pid in parents.items():
            if parent_pid == above:
                found[pid] = part_name(pid)
                frontier.append(pid)
    return found


def part_name(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return "?"
    if Path(command[0]).name == "nats-server":
        return "nats-server"
    factory = next((arg for arg in command if ":build_app" in arg), "?")
    return factory.split(".")[0].removeprefix("ratchet_").replace("_", "-")


def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    """Waits until every process in ``pids`` has exited (a pidfd becomes readable when its
    process exits: no polling); returns those still running after ``timeout``."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone already
            fds[os.pidfd_open(pid)] = pid
    try:
        deadline = time.monotonic() + timeout
        waiting = set(fds)
        while waiting and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(list(waiting), [], [], left)
            waiting -= set(readable)
        return {fds[fd] for fd in waiting}
    finally:
        for fd in fds:
            os.close(fd)


def assert_all_gone(up: Up, pids: set[int]) -> None:
    assert not wait_gone(pids), f"left running: {wait_gone(pids, 0)}"
    assert not port_in_use(up.port)


@linux_only
def test_killed_parts_are_restarted_and_sigterm_stops_everything(
    tmp_path: Path, start: list[Up]
) -> None:
    """A service, then nats-server (on its data, with the same credentials: the services
    reconnect), each killed: restarted, and the stack still runs a task."""
    start.append(up := Up(tmp_path))
    pids = set(up.ready())
    for part in ("executor", "nats-server"):
        killed = up.pid_of(part)
        os.kill(killed, signal.SIGKILL)
        up.expect(rf"^{part} was killed by SIGKILL; restarting it in 1s \(restart 1 of at most 5")
        restarted = int(up.expect(rf"^{part} restarted \(pid (\d+)\)").group(1))
        assert restarted != killed and up.pid_of(part) == restarted
        pids.add(restarted)
        ran = up.cli("run", "answer-only", "What is 7 + 5?", "--expect", "12")
        assert ran.returncode == 0 and "score:" in ran.stdout, ran.stdout + ran.stderr

    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0
    assert any(line.startswith("SIGTERM received") for line in up.output), up.output
    assert_all_gone(up, pids)
    log = (up.home / "logs" / "supervisor.log").read_text()
    assert log.count(" restarted (pid ") == 2 and log.endswith(" stopped\n"), log


@linux_only
def test_sighup_stops_everything(tmp_path: Path, start: list[Up]) -> None:
    start.append(up := Up(tmp_path))
    children = up.ready()
    up.process.send_signal(signal.SIGHUP)
    assert up.finish() == 0
    assert any(line.startswith("SIGHUP received") for line in up.output), up.output
    assert_all_gone(up, set(children))


@linux_only
def test_sigterm_during_start_up_stops_what_had_started(tmp_path: Path, start: list[Up]) -> None:
    start.append(up := Up(tmp_path))
    up.expect(r"ready executor")
    started = descendants(up.process.pid)
    assert "nats-server" in started.values() and "executor" in started.values(), started
    up.process.send_signal(signal.SIGTERM)
    assert up.finish() == 0
    assert not any(line.startswith("All up") for line in up.output), up.output
    assert_all_gone(up, set(started))


@linux_only
def test_no_child_outlives_a_killed_supervisor(tmp_path: Path, start: list[Up]) -> None:
    start.append(up := Up(tmp_path))
    children = up.ready()
    up.process.kill()
    up.process.wait(timeout=10)
    assert_all_gone(up, set(children))


@linux_only
def test_a_service_that_keeps_crashing_is_given_up_with_its_log(
    tmp_path: Path, start: list[Up]
) -> None:
    """A proposer whose database file is broken crashes at every start: restarted twice (the
    limit given), then reported with the end of its log, and the whole stack stopped."""
    start.append(up := Up(tmp_path, "--max-restarts", "2"))
    children = up.ready()
    (up.home / MARKS_FILE).write_bytes(b"not a database\n" * 100)
    os.kill(up.pid_of("proposer"), signal.SIGKILL)

    restarted = {int(up.expect(r"^proposer restarted \(pid (\d+)\)").group(1)) for _ in "12"}
    up.expect(
        r"^proposer exited with code 1: 3 exits in 60s, more than the 2 restarts allowed; "
        "not restarting it"
    )
    up.expect(r"DatabaseError: file is not a database")
    assert up.finish() == 1
    said = "".join(up.output)
    assert said.count("proposer restarted") == 2 and "restarting it in 2s" in said, said
    assert_all_gone(up, set(children) | restarted)
    log = (up.home / "logs" / "supervisor.log").read_text()
    assert "more than the 2 restarts allowed" in log and "not a database" in log, log


@linux_only
def test_a_service_that_cannot_start_is_reported_with_its_log(
    tmp_path: Path, start: list[Up]
) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / MARKS_FILE).write_bytes(b"not a database\n" * 100)
    start.append(up := Up(tmp_path))
    up.expect(r"ready failure-store")
    started = descendants(up.process.pid)
    assert {"nats-server", "executor", "evaluator", "failure-store"} <= set(started.values())
    up.expect(r"^proposer exited with code 1 during start-up; the end of its log:")
    up.expect(r"DatabaseError: file is not a database")
    assert up.finish() == 1
    assert not any(line.startswith("All up") for line in up.output), up.output
    assert_all_gone(up, set(started))

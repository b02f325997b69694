"""`ratchet up` as a user runs it: readiness lines, a working stack, a clean stop on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratchet.cli.up import StartFailed, start_stack
from ratchet.natsproc import free_port
from ratchet.services import CORE_SERVICES, SERVICES, get_service
from ratchet.settings import ModelSettings, Settings


def test_up_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RATCHET_HOME": str(tmp_path / "home"),
        "RATCHET_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "RATCHET_AGENT__SPEC": "scripted:prompt-sensitive",
        "RATCHET_JUDGE__SPEC": "scripted:judge-yes",
        "RATCHET_PROPOSER__SPEC": "scripted:proposer-fix",
        "COLUMNS": "200",
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "ratchet.cli", "up", "--evaluators", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any(line.startswith("All up") for line in lines):
            if time.monotonic() > deadline or up.poll() is not None:
                pytest.fail("ratchet up never got ready:\n" + "".join(lines))
            lines.append(up.stdout.readline())
        ready = " ".join("".join(lines).split())
        for part in ("nats-server", *(s.name for s in CORE_SERVICES if s.name != "evaluator")):
            assert f"ready {part}" in ready, ready
        assert "ready evaluator x2" in ready, ready
        optional = [s.name for s in SERVICES if s.optional]
        assert optional == ["approver"] and "ready approver" not in ready, ready

        ran = subprocess.run(
            [
                sys.executable,
                "-m",
                "ratchet.cli",
                "run",
                "answer-only",
                "What is 7 + 5?",
                "--expect",
                "12",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0 and "score: 0.00" in ran.stdout, ran.stdout + ran.stderr

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        rest = up.stdout.read()
        assert "stopped" in rest
    finally:
        if up.poll() is None:
            up.kill()
    # nothing it started is left running: its nats-server no longer answers
    failed = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "failures"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode == 1 and "cannot reach NATS" in failed.stderr


def test_the_optional_approver_starts_from_its_factory_when_asked(tmp_path: Path) -> None:
    """`start_stack` runs any declared service: the policy approver, with its rule from settings,
    logs in as its own user, approver-policy, and binds its durable consumer."""
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        approver_rule="min-lift:0.05",
    )
    ready: list[str] = []
    stack = start_stack(
        settings,
        services=(get_service("approver"),),
        on_ready=lambda name, _seconds: ready.append(name),
    )
    try:
        assert ready == ["nats-server", "approver"] and not stack.dead()
    finally:
        stack.stop()


def test_an_approver_with_an_unknown_rule_stops_the_start(tmp_path: Path) -> None:
    """The rule reaches the service process through its settings: a bad one fails at start."""
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        approver_rule="yolo",
    )
    with pytest.raises(StartFailed, match="approver exited with code 1 during start-up") as e:
        start_stack(settings, services=(get_service("approver"),))
    log = (tmp_path / "home" / "logs" / "approver.log").read_text()
    assert "unknown approval rule 'yolo'" in log and "'yolo'" in e.value.failed.log_tail

"""`ratchet up` as a user runs it: readiness lines, a working stack, a clean stop on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ratchet.natsproc import free_port


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
        ready = "".join(lines)
        for part in (
            "nats-server",
            "executor",
            "evaluator x2",
            "failure-store",
            "proposer",
            "gatekeeper",
        ):
            assert f"ready {part}" in " ".join(ready.split()), ready

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

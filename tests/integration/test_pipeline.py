"""Runs flow executor -> evaluator -> failure store as real processes on a real nats-server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from ratchet.cli.client import submit_and_wait
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import Check, RunRequested
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsproc import free_port
from ratchet.services import SERVICES
from ratchet.settings import ModelSettings, Settings, to_env
from ratchet.store import FailureQuery, FailureRecord

PIPELINE = tuple(s for s in SERVICES if s.name in ("executor", "evaluator", "failure-store"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-no"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
    )
    running = start_stack(settings, services=PIPELINE)
    yield running
    running.stop()


async def test_a_failed_run_is_scored_stored_and_logged(stack: Stack) -> None:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test")
    try:
        request = RunRequested(
            task="answer-only", input="What is 7 + 5?", check=Check(kind="exact", expected="12")
        )
        run, score, logged = await submit_and_wait(nc, request, timeout=30, threshold=0.7)
        # the default prompt makes the scripted agent wrap its answer, which an exact check fails
        assert run.output == "The answer is: 12." and run.rules_sha256 and run.trace
        assert score.score == 0.0 and score.scorer == "check:exact" and score.problems
        assert logged
        reply = await nc.request(
            f"{QUERY_PREFIX}.failures",
            FailureQuery(task="answer-only").model_dump_json().encode(),
            timeout=5,
        )
        failures = TypeAdapter(list[FailureRecord]).validate_json(reply.data)
        assert [f.run_id for f in failures] == [run.run_id]
        assert failures[0].problems == score.problems and failures[0].trace == run.trace
    finally:
        await nc.close()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.nats is not None
    env = {**to_env(stack.settings), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [sys.executable, "-m", "ratchet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_runs_a_task_and_lists_the_failure(stack: Stack) -> None:
    ran = _cli(stack, "run", "answer-only", "What is 7 + 5?", "--expect", "12")
    assert ran.returncode == 0, ran.stderr
    assert "The answer is: 12." in ran.stdout and "0.00" in ran.stdout
    listed = _cli(stack, "failures", "--task", "answer-only", "--json")
    assert listed.returncode == 0, listed.stderr
    [failure] = json.loads(listed.stdout)
    assert failure["output"] == "The answer is: 12." and failure["problems"]


def test_tool_steps_show_in_the_trace(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:tool-user"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
    )
    running = start_stack(settings, services=PIPELINE)
    try:
        env = to_env(settings)
        ran = subprocess.run(
            [
                sys.executable,
                "-m",
                "ratchet.cli",
                "run",
                "calc",
                "What is 6 * 7?",
                "--expect",
                "42",
                "--check",
                "number",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        result = json.loads(ran.stdout)
        kinds = [(s["kind"], s["name"]) for s in result["completed"]["trace"]]
        assert kinds == [("model", "agent"), ("tool", "calculator"), ("model", "agent")]
        assert result["completed"]["output"] == "42" and result["scored"]["score"] == 1.0
    finally:
        running.stop()


@pytest.mark.parametrize("user", [None, "client"])
def test_cli_errors_are_one_line(tmp_path: Path, user: str | None) -> None:
    """Without credentials, or with nothing listening, the user gets one line and exit 1."""
    settings = Settings(home=tmp_path, nats_url=f"nats://127.0.0.1:{free_port()}", nats_user=user)
    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "failures"],
        env=to_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 1
    assert ran.stderr.startswith("ratchet: error:") and ran.stderr.count("\n") == 1
    assert "ratchet up" in ran.stderr

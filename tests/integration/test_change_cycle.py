"""The whole change cycle on a real nats-server, every service a real process.

The agent is the scripted prompt-sensitive model (``ratchet.scripted``): with the demo suite's
initial prompt it wraps answers in words, which exact checks fail; a prompt asking for "only the
final answer" fixes that; a prompt asking to "explain" breaks every case. So each test knows
exactly what the gate should measure and decide.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from ratchet.client import submit_and_wait
from ratchet.contracts import Check, RunRequested
from ratchet.messaging import connect
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.settings import GateSettings, ModelSettings, Settings, to_env
from ratchet.suites import load_suite
from ratchet.up import Stack, start_stack

REPO = Path(__file__).resolve().parents[2]
DEMO = load_suite(REPO / "config" / "suites" / "demo.json")
EXACT_LEARN = [c for c in DEMO.learn if c.check.kind == "exact"]
MIN_FAILURES = 5


def make_stack(tmp_path: Path, proposer: str) -> Stack:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec=f"scripted:{proposer}"),
        min_failures_to_propose=MIN_FAILURES,
        gate=GateSettings(run_timeout_s=60),
    )
    return start_stack(settings)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    running = make_stack(tmp_path, request.param)
    yield running
    running.stop()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[Client]:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-client")
    yield nc
    await nc.close()


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratchet.cli", *args],
        env=to_env(stack.settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def run_live(nc: Client, case_input: str, check: Check) -> tuple[str, float | None, int]:
    request = RunRequested(task=DEMO.name, input=case_input, check=check)
    run, score, _ = await submit_and_wait(nc, request, timeout=30, threshold=0.7)
    return run.output, score.score, run.prompt_version


async def gather_failures(nc: Client) -> None:
    for case in EXACT_LEARN[:MIN_FAILURES]:
        _, score, _ = await run_live(nc, case.input, case.check)
        assert score == 0.0


async def wait_for_status(stack: Stack, statuses: set[str], timeout: float = 60) -> dict[str, str]:
    """Poll `ratchet changes --json` until one change reaches one of ``statuses``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        listed = cli(stack, "changes", "--json")
        if listed.returncode == 0:
            changes = json.loads(listed.stdout)
            for change in changes:
                if change["status"] in statuses:
                    return dict(change)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no change reached {statuses}: {listed.stdout} {listed.stderr}")
        await asyncio.sleep(0.5)


async def wait_for_trail(stack: Stack, change_id: str, last: str, timeout: float = 60) -> list[str]:
    """The change's audit kinds, once its trail has reached ``last``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (kinds := trail_kinds(stack, change_id))[-1] != last:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{change_id} did not reach {last}: {kinds}")
        await asyncio.sleep(0.5)
    return kinds


def trail_kinds(stack: Stack, change_id: str) -> list[str]:
    shown = cli(stack, "show", change_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return [r["kind"] for r in json.loads(shown.stdout)]


@pytest.mark.parametrize("stack", ["proposer-fix"], indirect=True)
async def test_a_fix_is_measured_approved_applied_used_and_kept(
    stack: Stack, client: Client, kept_trail: list[str]
) -> None:
    await gather_failures(client)
    waiting = await wait_for_status(stack, {"awaiting_approval"})
    shown = cli(stack, "show", waiting["change_id"])
    assert "current" in shown.stdout and "candidate" in shown.stdout and "+only" not in shown.stdout

    assert "verdict: shown better" in shown.stdout and "lower bound" in shown.stdout
    measured = json.loads(cli(stack, "show", waiting["change_id"], "--json").stdout)
    measurement = next(r["payload"] for r in measured if r["kind"] == "measured")
    assert measurement["verdict"] == "superior" and measurement["broken"] == []
    assert measurement["candidate_passes"] > measurement["current_passes"]

    approved = cli(stack, "approve", waiting["change_id"], "--reason", "fixes the wrapping")
    assert approved.returncode == 0, approved.stderr
    kept = await wait_for_status(stack, {"kept", "rolled_back"})
    assert kept["status"] == "kept"
    assert await wait_for_trail(stack, waiting["change_id"], "holdout") == kept_trail

    # the executor picked up the new version without a restart
    case = EXACT_LEARN[0]
    output, score, version = await run_live(client, case.input, case.check)
    assert score == 1.0 and output == case.check.expected and version > 1

    history = cli(stack, "prompts", DEMO.name)
    assert waiting["change_id"] in history.stdout and "initial" in history.stdout

    verified = cli(stack, "audit", "--verify")
    assert verified.returncode == 0, verified.stdout
    db = stack.settings.home / "ratchet.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE audit SET payload = replace(payload, 'fixes', 'FIXES') WHERE kind = 'approved'"
        )
        seq = conn.execute("SELECT seq FROM audit WHERE kind = 'approved'").fetchone()[0]
    tampered = cli(stack, "audit", "--verify")
    assert tampered.returncode == 2 and f"seq {seq}" in tampered.stdout


@pytest.mark.parametrize("stack", ["proposer-harm"], indirect=True)
async def test_policy_approver_rejects_a_harmful_change(stack: Stack, client: Client) -> None:
    log = open(stack.settings.home / "logs" / "policy-approver.log", "wb")  # noqa: SIM115
    approver = subprocess.Popen(
        [sys.executable, "-m", "ratchet.cli", "approver", "--rule", "superior"],
        env=to_env(stack.settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        await gather_failures(client)
        rejected = await wait_for_status(stack, {"rejected", "approved"})
    finally:
        approver.terminate()
        approver.wait(timeout=10)
        log.close()
    assert rejected["status"] == "rejected"
    shown = json.loads(cli(stack, "show", rejected["change_id"], "--json").stdout)
    decision = next(r for r in shown if r["kind"] == "rejected")
    assert decision["actor"] == "policy:superior"
    assert "not shown better" in decision["payload"]["reason"]
    assert stack.nats is not None
    current = await read_current(client.jetstream(), DEMO.name)
    assert current is not None and current.record.kind == "initial"


@pytest.mark.parametrize("stack", ["proposer-harm"], indirect=True)
async def test_a_harmful_change_that_slips_through_is_rolled_back(
    stack: Stack, client: Client
) -> None:
    await gather_failures(client)
    waiting = await wait_for_status(stack, {"awaiting_approval"})
    cli(stack, "approve", waiting["change_id"], "--reason", "trust me")
    outcome = await wait_for_status(stack, {"kept", "rolled_back"})
    assert outcome["status"] == "rolled_back"
    current = await read_current(client.jetstream(), DEMO.name)
    assert current is not None and current.record.kind == "rollback"
    assert current.record.text == DEMO.prompt


@pytest.mark.parametrize("stack", ["proposer-fix"], indirect=True)
async def test_a_waiting_change_survives_a_gatekeeper_crash(stack: Stack, client: Client) -> None:
    await gather_failures(client)
    waiting = await wait_for_status(stack, {"awaiting_approval"})
    await asyncio.to_thread(stack.restart, "gatekeeper", kill=True)
    # wait until the new process answers; the approval below then resumes the checkpoint
    assert (await wait_for_status(stack, {"awaiting_approval"}))["change_id"] == waiting[
        "change_id"
    ]
    approved = cli(stack, "approve", waiting["change_id"], "--reason", "after the crash")
    assert approved.returncode == 0, approved.stderr
    outcome = await wait_for_status(stack, {"kept", "rolled_back"})
    assert outcome["change_id"] == waiting["change_id"] and outcome["status"] == "kept"


@pytest.mark.parametrize("stack", ["proposer-rules"], indirect=True)
async def test_a_proposal_against_the_rules_is_refused_before_measuring(
    stack: Stack, client: Client
) -> None:
    await gather_failures(client)
    invalid = await wait_for_status(stack, {"invalid", "measured", "awaiting_approval"})
    assert invalid["status"] == "invalid"
    kinds = trail_kinds(stack, invalid["change_id"])
    assert "measured" not in kinds
    shown = cli(stack, "show", invalid["change_id"])
    assert "contradicts the pinned rules" in shown.stdout


@pytest.mark.parametrize("stack", ["proposer-fix"], indirect=True)
async def test_a_persons_own_change_for_another_reason_is_tested_for_non_inferiority(
    stack: Stack, client: Client
) -> None:
    """A shorter prompt that answers the same way: no better, no worse, kept by a person."""
    proposed = cli(
        stack, "propose", DEMO.name, "--prompt", "Help.", "--because", "shorter", "--margin", "0.05"
    )
    assert proposed.returncode == 0, proposed.stderr
    assert "non-inferiority, margin 5%" in proposed.stdout
    waiting = await wait_for_status(stack, {"awaiting_approval", "invalid"})
    assert waiting["status"] == "awaiting_approval"
    shown = cli(stack, "show", waiting["change_id"])
    assert "verdict: shown no worse than the margin (non-inferiority, margin 5%" in shown.stdout
    assert "by: cli:" in shown.stdout

    approved = cli(stack, "approve", waiting["change_id"], "--reason", "shorter, same answers")
    assert approved.returncode == 0, approved.stderr
    kept = await wait_for_status(stack, {"kept", "rolled_back"})
    assert kept["status"] == "kept"
    current = await read_current(client.jetstream(), DEMO.name)
    assert current is not None and current.record.text == "Help."

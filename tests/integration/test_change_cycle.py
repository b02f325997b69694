"""The whole change cycle on a real nats-server, every service a real process.

The agent is the scripted prompt-sensitive model (``ratchet.scripted``): with the demo suite's
initial prompt it wraps answers in words, which exact checks fail; a prompt asking for "only the
final answer" fixes that; a prompt asking to "explain" breaks every case. So each test knows
exactly what the gate should measure and decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import cli, policy_approver, trail_reaching
from nats.aio.client import Client

from ratchet.cli.client import submit_and_wait
from ratchet.cli.up import Stack, _wait_for_consumers, start_stack
from ratchet.contracts import Check, RunRequested
from ratchet.messaging import connect
from ratchet.natsconf import ROLES
from ratchet.natsproc import free_port, start_nats
from ratchet.prompts import read_current
from ratchet.services import CORE_SERVICES
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
DEMO = load_suite(REPO / "config" / "suites" / "demo.json")
EXACT_LEARN = [c for c in DEMO.learn if c.check.kind == "exact"]
MIN_FAILURES = 5


def stack_settings(tmp_path: Path, proposer: str) -> Settings:
    return Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec=f"scripted:{proposer}"),
        min_failures_to_propose=MIN_FAILURES,
        gate=GateSettings(run_timeout_s=60),
    )


def make_stack(tmp_path: Path, proposer: str) -> Stack:
    return start_stack(stack_settings(tmp_path, proposer))


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
    # proposed by the proposer service (its own subject), written by the model it names
    assert waiting["proposer"] == "proposer"
    assert "by: proposer (model scripted:proposer-fix)" in shown.stdout

    assert "verdict: shown better" in shown.stdout and "lower bound" in shown.stdout
    measured = json.loads(cli(stack, "show", waiting["change_id"], "--json").stdout)
    measurement = next(r["payload"] for r in measured if r["kind"] == "measured")
    assert measurement["verdict"] == "superior" and measurement["broken"] == []
    assert measurement["candidate_passes"] > measurement["current_passes"]

    approved = cli(stack, "approve", waiting["change_id"], "--reason", "fixes the wrapping")
    assert approved.returncode == 0, approved.stderr
    kept = await wait_for_status(stack, {"kept", "rolled_back"})
    assert kept["status"] == "kept"
    assert await trail_reaching(stack, waiting["change_id"], "holdout") == kept_trail

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
    with policy_approver(stack.settings):
        await gather_failures(client)
        rejected = await wait_for_status(stack, {"rejected", "approved"})
    assert rejected["status"] == "rejected"
    shown = json.loads(cli(stack, "show", rejected["change_id"], "--json").stdout)
    decision = next(r for r in shown if r["kind"] == "rejected")
    assert decision["actor"] == "policy"  # the approver the server authenticated
    assert decision["payload"]["reason"].startswith("rule superior: ")
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
    assert "by: client\n" in shown.stdout  # the CLI's NATS user, as the subject proved it
    assert waiting["proposer"] == "client"

    approved = cli(stack, "approve", waiting["change_id"], "--reason", "shorter, same answers")
    assert approved.returncode == 0, approved.stderr
    kept = await wait_for_status(stack, {"kept", "rolled_back"})
    assert kept["status"] == "kept"
    current = await read_current(client.jetstream(), DEMO.name)
    assert current is not None and current.record.text == "Help."


# --- one host per service ------------------------------------------------------------------------


def host_home(stack: Stack, service: str) -> Path:
    return stack.settings.home.resolve() / "hosts" / service


def start_on_hosts(settings: Settings) -> Stack:
    """What `ratchet up` starts, but each service in a home of its own, as on a host of its own:
    its own SQLite files, nothing shared with the others but NATS. The CLI keeps the base home,
    where the NATS credentials are."""
    stack = Stack(settings=settings)
    logs = settings.home.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        port = urlparse(settings.nats_url).port
        assert port is not None
        stack.nats = start_nats(
            settings.home.resolve(),
            port,
            log_path=logs / "nats-server.log",
            approvers=settings.approvers,
        )
        for service in CORE_SERVICES:
            home = host_home(stack, service.name)
            (home / "logs").mkdir(parents=True)
            host = Stack(settings=settings.model_copy(update={"home": home}), nats=stack.nats)
            stack.processes.append((service.name, host.launch(service.name, service)))
            durables = [durable for durable, _ in ROLES[service.role].consumers]
            asyncio.run(_wait_for_consumers(stack, durables))
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Stack]:
    running = start_on_hosts(stack_settings(tmp_path, "proposer-fix"))
    yield running
    running.stop()


def databases(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.db")}


def rows(database: Path) -> dict[str, int]:
    """Rows per table of a service's SQLite file (read-only, the service still running)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}


async def test_services_on_separate_hosts_own_their_tables(
    hosts: Stack, kept_trail: list[str]
) -> None:
    """Every service on a host of its own, with its own SQLite files: the whole cycle still
    works, and afterwards each file holds rows only in the tables its service owns.

    This is the ownership test at run time (tests/unit/test_ownership.py reads the code): a
    service that wrote a table it does not own would leave rows in its own file, and one that
    read such a table would find it empty in its own file and the cycle would stop."""
    assert hosts.nats is not None
    nc = await connect(hosts.nats.settings_for("client"), name="test-client")
    try:
        await gather_failures(nc)
    finally:
        await nc.close()
    waiting = await wait_for_status(hosts, {"awaiting_approval"})
    approved = cli(hosts, "approve", waiting["change_id"], "--reason", "fixes the wrapping")
    assert approved.returncode == 0, approved.stderr
    assert (await wait_for_status(hosts, {"kept", "rolled_back"}))["status"] == "kept"
    assert await trail_reaching(hosts, waiting["change_id"], "holdout") == kept_trail
    verified = cli(hosts, "audit", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(kept_trail)} records" in verified.stdout

    failure_store, gatekeeper = host_home(hosts, "failure-store"), host_home(hosts, "gatekeeper")
    proposer = host_home(hosts, "proposer")
    assert databases(failure_store) == {"ratchet.db"}
    stored = rows(failure_store / "ratchet.db")
    assert stored["failures"] == MIN_FAILURES and stored["runs"] > MIN_FAILURES
    assert stored["audit"] == 0
    assert databases(gatekeeper) == {
        "ratchet.db",
        "gatekeeper-runs.db",
        "gatekeeper-checkpoints.db",
    }
    trail = rows(gatekeeper / "ratchet.db")
    assert (trail["audit"], trail["runs"], trail["failures"]) == (len(kept_trail), 0, 0)
    assert rows(gatekeeper / "gatekeeper-runs.db")["gate_runs"] > 0
    assert databases(proposer) == {"proposer.db"}
    assert rows(proposer / "proposer.db") == {"last_proposals": 1}
    for service in ("executor", "evaluator"):
        assert databases(host_home(hosts, service)) == set(), service
    assert databases(hosts.settings.home) == set()  # the CLI's home: it opened no database

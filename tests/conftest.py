"""Shared fixtures: a real nats-server on a free port, with Ratchet's users and streams."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from pg import LocalPostgres, postgres_bin, running_postgres

from ratchet.cli.client import ClientError, fetch_trail
from ratchet.cli.up import Stack
from ratchet.contracts import ChangeProposed, ChangeRecorded, Measurement
from ratchet.messaging import connect, publish_js
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import read_current
from ratchet.settings import Settings, to_env
from ratchet.world import BASE_PROMPT, format_prompt

REPO = Path(__file__).resolve().parents[1]
# The system packages scripts/install.sh installs when run as root (PostgreSQL, Chromium). A
# machine without them skips the tests that need them, saying why; CI sets this, so there such a
# skip is a failure and those tests cannot silently stop running.
REQUIRE_SYSTEM_PARTS = os.environ.get("RATCHET_REQUIRE_SYSTEM_PARTS") == "1"
SYSTEM_PARTS = ("PostgreSQL is not installed", "no chromium")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_SYSTEM_PARTS and report.skipped:
        reason = str(report.longrepr)
        if any(part in reason for part in SYSTEM_PARTS):
            report.outcome = "failed"
            report.longrepr = f"RATCHET_REQUIRE_SYSTEM_PARTS=1, but skipped: {reason}"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = start_nats(tmp_path / "home", free_port(), log_path=tmp_path / "nats.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A real PostgreSQL of the tests' own (tests/pg.py), one per session; skipped only when
    PostgreSQL is not installed (scripts/install.sh installs it)."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (scripts/install.sh installs it)")
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres(postgres_server: LocalPostgres) -> str:
    """The URL of a fresh, empty database on the tests' PostgreSQL."""
    return postgres_server.new_database()


@pytest.fixture
def kept_trail() -> list[str]:
    """The audit trail of a change that went through every step and was kept (the gatekeeper's
    ``received`` record, which holds the whole proposal, is its first)."""
    return [
        "received", "measured", "awaiting_approval", "approved", "applied", "verified", "kept",
        "holdout",
    ]  # fmt: skip


def measurement(**changes: object) -> Measurement:
    """Gate evidence for tests: a superiority test that found the candidate better on 50 cases."""
    fields: dict[str, object] = {
        "test": "superiority",
        "margin": 0.0,
        "alpha": 0.05,
        "looks": [25, 50, 75, 100],
        "repeats": 1,
        "verdict": "superior",
        "stopped_at": 2,
        "history": [],
        "cases": 50,
        "current_passes": 20,
        "candidate_passes": 35,
        "lift": 0.3,
        "ci95": (0.15, 0.45),
        "lower_bound": 0.08,
        "runs": 100,
        "fixed": ["case-1"],
        "broken": [],
        "flaky": [],
        "unscored": 0,
        "pool_sha256": "ab" * 32,
        "pool_size": 120,
        "proposals_on_pool": 1,
        "pool_budget": 50,
    }
    return Measurement.model_validate({**fields, **changes})


@contextmanager
def policy_approver(settings: Settings, rule: str = "superior") -> Iterator[None]:
    """The policy approver as its own process, started the way a user does (`ratchet approver`),
    logging to ``home/logs/policy-approver.log``."""
    with open(settings.home / "logs" / "policy-approver.log", "wb") as log:
        approver = subprocess.Popen(
            [sys.executable, "-m", "ratchet.cli", "approver", "--rule", rule],
            env=to_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            approver.terminate()
            approver.wait(timeout=10)


async def trail_reaching(stack: Stack, change_id: str, kind: str, timeout: float = 60) -> list[str]:
    """A change's audit kinds once its trail holds ``kind``: waits on ``change.recorded``,
    subscribed before the trail is first read, so a step that lands in between is not missed."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-trail")
    arrived = asyncio.Event()

    async def on_recorded(msg: Msg) -> None:
        step = ChangeRecorded.model_validate_json(msg.data)
        if (step.change_id, step.kind) == (change_id, kind):
            arrived.set()

    async def kinds() -> list[str]:
        try:
            return [r.kind for r in await fetch_trail(nc, change_id)]
        except ClientError:  # the gatekeeper has not recorded the change yet
            return []

    try:
        await nc.subscribe(ChangeRecorded.subject, cb=on_recorded)
        await nc.flush()
        if kind not in (found := await kinds()):
            try:
                await asyncio.wait_for(arrived.wait(), timeout)
            except TimeoutError:
                raise AssertionError(f"{change_id} did not reach {kind}: {found}") from None
            found = await kinds()
        return found
    finally:
        await nc.close()


def cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it against ``stack``, with ``env`` exported on top of its settings
    (wide columns, so no line of evidence is wrapped)."""
    return subprocess.run(
        [sys.executable, "-m", "ratchet.cli", *args],
        env={**os.environ, **to_env(stack.settings), "COLUMNS": "300", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def propose_world(nc: Client, task: str, success: float, prompt_id: int) -> ChangeProposed:
    """Propose, as the CLI's client user, the FAKE world prompt ``prompt_id`` whose true success
    is ``success`` (``ratchet.world``), against the task's current version."""
    current = await read_current(nc.jetstream(), task)
    assert current is not None
    change = ChangeProposed(
        task=task,
        base_version=current.version,
        proposed_prompt=format_prompt(BASE_PROMPT, prompt_id, success),
        rationale=f"A FAKE world prompt whose true success is {success:.0%}.",
        model="test:world",
    )
    await publish_js(nc.jetstream(), change, subject=change.subject_of("client"), timeout=5)
    return change

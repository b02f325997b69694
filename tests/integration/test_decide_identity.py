"""`ratchet approve` / `ratchet reject` as docs/deploy.md describes them: the NATS user comes from
`RATCHET_NATS_USER` (the CLI's `client` login, or `approver` to decide), and every way that can go
wrong is one line that names the user."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli

from ratchet.cli.up import Stack, start_stack
from ratchet.natsproc import free_port
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
TASK = load_suite(REPO / "config" / "suites" / "demo.json").name


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path_factory.mktemp("decide") / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        gate=GateSettings(run_timeout_s=60),
    )
    running = start_stack(settings)
    yield running
    running.stop()


def login(stack: Stack, user: str, password_of: str | None = None) -> dict[str, str]:
    """``RATCHET_NATS_USER=user`` and, if given, the password of ``password_of``."""
    assert stack.nats is not None
    env = {"RATCHET_NATS_USER": user}
    if password_of is not None:
        env["RATCHET_NATS_PASSWORD"] = stack.nats.passwords[password_of]
    return env


def status(stack: Stack, change_id: str) -> str:
    listed = cli(stack, "changes", "--json")
    assert listed.returncode == 0, listed.stderr
    listing = {c["change_id"]: str(c["status"]) for c in json.loads(listed.stdout)}
    return listing.get(change_id, "not listed yet")


def waiting_change(stack: Stack, prompt: str, timeout: float = 90) -> str:
    """A person's own change (no worse than 5%), once the gate has measured it and waits."""
    proposed = cli(stack, "propose", TASK, "--prompt", prompt, "--margin", "0.05")
    assert proposed.returncode == 0, proposed.stderr
    found = re.search(r"proposed change (\w+)", proposed.stdout)
    assert found, proposed.stdout
    change_id = found.group(1)
    deadline = time.monotonic() + timeout
    while (now := status(stack, change_id)) != "awaiting_approval":
        assert now in {"not listed yet", "proposed", "received", "measured"}, now
        assert time.monotonic() < deadline, f"{change_id} still {now} after {timeout}s"
        time.sleep(0.5)
    return change_id


def decided_by(stack: Stack, change_id: str, kind: str, timeout: float = 30) -> str:
    """Who the audit trail says decided, once the gatekeeper has recorded the decision."""
    deadline = time.monotonic() + timeout
    while True:
        shown = cli(stack, "show", change_id, "--json")
        assert shown.returncode == 0, shown.stderr
        trail = json.loads(shown.stdout)
        if actors := [r["actor"] for r in trail if r["kind"] == kind]:
            return str(actors[0])
        assert time.monotonic() < deadline, [r["kind"] for r in trail]
        time.sleep(0.3)


def one_line_error(ran: subprocess.CompletedProcess[str]) -> str:
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stderr.startswith("ratchet: error:") and ran.stderr.count("\n") == 1, ran.stderr
    return ran.stderr


def test_the_cli_login_may_not_decide_and_says_so(stack: Stack) -> None:
    change_id = waiting_change(stack, "Help.")
    # deploy.md's CLI login: the client user, which the server does not let decide
    client = login(stack, "client", password_of="client")
    refused = cli(stack, "approve", change_id, "--reason", "looks fine", **client)
    error = one_line_error(refused)
    assert "NATS user 'client' may not decide" in error and "RATCHET_NATS_USER=approver" in error
    # "with RATCHET_NATS_USER=approver" on top of that login: the password is still the client's
    wrong = cli(stack, "reject", change_id, "--reason", "no", **login(stack, "approver", "client"))
    error = one_line_error(wrong)
    assert "refused user 'approver'" in error and "password" in error
    assert status(stack, change_id) == "awaiting_approval"  # nothing was decided
    # the approver's own credentials, as deploy.md describes
    rejected = cli(
        stack, "reject", change_id, "--reason", "not now", **login(stack, "approver", "approver")
    )
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stderr == ""  # the approver decided, as asked: nothing to point out
    assert decided_by(stack, change_id, "rejected").startswith("cli:")


def test_another_user_allowed_to_decide_is_named(stack: Stack) -> None:
    change_id = waiting_change(stack, "Reply.")
    rejected = cli(
        stack, "reject", change_id, "--reason", "not now", **login(stack, "admin", "admin")
    )
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stderr == "ratchet: decided as NATS user 'admin' (RATCHET_NATS_USER)\n"
    assert decided_by(stack, change_id, "rejected").startswith("cli:")


def test_the_approver_user_decides_with_the_password_ratchet_up_keeps(stack: Stack) -> None:
    """On the machine that runs `ratchet up`, `RATCHET_NATS_USER=approver` is all it takes."""
    change_id = waiting_change(stack, "Answer.")
    approved = cli(
        stack, "approve", change_id, "--reason", "same answers", **login(stack, "approver")
    )
    assert approved.returncode == 0, approved.stderr
    assert f"approved {change_id}" in approved.stdout
    assert decided_by(stack, change_id, "approved").startswith("cli:")

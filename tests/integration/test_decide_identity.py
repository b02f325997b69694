"""Who decided is proven (issue 9, item 7): each approver is a NATS user of its own, allowed to
publish only ``change.approved.<name>`` / ``change.rejected.<name>``; the gatekeeper records the
name from the subject, never one from the message. `ratchet approve` / `ratchet reject` decide as
``--as NAME`` (or the approver ``RATCHET_NATS_USER`` names), and every way that can go wrong is
one line that names the user."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, trail_reaching
from nats.aio.msg import Msg

from ratchet.cli.client import ClientError, evidence_of
from ratchet.cli.up import Stack, start_stack
from ratchet.console.backend import Backend
from ratchet.contracts import ChangeApproved, ChangeRejected, DeadLetter
from ratchet.messaging import connect
from ratchet.natsconf import CONSOLE, approver_user
from ratchet.natsproc import free_port
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
TASK = load_suite(REPO / "config" / "suites" / "demo.json").name
ALICE, BOB = approver_user("alice"), approver_user("bob")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path_factory.mktemp("decide") / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        gate=GateSettings(run_timeout_s=60),
        approvers=["alice", "bob"],
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


def waiting_change(stack: Stack, prompt: str) -> str:
    """A person's own change (no worse than 5%), once the gate has measured it and waits."""
    proposed = cli(stack, "propose", TASK, "--prompt", prompt, "--margin", "0.05")
    assert proposed.returncode == 0, proposed.stderr
    found = re.search(r"proposed change (\w+)", proposed.stdout)
    assert found, proposed.stdout
    change_id = found.group(1)
    asyncio.run(trail_reaching(stack, change_id, "awaiting_approval", timeout=90))
    return change_id


def trail(stack: Stack, change_id: str) -> list[dict[str, Any]]:
    shown = cli(stack, "show", change_id, "--json")
    assert shown.returncode == 0, shown.stderr
    records: list[dict[str, Any]] = json.loads(shown.stdout)
    return records


def decided_by(stack: Stack, change_id: str, kind: str) -> str:
    """Who the audit trail says decided, once the gatekeeper has recorded the decision."""
    asyncio.run(trail_reaching(stack, change_id, kind, timeout=30))
    [actor] = [r["actor"] for r in trail(stack, change_id) if r["kind"] == kind]
    return str(actor)


def one_line_error(ran: subprocess.CompletedProcess[str]) -> str:
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stderr.startswith("ratchet: error:") and ran.stderr.count("\n") == 1, ran.stderr
    return ran.stderr


async def test_a_reviewer_may_not_approve_the_rollback_they_proposed(stack: Stack) -> None:
    """The console proposes and decides as ``console.<reviewer>``: alice's approval of her own
    rollback is refused (and the console says so), bob's is taken. First in the module, and
    waited out until kept, so no later test's proposal races its prompt write."""
    assert stack.nats is not None
    console = Backend(stack.nats.settings_for(approver_user(CONSOLE), stack.settings))
    await console.start()
    try:
        [first, *_] = await console.history(TASK)
        change_id = (await console.rollback(TASK, first.version, "alice")).change_id
        await trail_reaching(stack, change_id, "awaiting_approval", timeout=90)
        evidence = evidence_of(await console.trail(change_id))
        with pytest.raises(ClientError, match="the gatekeeper refused the decision"):
            await console.decide(
                change_id, approve=True, reason="mine", evidence=evidence, reviewer="alice"
            )
        await console.decide(
            change_id, approve=True, reason="no worse", evidence=evidence, reviewer="bob"
        )
        await trail_reaching(stack, change_id, "kept", timeout=90)
        records = await console.trail(change_id)
    finally:
        await console.stop()
    who = [(r.kind, r.actor) for r in records if r.kind in ("received", "approved", "rejected")]
    assert who == [("received", "console.alice"), ("approved", "console.bob")], who
    [refused] = [r for r in records if r.kind == "decision_refused"]
    assert refused.payload["why"] == (
        "console.alice proposed this change and may not approve it: another reviewer must"
    )


def test_only_an_approvers_own_login_decides_under_its_name(stack: Stack) -> None:
    change_id = waiting_change(stack, "Help.")
    # the CLI's login (the client user), which the server does not let decide
    client = login(stack, "client", password_of="client")
    refused = cli(stack, "approve", change_id, "--reason", "fine", "--as", "alice", **client)
    error = one_line_error(refused)
    assert "NATS user 'client' may not decide as 'alice'" in error
    assert f"RATCHET_NATS_USER={ALICE}" in error
    # alice's user with someone else's password
    wrong = cli(stack, "reject", change_id, "--reason", "no", **login(stack, ALICE, "client"))
    assert f"refused user '{ALICE}'" in one_line_error(wrong) and "password" in wrong.stderr
    # alice's own login, deciding under bob's name: the server refuses it
    as_bob = cli(
        stack,
        "approve",
        change_id,
        "--reason",
        "bob said so",
        "--as",
        "bob",
        **login(stack, ALICE, ALICE),
    )
    assert f"NATS user '{ALICE}' may not decide as 'bob'" in one_line_error(as_bob)
    # two approvers and nobody named: the CLI asks which
    unnamed = cli(stack, "approve", change_id, "--reason", "who?")
    assert "--as NAME (approvers: alice, bob, policy)" in one_line_error(unnamed)
    unknown = cli(stack, "approve", change_id, "--reason", "?", "--as", "zed")
    assert "no password for 'approver-zed'" in one_line_error(unknown)
    assert status(stack, change_id) == "awaiting_approval"  # nothing was decided

    rejected = cli(stack, "reject", change_id, "--reason", "not now", **login(stack, ALICE, ALICE))
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stderr == ""  # alice decided, as asked: nothing to point out
    assert f"rejected {change_id} as alice" in rejected.stdout
    assert decided_by(stack, change_id, "rejected") == "alice"


async def test_the_name_recorded_is_the_subjects_never_the_bodys(stack: Stack) -> None:
    """A decision whose body still claims a name is malformed: dead-lettered with the reason,
    never recorded. The decision alice sends on her own subject is recorded as hers."""
    change_id = await asyncio.to_thread(waiting_change, stack, "Reply.")
    evidence = next(
        r["payload"]["evidence_sha256"]
        for r in await asyncio.to_thread(trail, stack, change_id)
        if r["kind"] == "awaiting_approval"
    )
    assert stack.nats is not None
    alice = await connect(stack.nats.settings_for(ALICE), name="alice")
    watcher = await connect(stack.nats.settings_for("client"), name="dlq-watcher")
    letters: asyncio.Queue[DeadLetter] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(DeadLetter.model_validate_json(msg.data))

    try:
        # the server lets alice publish on her own subject only
        errors: list[str] = []
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))
            refused.set()

        spoofer = await connect(stack.nats.settings_for(ALICE), name="spoof", on_error=on_error)
        try:
            await spoofer.publish(ChangeApproved.subject_of("bob"), b"{}")
            await asyncio.wait_for(refused.wait(), timeout=5)
        finally:
            await spoofer.close()
        assert 'permissions violation for publish to "change.approved.bob"' in errors[0]

        await watcher.subscribe(f"dlq.{ChangeApproved.subject_of('alice')}", cb=on_letter)
        await watcher.flush()
        claim = ChangeApproved(change_id=change_id, reason="bob agrees", evidence_sha256=evidence)
        body = {**claim.model_dump(mode="json"), "approver": "bob"}
        await alice.jetstream().publish(
            ChangeApproved.subject_of("alice"), json.dumps(body).encode(), timeout=5
        )
        letter = await asyncio.wait_for(letters.get(), timeout=30)
        assert letter.subject == "change.approved.alice"
        assert "malformed message" in letter.reason and "approver" in letter.reason
        assert await asyncio.to_thread(status, stack, change_id) == "awaiting_approval"

        decision = ChangeRejected(change_id=change_id, reason="not now", evidence_sha256=evidence)
        await alice.jetstream().publish(
            decision.subject_of("alice"), decision.model_dump_json().encode(), timeout=5
        )
        await trail_reaching(stack, change_id, "rejected", timeout=30)
    finally:
        await alice.close()
        await watcher.close()
    records = await asyncio.to_thread(trail, stack, change_id)
    [rejected] = [r for r in records if r["kind"] == "rejected"]
    assert rejected["actor"] == "alice" and rejected["payload"]["approver"] == "alice"
    assert "bob" not in json.dumps([r["actor"] for r in records])
    assert letters.empty()  # one dead letter, for the one malformed decision


def test_another_user_allowed_to_decide_is_named(stack: Stack) -> None:
    """The admin may publish anything (it manages the streams): the CLI says it decided as the
    admin, and the trail names the approver it decided for."""
    change_id = waiting_change(stack, "Answer.")
    rejected = cli(
        stack,
        "reject",
        change_id,
        "--reason",
        "not now",
        "--as",
        "bob",
        **login(stack, "admin", "admin"),
    )
    assert rejected.returncode == 0, rejected.stderr
    assert rejected.stderr == "ratchet: decided as NATS user 'admin' (RATCHET_NATS_USER)\n"
    assert decided_by(stack, change_id, "rejected") == "bob"


def test_an_approver_decides_with_the_password_ratchet_up_keeps(stack: Stack) -> None:
    """On the machine that runs `ratchet up`, naming the approver's user is all it takes."""
    change_id = waiting_change(stack, "Respond.")
    approved = cli(stack, "approve", change_id, "--reason", "same answers", **login(stack, BOB))
    assert approved.returncode == 0, approved.stderr
    assert f"approved {change_id} as bob" in approved.stdout
    assert decided_by(stack, change_id, "approved") == "bob"

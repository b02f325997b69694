"""The gate against the FAKE ground-truth world, end to end: a real nats-server, every service a
real process, the world model (``scripted:world``) as the agent and the policy approver deciding.

Every world prompt carries its true success rate as a tag (``ratchet.world``), so each change's
true effect is known: a change to success 0.75 from the base 0.5 is truly better (+25 points), one
to 0.35 truly worse (-15 points). The test publishes both as a client would
(`change.proposed.client`),
the worse one first, and checks what the gate made of them, what `ratchet show` prints, and that
every gate run the gatekeeper issued was run and scored exactly once (a client subscription counts
`run.completed` and `run.scored`; the gatekeeper's own ledger says which runs it issued).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import policy_approver, propose_world, trail_reaching
from nats.aio.msg import Msg

from ratchet.cli.client import fetch_trail
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import GATE_RUN_PREFIX, ChangeProposed, ChangeRecorded, Measurement
from ratchet.evidence import VERDICTS, describe, describe_after
from ratchet.messaging import EVENTS_STREAM, connect
from ratchet.natsproc import free_port
from ratchet.prompts import PromptVersion, read_current
from ratchet.settings import GateSettings, ModelSettings, Settings, to_env
from ratchet.suites import Suite, save_suite
from ratchet.world import BASE_PROMPT, world_suite

TASK = "world"
LEARN, GATE, HOLDOUT = 10, 220, 60
BASE, BETTER, WORSE = 0.5, 0.75, 0.35
WORLD_ENV = {  # the world every service process lives in (the executor's model reads it)
    "RATCHET_WORLD__SEED": "0",
    "RATCHET_WORLD__BASE_SUCCESS": str(BASE),
    "RATCHET_WORLD__DETERMINISTIC_SHARE": "0.5",
    "RATCHET_WORLD__UNEVENNESS": "0.25",
    "RATCHET_WORLD__LATENCY_S": "0",
}
WAIT_S = 90  # deadline of each wait; the whole module normally takes well under a minute
STAGES = ("measure", "verify", "holdout")


@dataclass
class Observer:
    """A client subscription to run and change events: counts, and waits on conditions."""

    completed: Counter[str] = field(default_factory=Counter)
    scored: Counter[str] = field(default_factory=Counter)
    changes: list[tuple[str, str]] = field(default_factory=list)  # (subject, change id)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, msg: Msg) -> None:
        data = json.loads(msg.data)
        if msg.subject == "run.completed":
            self.completed[data["run_id"]] += 1
        elif msg.subject == "run.scored":
            self.scored[data["run_id"]] += 1
        elif msg.subject == ChangeRecorded.subject:
            pass  # the audit trail's feed; the steps themselves are the other change.* events
        elif "change_id" in data:
            subject = msg.subject
            if subject.startswith(("change.approved.", "change.rejected.")):
                subject, _, approver = subject.rpartition(".")  # who decided ends the subject
                assert approver == "policy", msg.subject  # the only approver in this stack
            elif subject.startswith("change.proposed."):
                subject, _, proposer = subject.rpartition(".")  # and who proposed
                assert proposer == "client", msg.subject  # the test proposes as the CLI would
            self.changes.append((subject, data["change_id"]))
        async with self.arrived:
            self.arrived.notify_all()

    async def wait(self, what: str, done: Callable[[], bool], timeout: float = WAIT_S) -> None:
        try:
            async with self.arrived:
                await asyncio.wait_for(self.arrived.wait_for(done), timeout)
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout:.0f} s: saw {self.changes}") from None

    def subjects(self, change_id: str) -> list[str]:
        return [subject for subject, change in self.changes if change == change_id]


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = WAIT_S) -> None:
    """Re-check a condition nobody announces by an event (a consumer existing) until a deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.2)


@dataclass
class Decided:
    """One change as the gate left it, with every gate run seen for it."""

    change: ChangeProposed
    trail: list[dict[str, Any]]
    events: list[str]
    prompt_after: PromptVersion
    completed: dict[str, int]  # run id -> run.completed events seen
    scored: dict[str, int]  # run id -> run.scored events seen
    issued: set[str]  # run ids in the gatekeeper's ledger

    def record(self, kind: str) -> dict[str, Any]:
        return next(dict(r["payload"]) for r in self.trail if r["kind"] == kind)

    @property
    def kinds(self) -> list[str]:
        return [r["kind"] for r in self.trail]

    @property
    def measurement(self) -> Measurement:
        return Measurement.model_validate(self.record("measured"))

    def runs(self, stage: str) -> set[str]:
        return {run_id for run_id in self.completed if run_id.split(".")[2] == stage}


def world_settings(tmp: Path) -> Settings:
    suites = tmp / "suites"
    suite = Suite.model_validate(world_suite(n_learn=LEARN, n_gate=GATE, n_holdout=HOLDOUT))
    save_suite(suite, suites / "world.json")
    return Settings(
        home=tmp / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        suites_dir=suites,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
        min_failures_to_propose=10_000,  # nothing proposes on its own here
        gate=GateSettings(run_timeout_s=60, holdout_cases=HOLDOUT),
    )


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratchet.cli", *args],
        env={**to_env(stack.settings), "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def wait_for_consumer(stack: Stack, durable: str) -> None:
    """The policy approver is ready once its durable consumer exists."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("admin"), name="test-admin")
    try:
        js = nc.jetstream()

        async def exists() -> bool:
            try:
                await js.consumer_info(EVENTS_STREAM, durable)
            except Exception:
                return False
            return True

        await until(f"consumer {durable}", exists, timeout=30)
    finally:
        await nc.close()


def ledger(stack: Stack) -> dict[str, set[str]]:
    """Gate run ids the gatekeeper issued, by change, and that each was scored in its ledger."""
    path = stack.settings.home.resolve() / "gatekeeper-runs.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT run_id, change_id, scored IS NOT NULL FROM gate_runs").fetchall()
    issued: dict[str, set[str]] = {}
    for run_id, change_id, scored in rows:
        assert scored, f"gate run {run_id} was issued but never scored"
        issued.setdefault(change_id, set()).add(run_id)
    return issued


async def drive(stack: Stack) -> dict[str, Decided]:
    """The worse change, then the better one, each to the end of its trail."""
    assert stack.nats is not None
    await wait_for_consumer(stack, "policy-approver")
    nc = await connect(stack.nats.settings_for("client"), name="test-world-gate")
    observer = Observer()
    try:
        for subject in ("run.completed", "run.scored", "change.>"):
            await nc.subscribe(subject, cb=observer.on_message)
        await nc.flush()

        async def trail_reaches(change_id: str, kind: str) -> None:
            await trail_reaching(stack, change_id, kind, timeout=WAIT_S)

        worse = (await propose_world(nc, TASK, WORSE, 2)).change_id
        await observer.wait(
            "decision on the worse change",
            lambda: bool({"change.approved", "change.rejected"} & {*observer.subjects(worse)}),
        )
        await trail_reaches(worse, "rejected")
        after_worse = await read_current(nc.jetstream(), TASK)

        better = (await propose_world(nc, TASK, BETTER, 1)).change_id
        await observer.wait(
            "outcome of the better change",
            lambda: bool(
                {"change.rejected", "change.kept", "change.rolled_back"}
                & {*observer.subjects(better)}
            ),
        )
        await trail_reaches(better, "holdout")
        after_better = await read_current(nc.jetstream(), TASK)
        await nc.flush()
        issued = ledger(stack)
        decided: dict[str, Decided] = {}
        for name, change_id, after in (
            ("worse", worse, after_worse),
            ("better", better, after_better),
        ):
            trail = [r.model_dump(mode="json") for r in await fetch_trail(nc, change_id)]
            assert after is not None
            ours = f"{GATE_RUN_PREFIX}{change_id}."  # the change's gate runs
            decided[name] = Decided(
                change=ChangeProposed.model_validate(
                    next(r["payload"] for r in trail if r["kind"] == "received")
                ),
                trail=trail,
                events=observer.subjects(change_id),
                prompt_after=after,
                completed={k: v for k, v in observer.completed.items() if k.startswith(ours)},
                scored={k: v for k, v in observer.scored.items() if k.startswith(ours)},
                issued=issued.get(change_id, set()),
            )
        return decided
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Decided]]]:
    tmp = tmp_path_factory.mktemp("world-gate")
    with pytest.MonkeyPatch.context() as env:
        for key, value in WORLD_ENV.items():
            env.setenv(key, value)  # start_stack passes its own environment to every service
        stack = start_stack(world_settings(tmp))
    try:
        with policy_approver(stack.settings):
            yield stack, asyncio.run(drive(stack))
    finally:
        stack.stop()


def assert_each_run_once(decided: Decided, stages: tuple[str, ...]) -> None:
    """Every gate run the gatekeeper issued for the change ran once and was scored once."""
    assert decided.issued, "the gatekeeper issued no gate runs"
    assert set(decided.completed) == decided.issued
    assert set(decided.scored) == decided.issued
    duplicates = {
        f"{event} {run_id}": n
        for event, counts in (("completed", decided.completed), ("scored", decided.scored))
        for run_id, n in counts.items()
        if n != 1
    }
    assert not duplicates, f"runs completed or scored more than once: {duplicates}"
    assert {run_id.split(".")[2] for run_id in decided.issued} == set(stages)
    measurement = decided.measurement
    assert measurement.repeats == 1 and measurement.unscored == 0
    assert measurement.runs == 2 * measurement.cases == len(decided.runs("measure"))


def test_a_truly_better_change_is_shown_superior_approved_applied_verified_and_kept(
    world: tuple[Stack, dict[str, Decided]], kept_trail: list[str]
) -> None:
    _, decided = world
    better = decided["better"]
    assert better.kinds == kept_trail
    m = better.measurement
    assert m.verdict == "superior" and m.lower_bound > 0 and m.lift > 0
    assert m.cases < 200  # the sequential test stopped early on a 25-point lift
    approved = next(r for r in better.trail if r["kind"] == "approved")
    assert approved["actor"] == "policy"
    assert better.events == [
        "change.proposed",
        "change.awaiting_approval",
        "change.approved",
        "change.applied",
        "change.kept",
    ]
    applied, verified = better.record("applied"), better.record("verified")
    assert better.prompt_after.version == applied["version"]
    assert better.prompt_after.record.change_id == better.change.change_id
    assert better.prompt_after.record.text == better.change.proposed_prompt
    assert verified["served"] and verified["fresh"]
    assert verified["cases"] == min(100, GATE - m.cases)
    assert len(better.runs("verify")) == 2 * verified["cases"]
    holdout = better.record("holdout")
    assert holdout["cases"] == HOLDOUT and holdout["lift"] > 0
    assert not holdout["pool_overfit_warning"]
    assert len(better.runs("holdout")) == 2 * HOLDOUT
    assert_each_run_once(better, STAGES)


def test_a_truly_worse_change_is_rejected_and_the_prompt_stays(
    world: tuple[Stack, dict[str, Decided]],
) -> None:
    _, decided = world
    worse = decided["worse"]
    assert worse.kinds == ["received", "measured", "awaiting_approval", "rejected"]
    assert worse.measurement.verdict in {"futile", "not_shown"}
    rejected = worse.record("rejected")
    assert "not shown better" in rejected["reason"]
    assert next(r["actor"] for r in worse.trail if r["kind"] == "rejected") == "policy"
    assert worse.events == ["change.proposed", "change.awaiting_approval", "change.rejected"]
    assert worse.prompt_after.version == worse.change.base_version
    assert worse.prompt_after.record.kind == "initial"
    assert worse.prompt_after.record.text == BASE_PROMPT
    assert_each_run_once(worse, ("measure",))


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("which", ["better", "worse"])
def test_show_prints_the_evidence(world: tuple[Stack, dict[str, Decided]], which: str) -> None:
    stack, decided = world
    change = decided[which]
    shown = cli(stack, "show", change.change.change_id)
    assert shown.returncode == 0, shown.stderr
    out = flat(shown.stdout)
    m = change.measurement
    # everything ratchet.evidence says, and its parts spelled out
    for line in describe(m) + describe_after({r["kind"]: r["payload"] for r in change.trail}):
        assert flat(line) in out, line
    assert f"verdict: {VERDICTS[m.verdict]} (superiority test, one-sided alpha 0.05)" in out
    assert f"stopped at look {m.stopped_at} of {len(m.looks)} ({m.cases} of up to 200" in out
    low, high = m.ci95
    assert f"lift: {m.lift:+.1%} 95% CI {low:+.1%} to {high:+.1%} (unadjusted)" in out
    assert f"one-sided 95% lower bound {m.lower_bound:+.1%} (valid under early stopping)" in out
    assert f"{m.runs} model runs spent" in out and m.runs == 2 * m.cases
    assert f"fixed {len(m.fixed)}: " in out and f"broken {len(m.broken)}: " in out
    assert all(case in out for case in m.fixed[:12])
    assert all(case in out for case in m.broken[:12])
    proposals = {"worse": 1, "better": 2}[which]
    assert m.proposals_on_pool == proposals
    assert f"({GATE} cases): {proposals} proposal(s) tested on it, budget 50" in out
    assert "note: An approved lift is an overestimate" in out
    # who proposed is the CLI's user, which the subject proved; the model is what the body says
    assert next(r["actor"] for r in change.trail if r["kind"] == "received") == "client"
    assert "by: client (model test:world)" in out
    if which == "better":
        assert m.fixed
        assert f"holdout: lift {change.record('holdout')['lift']:+.1%}" in out
        assert "verify: applied" in out

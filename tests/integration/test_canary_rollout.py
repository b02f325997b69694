"""The canary through the real services: a real nats-server, every service a real process, the
FAKE ground-truth world (``scripted:world``) as the agent, canaries on (``canary_share`` 0.5,
no offline check after applying: ``verify_cases`` 0).

Each world prompt carries its true success rate as a tag (``ratchet.world``), and live runs go to
world cases drawn at random, so each version's true pass rate on live traffic is known: the base
prompt passes 50%, the better change 80%, the worse one 40%. The test proposes the better change
and approves it (as the operator, a person), then sends live runs (``run.requested``, the
executor serving each the version its run id draws) in batches, until the canary's test promotes
it; then a truly worse change, approved anyway, until the canary rolls it back. After every
batch, while the canary runs, the gatekeeper's counts (``query.changes``) must equal the scored
live runs of each version exactly: each counted once, none lost. The decision comes within a
batch, so its counts lie between the batch's start and end.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import cli, propose_world, trail_reaching
from nats.aio.client import Client
from nats.aio.msg import Msg

from ratchet import canary
from ratchet.cli.client import fetch_trail
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    CanaryStats,
    ChangeCanaryRolledBack,
    ChangeCanaryStarted,
    ChangePromoted,
    ChangeProposed,
    Check,
    RunRequested,
)
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsproc import free_port
from ratchet.prompts import PromptVersion, read_current
from ratchet.queries import ChangesQuery, ChangeSummary
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import Suite, save_suite
from ratchet.world import case_answer, case_input, world_suite

TASK = "world"
BASE, BETTER, WORSE = 0.5, 0.8, 0.4
WORLD_ENV = {
    "RATCHET_WORLD__SEED": "0",
    "RATCHET_WORLD__BASE_SUCCESS": str(BASE),
    "RATCHET_WORLD__DETERMINISTIC_SHARE": "0.5",
    "RATCHET_WORLD__UNEVENNESS": "0.25",
    "RATCHET_WORLD__LATENCY_S": "0",
}
BATCH = 40  # live runs between two checks of the counts
MAX_LIVE_RUNS = 2000  # per canary; a +30 / -40 point change needs a few hundred at most
WAIT_S = 90
OUTCOME_KINDS = {
    ChangePromoted.subject: "promoted",
    ChangeCanaryRolledBack.subject: "canary_rolled_back",
}
TRAIL = ["received", "measured", "awaiting_approval", "approved", "applied", "holdout", "canary"]


@dataclass
class Live:
    """Live runs sent and their scores, seen on ``run.scored`` (a client subscription)."""

    sent: set[str] = field(default_factory=set)
    scored: dict[str, list[tuple[int | None, float | None]]] = field(default_factory=dict)
    outcomes: dict[str, dict[str, object]] = field(default_factory=dict)  # change id -> event
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, msg: Msg) -> None:
        data = json.loads(msg.data)
        if msg.subject == "run.scored" and data["run_id"] in self.sent:
            self.scored.setdefault(data["run_id"], []).append(
                (data["prompt_version"], data["score"])
            )
        elif msg.subject in (ChangePromoted.subject, ChangeCanaryRolledBack.subject):
            self.outcomes[data["change_id"]] = {"subject": msg.subject, **data}
        async with self.arrived:
            self.arrived.notify_all()

    async def wait(self, what: str, done: Callable[[], bool]) -> None:
        try:
            async with self.arrived:
                await asyncio.wait_for(self.arrived.wait_for(done), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"no {what} within {WAIT_S} s") from None

    def counts(self, run_ids: set[str], stable: int, version: int) -> tuple[int, int]:
        """Scored runs among ``run_ids`` that used the stable version and the canary."""
        used = [self.scored[run_id][0] for run_id in run_ids]
        return (
            sum(v == stable and s is not None for v, s in used),
            sum(v == version and s is not None for v, s in used),
        )


async def until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Re-check a condition no event announces (the gatekeeper's counts) until a deadline."""
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S} s")
        await asyncio.sleep(0.1)


def stack_settings(tmp: Path) -> Settings:
    suites = tmp / "suites"
    save_suite(
        Suite.model_validate(world_suite(n_learn=5, n_gate=140, n_holdout=10)),
        suites / "world.json",
    )
    return Settings(
        home=tmp / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        suites_dir=suites,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
        min_failures_to_propose=10_000,  # nothing proposes on its own here
        gate=GateSettings(run_timeout_s=60, verify_cases=0, canary_share=0.5),
    )


async def send_live_runs(nc: Client, live: Live, n: int, rng: random.Random) -> set[str]:
    """``n`` live runs on world cases no suite holds (drawn above its first million)."""
    js = nc.jetstream()
    ids = set()
    for _ in range(n):
        index = rng.randrange(2_000_000, 3_000_000)
        request = RunRequested(
            task=TASK,
            input=case_input(index),
            check=Check(kind="exact", expected=case_answer(index)),
        )
        live.sent.add(request.run_id)
        ids.add(request.run_id)
        await js.publish(
            RunRequested.subject,
            request.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{request.subject}:{request.id}"},
            timeout=5,
        )
    return ids


async def gatekeeper_counts(nc: Client, change_id: str) -> CanaryStats | None:
    reply = await nc.request(
        f"{QUERY_PREFIX}.changes", ChangesQuery(task=TASK).model_dump_json().encode(), timeout=5
    )
    changes = [ChangeSummary.model_validate(c) for c in json.loads(reply.data)]
    return next(c.canary for c in changes if c.change_id == change_id)


@dataclass
class Canaried:
    change: ChangeProposed
    started: ChangeCanaryStarted
    outcome: dict[str, object]
    stats: CanaryStats
    before: tuple[int, int]  # (stable, canary) scored live runs before the deciding batch
    after: tuple[int, int]  # ... and after it
    trail: list[str]
    prompt_after: PromptVersion


async def canary_of(
    stack: Stack, nc: Client, live: Live, success: float, prompt_id: int, rng: random.Random
) -> Canaried:
    """Propose a change, approve it as the operator, and drive live runs until its canary ends."""
    change = await propose_world(nc, TASK, success, prompt_id)
    await trail_reaching(stack, change.change_id, "awaiting_approval", timeout=WAIT_S)
    approved = cli(stack, "approve", change.change_id, "--reason", "ship it; the canary decides")
    assert approved.returncode == 0, approved.stderr
    trail = await trail_reaching(stack, change.change_id, "canary", timeout=WAIT_S)
    assert trail == TRAIL
    record = next(r for r in await fetch_trail(nc, change.change_id) if r.kind == "canary")
    started = ChangeCanaryStarted.model_validate(
        {k: v for k, v in record.payload.items() if k != "alpha"}
    )
    stable, version = started.stable_version, started.version
    sent: set[str] = set()
    before = (0, 0)
    while change.change_id not in live.outcomes:
        assert len(sent) < MAX_LIVE_RUNS, f"no verdict after {len(sent)} live runs"
        before = live.counts(sent, stable, version)
        batch = await send_live_runs(nc, live, BATCH, rng)
        sent |= batch
        await live.wait("scores of the batch", lambda b=batch: b <= live.scored.keys())
        expected = live.counts(sent, stable, version)

        async def counted_or_decided(expected: tuple[int, int] = expected) -> bool:
            if change.change_id in live.outcomes:
                return True
            stats = await gatekeeper_counts(nc, change.change_id)
            assert stats is not None
            counted = (stats.stable_runs, stats.canary_runs)
            assert counted[0] <= expected[0] and counted[1] <= expected[1], (counted, expected)
            return counted == expected

        await until("the gatekeeper counting every scored live run", counted_or_decided)
    outcome = live.outcomes[change.change_id]
    after = live.counts(sent, stable, version)
    trail = await trail_reaching(stack, change.change_id, OUTCOME_KINDS[str(outcome["subject"])])
    prompt_after = await read_current(nc.jetstream(), TASK)
    assert prompt_after is not None
    return Canaried(
        change=change,
        started=started,
        outcome=outcome,
        stats=CanaryStats.model_validate(outcome["stats"]),
        before=before,
        after=after,
        trail=trail,
        prompt_after=prompt_after,
    )


async def drive(stack: Stack) -> tuple[Canaried, Canaried, Live]:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-canary")
    live = Live()
    rng = random.Random(7)
    try:
        for subject in ("run.scored", ChangePromoted.subject, ChangeCanaryRolledBack.subject):
            await nc.subscribe(subject, cb=live.on_message)
        await nc.flush()
        better = await canary_of(stack, nc, live, BETTER, 1, rng)
        worse = await canary_of(stack, nc, live, WORSE, 2, rng)
        return better, worse, live
    finally:
        await nc.close()


Rollout = tuple[Stack, Canaried, Canaried, Live]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rollout]:
    tmp = tmp_path_factory.mktemp("canary")
    with pytest.MonkeyPatch.context() as env:
        for key, value in WORLD_ENV.items():
            env.setenv(key, value)  # start_stack passes its own environment to every service
        stack = start_stack(stack_settings(tmp))
    try:
        better, worse, live = asyncio.run(drive(stack))
        yield stack, better, worse, live
    finally:
        stack.stop()


def assert_decided_within_its_batch(c: Canaried) -> None:
    """Each arm's count is what the gatekeeper had counted when the test decided: at least every
    scored live run before the deciding batch, at most every one after it; the verdict is the
    library's on exactly those counts, and one run fewer would not have decided it."""
    s = c.stats
    assert c.before[0] <= s.stable_runs <= c.after[0]
    assert c.before[1] <= s.canary_runs <= c.after[1]
    assert s.stable_runs + s.canary_runs > sum(c.before)
    again = canary.evaluate(
        stable_version=s.stable_version,
        canary_version=s.canary_version,
        stable_runs=s.stable_runs,
        stable_score=s.stable_score,
        canary_runs=s.canary_runs,
        canary_score=s.canary_score,
        margin=s.margin,
        alpha=s.alpha,
        max_runs=GateSettings().canary_max_runs,
    )
    assert again == s


def test_a_truly_better_change_is_promoted_by_its_canary(
    rollout: Rollout,
) -> None:
    _, better, _, _ = rollout
    assert better.trail == [*TRAIL, "promoted"]
    assert better.outcome["subject"] == ChangePromoted.subject
    assert better.started.share == 0.5 and better.started.version == better.change.base_version + 1
    assert better.started.stable_version == better.change.base_version
    s = better.stats
    assert s.verdict == "not_worse" and s.lower > -s.margin and s.lift > 0
    assert s.stable_runs > 0 and s.canary_runs > 0
    assert_decided_within_its_batch(better)
    promoted = better.prompt_after
    assert promoted.version == better.started.version + 1 == better.outcome["version"]
    assert promoted.record.kind == "promotion" and promoted.record.canary is None
    assert promoted.record.text == better.change.proposed_prompt


def test_a_truly_worse_change_approved_anyway_is_rolled_back_by_its_canary(
    rollout: Rollout,
) -> None:
    _, better, worse, _ = rollout
    assert worse.trail == [*TRAIL, "canary_rolled_back"]
    assert worse.outcome["subject"] == ChangeCanaryRolledBack.subject
    # the person approved it against the gate's evidence
    assert worse.change.base_version == better.prompt_after.version
    s = worse.stats
    assert s.verdict == "worse" and s.upper < 0 and s.lift < 0
    assert_decided_within_its_batch(worse)
    rolled_back = worse.prompt_after
    assert rolled_back.version == worse.started.version + 1 == worse.outcome["version"]
    assert rolled_back.record.kind == "rollback" and rolled_back.record.canary is None
    assert rolled_back.record.text == better.change.proposed_prompt  # the promoted text again


def test_every_live_run_was_scored_once_and_each_version_served_its_share(
    rollout: Rollout,
) -> None:
    _, better, worse, live = rollout
    assert live.scored.keys() == live.sent
    assert all(len(scores) == 1 for scores in live.scored.values())
    assert all(score is not None for [(_, score)] in live.scored.values())
    for c in (better, worse):
        runs = sum(c.after)
        # the run id draws the version: about half each (a 1-in-10^6 chance to fail)
        assert abs(c.after[1] - runs / 2) < 5 * (runs / 4) ** 0.5


def test_changes_and_show_print_the_canary(
    rollout: Rollout,
) -> None:
    stack, better, worse, _ = rollout
    listed = cli(stack, "changes")
    assert listed.returncode == 0, listed.stderr
    lines = {c.change.change_id: "" for c in (better, worse)}
    for line in listed.stdout.splitlines():
        for change_id in lines:
            if change_id in line:
                lines[change_id] = line
    assert "promoted" in lines[better.change.change_id]
    assert "not_worse: " in lines[better.change.change_id]
    assert "rolled back by canary" in lines[worse.change.change_id]
    assert (
        f"{worse.stats.canary_runs} canary (v{worse.started.version})"
        in lines[worse.change.change_id]
    )
    for c in (better, worse):
        shown = cli(stack, "show", c.change.change_id)
        assert shown.returncode == 0, shown.stderr
        out = " ".join(shown.stdout.split())
        assert f"canary: v{c.started.version} serves 50% of live traffic" in out
        assert f"canary outcome: {canary.describe(c.stats)}" in out
        assert "judge tokens: " in out

"""Improving an agent that runs in a user's own app, end to end: the example LangGraph app
(``examples/langgraph_app.py``) instrumented with the SDK runs as its own process, as the NATS
user ``app-app``, against a real nats-server with every service a real process.

The app's model is the FAKE ground-truth world (``scripted:world``): each world prompt carries its
true success rate as a tag, so every prompt version's true pass rate on the app's traffic is
known: the base prompt passes 50%. The fake proposer (``scripted:world-proposer``) is set to write
candidates 30 points better (``RATCHET_WORLD__PROPOSER_MEAN=0.3``, no spread). Canaries serve
half the live traffic (``canary_share`` 0.5) and the offline check after applying is off
(``verify_cases`` 0), so the canary alone judges an applied change on live traffic.

What happens, with nobody but the test acting as the person who approves:

1. the app serves the base prompt and reports its runs; the evaluator scores them (each carries
   its exact check), the failure store stores them and logs their failures tagged
   ``app:app``, and the proposer proposes from those failures;
2. the gate shows the proposal better; the person approves it; it serves half the app's users
   until the canary's test shows it not worse, and is promoted;
3. the person then proposes a truly worse prompt (30% against 80%) and approves it against the
   gate's evidence; the canary shows it worse on the app's traffic and rolls it back by itself.

Then the app is stopped (SIGTERM: it finishes its runs and delivers every report) and the counts
must close: every run the app reported was scored exactly once, every failing one was logged as a
failure exactly once, and the canaries counted no more runs than were scored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli, trail_reaching
from nats.aio.client import Client
from nats.aio.msg import Msg

from ratchet.cli.client import fetch_trail
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    CanaryStats,
    ChangeCanaryRolledBack,
    ChangePromoted,
    ChangeProposed,
    FailureLogged,
    Measurement,
    RunScored,
)
from ratchet.messaging import QUERY_PREFIX, connect, publish_js
from ratchet.natsproc import free_port
from ratchet.prompts import PromptVersion, read_current
from ratchet.settings import GateSettings, ModelSettings, Settings, to_env
from ratchet.store import FailureQuery
from ratchet.suites import Suite, save_suite
from ratchet.world import World, WorldSettings, format_prompt, world_suite

TASK = "world"
BASE, BETTER_BY, WORSE = 0.5, 0.3, 0.3
WORLD_ENV = {  # the world of every process: the services' and the app's
    "RATCHET_WORLD__SEED": "0",
    "RATCHET_WORLD__BASE_SUCCESS": str(BASE),
    "RATCHET_WORLD__DETERMINISTIC_SHARE": "0.5",
    "RATCHET_WORLD__UNEVENNESS": "0.25",
    "RATCHET_WORLD__LATENCY_S": "0",
    "RATCHET_WORLD__PROPOSER_MEAN": str(BETTER_BY),
    "RATCHET_WORLD__PROPOSER_SD": "0",
}
APP = "app"
ORIGIN = f"app:{APP}"
WAIT_S = 120
PROPOSED = "change.proposed"
OUTCOMES = {
    ChangePromoted.subject: "promoted",
    ChangeCanaryRolledBack.subject: "canary_rolled_back",
}


@dataclass
class Observer:
    """A client's subscriptions: the app's scores and failures by run id, and the changes."""

    scored: Counter[str] = field(default_factory=Counter)
    scores: dict[str, RunScored] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    proposals: dict[str, str] = field(default_factory=dict)  # change id -> who proposed
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)  # change id -> event
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def on_message(self, msg: Msg) -> None:
        data = json.loads(msg.data)
        if msg.subject == RunScored.subject and data["origin"] == ORIGIN:
            self.scored[data["run_id"]] += 1
            self.scores[data["run_id"]] = RunScored.model_validate(data)
        elif msg.subject == FailureLogged.subject and data["origin"] == ORIGIN:
            self.failures[data["run_id"]] += 1
        elif msg.subject.startswith(f"{PROPOSED}."):
            self.proposals[data["change_id"]] = msg.subject.rpartition(".")[2]
        elif msg.subject in OUTCOMES:
            self.outcomes[data["change_id"]] = {"subject": msg.subject, **data}
        async with self.arrived:
            self.arrived.notify_all()

    async def wait(self, what: str, done: Callable[[], bool]) -> None:
        try:
            async with self.arrived:
                await asyncio.wait_for(self.arrived.wait_for(done), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"no {what} within {WAIT_S} s") from None


@dataclass
class Canaried:
    change_id: str
    proposer: str
    trail: list[dict[str, Any]]
    outcome: dict[str, Any]
    prompt_after: PromptVersion

    @property
    def kinds(self) -> list[str]:
        return [r["kind"] for r in self.trail]

    def record(self, kind: str) -> dict[str, Any]:
        return next(dict(r["payload"]) for r in self.trail if r["kind"] == kind)

    @property
    def stats(self) -> CanaryStats:
        return CanaryStats.model_validate(self.outcome["stats"])


@dataclass
class Loop:
    stack: Stack
    better: Canaried
    worse: Canaried
    observer: Observer
    app: dict[str, Any]  # the app's own summary line
    failures_by_origin: list[dict[str, Any]]


def stack_settings(tmp: Path) -> Settings:
    suites = tmp / "suites"
    save_suite(
        Suite.model_validate(world_suite(n_learn=5, n_gate=140, n_holdout=10)),
        suites / f"{TASK}.json",
    )
    return Settings(
        home=tmp / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        suites_dir=suites,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
        min_failures_to_propose=30,
        gate=GateSettings(run_timeout_s=60, verify_cases=0, canary_share=0.5),
    )


def start_app(stack: Stack) -> subprocess.Popen[str]:
    """The example app as its own process, as a user runs it beside `ratchet up`."""
    env = {
        **os.environ,
        **to_env(stack.settings.model_copy(update={"home": stack.settings.home.resolve()})),
        **WORLD_ENV,
    }
    command = [
        sys.executable, str(REPO / "examples" / "langgraph_app.py"),
        "--model", "scripted:world", "--app", APP, "--task", TASK, "--inputs", "world",
        "--case-range", "2000000:3000000",  # world cases no suite holds
        "--duration", "600", "--rate", "80", "--concurrency", "8", "--users", "400",
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def approve(stack: Stack, change_id: str, reason: str) -> None:
    await trail_reaching(stack, change_id, "awaiting_approval", timeout=WAIT_S)
    approved = await asyncio.to_thread(cli, stack, "approve", change_id, "--reason", reason)
    assert approved.returncode == 0, approved.stderr


async def canaried(stack: Stack, nc: Client, observer: Observer, change_id: str) -> Canaried:
    await observer.wait(f"canary outcome of {change_id}", lambda: change_id in observer.outcomes)
    outcome = observer.outcomes[change_id]
    await trail_reaching(stack, change_id, OUTCOMES[outcome["subject"]], timeout=WAIT_S)
    trail = [r.model_dump(mode="json") for r in await fetch_trail(nc, change_id)]
    prompt_after = await read_current(nc.jetstream(), TASK)
    assert prompt_after is not None
    return Canaried(change_id, observer.proposals[change_id], trail, outcome, prompt_after)


async def drive(stack: Stack) -> Loop:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-production-loop")
    observer = Observer()
    app: subprocess.Popen[str] | None = None
    try:
        subjects = (RunScored.subject, FailureLogged.subject, f"{PROPOSED}.*", *OUTCOMES)
        for subject in subjects:
            await nc.subscribe(subject, cb=observer.on_message)
        await nc.flush()
        app = start_app(stack)

        # 1-2: the proposer learns from the app's failures; a person approves; the canary decides
        await observer.wait("a proposal from the app's failures", lambda: bool(observer.proposals))
        first = next(iter(observer.proposals))
        await approve(stack, first, "the gate shows it better; the canary decides")
        better = await canaried(stack, nc, observer, first)

        # 3: a person's own worse change, approved against the gate's evidence
        current = better.prompt_after
        worse_prompt = format_prompt(current.record.text, 999_001, WORSE)
        change = ChangeProposed(
            task=TASK,
            base_version=current.version,
            proposed_prompt=worse_prompt,
            rationale="A FAKE world prompt, truly 50 points worse than the promoted one.",
        )
        await publish_js(nc.jetstream(), change, subject=change.subject_of("client"))
        await approve(stack, change.change_id, "approved anyway, against the evidence")
        worse = await canaried(stack, nc, observer, change.change_id)

        # the app stops: it finishes its runs and delivers every report
        app.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(app.communicate, timeout=WAIT_S)
        assert app.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        await observer.wait(
            "a score for every run the app reported",
            lambda: len(observer.scored) >= summary["published"],
        )
        await observer.wait(
            "a failure for every failing run",
            lambda: (
                len(observer.failures)
                >= sum(score.score == 0.0 for score in observer.scores.values())
            ),
        )
        query = FailureQuery(task=TASK, origin=ORIGIN, limit=50)
        reply = await nc.request(
            f"{QUERY_PREFIX}.failures", query.model_dump_json().encode(), timeout=10
        )
        return Loop(stack, better, worse, observer, summary, json.loads(reply.data))
    finally:
        if app is not None and app.poll() is None:
            app.kill()
            app.communicate()
        await nc.close()


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    tmp = tmp_path_factory.mktemp("production-loop")
    with pytest.MonkeyPatch.context() as env:
        for key, value in WORLD_ENV.items():
            env.setenv(key, value)  # start_stack passes its own environment to every service
        stack = start_stack(stack_settings(tmp))
    try:
        yield asyncio.run(drive(stack))
    finally:
        stack.stop()


def true_success(prompt: str) -> float:
    world = World(WorldSettings(seed=0, base_success=BASE))
    return world.true_success(prompt)


def test_the_apps_runs_are_scored_and_their_failures_stored_each_exactly_once(loop: Loop) -> None:
    app, observer = loop.app, loop.observer
    assert app["dropped"] == 0 and app["undelivered"] == 0 and app["errors"] == 0
    assert app["reported"] == app["published"] == app["runs"]
    assert len(observer.scored) == app["published"]  # none lost
    assert set(observer.scored.values()) == {1}  # none scored twice
    assert all(run_id.startswith(f"{ORIGIN}/") for run_id in observer.scored)
    assert all(s.scorer == "check:exact" and s.score is not None for s in observer.scores.values())
    failing = {run_id for run_id, s in observer.scores.items() if s.score == 0.0}
    assert set(observer.failures) == failing and set(observer.failures.values()) == {1}
    # the failure store keeps their origin, and answers by it
    assert loop.failures_by_origin
    assert {f["origin"] for f in loop.failures_by_origin} == {ORIGIN}
    assert {f["run_id"] for f in loop.failures_by_origin} <= failing


def test_a_proposal_from_the_apps_failures_is_gated_canaried_and_promoted(loop: Loop) -> None:
    better = loop.better
    assert better.proposer == "proposer"  # the proposer service, from the failures
    received = ChangeProposed.model_validate(better.record("received"))
    assert received.failure_run_ids
    assert all(run_id.startswith(f"{ORIGIN}/") for run_id in received.failure_run_ids)
    assert true_success(received.proposed_prompt) == pytest.approx(BASE + BETTER_BY)
    assert better.kinds == [
        "received", "measured", "awaiting_approval", "approved", "applied", "holdout", "canary",
        "promoted",
    ]  # fmt: skip
    assert Measurement.model_validate(better.record("measured")).verdict == "superior"
    stats = better.stats
    assert stats.verdict == "not_worse" and stats.lift > 0
    assert stats.canary_runs > 0 and stats.stable_runs > 0
    promoted = better.prompt_after
    assert promoted.record.kind == "promotion" and promoted.record.canary is None
    assert promoted.record.text == received.proposed_prompt
    # the app served the canary to its share of users, then everyone the promoted version
    served = {int(v): n for v, n in loop.app["versions"].items()}
    assert served.get(stats.canary_version, 0) > 0 and served.get(promoted.version, 0) > 0


def test_a_worse_change_approved_anyway_is_rolled_back_by_the_canary(loop: Loop) -> None:
    better, worse = loop.better, loop.worse
    assert worse.proposer == "client"
    assert worse.kinds[-2:] == ["canary", "canary_rolled_back"]
    assert "approved" in worse.kinds
    measured = Measurement.model_validate(worse.record("measured"))
    assert measured.verdict in {"futile", "not_shown"}  # approved against the evidence
    stats = worse.stats
    assert stats.verdict == "worse" and stats.upper < 0
    after = worse.prompt_after
    assert after.record.kind == "rollback" and after.record.canary is None
    assert after.record.text == better.prompt_after.record.text  # the promoted prompt again
    served = {int(v): n for v, n in loop.app["versions"].items()}
    assert served.get(stats.canary_version, 0) > 0


def test_the_canaries_counted_only_scored_runs_of_their_two_versions(loop: Loop) -> None:
    by_version = Counter(s.prompt_version for s in loop.observer.scores.values())
    for canary in (loop.better, loop.worse):
        stats = canary.stats
        assert stats.stable_runs <= by_version[stats.stable_version]
        assert stats.canary_runs <= by_version[stats.canary_version]

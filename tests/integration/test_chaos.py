"""Chaos with counts (issue 12): a three-node JetStream cluster and every service as a real
process (two executors, two evaluators, the failure store, the proposer, the gatekeeper), 1,000
runs in flight and a change going through the gate, while SIGKILL takes, each in turn and then
all together, the node leading the events stream, an executor, an evaluator, the failure store,
the proposer and the gatekeeper; each is restarted.

Afterwards, counted from the stream itself (every message read back) and from the failure
store's SQLite file (read-only): every run stored with its score exactly once, one
``failure.logged`` per stored failure, no change proposed, applied or audited twice, and the
dead-letter stream holding exactly the poisoned requests sent on purpose. The counts are printed
(``pytest -s``) and written to ``chaos-counts.json`` in the test's tmp dir.

The agent is the FAKE ``scripted:world`` model (``ratchet.world``) with a fixed sleep, so runs are
in flight throughout; the change is a FAKE world prompt with a known true success.

    .venv/bin/pytest -s -p no:cacheprovider tests/integration/test_chaos.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import cli
from nats.aio.client import Client
from test_cluster import (
    admin,
    per_run,
    publish_runs,
    read_stream,
    stored_failures,
    stored_runs,
    until,
    world_request,
)

from ratchet.cli.client import ClientError, fetch_trail
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    ChangeApplied,
    ChangeProposed,
    ChangeRecorded,
    FailureLogged,
    RunCompleted,
    RunRequested,
    RunScored,
)
from ratchet.messaging import DLQ_STREAM, EVENTS_STREAM, connect, publish_js
from ratchet.natsconf import ROLES
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import Suite, save_suite
from ratchet.world import BASE_PROMPT, format_prompt, world_suite

RUNS = 1000
POISONED = 4  # run requests of an unknown schema version: dead-lettered on purpose
# The fake model's sleep per call: two executors of 8 workers finish at most 32 runs a second,
# so the 1,000 runs take over 30 s, and every kill (about 15 s in all) finds runs in flight.
LATENCY_S = 0.5
TASK = "world"
SERVICES = ("executor-1", "evaluator-1", "failure-store", "proposer", "gatekeeper")
FINISHED = {"holdout", "rejected", "rolled_back", "invalid", "stale"}  # a change's last records
WAIT_S = 240


def chaos_settings(tmp_path: Path) -> Settings:
    suites = tmp_path / "suites"
    save_suite(
        Suite.model_validate(world_suite(n_learn=10, n_gate=80, n_holdout=20)),
        suites / "world.json",
    )
    return Settings(
        home=(tmp_path / "home").resolve(),
        nats_url=",".join(f"nats://127.0.0.1:{free_port()}" for _ in range(3)),
        suites_dir=suites,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
        min_failures_to_propose=10**6,  # the proposer proposes when asked (`ratchet propose`)
        ack_wait_s=10.0,  # what a killed service held comes back after 10 s
        gate=GateSettings(
            max_cases=40, looks=2, verify_reserve=20, verify_cases=20, holdout_cases=20,
            run_timeout_s=WAIT_S,
        ),
    )  # fmt: skip


def poisoned(i: int) -> tuple[str, bytes]:
    body = world_request(100_000 + i).model_dump(mode="json")
    body["schema_version"] = 999
    return str(body["run_id"]), json.dumps(body).encode()


class Changes:
    """The changes driven through the gate during the chaos: proposed, then approved by a
    person (the CLI) once they wait for approval, followed until their trail ends."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.ids: set[str] = set()
        self.approved: set[str] = set()
        self.trails: dict[str, list[str]] = {}

    async def propose_client(self, nc: Client) -> None:
        current = await read_current(nc.jetstream(), TASK)
        assert current is not None
        change = ChangeProposed(
            task=TASK,
            base_version=current.version,
            proposed_prompt=format_prompt(BASE_PROMPT, 1, 0.75),
            rationale="A FAKE world prompt whose true success is 75%.",
            model="test:world",
        )
        await publish_js(nc.jetstream(), change, subject=change.subject_of("client"), timeout=30)
        self.ids.add(change.change_id)

    def propose_by_proposer(self) -> None:
        """`ratchet propose world`: the proposer service asks the failure store and proposes."""
        deadline = time.monotonic() + 60
        while True:
            ran = cli(self.stack, "propose", TASK)
            if ran.returncode == 0:
                self.ids.add(ran.stdout.split()[2])  # "proposed change <id> for ..."
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the proposer proposed nothing: {ran.stderr}")
            time.sleep(1)

    async def follow(self, nc: Client) -> bool:
        """Approve what waits; whether every change's trail has ended."""
        for change_id in self.ids:
            with contextlib.suppress(ClientError):
                self.trails[change_id] = [r.kind for r in await fetch_trail(nc, change_id)]
            kinds = self.trails.get(change_id, [])
            if "awaiting_approval" in kinds and change_id not in self.approved:
                ran = await asyncio.to_thread(
                    cli, self.stack, "approve", change_id, "--reason", "chaos"
                )
                if ran.returncode == 0:
                    self.approved.add(change_id)
        return all(FINISHED & set(self.trails.get(c, [])) for c in self.ids)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


async def chaos(stack: Stack, log: list[dict[str, Any]], stored: Callable[[], int]) -> None:
    """Each part killed with SIGKILL and restarted, in turn; then all of them together. The log
    says what was killed and how many runs were stored then (the others were in flight)."""
    nats = stack.nats
    assert nats is not None

    async def targets() -> dict[str, subprocess.Popen[bytes]]:
        leader = await nats.stream_leader()
        processes = dict(stack.processes)
        return {leader.name: leader.process, **{label: processes[label] for label in SERVICES}}

    for label, process in (await targets()).items():
        kill(process)
        log.append({"killed": [label], "stored": stored()})
        await asyncio.sleep(0.5)
        await asyncio.to_thread(stack.respawn, label)
        await asyncio.sleep(1.5)  # the next kill may come while this part still starts
    together = await targets()
    for process in together.values():
        process.kill()
    for process in together.values():
        process.wait()
    log.append({"killed": list(together), "stored": stored()})
    await asyncio.sleep(0.5)
    for label in together:
        await asyncio.to_thread(stack.respawn, label)


async def keep_running(stack: Stack, restarts: list[str]) -> None:
    """What `ratchet up`'s supervisor does, for the stack the test started: a part that exited
    (a service that started while the cluster was still electing leaders, and failed to bind to
    its consumer) is started again."""
    while True:
        for label, process in [*stack.nats_parts(), *stack.processes]:
            if process.poll() is not None and process.returncode != -9:  # not one we just killed
                restarts.append(f"{label} exited with code {process.returncode}")
                await asyncio.to_thread(stack.respawn, label)
        await asyncio.sleep(0.5)


async def drained(nc: Client) -> bool:
    """Whether every service's durable consumer has delivered everything and had it acked."""
    js = nc.jetstream()
    for role in ROLES.values():
        for durable, _ in role.consumers:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(EVENTS_STREAM, durable)
                if info.num_pending or info.num_ack_pending:
                    return False
    return True


async def test_chaos_with_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATCHET_WORLD__LATENCY_S", str(LATENCY_S))  # the services inherit it
    settings = chaos_settings(tmp_path)
    stack = await asyncio.to_thread(start_stack, settings, cluster=3, executors=2, evaluators=2)
    began = time.monotonic()
    try:
        assert stack.nats is not None
        requests = [world_request(i) for i in range(RUNS)]
        run_ids = {r.run_id for r in requests}
        poison = [poisoned(i) for i in range(POISONED)]
        changes = Changes(stack)
        killed: list[dict[str, Any]] = []
        restarts: list[str] = []
        keeper = asyncio.create_task(keep_running(stack, restarts))
        client = await connect(stack.nats.settings_for("client"), name="test-chaos")
        try:
            await changes.propose_client(client)
            await publish_runs(client, requests)
            for run_id, body in poison:
                await client.jetstream().publish(
                    RunRequested.subject, body, headers={"Nats-Msg-Id": f"poison:{run_id}"}
                )
            await until(
                lambda: asyncio.sleep(0, result=len(stored_runs(settings.home, run_ids)) >= 50),
                "runs flowing",
                timeout=60,
            )
            await asyncio.to_thread(changes.propose_by_proposer)
            await chaos(stack, killed, lambda: len(stored_runs(settings.home, run_ids)))

            async def finished() -> bool:
                done = len(stored_runs(settings.home, run_ids)) == RUNS
                return await changes.follow(client) and done and await drained(client)

            try:
                await until(finished, "all done", timeout=WAIT_S)
            except AssertionError:
                stored = len(stored_runs(settings.home, run_ids))
                raise AssertionError(
                    f"within {WAIT_S}s: {stored} of {RUNS} runs stored, changes {changes.trails}, "
                    f"consumers drained: {await drained(client)}; restarts {restarts}"
                ) from None
        finally:
            keeper.cancel()
            await client.close()
        counts = await count(stack, settings.home, run_ids, changes)
        counts.update(
            seconds=round(time.monotonic() - began, 1),
            killed=killed,
            restarted_after_exiting=restarts,
            in_flight_at_last_kill=RUNS - killed[-1]["stored"],
            settings={"runs": RUNS, "latency_s": LATENCY_S, "executors": 2, "evaluators": 2,
                      "nodes": 3, "replicas": stack.nats.replicas, "ack_wait_s": 10.0},
        )  # fmt: skip
    finally:
        await asyncio.to_thread(stack.stop)
    (tmp_path / "chaos-counts.json").write_text(json.dumps(counts, indent=2))
    print(
        "\nchaos: requested {requested}, stored {stored}, duplicates {duplicates}, lost {lost}, "
        "dead-lettered {dead_lettered} (sent there on purpose {poisoned}); failures {failures}, "
        "failure.logged {failure_logged}; changes {changes} ({change_outcomes}); {seconds}s".format(
            **counts
        )
    )
    for kill_ in counts["killed"]:
        print(f"  killed {', '.join(kill_['killed'])} with {kill_['stored']} of {RUNS} runs stored")
    print(f"counts written to {tmp_path / 'chaos-counts.json'}")
    assert counts["in_flight_at_last_kill"] > 0, counts  # the chaos hit runs in flight
    assert counts["stored"] == counts["requested"] == RUNS
    assert (counts["lost"], counts["duplicates"]) == (0, 0), counts
    assert counts["dead_lettered"] == counts["poisoned"] == POISONED, counts
    assert counts["failure_logged"] == counts["failures"] == counts["failures_expected"], counts
    assert (counts["failure_logged_twice"], counts["failure_logged_missing"]) == (0, 0), counts
    assert counts["change_duplicates"] == 0, counts


async def count(stack: Stack, home: Path, run_ids: set[str], changes: Changes) -> dict[str, Any]:
    assert stack.nats is not None
    nc = await admin(stack.nats)
    try:
        completed = per_run(await read_stream(nc, EVENTS_STREAM, RunCompleted.subject))
        scored = per_run(await read_stream(nc, EVENTS_STREAM, RunScored.subject))
        logged = per_run(await read_stream(nc, EVENTS_STREAM, FailureLogged.subject))
        proposed = Counter(
            json.loads(b)["change_id"]
            for b in await read_stream(nc, EVENTS_STREAM, ChangeProposed.subject_of("*"))
        )
        applied = Counter(
            json.loads(b)["change_id"]
            for b in await read_stream(nc, EVENTS_STREAM, ChangeApplied.subject)
        )
        recorded = Counter(
            (json.loads(b)["change_id"], json.loads(b)["seq"])
            for b in await read_stream(nc, EVENTS_STREAM, ChangeRecorded.subject)
        )
        letters = [json.loads(b) for b in await read_stream(nc, DLQ_STREAM, ">")]
        trails = {c: [r.kind for r in await fetch_trail(nc, c)] for c in changes.ids}
    finally:
        await nc.close()
    scores = stored_runs(home, run_ids)
    ours_completed = {r: n for r, n in completed.items() if r in run_ids}
    ours_scored = {r: n for r, n in scored.items() if r in run_ids}
    failures = stored_failures(home, run_ids)
    audited_twice = {
        c: k for c, kinds in trails.items() for k, n in Counter(kinds).items() if n > 1
    }
    return {
        "requested": len(run_ids),
        "stored": len(scores),
        "duplicates": sum(n - 1 for n in [*ours_completed.values(), *ours_scored.values()]),
        "lost": len(run_ids - scores.keys()),
        "dead_lettered": len(letters),
        "poisoned": sum(
            "unsupported" in str(letter["reason"]) and "999" in str(letter["reason"])
            for letter in letters
        ),
        "failures": len(failures),
        "failures_expected": sum(
            score < stack.settings.failure_threshold for score in scores.values()
        ),
        "failure_logged": sum(n for r, n in logged.items() if r in run_ids),
        "failure_logged_twice": sum(n > 1 for r, n in logged.items() if r in run_ids),
        "failure_logged_missing": len(failures - logged.keys()),
        "changes": len(changes.ids),
        "change_outcomes": {c: trails[c][-1] for c in sorted(trails)},
        "changes_applied": len(applied),
        "change_duplicates": (
            sum(n - 1 for n in proposed.values())
            + sum(n - 1 for n in applied.values())
            + sum(n - 1 for n in recorded.values())
            + len(audited_twice)
        ),
        "gate_runs_completed": sum(n for r, n in completed.items() if r not in run_ids),
    }

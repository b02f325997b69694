"""Chaos with counts (issue 12): a three-node JetStream cluster and every service as a real
process (two executors, two evaluators, the failure store, the proposer, the gatekeeper), 1,000
runs in flight and a change going through the gate, while SIGKILL takes, each in turn and then
all together, the node leading the events stream, an executor, an evaluator, the failure store,
the proposer and the gatekeeper; each is restarted.

Every kill after the first waits until the stored count has moved on since the previous restart:
past the number of runs completed by then, so at least one run completed after the restart has
been stored and each kill lands on a pipeline that works again, not on one still stalled by the
last. The stored count and the victim's durable consumers' unacknowledged deliveries are recorded
per kill.

Afterwards, counted from the stream itself (every message read back) and from the failure
store's SQLite file (read-only): every run stored with its score exactly once, one
``failure.logged`` per stored failure, exactly the two changes the test made proposed (the
client's and the proposer's, whatever ids they carry), one applied, each audited once per kind,
the client's with the whole trail of a kept change, and the dead-letter stream holding exactly
the poisoned requests sent on purpose. The counts are printed (``pytest -s``) and written to
``chaos-counts.json`` in the test's tmp dir.

The agent is the FAKE ``scripted:world`` model (``ratchet.world``) with a fixed sleep, so runs are
in flight throughout; the change is a FAKE world prompt with a known true success.

    .venv/bin/pytest -s -p no:cacheprovider tests/integration/test_chaos.py
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from nats.aio.msg import Msg
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
from ratchet.messaging import DLQ_STREAM, EVENTS_STREAM, PUBLISH_RETRY_S, connect, publish_js
from ratchet.natsconf import PROPOSER, ROLES
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import Suite, save_suite
from ratchet.world import BASE_PROMPT, format_prompt, world_suite

RUNS = 1000
POISONED = 4  # run requests of an unknown schema version: dead-lettered on purpose
# The fake model's sleep per call: two executors of 8 workers finish at most 32 runs a second,
# so the 1,000 runs take over 30 s, and every kill finds runs in flight.
LATENCY_S = 0.5
TASK = "world"
SERVICES = ("executor-1", "evaluator-1", "failure-store", "proposer", "gatekeeper")
# The audit kinds the gatekeeper writes (services/gatekeeper/ratchet_gatekeeper/graph.py), in order:
# a change measured, approved, applied, verified on fresh cases, kept and held out (no canary here)
KEPT = ["received", "measured", "awaiting_approval", "approved", "applied", "verified", "kept",
        "holdout"]  # fmt: skip
# The proposer's change is approved only once the client's is applied, so the version it was based
# on is gone when it comes to be applied; or, validated after that, it is refused at once.
STALE = ["received", "measured", "awaiting_approval", "approved", "stale"]
INVALID = ["received", "invalid"]
ENDS = {"holdout", "rejected", "rolled_back", "invalid", "stale"}  # a change's last records
PROGRESS_S = 30.0  # before each kill after the first: the pipeline moves on within this
PROPOSE_S = 90.0  # `ratchet propose` until the proposer proposes
FINAL_S = 180.0  # after the last restart: everything stored, both changes ended, consumers drained
RUN_TIMEOUT_S = 240.0  # the gate's own wait for one of its runs


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
            run_timeout_s=RUN_TIMEOUT_S,
        ),
    )  # fmt: skip


def poisoned(i: int) -> tuple[str, bytes]:
    body = world_request(100_000 + i).model_dump(mode="json")
    body["schema_version"] = 999
    return str(body["run_id"]), json.dumps(body).encode()


async def proposer_changes(nc: Client) -> list[str]:
    """The ids of the changes the proposer service published, read back from the stream (it
    proposes only when asked here: ``min_failures_to_propose`` is out of reach)."""
    bodies = await read_stream(nc, EVENTS_STREAM, ChangeProposed.subject_of(PROPOSER))
    return [str(json.loads(body)["change_id"]) for body in bodies]


class Changes:
    """The two changes driven through the gate during the chaos: one proposed as a client, one
    asked of the proposer; each approved by a person (the CLI) once it waits for approval, the
    proposer's only after the client's was applied; followed until their trails end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.client: str | None = None
        self.proposers: str | None = None
        self.propose_attempts: list[str] = []  # how each `ratchet propose` ended
        self.approved: set[str] = set()
        self.trails: dict[str, list[str]] = {}

    @property
    def ids(self) -> set[str]:
        return {c for c in (self.client, self.proposers) if c is not None}

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
        self.client = change.change_id

    async def propose_by_proposer(self, admin_nc: Client) -> None:
        """`ratchet propose world`: the proposer service asks the failure store and proposes.

        Asked again only when no change of the proposer's can be on its way. A refusal (an
        answer with an error) published nothing. A request left unanswered may have been
        worked all the same (the reply lost, or the publish still riding out an election for
        up to ``PUBLISH_RETRY_S``), and asking again would propose a second change from newer
        failures: so the stream is watched for the proposer's change first, and one that
        arrives is the change (heard live, else read back from the stream). The final count
        checks that no second one was made anyway. A refusal (the failure store may not hold
        enough failures yet) is asked again a second later, until ``PROPOSE_S``."""
        assert not await proposer_changes(admin_nc)
        arrived: asyncio.Queue[str] = asyncio.Queue()

        async def on_proposed(msg: Msg) -> None:
            arrived.put_nowait(str(json.loads(msg.data)["change_id"]))

        heard = await admin_nc.subscribe(ChangeProposed.subject_of(PROPOSER), cb=on_proposed)
        await admin_nc.flush()
        deadline = time.monotonic() + PROPOSE_S
        try:
            while True:
                ran = await asyncio.to_thread(cli, self.stack, "propose", TASK)
                if ran.returncode == 0:
                    self.propose_attempts.append("proposed")
                    self.proposers = ran.stdout.split()[2]  # "proposed change <id> for ..."
                    return
                unanswered = "did not answer" in ran.stderr
                self.propose_attempts.append("unanswered" if unanswered else "refused")
                if unanswered:
                    with contextlib.suppress(TimeoutError):
                        self.proposers = await asyncio.wait_for(arrived.get(), PUBLISH_RETRY_S + 10)
                        return
                    if found := await proposer_changes(admin_nc):
                        self.proposers = found[0]
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the proposer proposed nothing: {ran.stderr}")
                await asyncio.sleep(1)  # the pace of asking again after a refusal
        finally:
            await heard.unsubscribe()

    async def follow(self, nc: Client) -> bool:
        """Approve what waits (the proposer's change once the client's was applied); whether
        both changes' trails have ended."""
        for change_id in sorted(self.ids):
            with contextlib.suppress(ClientError):
                self.trails[change_id] = [r.kind for r in await fetch_trail(nc, change_id)]
        client_trail = self.trails.get(self.client or "", [])
        for change_id in sorted(self.ids):
            kinds = self.trails.get(change_id, [])
            if "awaiting_approval" not in kinds or change_id in self.approved:
                continue
            if change_id != self.client and not ({"applied"} | ENDS) & set(client_trail):
                continue
            ran = await asyncio.to_thread(
                cli, self.stack, "approve", change_id, "--reason", "chaos"
            )
            if ran.returncode == 0:
                self.approved.add(change_id)
        return len(self.ids) == 2 and all(ENDS & set(self.trails.get(c, [])) for c in self.ids)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


async def chaos(
    stack: Stack,
    log: list[dict[str, Any]],
    stored: Callable[[], int],
    completed: Callable[[], int],
) -> None:
    """Each part killed with SIGKILL and restarted, in turn; then all of them together.

    Before each kill after the first, the stored count must pass (within ``PROGRESS_S``) the
    number of runs ``completed`` when the previous part was restarted. Stored runs are completed
    runs, so one more stored than were completed then is a run completed after the restart,
    carried through the stream, the evaluator and the failure store: every kill hits a working
    pipeline. (Merely more stored than at the restart would not do: runs completed before a
    stream leader's loss are still stored while nothing new gets published.)

    The log says, per kill, what was killed, how many runs were stored then, the count it had to
    pass and how long the test waited for that, and how many deliveries each durable consumer of
    the victims had unacknowledged (the shared durable of an executor or evaluator, with its
    other replica's part in it)."""
    nats = stack.nats
    assert nats is not None
    nc = await admin(nats)

    async def targets() -> dict[str, subprocess.Popen[bytes]]:
        leader = await nats.stream_leader()
        processes = dict(stack.processes)
        return {leader.name: leader.process, **{label: processes[label] for label in SERVICES}}

    async def ack_pending(labels: list[str]) -> dict[str, int | None]:
        pending: dict[str, int | None] = {}
        for label in labels:
            service = stack.services.get(label)
            if service is None:  # a nats-server node: no consumer of its own
                continue
            for durable, _ in ROLES[service.role].consumers:
                pending[durable] = None
                with contextlib.suppress(Exception):
                    info = await nc.jetstream().consumer_info(EVENTS_STREAM, durable, timeout=2)
                    pending[durable] = info.num_ack_pending
        return pending

    async def moved_on(since: int | None) -> float:
        """Seconds until the stored count passed ``since`` (runs completed at the restart)."""
        if since is None:
            return 0.0
        began = time.monotonic()
        try:
            await until(
                lambda: asyncio.sleep(0, result=stored() > since),
                f"the stored count moving on from {since}",
                timeout=PROGRESS_S,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; kills so far: {log}") from None
        return round(time.monotonic() - began, 1)

    async def kill_and_restart(
        victims: dict[str, subprocess.Popen[bytes]] | None, since: int | None
    ) -> int:
        waited = await moved_on(since)
        victims = victims if victims is not None else await targets()  # the leader as it is now
        pending = await ack_pending(list(victims))
        at_kill = stored()
        for process in victims.values():
            process.kill()
        for process in victims.values():
            process.wait()
        log.append(
            {"killed": list(victims), "stored": at_kill, "past": since, "waited_s": waited,
             "ack_pending": pending}
        )  # fmt: skip
        for label in victims:
            await asyncio.to_thread(stack.respawn, label)
        return max(completed(), stored())  # stored runs were completed, even ones the watch missed

    try:
        since: int | None = None
        for label, process in (await targets()).items():
            since = await kill_and_restart({label: process}, since)
        await kill_and_restart(None, since)
    finally:
        await nc.close()


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


# Measured at 197-213 s in all (145-155 s from the stack being up to the counts) on 2 cores
# shared with other tests; its own waits (60 s for runs to flow, PROPOSE_S, PROGRESS_S before
# each of six kills, FINAL_S) all fit in this, so a slow run fails with its counts rather than
# being cut off by the suite's 300 s.
@pytest.mark.timeout(600)
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
        watcher = await admin(stack.nats)
        completed: set[str] = set()  # our runs seen on `run.completed` (published, or retried)

        async def on_completed(msg: Msg) -> None:
            with contextlib.suppress(ValueError, KeyError):
                if (run_id := str(json.loads(msg.data)["run_id"])) in run_ids:
                    completed.add(run_id)

        await watcher.subscribe(RunCompleted.subject, cb=on_completed)
        await watcher.flush()
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
            await changes.propose_by_proposer(watcher)
            await chaos(
                stack,
                killed,
                stored=lambda: len(stored_runs(settings.home, run_ids)),
                completed=lambda: len(completed),
            )

            async def finished() -> bool:
                done = len(stored_runs(settings.home, run_ids)) == RUNS
                return await changes.follow(client) and done and await drained(client)

            try:
                await until(finished, "all done", timeout=FINAL_S)
            except AssertionError:
                stored = len(stored_runs(settings.home, run_ids))
                raise AssertionError(
                    f"within {FINAL_S:g}s: {stored} of {RUNS} runs stored, changes "
                    f"{changes.trails}, consumers drained: {await drained(client)}; restarts "
                    f"{restarts}; kills {killed}"
                ) from None
        finally:
            keeper.cancel()
            await client.close()
            await watcher.close()
        counts = await count(stack, settings.home, run_ids, changes)
        counts.update(
            seconds=round(time.monotonic() - began, 1),
            killed=killed,
            restarted_after_exiting=restarts,
            in_flight_at_last_kill=RUNS - killed[-1]["stored"],
            propose_attempts=changes.propose_attempts,
            settings={"runs": RUNS, "latency_s": LATENCY_S, "executors": 2, "evaluators": 2,
                      "nodes": 3, "replicas": stack.nats.replicas, "ack_wait_s": 10.0,
                      "progress_s": PROGRESS_S},
        )  # fmt: skip
    finally:
        await asyncio.to_thread(stack.stop)
    (tmp_path / "chaos-counts.json").write_text(json.dumps(counts, indent=2))
    print(
        "\nchaos: requested {requested}, stored {stored}, duplicates {duplicates}, lost {lost}, "
        "dead-lettered {dead_lettered} (sent there on purpose {poisoned}); failures {failures}, "
        "failure.logged {failure_logged}; changes proposed {changes_proposed}, applied "
        "{changes_applied}, duplicated {change_duplicates}; {seconds}s".format(**counts)
    )
    for change_id, kinds in counts["trails"].items():
        who = "client" if change_id == changes.client else "proposer"
        print(f"  {who}'s change {change_id}: {', '.join(kinds)}")
    for kill_ in counts["killed"]:
        print(
            f"  killed {', '.join(kill_['killed'])} with {kill_['stored']} of {RUNS} runs stored "
            f"(waited {kill_['waited_s']}s for the count to pass {kill_['past']}); unacknowledged "
            f"{kill_['ack_pending'] or '-'}"
        )
    print(f"  `ratchet propose`: {counts['propose_attempts']}; restarted {restarts or 'none'}")
    print(f"counts written to {tmp_path / 'chaos-counts.json'}")
    assert counts["in_flight_at_last_kill"] > 0, counts  # the chaos hit runs in flight
    for before, kill_ in itertools.pairwise(killed):  # each kill on a working pipeline
        assert kill_["stored"] > kill_["past"] >= before["stored"], counts
    assert counts["stored"] == counts["requested"] == RUNS
    assert (counts["lost"], counts["duplicates"]) == (0, 0), counts
    assert counts["dead_lettered"] == counts["poisoned"] == POISONED, counts
    assert counts["failure_logged"] == counts["failures"] == counts["failures_expected"], counts
    assert (counts["failure_logged_twice"], counts["failure_logged_missing"]) == (0, 0), counts
    # exactly the two changes the test made, whatever their ids: a proposal made again (a retry
    # after a lost reply, a redelivery turned into a new change) would add an id here
    assert changes.client is not None and changes.proposers is not None
    assert set(counts["proposed_ids"]) == changes.ids and len(changes.ids) == 2, counts
    assert counts["change_duplicates"] == 0, counts
    assert counts["trails"][changes.client] == KEPT, counts
    assert counts["trails"][changes.proposers] in (STALE, INVALID), counts
    assert counts["applied_ids"] == [changes.client], counts


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
        trails = {c: [r.kind for r in await fetch_trail(nc, c)] for c in sorted(changes.ids)}
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
        "changes_proposed": len(proposed),
        "proposed_ids": sorted(proposed),
        "changes_applied": len(applied),
        "applied_ids": sorted(applied),
        "trails": trails,
        "change_duplicates": (
            sum(n - 1 for n in proposed.values())
            + sum(n - 1 for n in applied.values())
            + sum(n - 1 for n in recorded.values())
            + len(audited_twice)
        ),
        "gate_runs_completed": sum(n for r, n in completed.items() if r not in run_ids),
    }

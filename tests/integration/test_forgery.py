"""Issue 7, point 7: a measurement nobody can forge, tried as the forger on a real stack.

The forger holds the least-privileged ``client`` role (and, for the decisions, the credentials
of the approver ``operator``). The agent is the scripted prompt-sensitive model and the proposer
``proposer-harm``, whose candidate ("Explain your reasoning ...") truly fails every case. Before
the gate's fix, a client that published runs with the gate's predictable ids and checks it
chose, first, turned that measurement into a clear win; the policy approver approved it and the
harmful prompt went live.

Proposals are asked for with ``query.propose`` (the threshold is set out of reach), so that the
failures the forger's own flood logs never trigger further changes, and so that the forger can
predict the change id (a hash of the task and the failures it made) and flood before the change
exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import cli, policy_approver
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from ratchet.cli.client import ClientError, fetch_trail, submit_and_wait
from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    ChangeApproved,
    ChangeAwaitingApproval,
    ChangeDecision,
    ChangeProposed,
    ChangeRejected,
    Check,
    GateRunRequested,
    Measurement,
    RunContext,
    RunRequested,
    RunScored,
)
from ratchet.messaging import connect, inbox_prefix
from ratchet.natsconf import approver_user
from ratchet.natsproc import free_port
from ratchet.prompts import read_current
from ratchet.queries import ProposeReply, ProposeRequest
from ratchet.settings import GateSettings, ModelSettings, Settings
from ratchet.suites import load_suite

REPO = Path(__file__).resolve().parents[2]
DEMO = load_suite(REPO / "config" / "suites" / "demo.json")
EXACT_LEARN = [c for c in DEMO.learn if c.check.kind == "exact"]
HARM_PROMPT = "Explain your reasoning in detail before you give any answer."
PASS_ANYTHING = Check(kind="regex", expected=".*")
PASS_NOTHING = Check(kind="regex", expected="(?!)")
HONEST_FAILURES = 5
FORGER = "operator"  # the approver whose credentials the forger holds


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:prompt-sensitive"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-harm"),
        min_failures_to_propose=1_000_000,  # proposals only when asked (see the module doc)
        gate=GateSettings(run_timeout_s=60),
    )
    running = start_stack(settings)
    yield running
    running.stop()


class Forger:
    """The ``client`` connection, and everything that role may read, as it arrives."""

    def __init__(self) -> None:
        self.nc: Client | None = None
        self.violations: list[str] = []
        self.completed: set[str] = set()
        self.scored: dict[str, RunScored] = {}
        self.failures: set[str] = set()
        self.letters: list[dict[str, Any]] = []
        self.proposed: list[ChangeProposed] = []
        self.awaiting: list[ChangeAwaitingApproval] = []

    async def open(self, stack: Stack) -> Client:
        assert stack.nats is not None

        async def on_error(exc: Exception) -> None:
            self.violations.append(str(exc))

        nc = await nats.connect(
            stack.nats.url,
            user="client",
            password=stack.nats.passwords["client"],
            error_cb=on_error,
            name="forger",
            inbox_prefix=inbox_prefix("client"),  # the only inbox the client may hear
        )
        self.nc = nc
        handlers: dict[str, Callable[[Any], None]] = {
            "run.completed": lambda m: self.completed.add(json.loads(m.data)["run_id"]),
            "run.scored": self._on_scored,
            "failure.logged": lambda m: self.failures.add(json.loads(m.data)["run_id"]),
            "dlq.>": lambda m: self.letters.append(json.loads(m.data)),
            ChangeProposed.subject_of("*"): lambda m: self.proposed.append(
                ChangeProposed.model_validate_json(m.data)
            ),
            "change.awaiting_approval": lambda m: self.awaiting.append(
                ChangeAwaitingApproval.model_validate_json(m.data)
            ),
        }
        for subject, handle in handlers.items():

            async def callback(msg: Any, handle: Callable[[Any], None] = handle) -> None:
                handle(msg)

            await nc.subscribe(subject, cb=callback)
        await nc.flush()
        return nc

    def _on_scored(self, msg: Any) -> None:
        score = RunScored.model_validate_json(msg.data)
        self.scored.setdefault(score.run_id, score)

    async def publish_runs(self, requests: list[RunRequested]) -> None:
        """Publish live run requests; the stream must accept every one."""
        assert self.nc is not None
        js = self.nc.jetstream()
        for start in range(0, len(requests), 200):
            await asyncio.gather(
                *(
                    js.publish(
                        r.subject,
                        r.model_dump_json().encode(),
                        headers={"Nats-Msg-Id": f"{r.subject}:{r.id}"},
                        timeout=10,
                    )
                    for r in requests[start : start + 200]
                )
            )


@pytest.fixture
async def forger(stack: Stack) -> AsyncIterator[Forger]:
    watcher = Forger()
    nc = await watcher.open(stack)
    yield watcher
    await nc.close()


async def until(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Wait until ``condition()`` holds, checking every 50 ms up to ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def trail_until(
    nc: Client, change_id: str, done: Callable[[list[str]], bool], what: str, timeout: float = 60
) -> list[str]:
    """The change's audit kinds (the query ``ratchet show`` uses), once ``done`` holds for them."""
    deadline = asyncio.get_running_loop().time() + timeout
    kinds: list[str] = []
    while True:
        try:
            kinds = [r.kind for r in await fetch_trail(nc, change_id)]
        except ClientError:
            kinds = []  # the gatekeeper has not seen the change yet
        if done(kinds):
            return kinds
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{change_id}: timed out waiting for {what}; trail {kinds}")
        await asyncio.sleep(0.2)


async def cli_json(stack: Stack, *args: str) -> Any:
    done = await asyncio.to_thread(cli, stack, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def status_of(stack: Stack, change_id: str) -> str:
    changes = await cli_json(stack, "changes")
    return str(next(c["status"] for c in changes if c["change_id"] == change_id))


async def make_honest_failures(nc: Client) -> list[str]:
    """Live runs that truly fail (the initial prompt wraps answers in words), with run ids the
    forger chose; returns them once each is scored and logged as a failure."""
    run_ids = [f"forger-failure-{i}-{secrets.token_hex(4)}" for i in range(HONEST_FAILURES)]
    for run_id, case in zip(run_ids, EXACT_LEARN, strict=False):
        request = RunRequested(run_id=run_id, task=DEMO.name, input=case.input, check=case.check)
        _, score, _ = await submit_and_wait(nc, request, timeout=30, threshold=0.7)
        assert score.score == 0.0
    return run_ids


def predicted_change_id(failure_run_ids: list[str]) -> str:
    """What the proposer will call a change made from these failures (it is public code)."""
    return hashlib.sha256(json.dumps([DEMO.name, sorted(failure_run_ids)]).encode()).hexdigest()[
        :16
    ]


def forged_runs(change_id: str, arms: tuple[str, ...]) -> list[RunRequested]:
    """Live runs dressed as the change's gate runs, with the change, arm and case in their
    context, under ids of the shapes gate runs had before they started with ``gate:``
    (``<change>.<arm>.<case>``, ``<change>.<nonce>.measure.<arm>.<case>.0``), which no live run
    can take any more (``test_a_client_cannot_take_the_gate_run_ids_it_reads``): what this
    shows is that live runs claiming a gate context, with checks the forger chose, never count.
    The candidate arm gets the candidate prompt and a check that passes
    anything; the current arm a check that passes nothing."""
    nonces = ["0" * 32, secrets.token_hex(16)]
    forged = []
    for case in DEMO.gate:
        for arm in arms:
            ids = [f"{change_id}.{arm}.{case.id}", f"{change_id}.{arm}.{case.id}.0"]
            ids += [f"{change_id}.{nonce}.measure.{arm}.{case.id}.0" for nonce in nonces]
            for run_id in ids:
                forged.append(
                    RunRequested(
                        run_id=run_id,
                        task=DEMO.name,
                        input=case.input,
                        check=PASS_ANYTHING if arm == "candidate" else PASS_NOTHING,
                        candidate_prompt=HARM_PROMPT if arm == "candidate" else None,
                        context=RunContext(
                            change_id=change_id, case_id=case.id, stage="measure", arm=arm
                        ),
                    )
                )
    return forged


async def propose(nc: Client) -> ChangeProposed:
    reply = await nc.request(
        "query.propose", ProposeRequest(task=DEMO.name).model_dump_json().encode(), timeout=30
    )
    proposal = ProposeReply.model_validate_json(reply.data)
    assert proposal.change is not None, proposal.error
    return proposal.change


def honest_current_passes(case_id: str) -> bool:
    """Whether the initial prompt's answer ("The answer is: X.") passes the case's own check:
    of the demo gate's kinds (exact, any_of, json_shape, number), only number reads one out of
    words."""
    case = next(c for c in DEMO.gate if c.id == case_id)
    return bool(case.check.kind == "number")


async def test_a_client_cannot_forge_the_measurement(stack: Stack, forger: Forger) -> None:
    assert forger.nc is not None
    nc = forger.nc
    with policy_approver(stack.settings):
        # 1. the gate's own subject is closed to the client: the server refuses the publish
        refused = GateRunRequested(
            run_id=f"gate:forged-{secrets.token_hex(4)}",
            task=DEMO.name,
            input=DEMO.gate[0].input,
            check=PASS_ANYTHING,
            candidate_prompt=HARM_PROMPT,
            context=RunContext(purpose="gate", case_id=DEMO.gate[0].id, stage="measure"),
        )
        with pytest.raises(NatsTimeoutError):  # a refused publish is never acknowledged
            await nc.jetstream().publish(
                refused.subject, refused.model_dump_json().encode(), timeout=1.0
            )
        await until(
            lambda: any(
                "permissions violation" in v.lower() and "run.gate.requested" in v
                for v in forger.violations
            ),
            "the server's permissions violation",
            timeout=5,
        )

        # 2. a gate-purpose run on the live subject is dead-lettered with the reason
        disguised = refused.model_copy(update={"run_id": f"disguised-{secrets.token_hex(4)}"})
        await nc.jetstream().publish(
            RunRequested.subject,
            disguised.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{RunRequested.subject}:{disguised.id}"},
            timeout=5,
        )

        def letters_for(run_id: str) -> list[dict[str, Any]]:
            return [
                letter
                for letter in forger.letters
                if letter["subject"] == RunRequested.subject
                and json.loads(letter["payload"])["run_id"] == run_id
            ]

        await until(lambda: letters_for(disguised.run_id), "dlq.run.requested", timeout=30)
        [letter] = letters_for(disguised.run_id)
        assert letter["deliveries"] == 1
        assert "malformed" in letter["reason"] and "live runs only" in letter["reason"]

        # 3. the forger makes the failures the proposal learns from, so it knows the change id
        failures = await make_honest_failures(nc)
        change_id = predicted_change_id(failures)

        # 4. before the change exists: flood its candidate arm under every guessable id
        before = forged_runs(change_id, ("candidate",))
        await forger.publish_runs(before)
        change = await propose(nc)
        assert change.change_id == change_id  # the forger did know the id in advance
        assert change.proposed_prompt == HARM_PROMPT

        # 5. while it is measured: flood both arms (candidate passes anything, current nothing)
        during = forged_runs(change_id, ("candidate", "current"))
        await forger.publish_runs(during)

        kinds = await trail_until(
            nc, change_id, lambda k: "rejected" in k or "approved" in k, "a decision"
        )

    # the measurement is the honest one: the candidate passed nothing, the verdict is no win
    trail = await cli_json(stack, "show", change_id)
    by_kind = {r["kind"]: r for r in trail}
    measurement = Measurement.model_validate(by_kind["measured"]["payload"])
    assert measurement.verdict != "superior", measurement
    assert measurement.candidate_passes == 0 and measurement.fixed == []
    assert measurement.current_passes == len(measurement.broken) > 0
    assert all(honest_current_passes(case_id) for case_id in measurement.broken)
    assert measurement.unscored == 0
    assert measurement.runs == 2 * measurement.cases * measurement.repeats

    # every forged run really ran and was scored, as the live run it is, with the forger's checks
    assert (len(before), len(during)) == (len(DEMO.gate) * 4, len(DEMO.gate) * 8)
    forged = {r.run_id: r for r in [*before, *during]}  # some guesses repeat across the floods
    await until(lambda: forged.keys() <= forger.scored.keys(), "every forged run scored")
    for run_id, request in forged.items():
        score = forger.scored[run_id]
        assert score.context.purpose == "live"
        assert score.score == (1.0 if request.check == PASS_ANYTHING else 0.0), run_id

    # and the forger's scores were arriving while it was measured
    proposed_at = change.created_at
    measured_at = datetime.fromisoformat(by_kind["measured"]["at"])
    overlapping = [s for s in forger.scored.values() if s.run_id in forged]
    overlapping = [s for s in overlapping if proposed_at <= s.created_at <= measured_at]
    assert overlapping, "no forged score arrived during the measurement"

    # the proposer service proposed it (its own subject), and the forger saw that proposal
    assert by_kind["received"]["actor"] == "proposer"
    assert [p.change_id for p in forger.proposed] == [change_id]
    # the policy approver rejected it; nothing was applied
    assert "approved" not in kinds and "applied" not in kinds
    assert by_kind["rejected"]["actor"] == "policy"
    assert "not shown better" in by_kind["rejected"]["payload"]["reason"]
    assert await status_of(stack, change_id) == "rejected"
    current = await read_current(nc.jetstream(), DEMO.name)
    assert current is not None and current.record.kind == "initial"
    assert current.record.text == DEMO.prompt

    # neither the refused gate run nor the disguised one ever ran
    for run_id in (refused.run_id, disguised.run_id):
        assert run_id not in forger.completed and run_id not in forger.scored
    assert len(letters_for(disguised.run_id)) == 1


async def test_a_client_cannot_take_the_gate_run_ids_it_reads(stack: Stack, forger: Forger) -> None:
    """Found in review: the client may read ``run.scored``, so the first gate scores showed it
    the change's nonce, and a live run published under a gate run id not yet requested
    completed first; JetStream then dropped the gate run's own ``run.completed`` as a repeat of
    that id, and the measurement waited for scores that never came (a change held for about an
    hour, then dead-lettered). Gate run ids now start with ``gate:``, and no live run may have a
    ':' in its id: the forged requests are dead-lettered with the reason and the measurement is
    whole."""
    assert forger.nc is not None
    nc = forger.nc
    await make_honest_failures(nc)
    change = await propose(nc)
    await until(
        lambda: any(s.context.purpose == "gate" for s in forger.scored.values()),
        "the first gate score",
    )
    seen = next(s.run_id for s in forger.scored.values() if s.context.purpose == "gate")
    prefix = seen[: seen.index(".measure.")]  # gate:<change>.<nonce>, read off the wire
    assert prefix.startswith(f"gate:{change.change_id}.")
    forged = [
        {
            "id": f"forged-{secrets.token_hex(8)}",
            "run_id": f"{prefix}.measure.{arm}.{case.id}.0",
            "task": DEMO.name,
            "input": case.input,
            "check": (PASS_ANYTHING if arm == "candidate" else PASS_NOTHING).model_dump(),
        }
        for case in DEMO.gate
        for arm in ("candidate", "current")
    ]
    js = nc.jetstream()
    for body in forged:  # raw JSON: the client's own copy of the contract would refuse them
        await js.publish(
            RunRequested.subject,
            json.dumps(body).encode(),
            headers={"Nats-Msg-Id": f"{RunRequested.subject}:{body['id']}"},
            timeout=10,
        )
    forged_ids = {str(body["run_id"]) for body in forged}

    def letters() -> list[dict[str, Any]]:
        return [
            letter
            for letter in forger.letters
            if letter["subject"] == RunRequested.subject
            and json.loads(letter["payload"])["run_id"] in forged_ids
        ]

    await until(lambda: len(letters()) == len(forged), "every forged request dead-lettered")
    assert all("may not contain ':'" in letter["reason"] for letter in letters())
    await trail_until(nc, change.change_id, lambda k: "measured" in k, "the measurement")
    trail = await cli_json(stack, "show", change.change_id)
    measurement = Measurement.model_validate(
        next(r for r in trail if r["kind"] == "measured")["payload"]
    )
    assert measurement.unscored == 0
    assert measurement.runs == 2 * measurement.cases * measurement.repeats
    # every gate run the client saw scored was scored as the gate run it is, once
    gate_scores = [s for s in forger.scored.values() if s.run_id.startswith("gate:")]
    assert gate_scores and all(s.context.purpose == "gate" for s in gate_scores)
    assert len(letters()) == len(forged)


async def decide(
    stack: Stack, kind: type[ChangeDecision], change_id: str, evidence: str, reason: str
) -> ChangeDecision:
    """Publish a decision as the approver ``operator``, naming ``evidence``; the stream accepts
    it."""
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for(approver_user(FORGER)), name="test-approver")
    try:
        decision = kind(change_id=change_id, reason=reason, evidence_sha256=evidence)
        await nc.jetstream().publish(
            decision.subject_of(FORGER),
            decision.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{decision.subject}:{decision.id}"},
            timeout=5,
        )
        return decision
    finally:
        await nc.close()


async def test_an_early_or_mismatched_decision_is_refused(stack: Stack, forger: Forger) -> None:
    assert forger.nc is not None
    nc = forger.nc
    await make_honest_failures(nc)
    evaluator = dict(stack.processes)["evaluator"]

    def refusals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["kind"] == "decision_refused"]

    # hold the evaluator, so the measurement cannot finish while the early approval arrives
    os.kill(evaluator.pid, signal.SIGSTOP)
    try:
        change = await propose(nc)
        kinds = await trail_until(nc, change.change_id, lambda k: "received" in k, "received")
        assert "measured" not in kinds
        await decide(stack, ChangeApproved, change.change_id, "ab" * 32, "before the evidence")
        kinds = await trail_until(
            nc, change.change_id, lambda k: "decision_refused" in k, "the early refusal"
        )
        assert "measured" not in kinds and "approved" not in kinds
    finally:
        os.kill(evaluator.pid, signal.SIGCONT)

    await trail_until(nc, change.change_id, lambda k: "awaiting_approval" in k, "the evidence")
    await until(lambda: forger.awaiting, "change.awaiting_approval")
    [awaiting] = forger.awaiting
    evidence = awaiting.evidence_sha256
    assert awaiting.change_id == change.change_id
    assert evidence == awaiting.measurement.sha256()  # an approver can check what it names

    # evidence the forger would rather approve: the same measurement, called a win
    flattering = awaiting.measurement.model_copy(
        update={"verdict": "superior", "candidate_passes": awaiting.measurement.cases}
    )
    assert flattering.sha256() != evidence
    await decide(stack, ChangeApproved, change.change_id, flattering.sha256(), "looks better")
    await trail_until(
        nc,
        change.change_id,
        lambda k: k.count("decision_refused") == 2,
        "the mismatched refusal",
    )
    assert await status_of(stack, change.change_id) == "awaiting_approval"
    current = await read_current(nc.jetstream(), DEMO.name)
    assert current is not None and current.record.kind == "initial"

    # the right evidence is accepted
    await decide(stack, ChangeRejected, change.change_id, evidence, "measured worse")
    kinds = await trail_until(nc, change.change_id, lambda k: "rejected" in k, "the rejection")
    assert "approved" not in kinds and "applied" not in kinds
    assert await status_of(stack, change.change_id) == "rejected"

    trail = await cli_json(stack, "show", change.change_id)
    early, mismatched = refusals(trail)
    assert early["actor"] == mismatched["actor"] == FORGER
    assert "no evidence yet" in early["payload"]["why"]
    assert "other evidence" in mismatched["payload"]["why"]
    kinds = [r["kind"] for r in trail]
    assert kinds.index("decision_refused") < kinds.index("measured")  # refused before evidence
    rejected = next(r for r in trail if r["kind"] == "rejected")
    assert rejected["payload"]["evidence_sha256"] == evidence
    shown = await asyncio.to_thread(cli, stack, "show", change.change_id)
    assert shown.stdout.count(f"refused decision by {FORGER}") == 2
    current = await read_current(nc.jetstream(), DEMO.name)
    assert current is not None and current.record.kind == "initial"

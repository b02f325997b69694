"""The canary in the gatekeeper's graph, in process: no NATS, the fake world of test_gate_graph.

An approved change is applied as a canary (the record carries the stable text and version), the
``canary`` node starts counting, and the thread waits at ``canary_verdict`` until live scores fed
to ``GateRunner.on_scored`` (as the ``run.scored`` handler would) let the canary's test decide;
then it promotes or rolls back. Crashes are injected once at every side effect and the message
that was being handled is redelivered, as in test_gate_graph; a restarted gatekeeper (its
ledger reopened from the file) continues the counts and finishes a canary decided before the
crash.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_gate_graph import (
    BAD,
    BASE,
    GOOD,
    KEPT,
    PROPOSER,
    TASK,
    CrashWhen,
    Harness,
    InjectedCrash,
    after_write,
    approval,
    auditing,
    open_ledger_and_store,
    proposal,
    propose_and_approve,
    publishing,
    stage_requests,
)

from ratchet import canary
from ratchet.contracts import (
    CanaryStats,
    ChangeAwaitingApproval,
    ChangeCanaryRolledBack,
    ChangeCanaryStarted,
    ChangeKept,
    ChangePromoted,
    ChangeRecorded,
    ChangeRejected,
    Event,
    RunContext,
    RunScored,
    TokenUsage,
)
from ratchet.prompts import Canary
from ratchet.queries import summarize
from ratchet.settings import GateSettings
from ratchet_gatekeeper.graph import build_gate_graph
from ratchet_gatekeeper.ledger import GateLedger
from ratchet_gatekeeper.runner import GateRunner

STABLE, CANARY = 1, 2  # the base version and the version the change is applied as
NO_VERIFY = ["received", "measured", "awaiting_approval", "approved", "applied", "holdout"]
PROMOTED = [*KEPT, "canary", "promoted"]
ROLLED_BACK = [*NO_VERIFY, "canary", "canary_rolled_back"]


def canary_settings(**changes: Any) -> GateSettings:
    fields: dict[str, Any] = {
        "looks": 4, "max_cases": 200, "verify_reserve": 20, "run_timeout_s": 10.0,
        "canary_share": 0.5, "canary_margin": 0.05, "canary_alpha": 0.05,
        "canary_max_runs": 5000,
    }  # fmt: skip
    return GateSettings(**{**fields, **changes})


def in_canary(h: Harness, **changes: Any) -> Harness:
    """The harness's gatekeeper with canaries on (the graph reads its gate's settings)."""
    h.gate.settings = canary_settings(**changes)
    return h


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    ledger, store = await open_ledger_and_store(tmp_path)
    h = in_canary(Harness(ledger=ledger, store=store))
    yield h
    for task in h.bus.pending:
        task.cancel()
    await h.ledger.close()
    await store.close()


def live(
    n: int, version: int, score: float | None, *, tokens: int = 0, task: str = TASK
) -> RunScored:
    """The score of live run ``n`` that used ``version``, as the evaluator publishes it."""
    return RunScored(
        id=f"live-{n}.scored",
        run_id=f"live-{n}",
        task=task,
        context=RunContext(),
        score=score,
        scorer="check:exact",
        prompt_version=version,
        judge_usage=TokenUsage(input_tokens=tokens, output_tokens=0),
    )


def better_traffic(n: int) -> list[RunScored]:
    """Live runs alternating between the versions: the stable one passes half, the canary all."""
    return [live(i, CANARY, 1.0) if i % 2 else live(i, STABLE, float(i % 4 == 0)) for i in range(n)]


def worse_traffic(n: int) -> list[RunScored]:
    """The stable version passes every run, the canary none."""
    return [live(i, CANARY, 0.0) if i % 2 else live(i, STABLE, 1.0) for i in range(n)]


def deciding_run(scores: list[RunScored], **settings: Any) -> tuple[int, CanaryStats]:
    """How many of ``scores`` the test counts before it decides, and its verdict, replayed with
    ratchet.canary itself."""
    g = canary_settings(**settings)
    totals = {STABLE: [0, 0.0], CANARY: [0, 0.0]}
    for n, score in enumerate(scores, 1):
        assert score.prompt_version is not None and score.score is not None
        totals[score.prompt_version][0] += 1
        totals[score.prompt_version][1] += score.score
        stats = canary.evaluate(
            stable_version=STABLE,
            canary_version=CANARY,
            stable_runs=int(totals[STABLE][0]),
            stable_score=totals[STABLE][1],
            canary_runs=int(totals[CANARY][0]),
            canary_score=totals[CANARY][1],
            margin=g.canary_margin,
            alpha=g.canary_alpha,
            max_runs=g.canary_max_runs,
        )
        if stats.verdict != "running":
            return n, stats
    raise AssertionError("the test never decided on these scores")


async def feed(h: Harness, scores: list[RunScored]) -> None:
    """Each score delivered until its handler succeeds, as JetStream would."""
    for score in scores:
        await h.deliver(lambda score=score: h.runner.on_scored(score))


async def status(h: Harness, change_id: str) -> tuple[str, tuple[str, ...]]:
    values, pending = await h.runner.status(change_id)
    return values["status"], pending


def events(h: Harness, kind: type[Event], change_id: str) -> list[Any]:
    return [e for e in h.bus.of_type(kind) if getattr(e, "change_id", None) == change_id]


async def assert_done_once(
    h: Harness, change_id: str, *, trail: list[str], writes: list[str], final: str
) -> None:
    """Every error was the one injected crash, and every side effect happened once."""
    assert all(isinstance(e, InjectedCrash) for e in h.errors), h.errors
    assert len(h.errors) == len(h.crashes) <= 1
    assert await status(h, change_id) == (final, ())
    assert [w.kind for w in h.prompts.writes] == writes
    assert await h.kinds(change_id) == trail
    for kind in (ChangeCanaryStarted, ChangePromoted, ChangeCanaryRolledBack, ChangeKept):
        assert len({e.id for e in events(h, kind, change_id)}) <= 1, kind
    records = await h.store.audit(change_id)
    announced = {(e.id, e.seq) for e in events(h, ChangeRecorded, change_id)}
    assert announced == {(f"{change_id}.recorded.{r.seq}", r.seq) for r in records}
    assert await h.ledger.unfinished() == []


# --- the paths ---------------------------------------------------------------------------------


async def test_an_approved_change_serves_its_share_and_is_promoted_once_shown_not_worse(
    harness: Harness,
) -> None:
    h = harness
    change = proposal(GOOD)
    await propose_and_approve(h, change)

    # applied as a canary: the new text for half the keys, the stable text and version carried
    stored = h.prompts.latest(TASK)
    assert (stored.version, stored.record.text, stored.record.kind) == (CANARY, GOOD, "change")
    assert stored.record.canary == Canary(share=0.5, stable_version=STABLE, stable_text=BASE)
    # the offline checks ran on the record's own text (gate runs are not split)
    verify = [r for r in stage_requests(h, "verify") if r.context.arm == "candidate"]
    assert verify and all(r.min_prompt_version == CANARY for r in verify)
    assert events(h, ChangeKept, change.change_id)[0].applied_passes > 0
    # then the canary started, and the thread waits for its verdict
    assert await status(h, change.change_id) == ("canary", ("canary_verdict",))
    assert await h.kinds(change.change_id) == [*KEPT, "canary"]
    [started] = events(h, ChangeCanaryStarted, change.change_id)
    assert (started.version, started.stable_version, started.share) == (CANARY, STABLE, 0.5)
    assert (started.margin, started.max_runs) == (0.05, 5000)
    canary_record = (await h.store.audit(change.change_id))[-1]
    assert canary_record.payload == {**started.model_dump(mode="json"), "alpha": 0.05}

    # live traffic decides it; the scores after the deciding one are not counted
    traffic = better_traffic(400)
    decided_at, expected = deciding_run(traffic)
    assert 10 < decided_at < 200
    await feed(h, traffic[: decided_at - 1])
    assert await status(h, change.change_id) == ("canary", ("canary_verdict",))
    await feed(h, traffic[decided_at - 1 :])
    await feed(h, traffic)  # every score again: redelivered, nothing changes

    promoted = h.prompts.latest(TASK)
    assert (promoted.version, promoted.record.kind) == (CANARY + 1, "promotion")
    assert promoted.record.text == GOOD and promoted.record.canary is None
    assert promoted.record.change_id == change.change_id
    [event] = events(h, ChangePromoted, change.change_id)
    assert event.stats == expected and event.version == CANARY + 1
    assert event.stats.stable_runs + event.stats.canary_runs == decided_at
    assert event.reason == canary.describe(expected)
    [record] = [r for r in await h.store.audit(change.change_id) if r.kind == "promoted"]
    assert record.payload == event.model_dump(mode="json")
    await assert_done_once(
        h, change.change_id, trail=PROMOTED, writes=["change", "promotion"], final="promoted"
    )


async def test_a_worse_change_approved_anyway_is_rolled_back_by_the_canary(
    harness: Harness,
) -> None:
    """With no check after applying (verify_cases 0), the canary alone catches it."""
    h = in_canary(harness, verify_cases=0)
    change = proposal(BAD)
    await propose_and_approve(h, change)
    assert stage_requests(h, "verify") == []
    assert await h.kinds(change.change_id) == [*NO_VERIFY, "canary"]

    traffic = worse_traffic(200)
    decided_at, expected = deciding_run(traffic)
    await feed(h, traffic)

    assert expected.verdict == "worse"
    rolled_back = h.prompts.latest(TASK)
    assert (rolled_back.version, rolled_back.record.kind) == (CANARY + 1, "rollback")
    assert rolled_back.record.text == BASE and rolled_back.record.canary is None
    [event] = events(h, ChangeCanaryRolledBack, change.change_id)
    assert event.stats == expected and event.version == CANARY + 1
    assert event.stats.stable_runs + event.stats.canary_runs == decided_at
    assert "shown worse: rolled back" in event.reason
    assert events(h, ChangePromoted, change.change_id) == []
    await assert_done_once(
        h,
        change.change_id,
        trail=ROLLED_BACK,
        writes=["change", "rollback"],
        final="canary_rolled_back",
    )


async def test_a_reviewer_stops_a_canary_by_rejecting_the_change(harness: Harness) -> None:
    """A rejection while the change is in canary stops it: the stable text is served again at
    once (no waiting for the test), the trail says who stopped it and why, and a redelivered
    rejection or later live scores change nothing."""
    h = harness
    change = proposal(GOOD)
    approved = await propose_and_approve(h, change)
    traffic = better_traffic(6)  # a few live runs, far from a verdict
    await feed(h, traffic)
    assert await status(h, change.change_id) == ("canary", ("canary_verdict",))

    stop = ChangeRejected(
        change_id=change.change_id,
        reason="customers complain about the tone",
        evidence_sha256=approved.evidence_sha256,
    )
    assert await h.runner.on_decision(stop, approved=False, approver="bob") is True
    # redelivered: the change is over, the decision is ignored
    assert await h.runner.on_decision(stop, approved=False, approver="bob") is False
    await feed(h, better_traffic(400))  # the canary is over: nothing more counts

    rolled_back = h.prompts.latest(TASK)
    assert (rolled_back.version, rolled_back.record.kind) == (CANARY + 1, "rollback")
    assert rolled_back.record.text == BASE and rolled_back.record.canary is None
    [event] = events(h, ChangeCanaryRolledBack, change.change_id)
    assert event.stats.verdict == "stopped"
    assert event.stats.stable_runs + event.stats.canary_runs == len(traffic)
    assert event.reason.startswith("stopped by a reviewer: rolled back")
    [stopped] = [r for r in await h.store.audit(change.change_id) if r.kind == "canary_stopped"]
    assert stopped.actor == "bob"
    assert stopped.payload["approver"] == "bob"
    assert stopped.payload["reason"] == "customers complain about the tone"
    assert await h.kinds(change.change_id) == [
        *KEPT,
        "canary",
        "canary_stopped",
        "canary_rolled_back",
    ]
    assert [w.kind for w in h.prompts.writes] == ["change", "rollback"]
    assert await status(h, change.change_id) == ("canary_rolled_back", ())
    assert await h.ledger.unfinished() == []


async def test_a_rejection_wins_over_a_verdict_the_thread_has_not_taken(harness: Harness) -> None:
    """Found in review: the test had decided "not worse" (a crash, or another gatekeeper's
    lease, kept the thread from taking it), a reviewer rejected, and the change was promoted
    with "canary_stopped" in its trail. A person's rejection wins: rolled back, said once."""
    h = harness
    change = proposal(GOOD)
    approved = await propose_and_approve(h, change)
    traffic = better_traffic(400)
    decided_at, expected = deciding_run(traffic)
    for score in traffic[:decided_at]:  # counted, decided, not taken (no finish_canary)
        await h.ledger.count_live(score)
    tally = await h.ledger.canary(change.change_id)
    assert tally is not None and tally.decided == expected and expected.verdict == "not_worse"

    stop = ChangeRejected(
        change_id=change.change_id, reason="stop it", evidence_sha256=approved.evidence_sha256
    )
    assert await h.runner.on_decision(stop, approved=False, approver="bob") is True

    assert events(h, ChangePromoted, change.change_id) == []
    [event] = events(h, ChangeCanaryRolledBack, change.change_id)
    assert event.stats.verdict == "stopped"
    assert h.prompts.latest(TASK).record.kind == "rollback"
    kinds = await h.kinds(change.change_id)
    assert kinds[-2:] == ["canary_stopped", "canary_rolled_back"]
    assert kinds.count("canary_stopped") == 1


async def test_a_canary_not_shown_no_worse_within_its_runs_is_rolled_back(
    harness: Harness,
) -> None:
    h = in_canary(harness, verify_cases=0, canary_max_runs=10)
    change = proposal(GOOD)
    await propose_and_approve(h, change)
    equal = [live(i, CANARY if i % 2 else STABLE, float(i % 4 < 2)) for i in range(40)]
    await feed(h, equal)
    [event] = events(h, ChangeCanaryRolledBack, change.change_id)
    assert event.stats.verdict == "undecided" and event.stats.canary_runs == 10
    assert "not shown no worse within its runs" in event.reason
    assert h.prompts.latest(TASK).record.text == BASE


async def test_only_each_scored_live_run_of_the_two_versions_counts_once(
    harness: Harness, tmp_path: Path
) -> None:
    h = in_canary(harness, verify_cases=0)
    change = proposal(GOOD)
    await propose_and_approve(h, change)
    gate_score = live(900, CANARY, 1.0).model_copy(
        update={"context": RunContext(purpose="gate", change_id="other", case_id="g001")}
    )
    await feed(
        h,
        [
            live(1, STABLE, 1.0, tokens=7),
            live(1, STABLE, 1.0, tokens=7),  # the same run again
            live(2, CANARY, 0.5, tokens=5),
            live(3, CANARY, None),  # unscored
            live(4, CANARY + 5, 1.0),  # another version (not served by this canary)
            live(5, STABLE, 1.0, task="other-task"),  # another task
            gate_score,  # a gate run nobody issued
        ],
    )
    [tally] = await h.ledger.unfinished()
    stats = tally.stats()
    assert (stats.stable_runs, stats.stable_score, stats.canary_runs, stats.canary_score) == (
        1, 1.0, 1, 0.5,
    )  # fmt: skip
    assert stats.judge_tokens == 12 and stats.verdict == "running"
    # `ratchet changes` shows the counts while it runs
    [summary] = summarize(await h.store.audit(), canaries={tally.change_id: stats})
    assert (summary.status, summary.canary) == ("canary", stats)

    # a restarted gatekeeper continues from the counts in its ledger
    path = tmp_path / "gatekeeper-runs.db"  # where open_ledger_and_store put it
    await h.ledger.close()
    h.ledger = await GateLedger.open(path)
    [reopened] = await h.ledger.unfinished()
    assert reopened == tally
    assert await h.ledger.count_live(live(2, CANARY, 0.5)) == tally  # counted before the restart


async def test_judge_tokens_are_counted_per_change_and_step(harness: Harness) -> None:
    h = harness
    run_and_score = h.bus.run_and_score

    def judged(request: Any) -> RunScored:
        return run_and_score(request).model_copy(
            update={"judge_usage": TokenUsage(input_tokens=2, output_tokens=1)}
        )

    h.bus.run_and_score = judged  # type: ignore[method-assign]
    change = proposal(GOOD)
    await propose_and_approve(h, change)
    by_kind = {r.kind: r.payload for r in await h.store.audit(change.change_id)}
    assert by_kind["awaiting_approval"]["judge_tokens"] == 3 * len(stage_requests(h, "measure"))
    assert by_kind["verified"]["judge_tokens"] == 3 * len(stage_requests(h, "verify"))
    assert by_kind["holdout"]["judge_tokens"] == 3 * len(stage_requests(h, "holdout"))
    judged_live = TokenUsage(output_tokens=4)
    traffic = [s.model_copy(update={"judge_usage": judged_live}) for s in better_traffic(400)]
    decided_at, _ = deciding_run(traffic)
    await feed(h, traffic)
    [event] = events(h, ChangePromoted, change.change_id)
    assert event.stats.judge_tokens == 4 * decided_at


# --- while a canary runs -------------------------------------------------------------------------


async def test_a_proposal_for_a_task_in_canary_is_refused_and_the_canary_stays(
    harness: Harness,
) -> None:
    h = harness
    change = proposal(GOOD)
    await propose_and_approve(h, change)
    rival = proposal(BASE + " Be brief.", change_id="change-2").model_copy(
        update={"base_version": CANARY}
    )
    await h.runner.on_proposed(rival, proposer=PROPOSER)
    trail = await h.store.audit("change-2")
    assert [r.kind for r in trail] == ["received", "invalid"]
    assert trail[-1].payload["problems"] == [
        f"task {TASK!r} has change {change.change_id} in canary: propose again once it is "
        "promoted or rolled back"
    ]
    assert h.prompts.latest(TASK).version == CANARY and len(h.prompts.writes) == 1
    # a redelivered approval of the change in canary changes nothing either
    evidence = h.bus.of_type(ChangeAwaitingApproval)[0].evidence_sha256
    assert await h.runner.on_decision(approval(change, evidence), approved=True, approver="alice")
    assert await status(h, change.change_id) == ("canary", ("canary_verdict",))
    # once promoted, the task takes proposals again
    await feed(h, better_traffic(400))
    assert await status(h, change.change_id) == ("promoted", ())
    again = rival.model_copy(update={"change_id": "change-3", "base_version": CANARY + 1})
    await h.runner.on_proposed(again, proposer=PROPOSER)
    assert "invalid" not in await h.kinds("change-3")


# --- crashes -----------------------------------------------------------------------------------

# point -> (when to crash, the proposal's text, verify_cases, its trail, prompt writes, end status)
CRASHES: dict[str, tuple[CrashWhen, str, int, list[str], list[str], str]] = {
    # the canary node: started, its record not audited
    "canary-audit": (auditing("canary"), GOOD, 100, PROMOTED, ["change", "promotion"], "promoted"),
    # the canary node: announcing the start
    "canary-publish": (
        publishing(ChangeCanaryStarted, lambda h, e: True),
        GOOD, 100, PROMOTED, ["change", "promotion"], "promoted",
    ),
    # the promotion written, the process died before it knew
    "promotion-write": (
        after_write("promotion"), GOOD, 100, PROMOTED, ["change", "promotion"], "promoted",
    ),
    # change.canary.promoted out, its record not audited
    "promoted-audit": (
        auditing("promoted"), GOOD, 100, PROMOTED, ["change", "promotion"], "promoted",
    ),
    # the rollback written, the process died before it knew
    "rollback-write": (
        after_write("rollback"), BAD, 0, ROLLED_BACK, ["change", "rollback"], "canary_rolled_back",
    ),
    # change.canary.rolled_back out, its record not audited
    "rolled-back-audit": (
        auditing("canary_rolled_back"),
        BAD, 0, ROLLED_BACK, ["change", "rollback"], "canary_rolled_back",
    ),
}  # fmt: skip


def traffic_for(text: str) -> list[RunScored]:
    return better_traffic(400) if text == GOOD else worse_traffic(200)


@pytest.mark.parametrize("point", list(CRASHES))
async def test_a_crash_at_every_canary_step_is_redone_once(harness: Harness, point: str) -> None:
    """The message being handled (the approval, or the deciding score) is redelivered."""
    crash_when, text, verify_cases, trail, writes, final = CRASHES[point]
    h = in_canary(harness, verify_cases=verify_cases)
    h.crash_when = crash_when
    change = proposal(text)
    await propose_and_approve(h, change)
    await feed(h, traffic_for(text))
    assert h.crashes, f"the crash at {point} was never injected"
    await assert_done_once(h, change.change_id, trail=trail, writes=writes, final=final)


@pytest.mark.parametrize("point", ["promotion-write", "rolled-back-audit"])
async def test_a_restarted_gatekeeper_finishes_a_canary_decided_before_the_crash(
    harness: Harness, tmp_path: Path, point: str
) -> None:
    """The deciding score's handler crashed and the process with it: nothing redelivers that
    score here, the new process finishes the canary at start (``finish_decided_canaries``)."""
    crash_when, text, verify_cases, trail, writes, final = CRASHES[point]
    h = in_canary(harness, verify_cases=verify_cases)
    change = proposal(text)
    await propose_and_approve(h, change)
    h.crash_when = crash_when
    traffic = traffic_for(text)
    decided_at, _ = deciding_run(traffic)
    for score in traffic[: decided_at - 1]:
        await h.runner.on_scored(score)
    with pytest.raises(InjectedCrash) as crash:
        await h.runner.on_scored(traffic[decided_at - 1])
    h.errors.append(crash.value)

    # the restart: the ledger reopened from its file, a new gate and runner on the same
    # checkpoints (the in-memory saver stands in for the SQLite file)
    path = tmp_path / "gatekeeper-runs.db"  # where open_ledger_and_store put it
    await h.ledger.close()
    h.ledger = await GateLedger.open(path)
    [tally] = await h.ledger.unfinished()
    assert tally.decided is not None
    h.runner = restarted(h, h.ledger)
    await h.runner.finish_decided_canaries()
    await assert_done_once(h, change.change_id, trail=trail, writes=writes, final=final)


def restarted(h: Harness, ledger: GateLedger) -> GateRunner:
    gate = type(h.gate)(
        store=h.store,
        ledger=ledger,
        prompts=h.prompts,
        publish=h.bus.publish,
        rules=h.gate.rules,
        suites=h.gate.suites,
        threshold=h.gate.threshold,
        settings=h.gate.settings,
        signer=h.gate.signer,
    )
    gate.harness = h
    h.gate = gate
    checkpointer = h.runner.graph.checkpointer
    assert checkpointer is not None and not isinstance(checkpointer, bool)
    return GateRunner(build_gate_graph(gate, checkpointer), gate)


async def test_without_a_canary_share_nothing_changes(harness: Harness) -> None:
    h = harness
    h.gate.settings = canary_settings(canary_share=0.0)
    change = proposal(GOOD)
    await propose_and_approve(h, change)
    assert await h.kinds(change.change_id) == KEPT
    assert h.prompts.latest(TASK).record.canary is None
    assert await h.ledger.unfinished() == []
    await feed(h, better_traffic(50))
    assert [w.kind for w in h.prompts.writes] == ["change"]


def test_verify_cases_zero_needs_a_canary() -> None:
    with pytest.raises(ValueError, match="needs a canary"):
        GateSettings(verify_cases=0)
    assert GateSettings(verify_cases=0, canary_share=0.1).verify_cases == 0

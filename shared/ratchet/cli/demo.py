"""``ratchet demo``: one full improvement cycle, start to finish, on whatever model is configured.

Run the suite's learn cases, show the failures and their groups, get a proposal, let the gate
measure it, ask the person at the terminal (or the policy approver with ``--yes``), then follow
the gatekeeper through apply, verify and keep-or-roll-back, and report what happened. The demo
follows the change by the gatekeeper's ``change.recorded`` events and reads the trail once per
step it waits for; it opens no database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from contextlib import suppress
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, Field, TypeAdapter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ratchet.cli.client import ClientError, fetch_trail, request, send_decision, submit_and_wait
from ratchet.cli.render import labelled, print_evidence, shown
from ratchet.contracts import (
    ChangeProposed,
    ChangeRecorded,
    FailureGroup,
    Measurement,
    RunCompleted,
    RunRequested,
    TokenUsage,
)
from ratchet.evidence import VERDICTS, describe_after
from ratchet.messaging import QUERY_PREFIX
from ratchet.natsconf import POLICY_APPROVER
from ratchet.queries import ProposeReply, ProposeRequest
from ratchet.store import AuditRecord, FailureQuery
from ratchet.suites import Case, Suite
from ratchet.untrusted import for_terminal
from ratchet_approver.policy import policy_decision

OUTCOMES = {"kept", "rolled_back", "rejected", "invalid", "stale"}
CONCURRENCY = 8


class DemoReport(BaseModel):
    task: str
    model: str
    learn_cases: int
    learn_success_rate: float
    failures: int
    groups: list[FailureGroup]
    change_id: str | None = None
    proposed_prompt: str | None = None
    measurement: Measurement | None = None
    decision: dict[str, Any] | None = None
    outcome: str
    verified: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None
    prompt_version_after: int | None = None
    runs: int
    tokens: TokenUsage
    seconds: float
    trail: list[str] = Field(default_factory=list)


class UsageMeter:
    """Counts runs and tokens of every run completed while the demo watches."""

    def __init__(self) -> None:
        self.runs = 0
        self.tokens = TokenUsage()

    async def on_completed(self, msg: Any) -> None:
        run = RunCompleted.model_validate_json(msg.data)
        self.runs += 1
        self.tokens = self.tokens + run.usage


async def run_learn_cases(
    nc: Client, suite: Suite, console: Console, threshold: float
) -> list[tuple[Case, RunCompleted, float | None]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    results: list[tuple[Case, RunCompleted, float | None]] = []
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(
            for_terminal(f"running {suite.name} learn cases"), total=len(suite.learn)
        )

        async def one(case: Case) -> None:
            async with limit:
                request = RunRequested(task=suite.name, input=case.input, check=case.check)
                run, score, _ = await submit_and_wait(nc, request, timeout=600, threshold=threshold)
                results.append((case, run, score.score))
                progress.advance(bar)

        await asyncio.gather(*(one(case) for case in suite.learn))
    return results


class ChangeFollower:
    """The steps the gatekeeper records, as its ``change.recorded`` events announce them: the
    demo waits on these instead of asking for the trail again and again."""

    def __init__(self) -> None:
        self.kinds: defaultdict[str, set[str]] = defaultdict(set)  # change id -> recorded kinds
        self.arrived = asyncio.Condition()

    async def on_recorded(self, msg: Msg) -> None:
        event = ChangeRecorded.model_validate_json(msg.data)
        async with self.arrived:
            self.kinds[event.change_id].add(event.kind)
            self.arrived.notify_all()

    async def wait_for_trail(
        self, nc: Client, change_id: str, kinds: set[str], timeout: float
    ) -> list[AuditRecord]:
        """The change's trail, read once one of ``kinds`` has been recorded."""
        try:
            async with self.arrived:
                await asyncio.wait_for(
                    self.arrived.wait_for(lambda: bool(self.kinds[change_id] & kinds)), timeout
                )
        except TimeoutError:
            seen = sorted(self.kinds[change_id])
            raise ClientError(
                f"change {change_id} did not reach {sorted(kinds)} in {timeout:.0f}s (saw {seen})"
            ) from None
        return await fetch_trail(nc, change_id)


def ask_person(console: Console) -> tuple[bool, str]:
    while True:
        answer = console.input("[bold]Approve this change? \\[y/n] [/]").strip().lower()
        if answer in ("y", "yes", "n", "no"):
            break
    reason = console.input("Reason (for the audit log): ").strip() or "no reason given"
    return answer.startswith("y"), reason


async def run_demo(
    nc: Client,
    suite: Suite,
    *,
    model: str,
    threshold: float,
    auto_approve_rule: str | None,
    console: Console,
    gate_timeout: float = 1800,
) -> DemoReport:
    started = time.monotonic()
    meter = UsageMeter()
    follower = ChangeFollower()
    subs = [
        await nc.subscribe(RunCompleted.subject, cb=meter.on_completed),
        await nc.subscribe(ChangeRecorded.subject, cb=follower.on_recorded),
    ]
    await nc.flush()  # both subscriptions are in place before anything is asked for
    try:
        console.rule(
            shown(f"1. run the {len(suite.learn)} learn cases of {suite.name!r} on {model}")
        )
        results = await run_learn_cases(nc, suite, console, threshold)
        passed = sum(s is not None and s >= threshold for _, _, s in results)
        console.print(f"passed {passed}/{len(results)}; the rest are stored as failures")

        console.rule("2. failures, grouped by problem")
        failures = len(results) - passed
        groups = await request(
            nc,
            f"{QUERY_PREFIX}.groups",
            FailureQuery(task=suite.name, limit=500),
            TypeAdapter(list[FailureGroup]),
            service="failure store",
        )
        table = Table("failures", "problem")
        for group in groups:
            table.add_row(str(group.size), shown(group.label))
        console.print(table)

        def report(outcome: str, **extra: Any) -> DemoReport:
            return DemoReport(
                task=suite.name,
                model=model,
                learn_cases=len(results),
                learn_success_rate=passed / len(results) if results else 0.0,
                failures=failures,
                groups=groups,
                outcome=outcome,
                runs=meter.runs,
                tokens=meter.tokens,
                seconds=time.monotonic() - started,
                **extra,
            )

        if failures == 0:
            console.print("[green]no failures: nothing to improve[/]")
            return report("nothing_to_improve")

        console.rule("3. the proposer writes a new task prompt")
        reply = await request(
            nc,
            f"{QUERY_PREFIX}.propose",
            ProposeRequest(task=suite.name),
            TypeAdapter(ProposeReply),
            service="proposer",
            timeout=600,
        )
        if reply.change is None:
            console.print(labelled("no proposal:", reply.error or "", "red"))
            return report("no_proposal")
        change: ChangeProposed = reply.change
        console.print(labelled("proposed prompt:", change.proposed_prompt, ""))

        console.rule(f"4. the gatekeeper measures it on up to {len(suite.gate)} gate-pool cases")
        with console.status("measuring current and candidate prompts…"):
            trail = await follower.wait_for_trail(
                nc, change.change_id, {"awaiting_approval", "invalid"}, gate_timeout
            )
        print_evidence(trail, console)
        if any(r.kind == "invalid" for r in trail):
            return report(
                "invalid",
                change_id=change.change_id,
                proposed_prompt=change.proposed_prompt,
                trail=[r.kind for r in trail],
            )
        measurement = Measurement.model_validate(
            next(r.payload for r in trail if r.kind == "measured")
        )

        console.rule("5. the approval gate")
        if auto_approve_rule:
            approve, reason = policy_decision(measurement, auto_approve_rule)
            deciding_as: str | None = POLICY_APPROVER
            console.print(
                shown(
                    f"policy approver ({auto_approve_rule}): "
                    f"{'approve' if approve else 'reject'} — {reason}"
                )
            )
        else:
            approve, reason = ask_person(console)
            deciding_as = None  # the person approver configured (operator by default)
        approver = await send_decision(
            change.change_id, approve=approve, reason=reason, approver=deciding_as
        )

        console.rule("6. apply, verify on fresh cases, keep or roll back, then the holdout")
        # a kept change goes on to the sealed holdout, when the suite has one
        last_steps = (OUTCOMES - {"kept"}) | {"holdout"} if suite.holdout else OUTCOMES
        with console.status("waiting for the gatekeeper…"):
            trail = await follower.wait_for_trail(nc, change.change_id, last_steps, gate_timeout)
        for line in describe_after({r.kind: r.payload for r in trail}):
            console.print(shown(line))
        by_kind = {r.kind: r.payload for r in trail}
        outcome = next(r.kind for r in reversed(trail) if r.kind in OUTCOMES)
        return report(
            outcome,
            change_id=change.change_id,
            proposed_prompt=change.proposed_prompt,
            measurement=measurement,
            decision={"approved": approve, "approver": approver, "reason": reason},
            verified=by_kind.get("verified"),
            holdout=by_kind.get("holdout"),
            prompt_version_after=by_kind.get(outcome, {}).get("version"),
            trail=[r.kind for r in trail],
        )
    finally:
        for sub in subs:
            with suppress(Exception):
                await sub.unsubscribe()


def print_summary(report: DemoReport, console: Console) -> None:
    console.rule("summary")
    table = Table(show_header=False)
    table.add_row("task / model", shown(f"{report.task} / {report.model}"))
    table.add_row("learn cases passed", f"{report.learn_success_rate:.0%} of {report.learn_cases}")
    table.add_row("failures / patterns", f"{report.failures} / {len(report.groups)}")
    if report.measurement:
        m = report.measurement
        table.add_row(
            "gate: current -> candidate",
            f"{m.current_rate:.0%} -> {m.candidate_rate:.0%} on {m.cases} cases: lift "
            f"{m.lift:+.1%} (lower bound {m.lower_bound:+.1%}), {VERDICTS[m.verdict]}",
        )
    if report.decision:
        table.add_row(
            "decision",
            shown(
                f"{'approved' if report.decision['approved'] else 'rejected'} by "
                f"{report.decision['approver']}"
            ),
        )
    if report.verified is not None:
        v = report.verified
        table.add_row(
            "fresh control after applying",
            f"{v['control_passes']} -> {v['applied_passes']} passes on {v['cases']} cases",
        )
    if report.holdout is not None:
        table.add_row("holdout lift (the real one)", f"{report.holdout['lift']:+.1%}")
    table.add_row("outcome", report.outcome)
    table.add_row(
        "runs / tokens",
        f"{report.runs} runs, {report.tokens.input_tokens}+{report.tokens.output_tokens} tokens",
    )
    table.add_row("time", f"{report.seconds:.0f}s")
    console.print(table)
    console.print(_verdict(report))


def _verdict(report: DemoReport) -> str:
    """Say plainly what happened, including when nothing improved."""
    m = report.measurement
    if report.outcome == "kept" and m is not None:
        if m.verdict == "superior":
            return (
                f"The gate showed the change better ({m.lift:+.0%}, an overestimate; the holdout "
                "gives the real lift) and it was kept after a fresh check."
            )
        return "The change was approved without being shown better and kept after a fresh check."
    if report.outcome == "rolled_back":
        return (
            "The change was approved, but a fresh control after applying showed a regression, "
            "so it was rolled back."
        )
    if report.outcome == "rejected":
        if m is not None and m.verdict != "superior":
            return (
                "The gate could not show the change better, so it was rejected; the prompt is "
                "unchanged."
            )
        return "The change was rejected at the gate; the prompt is unchanged."
    if report.outcome == "invalid":
        return (
            "The proposal broke the pinned rules or targeted a stale version; it was "
            "refused unmeasured."
        )
    if report.outcome == "no_proposal":
        return "The proposer model gave no usable proposal; nothing changed."
    return f"Outcome: {report.outcome}."


def write_report(report: DemoReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=2))

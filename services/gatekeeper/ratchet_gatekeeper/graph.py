"""The gatekeeper's LangGraph graph: one durable thread per change.

    validate -> measure -> ask -> decide (interrupt) -> apply -> verify -> holdout
        \\-> END (invalid)          \\-> END (rejected)    \\-> END     \\-> END (rolled back)

    with a canary: apply -> [verify] -> holdout -> canary -> canary_verdict (interrupt) -> END
                                                             (promoted, or rolled back by it)

``measure`` runs the paired sequential test of :mod:`ratchet.sequential` on the task's gate pool,
look by look; ``verify`` checks that executors serve the applied version and that a fresh,
concurrent control on pool cases the decision never used shows no regression (skipped when
``verify_cases`` is 0: the canary checks in production instead); ``holdout`` runs the sealed
holdout after a keep, to report the real lift.

With ``canary_share`` above 0, ``apply`` writes the new version as a canary
(:class:`ratchet.prompts.Canary`): live runs get it for that share of rollout keys and the
stable (base) version otherwise, while gate runs still run the record's own text. After the
checks, ``canary`` starts counting live scores in the ledger, and ``canary_verdict`` waits
(``interrupt()``) until the canary's anytime-valid test (:mod:`ratchet.canary`) decides; then it
promotes the new version to all traffic (a "promotion" version of the same text) or rolls back
to the stable text. While a task has a canary in progress, ``validate`` refuses new proposals
for it: one based on an older version would go stale at ``apply`` anyway, and one based on the
canary version would replace the canary before its test decided.

A resumed node re-runs from its first line, so every side effect here is idempotent: gate run ids
are derived from the change and a secret nonce drawn once per change (a finished run is not
requested again, and JetStream drops a repeated request), events carry ids derived from the
change id, prompt writes check whether they already happened, and each audit kind is written
once per change. The gatekeeper owns the audit trail (no other service writes it), signs each
record, and announces it on ``change.recorded`` with the trail's head, so followers wait on events
instead of asking again and again, and the stream keeps an anchor of the trail's end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Checkpointer, interrupt

from ratchet.audit import AnchorReading, AuditSigner, anchor_problem, announcement, signed_by
from ratchet.canary import describe as describe_canary
from ratchet.contracts import (
    GATE_RUN_PREFIX,
    CanaryStats,
    ChangeApplied,
    ChangeAwaitingApproval,
    ChangeCanaryRolledBack,
    ChangeCanaryStarted,
    ChangeKept,
    ChangePromoted,
    ChangeProposed,
    ChangeRolledBack,
    Event,
    GateRunRequested,
    GateStage,
    Look,
    Measurement,
    RunContext,
    RunScored,
)
from ratchet.prompts import Canary, PromptRecord, PromptVersion, StaleVersionError
from ratchet.rules import Rules
from ratchet.sequential import analyse, design_for_pool, paired_interval, regression_shown
from ratchet.settings import GateSettings
from ratchet.store import AuditRecord, Store
from ratchet.suites import Case, Suite
from ratchet_gatekeeper.checks import prompt_diff, validate
from ratchet_gatekeeper.ledger import CanaryPlan, GateLedger

log = logging.getLogger("ratchet.gatekeeper")

ACTOR = "gatekeeper"
Arm = Literal["current", "candidate"]
AnchorReader = Callable[[], Awaitable[AnchorReading]]


class TrailTampered(RuntimeError):
    """The audit trail no longer matches its newest anchor in the stream (records were cut off
    or rewritten behind the gatekeeper's back), its head is not signed by the gatekeeper, or the
    stream holds no valid anchor to check it against: it is neither extended nor anchored again,
    since either would hide what happened or vouch for what the gatekeeper never wrote."""


class ChangeState(TypedDict, total=False):
    change: dict[str, Any]
    proposer: str  # who proposed: the NATS user the proposal's subject names
    status: str
    problems: list[str]
    base_prompt: str
    nonce: str
    measurement: dict[str, Any]
    evidence_sha256: str
    decision: dict[str, Any]
    applied_version: int
    outcome: dict[str, Any]
    judge_tokens: int  # what judging the measurement's runs cost
    canary: dict[str, Any]  # a CanaryPlan, when the change was applied as a canary
    canary_stats: dict[str, Any]  # the canary's verdict


def _change(state: ChangeState) -> ChangeProposed:
    """The change a thread works on. A thread checkpointed before proposals were named by their
    subject still holds the body's ``proposer`` claim: dropped, it was never proof of anything."""
    fields = {k: v for k, v in state["change"].items() if k != "proposer"}
    return ChangeProposed.model_validate(fields)


class PromptStoreAccess(Protocol):
    async def current(self, task: str) -> PromptVersion | None: ...

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int: ...


@dataclass(frozen=True)
class ArmSpec:
    """How one arm runs: an explicit prompt text, or the stored prompt at least at a version."""

    prompt: str | None
    min_version: int | None = None


@dataclass(frozen=True)
class PairedRuns:
    """Pass counts per case for both arms, from the gatekeeper's own runs."""

    cases: list[Case]
    current: dict[str, int]
    candidate: dict[str, int]
    flaky: list[str]
    unscored: int
    candidate_versions: set[int | None]
    judge_tokens: int  # what the judge spent scoring these runs

    def diffs(self) -> list[int]:
        return [self.candidate[c.id] - self.current[c.id] for c in self.cases]


class Gate:
    """What the graph's nodes act on; built once per gatekeeper process."""

    def __init__(
        self,
        *,
        store: Store,
        ledger: GateLedger,
        prompts: PromptStoreAccess,
        publish: Callable[[Event], Awaitable[None]],
        rules: Rules,
        suites: dict[str, Suite],
        threshold: float,
        settings: GateSettings,
        signer: AuditSigner,
        newest_anchor: AnchorReader | None = None,
    ) -> None:
        """``signer`` signs every audit record; ``newest_anchor`` reads the trail's newest
        valid anchor from the stream (None where there is no stream: the in-memory tests)."""
        self.store = store
        self.ledger = ledger
        self.prompts = prompts
        self.publish = publish
        self.rules = rules
        self.suites = suites
        self.threshold = threshold
        self.settings = settings
        self.signer = signer
        self.newest_anchor = newest_anchor
        # append and announce as one step, so the newest announcement carries the newest head
        self._audit_lock = asyncio.Lock()

    async def audit(
        self,
        change_id: str,
        kind: str,
        payload: dict[str, Any],
        actor: str = ACTOR,
        *,
        key: str | None = None,
    ) -> None:
        """Append one signed audit record of this kind for this change (and ``key``), once,
        then announce it on ``change.recorded`` (again after a crash: the event id is the
        record's seq, so a repeat is dropped). Refuses (:class:`TrailTampered`) while the trail
        does not match its anchor in the stream."""
        async with self._audit_lock:
            await self._check_anchor()
            record = await self._recorded(change_id, kind, key)
            if record is None:
                record = await self.store.append_audit(
                    change_id,
                    kind,
                    actor,
                    payload if key is None else {**payload, "key": key},
                    signer=self.signer,
                )
            await self._announce(record)

    async def reanchor(self) -> AuditRecord | None:
        """Announce the trail's head again (the gatekeeper does at start and daily), so the
        stream always holds a recent anchor although it drops messages after 30 days. Returns
        the head, None while the trail is empty."""
        async with self._audit_lock:
            await self._check_anchor()
            head = await self.store.audit_head()
            if head is not None:
                await self._announce(head)
            return head

    async def _announce(self, record: AuditRecord) -> None:
        head = await self.store.audit_head()
        await self.publish(announcement(record, head))

    async def _check_anchor(self) -> None:
        """Before the trail is extended or anchored again: the stream's newest valid anchor
        still names a record of the trail, unchanged and signed, and the trail's head is signed
        by this gatekeeper. Otherwise records cut off behind its back would be replaced by new
        ones under the same seqs (and the next anchor hide the cut), or its next record would
        chain onto one it never wrote. A stream whose ``change.recorded`` holds no valid anchor
        among its newest messages cannot be checked against, so nothing is written then either."""
        reading = await self.newest_anchor() if self.newest_anchor else AnchorReading()
        if reading.unreadable:
            raise TrailTampered(
                f"the audit trail cannot be checked against its anchor in the stream: "
                f"{reading.summary()}; see `ratchet audit --verify`"
            )
        head = await self.store.audit_head()
        anchor, key = reading.head, self.signer.key
        if anchor is not None:
            anchored = await self.store.audit_at(anchor.seq)
            problem = anchor_problem(anchor, anchored, head.seq if head else 0)
            if problem is None and anchored is not None and not signed_by(anchored, key):
                problem = f"seq {anchor.seq}: its signature was removed or replaced"
            if problem:
                raise TrailTampered(
                    f"the audit trail does not match its anchor in the stream: {problem}; see "
                    "`ratchet audit --verify`"
                )
        if head is not None and not signed_by(head, key):
            raise TrailTampered(
                f"the audit trail's newest record, seq {head.seq}, is not signed by this "
                f"gatekeeper's key {key.id} (forged, or its signature removed); see "
                "`ratchet audit --verify`"
            )

    async def _recorded(self, change_id: str, kind: str, key: str | None) -> AuditRecord | None:
        """The change's record of this kind (and ``key``), if it was written before."""
        for record in await self.store.audit(change_id):
            if record.kind == kind and (key is None or record.payload.get("key") == key):
                return record
        return None

    def pool_order(self, change: ChangeProposed, nonce: str) -> list[Case]:
        """The gate pool in this change's own random order: the decision takes a prefix and the
        check after applying takes the cases right after it, which the decision never saw."""
        cases = list(self.suites[change.task].gate)
        seed = hashlib.sha256(f"{change.change_id}:{nonce}".encode()).digest()
        random.Random(seed).shuffle(cases)
        return cases

    async def run_pairs(
        self,
        change: ChangeProposed,
        nonce: str,
        stage: GateStage,
        cases: list[Case],
        arms: dict[Arm, ArmSpec],
    ) -> PairedRuns:
        """Run both arms on ``cases`` concurrently through the real executor and evaluator.

        Run ids hold a nonce nobody else knows, requests go on a subject only the gatekeeper may
        publish, checks come from the gatekeeper's own suites, and only gate scores of runs it
        issued count (:class:`GateLedger`), so nobody can run or score a gate run in its place."""
        repeats = self.suites[change.task].repeats
        requests: dict[str, GateRunRequested] = {}
        for case in cases:
            for arm, spec in arms.items():
                for repeat in range(repeats):
                    run_id = (
                        f"{GATE_RUN_PREFIX}{change.change_id}.{nonce}.{stage}.{arm}.{case.id}"
                        f".{repeat}"
                    )
                    requests[run_id] = GateRunRequested(
                        id=f"{run_id}.requested",
                        run_id=run_id,
                        task=change.task,
                        input=case.input,
                        check=case.check,
                        candidate_prompt=spec.prompt,
                        min_prompt_version=spec.min_version,
                        context=RunContext(
                            purpose="gate",
                            change_id=change.change_id,
                            case_id=case.id,
                            stage=stage,
                            arm=arm,
                            repeat=repeat,
                        ),
                    )
        to_request = await self.ledger.issue(change.change_id, list(requests))
        await asyncio.gather(*(self.publish(requests[run_id]) for run_id in to_request))
        scores = await self.ledger.wait(list(requests), self.settings.run_timeout_s)
        return self._count(cases, requests, scores, repeats)

    def _count(
        self,
        cases: list[Case],
        requests: dict[str, GateRunRequested],
        scores: dict[str, RunScored],
        repeats: int,
    ) -> PairedRuns:
        passes: dict[Arm, dict[str, int]] = {
            "current": {c.id: 0 for c in cases},
            "candidate": {c.id: 0 for c in cases},
        }
        unscored = judge_tokens = 0
        versions: set[int | None] = set()
        for run_id, request in requests.items():
            score, context = scores[run_id], request.context
            judge_tokens += score.judge_usage.input_tokens + score.judge_usage.output_tokens
            assert context.arm is not None and context.case_id is not None
            if score.score is None:
                unscored += 1
            elif score.score >= self.threshold:
                passes[context.arm][context.case_id] += 1
            if context.arm == "candidate":
                versions.add(score.prompt_version)
        flaky = [
            c.id
            for c in cases
            if any(0 < passes[arm][c.id] < repeats for arm in ("current", "candidate"))
        ]
        return PairedRuns(
            cases=cases,
            current=passes["current"],
            candidate=passes["candidate"],
            flaky=flaky,
            unscored=unscored,
            candidate_versions=versions,
            judge_tokens=judge_tokens,
        )

    async def roll_back(
        self, change: ChangeProposed, base_prompt: str, applied: int, reason: str
    ) -> int:
        """Write the pre-change prompt back as a new version (once), returning that version."""
        current = await self.prompts.current(change.task)
        if current is not None and (current.record.kind, current.record.change_id) == (
            "rollback",
            change.change_id,
        ):
            return current.version  # done before a restart
        return await self.prompts.write(
            change.task,
            PromptRecord(
                text=base_prompt, kind="rollback", change_id=change.change_id, note=reason[:500]
            ),
            base_version=applied,
        )

    # --- nodes ----------------------------------------------------------------------------------

    async def validate_node(self, state: ChangeState) -> ChangeState:
        change = _change(state)
        # the proposal as it arrived, by the proposer the server authenticated
        received = change.model_dump(mode="json")
        await self.audit(change.change_id, "received", received, actor=state["proposer"])
        current = await self.prompts.current(change.task)
        problems = validate(
            change,
            current_version=current.version if current else None,
            rules=self.rules,
            canary_of=current.record.change_id or "?"
            if current is not None and current.record.canary is not None
            else None,
        )
        if change.task not in self.suites:
            problems.append(f"task {change.task!r} has no gate pool to measure it on")
        if problems:
            await self.audit(change.change_id, "invalid", {"problems": problems})
            return {"status": "invalid", "problems": problems}
        assert current is not None
        return {
            "status": "valid",
            "base_prompt": current.record.text,
            "nonce": secrets.token_hex(16),
        }

    async def measure_node(self, state: ChangeState) -> ChangeState:
        change = _change(state)
        suite = self.suites[change.task]
        g = self.settings
        design = design_for_pool(
            len(suite.gate),
            max_cases=g.max_cases,
            n_looks=g.looks,
            verify_reserve=g.verify_reserve,
            alpha=g.alpha,
            margin=change.margin,
            repeats=suite.repeats,
        )
        pool_sha = suite.gate_pool_sha256()
        uses = await self.ledger.use_pool(change.change_id, change.task, pool_sha)
        order = self.pool_order(change, state["nonce"])
        arms: dict[Arm, ArmSpec] = {
            "current": ArmSpec(state["base_prompt"]),
            "candidate": ArmSpec(change.proposed_prompt),
        }
        history: list[Look] = []
        batches: list[PairedRuns] = []
        done = 0
        for look, n in enumerate(design.looks, start=1):
            batches.append(
                await self.run_pairs(change, state["nonce"], "measure", order[done:n], arms)
            )
            done = n
            diffs = [d for batch in batches for d in batch.diffs()]
            result = analyse(diffs, design, look)
            history.append(
                Look(
                    n=n,
                    z=round(result.z, 4),
                    efficacy_bound=result.efficacy_bound,
                    conditional_power=None
                    if result.conditional_power is None
                    else round(result.conditional_power, 4),
                )
            )
            if result.verdict != "continue":
                break
        assert result.verdict != "continue"
        current = {k: v for b in batches for k, v in b.current.items()}
        candidate = {k: v for b in batches for k, v in b.candidate.items()}
        used = order[:done]
        measurement = Measurement(
            test=design.test,
            margin=design.margin,
            alpha=design.alpha,
            looks=list(design.looks),
            repeats=design.repeats,
            verdict=result.verdict,
            stopped_at=result.look,
            history=history,
            cases=done,
            current_passes=sum(current.values()),
            candidate_passes=sum(candidate.values()),
            lift=round(result.lift, 4),
            ci95=(round(result.ci95[0], 4), round(result.ci95[1], 4)),
            lower_bound=round(result.lower_bound, 4),
            runs=2 * done * design.repeats,
            fixed=[c.id for c in used if candidate[c.id] > current[c.id]],
            broken=[c.id for c in used if candidate[c.id] < current[c.id]],
            flaky=[case for b in batches for case in b.flaky],
            unscored=sum(b.unscored for b in batches),
            pool_sha256=pool_sha,
            pool_size=len(suite.gate),
            proposals_on_pool=uses,
            pool_budget=g.pool_budget,
        )
        await self.audit(change.change_id, "measured", measurement.model_dump(mode="json"))
        return {
            "status": "measured",
            "measurement": measurement.model_dump(mode="json"),
            "evidence_sha256": measurement.sha256(),
            "judge_tokens": sum(b.judge_tokens for b in batches),
        }

    async def ask_node(self, state: ChangeState) -> ChangeState:
        change = _change(state)
        awaiting = ChangeAwaitingApproval(
            id=f"{change.change_id}.awaiting",
            change_id=change.change_id,
            task=change.task,
            base_version=change.base_version,
            prompt_diff=prompt_diff(state["base_prompt"], change.proposed_prompt),
            rationale=change.rationale,
            measurement=Measurement.model_validate(state["measurement"]),
            evidence_sha256=state["evidence_sha256"],
        )
        await self.publish(awaiting)
        await self.audit(
            change.change_id,
            "awaiting_approval",
            {
                "prompt_diff": awaiting.prompt_diff,
                "evidence_sha256": awaiting.evidence_sha256,
                # the measurement's judge tokens (the measurement itself is the hashed evidence)
                "judge_tokens": state.get("judge_tokens", 0),
            },
        )
        return {"status": "awaiting_approval"}

    async def decide_node(self, state: ChangeState) -> ChangeState:
        change_id = state["change"]["change_id"]
        decision: dict[str, Any] = interrupt(
            {
                "change_id": change_id,
                "question": "Approve this prompt change?",
                "evidence_sha256": state["evidence_sha256"],
            }
        )
        status = "approved" if decision["approved"] else "rejected"
        await self.audit(change_id, status, decision, actor=str(decision["approver"]))
        return {"status": status, "decision": decision}

    async def apply_node(self, state: ChangeState) -> ChangeState:
        change = _change(state)
        current = await self.prompts.current(change.task)
        if current is not None and current.record.change_id == change.change_id:
            version = current.version  # this node ran before the restart: already written
            canary = current.record.canary
        else:
            share = self.settings.canary_share
            canary = (
                Canary(
                    share=share,
                    stable_version=change.base_version,
                    stable_text=state["base_prompt"],
                )
                if share > 0
                else None
            )
            record = PromptRecord(
                text=change.proposed_prompt,
                kind="change",
                change_id=change.change_id,
                note=change.rationale[:500],
                canary=canary,
            )
            try:
                version = await self.prompts.write(
                    change.task, record, base_version=change.base_version
                )
            except StaleVersionError as exc:
                await self.audit(change.change_id, "stale", {"reason": str(exc)})
                return {"status": "stale", "problems": [str(exc)]}
        applied = ChangeApplied(
            id=f"{change.change_id}.applied",
            change_id=change.change_id,
            task=change.task,
            previous_version=change.base_version,
            version=version,
            prompt_sha256=PromptRecord(text=change.proposed_prompt).sha256,
        )
        await self.publish(applied)
        await self.audit(change.change_id, "applied", applied.model_dump(mode="json"))
        if canary is None:
            return {"status": "applied", "applied_version": version}
        g = self.settings
        plan = CanaryPlan(
            share=canary.share,
            stable_version=canary.stable_version,
            version=version,
            margin=g.canary_margin,
            alpha=g.canary_alpha,
            max_runs=g.canary_max_runs,
        )
        return {
            "status": "applied",
            "applied_version": version,
            "canary": plan.model_dump(mode="json"),
        }

    async def verify_node(self, state: ChangeState) -> ChangeState:
        """Fresh cases, a concurrent control, and the executors' own version: never the arm the
        decision was selected on."""
        change = _change(state)
        version = state["applied_version"]
        measurement = Measurement.model_validate(state["measurement"])
        order = self.pool_order(change, state["nonce"])
        fresh = order[measurement.cases : measurement.cases + self.settings.verify_cases]
        if not fresh:  # a pool too small to keep fresh cases: rerun the decision's
            fresh = order[: self.settings.verify_cases]
        runs = await self.run_pairs(
            change,
            state["nonce"],
            "verify",
            fresh,
            {"current": ArmSpec(state["base_prompt"]), "candidate": ArmSpec(None, version)},
        )
        repeats = self.suites[change.task].repeats
        served = runs.candidate_versions == {version}
        regressed, upper = regression_shown(runs.diffs(), repeats)
        if not served:
            reason = f"executors served versions {sorted(map(str, runs.candidate_versions))}, "
            reason += f"not v{version}"
        elif regressed:
            reason = f"fresh control shows a regression (upper bound {upper:+.1%})"
        else:
            reason = f"no regression on {len(fresh)} fresh cases (upper bound {upper:+.1%})"
        rolled_back = regressed or not served
        details = {
            "cases": len(fresh),
            "fresh": measurement.cases < len(order),
            "control_passes": sum(runs.current.values()),
            "applied_passes": sum(runs.candidate.values()),
            "upper_bound": round(upper, 4),
            "served": served,
            "reason": reason,
            "judge_tokens": runs.judge_tokens,
        }
        await self.audit(change.change_id, "verified", details)
        if rolled_back:
            version = await self.roll_back(change, state["base_prompt"], version, reason)
        status = "rolled_back" if rolled_back else "kept"
        outcome_type = ChangeRolledBack if rolled_back else ChangeKept
        outcome = outcome_type(
            id=f"{change.change_id}.{status}",
            change_id=change.change_id,
            task=change.task,
            version=version,
            cases=len(fresh),
            repeats=repeats,
            control_passes=sum(runs.current.values()),
            applied_passes=sum(runs.candidate.values()),
            served=served,
            upper_bound=round(upper, 4),
            reason=reason,
        )
        await self.publish(outcome)
        await self.audit(change.change_id, status, outcome.model_dump(mode="json"))
        return {"status": status, "outcome": outcome.model_dump(mode="json")}

    async def holdout_node(self, state: ChangeState) -> ChangeState:
        """The sealed holdout, after a keep: the real lift, and a warning when it contradicts the
        gate's own lower bound (the pool may be overfit by repeated proposals)."""
        change = _change(state)
        holdout = self.suites[change.task].holdout[: self.settings.holdout_cases]
        if not holdout:
            return {}
        runs = await self.run_pairs(
            change,
            state["nonce"],
            "holdout",
            holdout,
            {
                "current": ArmSpec(state["base_prompt"]),
                "candidate": ArmSpec(change.proposed_prompt),
            },
        )
        repeats = self.suites[change.task].repeats
        diffs = runs.diffs()
        low, high = paired_interval(diffs, repeats)
        gate = Measurement.model_validate(state["measurement"])
        lift = sum(diffs) / (len(diffs) * repeats)
        await self.audit(
            change.change_id,
            "holdout",
            {
                "cases": len(holdout),
                "current_passes": sum(runs.current.values()),
                "candidate_passes": sum(runs.candidate.values()),
                "lift": round(lift, 4),
                "ci95": [round(low, 4), round(high, 4)],
                "gate_lift": gate.lift,
                "gate_lower_bound": gate.lower_bound,
                "pool_overfit_warning": high < gate.lower_bound,
                "judge_tokens": runs.judge_tokens,
            },
        )
        return {}

    async def canary_node(self, state: ChangeState) -> ChangeState:
        """The canary starts: its live scores count from here on (the ledger keeps them)."""
        change = _change(state)
        plan = CanaryPlan.model_validate(state["canary"])
        await self.ledger.start_canary(change.change_id, change.task, plan)
        started = ChangeCanaryStarted(
            id=f"{change.change_id}.canary.started",
            change_id=change.change_id,
            task=change.task,
            version=plan.version,
            stable_version=plan.stable_version,
            share=plan.share,
            margin=plan.margin,
            max_runs=plan.max_runs,
        )
        await self.publish(started)
        details = {**started.model_dump(mode="json"), "alpha": plan.alpha}
        await self.audit(change.change_id, "canary", details)
        return {"status": "canary"}

    async def canary_verdict_node(self, state: ChangeState) -> ChangeState:
        """Waits for the canary's verdict (the monitor resumes the thread with it, once the test
        decided and the ledger holds it), then promotes the new version or rolls it back."""
        change = _change(state)
        plan = CanaryPlan.model_validate(state["canary"])
        tally = await self.ledger.canary(change.change_id)
        stats = tally.decided if tally is not None else None
        if stats is None:  # not decided yet: wait (a resumed node finds it in the ledger)
            resumed = interrupt(
                {
                    "change_id": change.change_id,
                    "question": "Is the canary worse than the stable version?",
                }
            )
            stats = CanaryStats.model_validate(resumed)
        reason = describe_canary(stats)
        try:
            if stats.verdict == "not_worse":
                version = await self.promote(change, plan, reason)
            else:
                version = await self.roll_back(change, state["base_prompt"], plan.version, reason)
        except StaleVersionError as exc:  # nothing else writes a task in canary; say so if it did
            await self.audit(change.change_id, "stale", {"reason": str(exc)})
            await self.ledger.finish_canary(change.change_id)
            return {"status": "stale", "problems": [str(exc)]}
        status = "promoted" if stats.verdict == "not_worse" else "canary_rolled_back"
        outcome_type = ChangePromoted if status == "promoted" else ChangeCanaryRolledBack
        outcome = outcome_type(
            id=f"{change.change_id}.{status}",
            change_id=change.change_id,
            task=change.task,
            version=version,
            stats=stats,
            reason=reason,
        )
        await self.publish(outcome)
        await self.audit(change.change_id, status, outcome.model_dump(mode="json"))
        await self.ledger.finish_canary(change.change_id)
        return {"status": status, "canary_stats": stats.model_dump(mode="json")}

    async def promote(self, change: ChangeProposed, plan: CanaryPlan, reason: str) -> int:
        """Write the canary's text as a new version for all traffic (once), returning it."""
        current = await self.prompts.current(change.task)
        if current is not None and (current.record.kind, current.record.change_id) == (
            "promotion",
            change.change_id,
        ):
            return current.version  # done before a restart
        return await self.prompts.write(
            change.task,
            PromptRecord(
                text=change.proposed_prompt,
                kind="promotion",
                change_id=change.change_id,
                note=reason[:500],
            ),
            base_version=plan.version,
        )


def _after_validate(state: ChangeState) -> str:
    return "measure" if state["status"] == "valid" else END


def _after_decide(state: ChangeState) -> str:
    return "apply" if state["status"] == "approved" else END


def _after_verify(state: ChangeState) -> str:
    return "holdout" if state["status"] == "kept" else END


def _after_holdout(state: ChangeState) -> str:
    return "canary" if state.get("canary") else END


def build_gate_graph(
    gate: Gate, checkpointer: Checkpointer
) -> CompiledStateGraph[Any, Any, Any, Any]:
    graph = StateGraph(ChangeState)
    graph.add_node("validate", gate.validate_node)
    graph.add_node("measure", gate.measure_node)
    graph.add_node("ask", gate.ask_node)
    graph.add_node("decide", gate.decide_node)
    graph.add_node("apply", gate.apply_node)
    graph.add_node("verify", gate.verify_node)
    graph.add_node("holdout", gate.holdout_node)
    graph.add_node("canary", gate.canary_node)
    graph.add_node("canary_verdict", gate.canary_verdict_node)
    graph.add_edge(START, "validate")
    graph.add_conditional_edges("validate", _after_validate, ["measure", END])
    graph.add_edge("measure", "ask")
    graph.add_edge("ask", "decide")
    graph.add_conditional_edges("decide", _after_decide, ["apply", END])

    def after_apply(state: ChangeState) -> str:
        """Verify, unless there is nothing to verify on (``verify_cases`` 0, only allowed with a
        canary, which checks the change on live traffic instead)."""
        if state["status"] != "applied":
            return END
        return "verify" if gate.settings.verify_cases > 0 else "holdout"

    graph.add_conditional_edges("apply", after_apply, ["verify", "holdout", END])
    graph.add_conditional_edges("verify", _after_verify, ["holdout", END])
    graph.add_conditional_edges("holdout", _after_holdout, ["canary", END])
    graph.add_edge("canary", "canary_verdict")
    graph.add_edge("canary_verdict", END)
    return graph.compile(checkpointer=checkpointer)

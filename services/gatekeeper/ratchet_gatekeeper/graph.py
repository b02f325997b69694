"""The gatekeeper's LangGraph graph: one durable thread per change.

    validate -> measure -> ask -> decide (interrupt) -> apply -> verify
        \\-> END (invalid)          \\-> END (rejected)

A resumed node re-runs from its first line, so every side effect here is idempotent: requests
and events carry ids derived from the change id (JetStream drops duplicates), prompt writes
check whether they already happened, and each audit kind is written once per change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Checkpointer, interrupt

from ratchet.contracts import (
    ChangeApplied,
    ChangeAwaitingApproval,
    ChangeKept,
    ChangeProposed,
    ChangeRolledBack,
    Event,
    Measurement,
    RunContext,
    RunRequested,
)
from ratchet.prompts import PromptRecord, PromptVersion, StaleVersionError
from ratchet.rules import Rules
from ratchet.store import Store
from ratchet.suites import Case, Suite
from ratchet_gatekeeper.checks import measure, prompt_diff, success_rate, validate

log = logging.getLogger("ratchet.gatekeeper")

ACTOR = "gatekeeper"
ROLLBACK_MARGIN = 0.02  # roll back when the verified success rate fell by more than 2 points


class ChangeState(TypedDict, total=False):
    change: dict[str, Any]
    status: str
    problems: list[str]
    base_prompt: str
    measurement: dict[str, Any]
    decision: dict[str, Any]
    applied_version: int
    verified_rate: float


class PromptStoreAccess(Protocol):
    async def current(self, task: str) -> PromptVersion | None: ...

    async def write(self, task: str, record: PromptRecord, *, base_version: int) -> int: ...


class Gate:
    """What the graph's nodes act on; built once per gatekeeper process."""

    def __init__(
        self,
        *,
        store: Store,
        prompts: PromptStoreAccess,
        publish: Callable[[Event], Awaitable[None]],
        rules: Rules,
        suites: dict[str, Suite],
        threshold: float,
        run_timeout_s: float,
    ) -> None:
        self.store = store
        self.prompts = prompts
        self.publish = publish
        self.rules = rules
        self.suites = suites
        self.threshold = threshold
        self.run_timeout_s = run_timeout_s

    async def audit(
        self, change_id: str, kind: str, payload: dict[str, Any], actor: str = ACTOR
    ) -> None:
        """Append one audit record of this kind for this change, once."""
        if any(r.kind == kind for r in await self.store.audit(change_id)):
            return
        await self.store.append_audit(change_id, kind, actor, payload)

    async def run_cases(
        self,
        change: ChangeProposed,
        arm: Literal["current", "candidate", "verify"],
        prompt: str | None,
        min_version: int | None = None,
    ) -> dict[str, float | None]:
        """Run the task's gate set through the real executor and evaluator; scores by case.

        Scores are read back from the store, so a gatekeeper that restarts mid-measurement
        finds the runs that already finished."""
        cases: list[Case] = self.suites[change.task].gate
        run_ids = {case.id: f"{change.change_id}.{arm}.{case.id}" for case in cases}
        for case in cases:
            run_id = run_ids[case.id]
            await self.publish(
                RunRequested(
                    id=f"{run_id}.requested",
                    run_id=run_id,
                    task=change.task,
                    input=case.input,
                    check=case.check,
                    candidate_prompt=prompt,
                    min_prompt_version=min_version,
                    context=RunContext(
                        purpose="gate", change_id=change.change_id, case_id=case.id, arm=arm
                    ),
                )
            )
        scores: dict[str, float | None] = {}
        deadline = time.monotonic() + self.run_timeout_s
        while len(scores) < len(cases) and time.monotonic() < deadline:
            for case_id, run_id in run_ids.items():
                if case_id not in scores:
                    stored = await self.store.get_run(run_id)
                    if stored is not None and stored.scored is not None:
                        scores[case_id] = stored.scored.score
            await asyncio.sleep(0.2)
        missing = [c for c in run_ids if c not in scores]
        if missing:
            log.warning(
                "%s: %d %s runs never scored; counted as failed",
                change.change_id,
                len(missing),
                arm,
            )
        return {case_id: scores.get(case_id) for case_id in run_ids}

    async def roll_back(
        self, change: ChangeProposed, base_prompt: str, applied: int, before: float, after: float
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
                text=base_prompt,
                kind="rollback",
                change_id=change.change_id,
                note=f"rolled back: success {before:.0%} -> {after:.0%}",
            ),
            base_version=applied,
        )

    # --- nodes ----------------------------------------------------------------------------------

    async def validate_node(self, state: ChangeState) -> ChangeState:
        change = ChangeProposed.model_validate(state["change"])
        await self.audit(change.change_id, "received", change.model_dump(mode="json"))
        current = await self.prompts.current(change.task)
        problems = validate(
            change, current_version=current.version if current else None, rules=self.rules
        )
        if change.task not in self.suites:
            problems.append(f"task {change.task!r} has no gate set to measure it on")
        if problems:
            await self.audit(change.change_id, "invalid", {"problems": problems})
            return {"status": "invalid", "problems": problems}
        assert current is not None
        return {"status": "valid", "base_prompt": current.record.text}

    async def measure_node(self, state: ChangeState) -> ChangeState:
        change = ChangeProposed.model_validate(state["change"])
        current, candidate = await asyncio.gather(
            self.run_cases(change, "current", state["base_prompt"]),
            self.run_cases(change, "candidate", change.proposed_prompt),
        )
        measurement = measure(current, candidate, self.threshold)
        await self.audit(change.change_id, "measured", measurement.model_dump(mode="json"))
        return {"status": "measured", "measurement": measurement.model_dump(mode="json")}

    async def ask_node(self, state: ChangeState) -> ChangeState:
        change = ChangeProposed.model_validate(state["change"])
        awaiting = ChangeAwaitingApproval(
            id=f"{change.change_id}.awaiting",
            change_id=change.change_id,
            task=change.task,
            base_version=change.base_version,
            prompt_diff=prompt_diff(state["base_prompt"], change.proposed_prompt),
            rationale=change.rationale,
            measurement=Measurement.model_validate(state["measurement"]),
        )
        await self.publish(awaiting)
        await self.audit(
            change.change_id, "awaiting_approval", {"prompt_diff": awaiting.prompt_diff}
        )
        return {"status": "awaiting_approval"}

    async def decide_node(self, state: ChangeState) -> ChangeState:
        change_id = state["change"]["change_id"]
        decision: dict[str, Any] = interrupt(
            {"change_id": change_id, "question": "Approve this prompt change?"}
        )
        status = "approved" if decision["approved"] else "rejected"
        await self.audit(change_id, status, decision, actor=str(decision["approver"]))
        return {"status": status, "decision": decision}

    async def apply_node(self, state: ChangeState) -> ChangeState:
        change = ChangeProposed.model_validate(state["change"])
        current = await self.prompts.current(change.task)
        if current is not None and current.record.change_id == change.change_id:
            version = current.version  # this node ran before the restart: already written
        else:
            record = PromptRecord(
                text=change.proposed_prompt,
                kind="change",
                change_id=change.change_id,
                note=change.rationale[:500],
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
        return {"status": "applied", "applied_version": version}

    async def verify_node(self, state: ChangeState) -> ChangeState:
        change = ChangeProposed.model_validate(state["change"])
        version = state["applied_version"]
        scores = await self.run_cases(change, "verify", None, min_version=version)
        before = Measurement.model_validate(state["measurement"]).current.success_rate
        after = success_rate(scores, self.threshold)
        await self.audit(
            change.change_id, "verified", {"scores": scores, "before": before, "after": after}
        )
        rolled_back = after < before - ROLLBACK_MARGIN
        if rolled_back:
            version = await self.roll_back(change, state["base_prompt"], version, before, after)
        outcome_type = ChangeRolledBack if rolled_back else ChangeKept
        status = "rolled_back" if rolled_back else "kept"
        outcome = outcome_type(
            id=f"{change.change_id}.{status}",
            change_id=change.change_id,
            task=change.task,
            before=before,
            after=after,
            version=version,
        )
        await self.publish(outcome)
        await self.audit(change.change_id, status, outcome.model_dump(mode="json"))
        return {"status": status, "verified_rate": after}


def _after_validate(state: ChangeState) -> str:
    return "measure" if state["status"] == "valid" else END


def _after_decide(state: ChangeState) -> str:
    return "apply" if state["status"] == "approved" else END


def _after_apply(state: ChangeState) -> str:
    return "verify" if state["status"] == "applied" else END


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
    graph.add_edge(START, "validate")
    graph.add_conditional_edges("validate", _after_validate, ["measure", END])
    graph.add_edge("measure", "ask")
    graph.add_edge("ask", "decide")
    graph.add_conditional_edges("decide", _after_decide, ["apply", END])
    graph.add_conditional_edges("apply", _after_apply, ["verify", END])
    graph.add_edge("verify", END)
    return graph.compile(checkpointer=checkpointer)

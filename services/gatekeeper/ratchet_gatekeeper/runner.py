"""Drives change threads: start on a proposal, resume on a decision, finish what a crash left."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from ratchet.contracts import ChangeDecision, ChangeProposed
from ratchet.natsconf import POLICY_APPROVER
from ratchet_gatekeeper.graph import Gate

log = logging.getLogger("ratchet.gatekeeper")


class EarlyDecision(RuntimeError):
    """A decision on the right evidence arrived before its thread reached the gate (a crash
    interrupted it between publishing the evidence and waiting); raising gets it redelivered."""


class GateRunner:
    """One change thread runs at a time: a decision waits for the proposal's run to reach the
    gate, so a fast approver answering ``change.awaiting_approval`` cannot race the checkpoint."""

    def __init__(self, graph: CompiledStateGraph[Any, Any, Any, Any], gate: Gate) -> None:
        self.graph = graph
        self.gate = gate
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @staticmethod
    def config(change_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": change_id}}

    async def status(self, change_id: str) -> tuple[dict[str, Any], tuple[str, ...]]:
        snapshot = await self.graph.aget_state(self.config(change_id))
        return dict(snapshot.values), tuple(snapshot.next)

    async def on_proposed(self, change: ChangeProposed, *, proposer: str) -> None:
        """Run a new change up to the approval gate. ``proposer``: who proposed, as the server
        authenticated it (the proposal's subject). A redelivered proposal resumes a thread a
        crash interrupted, and is ignored once the thread waits for its decision or is done. A
        proposal reusing an existing change's id, whoever sends it, changes nothing of that
        change: it stays its first proposer's."""
        async with self.locks[change.change_id]:
            values, pending = await self.status(change.change_id)
            if not values:
                start = {"change": change.model_dump(mode="json"), "proposer": proposer}
                await self.graph.ainvoke(start, self.config(change.change_id))
            elif pending and pending != ("decide",):
                await self.graph.ainvoke(None, self.config(change.change_id))

    async def on_decision(self, decision: ChangeDecision, *, approved: bool, approver: str) -> bool:
        """Resume a change waiting at the gate. ``approver``: who decided, as the server
        authenticated it (the decision's subject). False (and audited, when the change exists)
        when the decision is refused: no change waits for it, its evidence does not exist yet,
        or it names other evidence than the gate measured."""
        values, _ = await self.status(decision.change_id)
        if not values:
            why = "no such change (yet): nothing to decide on"
            return await self._refuse(decision, approver, why)
        evidence = values.get("evidence_sha256")
        if evidence is None:
            why = "no evidence yet: the change is being measured"
            return await self._refuse(decision, approver, why)
        if decision.evidence_sha256 != evidence:
            why = f"names other evidence than {evidence[:12]}"
            return await self._refuse(decision, approver, why)
        if approved and approver == POLICY_APPROVER and values["change"].get("margin", 0) > 0:
            # held here, not only by the policy approver's own rule: its password sits on every
            # host that runs `ratchet up`
            why = "a change with a non-inferiority margin needs a person, not the policy approver"
            return await self._refuse(decision, approver, why)
        async with self.locks[decision.change_id]:
            return await self._decide(decision, approved=approved, approver=approver)

    async def _refuse(self, decision: ChangeDecision, approver: str, why: str) -> bool:
        log.warning("decision %s on %s refused: %s", decision.id, decision.change_id, why)
        await self.gate.audit(
            decision.change_id,
            "decision_refused",
            {"approver": approver, "reason": decision.reason, "why": why},
            actor=approver,
            key=decision.id,
        )
        return False

    async def _decide(self, decision: ChangeDecision, *, approved: bool, approver: str) -> bool:
        _, pending = await self.status(decision.change_id)
        if pending == ("decide",):
            resume = {
                "approved": approved,
                "approver": approver,
                "reason": decision.reason,
                "evidence_sha256": decision.evidence_sha256,
            }
            await self.graph.ainvoke(Command(resume=resume), self.config(decision.change_id))
            return True
        if pending and set(pending) <= {"apply", "verify", "holdout"}:  # decided, then a crash
            await self.graph.ainvoke(None, self.config(decision.change_id))
            return True
        if pending:  # the evidence exists, but a crash stopped the thread before the gate
            raise EarlyDecision(f"change {decision.change_id} is at {pending}, not at the gate yet")
        log.warning("decision for %s ignored: the change is already decided", decision.change_id)
        return False

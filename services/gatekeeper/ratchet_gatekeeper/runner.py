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

log = logging.getLogger("ratchet.gatekeeper")


class EarlyDecision(RuntimeError):
    """A decision arrived before its change reached the gate; raising it gets it redelivered."""


class GateRunner:
    """One change thread runs at a time: a decision waits for the proposal's run to reach the
    gate, so a fast approver answering ``change.awaiting_approval`` cannot race the checkpoint."""

    def __init__(self, graph: CompiledStateGraph[Any, Any, Any, Any]) -> None:
        self.graph = graph
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @staticmethod
    def config(change_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": change_id}}

    async def status(self, change_id: str) -> tuple[dict[str, Any], tuple[str, ...]]:
        snapshot = await self.graph.aget_state(self.config(change_id))
        return dict(snapshot.values), tuple(snapshot.next)

    async def on_proposed(self, change: ChangeProposed) -> None:
        """Run a new change up to the approval gate; a redelivered proposal resumes a thread a
        crash interrupted, and is ignored once the thread waits for its decision or is done."""
        async with self.locks[change.change_id]:
            values, pending = await self.status(change.change_id)
            if not values:
                await self.graph.ainvoke(
                    {"change": change.model_dump(mode="json")}, self.config(change.change_id)
                )
            elif pending and pending != ("decide",):
                await self.graph.ainvoke(None, self.config(change.change_id))

    async def on_decision(self, decision: ChangeDecision, *, approved: bool) -> bool:
        """Resume a change waiting at the gate. False when no such change is waiting."""
        async with self.locks[decision.change_id]:
            return await self._decide(decision, approved=approved)

    async def _decide(self, decision: ChangeDecision, *, approved: bool) -> bool:
        _, pending = await self.status(decision.change_id)
        if pending == ("decide",):
            resume = {
                "approved": approved,
                "approver": decision.approver,
                "reason": decision.reason,
            }
            await self.graph.ainvoke(Command(resume=resume), self.config(decision.change_id))
            return True
        if pending and set(pending) <= {"apply", "verify"}:  # decided, then a crash interrupted
            await self.graph.ainvoke(None, self.config(decision.change_id))
            return True
        if pending:  # still validating or measuring (e.g. in another gatekeeper process)
            raise EarlyDecision(f"change {decision.change_id} is at {pending}, not at the gate yet")
        log.warning("decision for %s ignored: no change waiting for one", decision.change_id)
        return False

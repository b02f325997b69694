"""Drives change threads: start on a proposal, resume on a decision, finish what a crash left."""

from __future__ import annotations

import logging
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from ratchet.contracts import ChangeDecision, ChangeProposed

log = logging.getLogger("ratchet.gatekeeper")


class GateRunner:
    def __init__(self, graph: CompiledStateGraph[Any, Any, Any, Any]) -> None:
        self.graph = graph

    @staticmethod
    def config(change_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": change_id}}

    async def status(self, change_id: str) -> tuple[dict[str, Any], tuple[str, ...]]:
        snapshot = await self.graph.aget_state(self.config(change_id))
        return dict(snapshot.values), tuple(snapshot.next)

    async def on_proposed(self, change: ChangeProposed) -> None:
        """Run a new change up to the approval gate; a redelivered proposal resumes a thread a
        crash interrupted, and is ignored once the thread waits for its decision or is done."""
        values, pending = await self.status(change.change_id)
        if not values:
            await self.graph.ainvoke(
                {"change": change.model_dump(mode="json")}, self.config(change.change_id)
            )
        elif pending and pending != ("decide",):
            await self.graph.ainvoke(None, self.config(change.change_id))

    async def on_decision(self, decision: ChangeDecision, *, approved: bool) -> bool:
        """Resume a change waiting at the gate. False when no such change is waiting."""
        values, pending = await self.status(decision.change_id)
        if pending == ("decide",):
            resume = {
                "approved": approved,
                "approver": decision.approver,
                "reason": decision.reason,
            }
            await self.graph.ainvoke(Command(resume=resume), self.config(decision.change_id))
            return True
        if values and pending:  # decided before a crash; apply or verify did not finish
            await self.graph.ainvoke(None, self.config(decision.change_id))
            return True
        log.warning("decision for %s ignored: no change waiting for one", decision.change_id)
        return False

"""Drives change threads: start on a proposal, resume on a decision or a canary's verdict, finish
what a crash left.

Each thread is worked by one coroutine of one gatekeeper at a time: a lock per change within the
process and, when several gatekeepers share the checkpoints, the change's lease in NATS KV
(:mod:`ratchet_gatekeeper.lease`) across them. A gatekeeper that cannot take the lease raises
:class:`LeaseBusy`, and the message is nacked and comes back later, to it or another."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from ratchet.contracts import ChangeDecision, ChangeProposed, Measurement, RunScored
from ratchet.natsconf import POLICY_APPROVER
from ratchet_gatekeeper.graph import Gate
from ratchet_gatekeeper.lease import LeaseBusy, Leases

log = logging.getLogger("ratchet.gatekeeper")
# where a thread waits for something outside it: a decision, a canary's verdict
WAITING = (("decide",), ("canary_verdict",))
# where a crash after the decision can leave a thread; its redelivered decision finishes them
AFTER_DECISION = {"apply", "verify", "holdout", "canary"}


class EarlyDecision(RuntimeError):
    """A decision on the right evidence arrived before its thread reached the gate (a crash
    interrupted it between publishing the evidence and waiting); raising gets it redelivered."""


class GateRunner:
    """One change thread runs at a time: a decision waits for the proposal's run to reach the
    gate, so a fast approver answering ``change.awaiting_approval`` cannot race the checkpoint."""

    def __init__(
        self,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        gate: Gate,
        leases: Leases | None = None,
    ) -> None:
        """``leases``: the changes' leases, where several gatekeepers share the checkpoints;
        None for a gatekeeper alone (its lock per change is enough)."""
        self.graph = graph
        self.gate = gate
        self.leases = leases
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def working(self, change_id: str) -> AsyncIterator[None]:
        """The change's thread is this coroutine's alone within the block."""
        async with self.locks[change_id]:
            if self.leases is None:
                yield
            else:
                async with self.leases.hold(change_id):
                    yield

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
        values, pending = await self.status(change.change_id)
        if values and (not pending or pending in WAITING):
            return  # a repeat: nothing to do, no lease to take
        async with self.working(change.change_id):
            values, pending = await self.status(change.change_id)
            if not values:
                start = {"change": change.model_dump(mode="json"), "proposer": proposer}
                await self.graph.ainvoke(start, self.config(change.change_id))
            elif pending and pending not in WAITING:
                log.warning(
                    "resuming change %s at %s: its work was cut off", change.change_id, pending
                )
                await self.graph.ainvoke(None, self.config(change.change_id))

    async def on_decision(self, decision: ChangeDecision, *, approved: bool, approver: str) -> bool:
        """Resume a change waiting at the gate. ``approver``: who decided, as the server
        authenticated it (the decision's subject). False (and audited, when the change exists)
        when the decision is refused: no change waits for it, its proposer approves it, its
        evidence does not exist yet, or it names other evidence than the gate measured."""
        values, _ = await self.status(decision.change_id)
        if not values:
            why = "no such change (yet): nothing to decide on"
            return await self._refuse(decision, approver, why)
        if approved and approver == values.get("proposer"):
            # no identity drives a change through both ends of the gate; withdrawing one's own
            # change (a rejection) is fine. A thread from before proposers were recorded has none.
            why = f"{approver} proposed this change and may not approve it: another reviewer must"
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
        measured = values.get("measurement")
        if (
            approved
            and approver == POLICY_APPROVER
            and measured is not None
            and Measurement.model_validate(measured).pool_overused
        ):  # the same reason: the budget holds whichever policy approver answers
            why = "the gate pool is past its budget and may be overfit: a person must decide"
            return await self._refuse(decision, approver, why)
        async with self.working(decision.change_id):
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
        if pending and set(pending) <= AFTER_DECISION:  # decided, then a crash
            log.warning(
                "resuming change %s at %s: its work was cut off", decision.change_id, pending
            )
            await self.graph.ainvoke(None, self.config(decision.change_id))
            _, pending = await self.status(decision.change_id)
            if pending == ("canary_verdict",) and not approved:  # now in canary: stop it
                await self._stop_canary(decision, approver)
            return True
        if pending == ("canary_verdict",):  # decided: the change is in canary now
            if not approved:  # a reviewer stops it: rolled back like a canary shown worse
                await self._stop_canary(decision, approver)
            return True
        if pending:  # the evidence exists, but a crash stopped the thread before the gate
            raise EarlyDecision(f"change {decision.change_id} is at {pending}, not at the gate yet")
        log.warning("decision for %s ignored: the change is already decided", decision.change_id)
        return False

    async def _stop_canary(self, decision: ChangeDecision, approver: str) -> None:
        """A rejection while the change is in canary stops the canary, even one whose test has
        decided but whose thread has not taken the verdict yet: the verdict becomes "stopped"
        in the ledger, the stop is audited with who and why, and the change ends rolled back."""
        tally = await self.gate.ledger.stop_canary(decision.change_id)
        if tally is None or tally.finished:
            return
        await self.gate.audit(
            decision.change_id,
            "canary_stopped",
            {"approver": approver, "reason": decision.reason},
            actor=approver,
            key=decision.id,
        )
        # the thread is ours (working): take the verdict now, as finish_canary would
        tally = await self.gate.ledger.canary(decision.change_id)
        if tally is not None and tally.decided is not None and not tally.finished:
            verdict = tally.decided.model_dump(mode="json")
            await self.graph.ainvoke(Command(resume=verdict), self.config(decision.change_id))

    async def on_scored(self, score: RunScored) -> None:
        """A score from ``run.scored``: a gate run's goes to the ledger; a live run's counts for
        its task's canary, and once the canary's test has decided, the change's thread takes the
        verdict. A redelivered score finds the decision again, so a crash while promoting or
        rolling back is finished by the redelivery."""
        ledger = self.gate.ledger
        if await ledger.record(score):
            return
        tally = await ledger.count_live(score)
        if tally is not None and tally.decided is not None:
            await self.finish_canary(tally.change_id)

    async def finish_canary(self, change_id: str) -> bool:
        """Resume a change whose canary has a verdict in the ledger and whose thread waits for
        it; True once its thread has taken it. A thread that has not reached the wait yet (a
        crash stopped it before) takes the verdict from the ledger when its redelivered
        decision brings it there."""
        tally = await self.gate.ledger.canary(change_id)
        if tally is None or tally.decided is None:
            return False
        if tally.finished:
            return True
        async with self.working(change_id):
            tally = await self.gate.ledger.canary(change_id)  # again: another may have taken it
            assert tally is not None and tally.decided is not None
            if tally.finished:
                return True
            _, pending = await self.status(change_id)
            if pending != ("canary_verdict",):
                log.warning("canary of %s decided, its thread is at %s", change_id, pending)
                return False
            verdict = tally.decided.model_dump(mode="json")
            await self.graph.ainvoke(Command(resume=verdict), self.config(change_id))
            return True

    async def finish_decided_canaries(self) -> None:
        """At start: every canary decided before a crash, whose thread did not take the
        verdict, takes it now (without waiting for another live score)."""
        for tally in await self.gate.ledger.unfinished():
            if tally.decided is not None:
                try:
                    await self.finish_canary(tally.change_id)
                except LeaseBusy:  # another gatekeeper finishes it
                    log.info("canary of %s is being finished elsewhere", tally.change_id)

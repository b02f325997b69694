"""Joins each run with its score, in whatever order they arrive, and spots failures."""

from __future__ import annotations

from ratchet.contracts import FailureLogged, RunCompleted, RunScored, utcnow
from ratchet.store import FailureRecord, Store, StoredRun


class FailureRecorder:
    def __init__(self, store: Store, *, threshold: float) -> None:
        self.store = store
        self.threshold = threshold

    async def on_completed(self, run: RunCompleted) -> FailureLogged | None:
        return await self._check(await self.store.save_completed(run))

    async def on_scored(self, score: RunScored) -> FailureLogged | None:
        return await self._check(await self.store.save_scored(score))

    async def _check(self, stored: StoredRun) -> FailureLogged | None:
        """A live run scored under the threshold is a failure; gate runs never are (the
        proposer must not see the gate set). Returns the event to publish, also on a redelivery,
        since the first attempt may have stored the failure and crashed before publishing."""
        run, score = stored.completed, stored.scored
        if run is None or score is None or score.score is None:
            return None
        if score.score >= self.threshold or run.context.purpose != "live":
            return None
        await self.store.add_failure(
            FailureRecord(
                run_id=run.run_id,
                task=run.task,
                input=run.input,
                output=run.output,
                score=score.score,
                problems=score.problems,
                trace=run.trace,
                prompt_version=run.prompt_version,
                rules_sha256=run.rules_sha256,
                model=run.model,
                logged_at=utcnow(),
            )
        )
        return FailureLogged(
            id=f"{run.run_id}.failure",
            run_id=run.run_id,
            task=run.task,
            score=score.score,
            problems=score.problems,
        )

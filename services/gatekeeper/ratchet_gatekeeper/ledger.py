"""The gatekeeper's own tables: the gate runs it issued, their scores, and the pools they used;
the canaries and the live scores they counted.

Scores arrive as ``run.scored`` events; only a score for a run the gatekeeper issued, scored for a
gate purpose, counts, and only the first one. A measurement waits on them here (no polling), and
a gatekeeper that restarts mid-measurement finds the scores that arrived before the crash.

While a change is in canary, each scored live run of its task that used one of its two versions
counts once (by run id) for that version's arm, and after each count the canary's test
(:mod:`ratchet.canary`) is evaluated; the first verdict that is not "running" is stored and the
counts stop there, so a redelivered score, or a crash before the change's thread took the verdict,
finds the same verdict again. A restarted gatekeeper continues from the counts here.

The tables live in a SQLite file in the gatekeeper's home, or, with ``checkpoint_url`` set, in
PostgreSQL beside the checkpoints (:mod:`ratchet_gatekeeper.sql`). There they are shared by every
gatekeeper of the deployment, and must be: the gatekeepers share the durable consumer of
``run.scored``, so a gate run's score reaches any of them, not only the one measuring, and a
standby that takes a change over finds the scores that arrived before. A shared ledger is read
again where another process may have written it: a measurement also looks for missing scores
every ``POLL_S``, and a live score looks its task's canary up in the tables. No other service
opens them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from ratchet import canary
from ratchet.contracts import CanaryStats, RunScored, utcnow
from ratchet_gatekeeper.sql import LedgerDb, SqliteDb

SCHEMA = """
CREATE TABLE IF NOT EXISTS gate_runs (
    run_id    TEXT PRIMARY KEY,
    change_id TEXT NOT NULL,
    scored    TEXT
);
CREATE TABLE IF NOT EXISTS pool_uses (
    change_id   TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    pool_sha256 TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pool_uses_by_pool ON pool_uses (pool_sha256);
CREATE TABLE IF NOT EXISTS canaries (
    change_id      TEXT PRIMARY KEY,
    task           TEXT NOT NULL,
    plan           TEXT NOT NULL,
    stable_runs    INTEGER NOT NULL DEFAULT 0,
    stable_score   DOUBLE PRECISION NOT NULL DEFAULT 0,
    canary_runs    INTEGER NOT NULL DEFAULT 0,
    canary_score   DOUBLE PRECISION NOT NULL DEFAULT 0,
    judge_tokens   INTEGER NOT NULL DEFAULT 0,
    decided        TEXT,
    finished       INTEGER NOT NULL DEFAULT 0,
    started_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS canary_runs (
    run_id    TEXT PRIMARY KEY,
    change_id TEXT NOT NULL
);
"""

Arm = Literal["stable", "canary"]
POLL_S = 0.5  # a shared ledger: how often a measurement looks for scores another process kept


class CanaryPlan(BaseModel):
    """How a change's canary runs, fixed when it is applied: the two versions, the share of
    live traffic the new one serves, and the test's settings."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(gt=0.0, lt=1.0)
    stable_version: int = Field(ge=0)
    version: int = Field(ge=0, description="The canary version.")
    margin: float = Field(ge=0.0, le=0.5)
    alpha: float = Field(gt=0.0, lt=0.5)
    max_runs: int = Field(ge=1)


@dataclass(frozen=True)
class CanaryTally:
    """One canary's counts, and its verdict once the test reached one."""

    change_id: str
    task: str
    plan: CanaryPlan
    stable_runs: int = 0
    stable_score: float = 0.0
    canary_runs: int = 0
    canary_score: float = 0.0
    judge_tokens: int = 0
    decided: CanaryStats | None = None
    finished: bool = False

    def arm(self, version: int | None) -> Arm | None:
        """Which arm a run served ``version`` counts for (None: neither, not counted)."""
        if version == self.plan.version:
            return "canary"
        return "stable" if version == self.plan.stable_version else None

    def stats(self) -> CanaryStats:
        """The verdict it reached, else the test on the counts so far."""
        if self.decided is not None:
            return self.decided
        return canary.evaluate(
            stable_version=self.plan.stable_version,
            canary_version=self.plan.version,
            stable_runs=self.stable_runs,
            stable_score=self.stable_score,
            canary_runs=self.canary_runs,
            canary_score=self.canary_score,
            margin=self.plan.margin,
            alpha=self.plan.alpha,
            max_runs=self.plan.max_runs,
            judge_tokens=self.judge_tokens,
        )


class GateRunsMissing(TimeoutError):
    """Some gate runs were not scored in time (an executor or evaluator is down or behind)."""


class GateLedger:
    def __init__(self, db: LedgerDb) -> None:
        self.db = db
        self.awaited: set[str] = set()  # run ids a measurement of this process waits for
        self.scored: dict[str, RunScored] = {}  # the scores of those that arrived
        self.arrived = asyncio.Condition()
        self.canaries: dict[str, CanaryTally] = {}  # by task: canaries their threads have not taken

    @classmethod
    async def open(cls, path: Path) -> Self:
        """The ledger in its own SQLite file (one gatekeeper)."""
        return await cls.on(await SqliteDb.open(path, SCHEMA))

    @classmethod
    async def on(cls, db: LedgerDb) -> Self:
        """The ledger in ``db``, whose tables :data:`SCHEMA` created."""
        ledger = cls(db)
        await ledger._load_canaries()
        return ledger

    async def close(self) -> None:
        await self.db.close()

    async def issue(self, change_id: str, run_ids: Sequence[str]) -> list[str]:
        """Register runs about to be requested; returns those not scored yet (to request)."""
        async with self.db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO gate_runs (run_id, change_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(run_id, change_id) for run_id in run_ids],
            )
        done = await self._load(run_ids)
        return [run_id for run_id in run_ids if run_id not in done]

    async def record(self, score: RunScored) -> bool:
        """Keep the first gate score of a run a gatekeeper issued; False if it does not count."""
        if score.context.purpose != "gate":
            return False
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE gate_runs SET scored = ? WHERE run_id = ? AND scored IS NULL",
                (score.model_dump_json(), score.run_id),
            )
        if changed == 0:
            return False
        async with self.arrived:
            if score.run_id in self.awaited:
                self.scored[score.run_id] = score
                self.arrived.notify_all()
        return True

    async def wait(self, run_ids: Sequence[str], timeout_s: float) -> dict[str, RunScored]:
        """The scores of ``run_ids``, once every one has arrived (in this process, or, in a
        shared ledger, in another gatekeeper that took them from the shared consumer)."""
        wanted = set(run_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self.arrived:
            self.awaited |= wanted
        try:
            found = await self._load(run_ids)
            async with self.arrived:
                self.scored.update(found)
                while not wanted <= self.scored.keys():
                    left = deadline - loop.time()
                    if left <= 0:
                        missing = len(wanted - self.scored.keys())
                        raise GateRunsMissing(
                            f"{missing} of {len(wanted)} gate runs not scored within "
                            f"{timeout_s:.0f} s"
                        )
                    try:
                        pause = min(left, POLL_S) if self.db.shared else left
                        await asyncio.wait_for(self.arrived.wait(), pause)
                    except TimeoutError:
                        if self.db.shared:
                            self.scored.update(await self._load(wanted - self.scored.keys()))
            return {run_id: self.scored[run_id] for run_id in run_ids}
        finally:
            async with self.arrived:
                self.awaited -= wanted
                for run_id in wanted:
                    self.scored.pop(run_id, None)

    async def _load(self, run_ids: Iterable[str]) -> dict[str, RunScored]:
        ids = list(run_ids)
        found: dict[str, RunScored] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT scored FROM gate_runs WHERE scored IS NOT NULL AND run_id IN ({marks})",
                chunk,
            )
            for (scored,) in rows:
                score = RunScored.model_validate_json(scored)
                found[score.run_id] = score
        return found

    async def use_pool(self, change_id: str, task: str, pool_sha256: str) -> int:
        """Count this change as tested on the pool (once); returns the pool's count so far."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO pool_uses (change_id, task, pool_sha256, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (change_id, task, pool_sha256, utcnow().isoformat()),
            )
        rows = await self.db.fetchall(
            "SELECT COUNT(*) FROM pool_uses WHERE pool_sha256 = ?", (pool_sha256,)
        )
        return int(rows[0][0]) if rows else 0

    # --- canaries ---------------------------------------------------------------------------------

    async def start_canary(self, change_id: str, task: str, plan: CanaryPlan) -> CanaryTally:
        """Count live scores for this change's canary from now on (once: a restarted start
        keeps the counts so far)."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO canaries (change_id, task, plan, started_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (change_id, task, plan.model_dump_json(), utcnow().isoformat()),
            )
        tally = await self.canary(change_id)
        assert tally is not None
        if not tally.finished:
            self.canaries[task] = tally
        return tally

    async def count_live(self, score: RunScored) -> CanaryTally | None:
        """Count a scored live run for its task's canary, once per run id, if it used one of the
        canary's two versions and the test has not decided yet; then evaluate the test and keep
        its first verdict. Returns the task's canary (decided or not) unless its thread has
        taken the verdict; None when the task has none. Unscored runs are not counted."""
        if score.context.purpose != "live":
            return None
        tally = await self._canary_of(score.task)
        if tally is None:
            return None
        arm = tally.arm(score.prompt_version)
        if tally.decided is not None or score.score is None or arm is None:
            return tally
        tokens = score.judge_usage.input_tokens + score.judge_usage.output_tokens
        async with self.db.transaction() as tx:
            # the row, locked: a shared ledger's other writers count after this one
            rows = await tx.fetchall(
                f"SELECT {_TALLY_COLUMNS} FROM canaries WHERE change_id = ?{self.db.lock_rows}",
                (tally.change_id,),
            )
            tally = _tally(rows[0])
            if tally.decided is not None or tally.finished:
                return self._cached(tally)
            counted_before = not await tx.execute(
                "INSERT INTO canary_runs (run_id, change_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (score.run_id, tally.change_id),
            )
            if counted_before:  # a redelivery
                return self._cached(tally)
            counted = _count(tally, arm, score.score, tokens)
            await tx.execute(
                "UPDATE canaries SET stable_runs = ?, stable_score = ?, canary_runs = ?, "
                "canary_score = ?, judge_tokens = ?, decided = ? WHERE change_id = ?",
                (
                    counted.stable_runs,
                    counted.stable_score,
                    counted.canary_runs,
                    counted.canary_score,
                    counted.judge_tokens,
                    counted.decided.model_dump_json() if counted.decided else None,
                    counted.change_id,
                ),
            )
        return self._cached(counted)

    async def stop_canary(self, change_id: str) -> CanaryTally | None:
        """A reviewer stopped the change's canary: its verdict is "stopped" with the counts so
        far, also over a verdict of the test's that the change's thread has not taken yet (a
        person's rejection wins; the caller works the change, so nobody is taking it meanwhile).
        A finished canary stays as it ended. None without a canary."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT {_TALLY_COLUMNS} FROM canaries WHERE change_id = ?{self.db.lock_rows}",
                (change_id,),
            )
            if not rows:
                return None
            tally = _tally(rows[0])
            if tally.finished or (tally.decided is not None and tally.decided.verdict == "stopped"):
                return tally
            stopped = replace(
                tally, decided=tally.stats().model_copy(update={"verdict": "stopped"})
            )
            assert stopped.decided is not None
            await tx.execute(
                "UPDATE canaries SET decided = ? WHERE change_id = ?",
                (stopped.decided.model_dump_json(), change_id),
            )
        self._cached(stopped)
        return stopped

    def _cached(self, tally: CanaryTally) -> CanaryTally | None:
        """Keep the newest counts of an unfinished canary in memory; None once finished."""
        if tally.finished:
            self.canaries.pop(tally.task, None)
            return None
        self.canaries[tally.task] = tally
        return tally

    async def _canary_of(self, task: str) -> CanaryTally | None:
        """The task's unfinished canary: from memory, or, in a shared ledger, where another
        gatekeeper may have started or finished it, from the tables."""
        if not self.db.shared:
            return self.canaries.get(task)
        rows = await self.db.fetchall(
            f"SELECT {_TALLY_COLUMNS} FROM canaries WHERE task = ? AND finished = 0 "
            "ORDER BY started_at DESC LIMIT 1",
            (task,),
        )
        if not rows:
            self.canaries.pop(task, None)
            return None
        return self._cached(_tally(rows[0]))

    async def finish_canary(self, change_id: str) -> None:
        """The change's thread took the verdict: the canary is over, and the run ids it counted
        (needed only to count each run once while it ran) are dropped."""
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE canaries SET finished = 1 WHERE change_id = ?", (change_id,))
            await tx.execute("DELETE FROM canary_runs WHERE change_id = ?", (change_id,))
        for task, tally in list(self.canaries.items()):
            if tally.change_id == change_id:
                del self.canaries[task]

    async def canary(self, change_id: str) -> CanaryTally | None:
        """A change's canary as stored, finished or not; None if it never started one."""
        rows = await self.db.fetchall(
            f"SELECT {_TALLY_COLUMNS} FROM canaries WHERE change_id = ?", (change_id,)
        )
        return _tally(rows[0]) if rows else None

    async def unfinished(self) -> list[CanaryTally]:
        """Canaries whose threads have not taken a verdict: running, or decided and waiting."""
        if self.db.shared:
            self.canaries.clear()
            await self._load_canaries()
        return list(self.canaries.values())

    async def _load_canaries(self) -> None:
        rows = await self.db.fetchall(
            f"SELECT {_TALLY_COLUMNS} FROM canaries WHERE finished = 0 ORDER BY started_at"
        )
        for row in rows:
            tally = _tally(row)
            self.canaries[tally.task] = tally


def _count(tally: CanaryTally, arm: Arm, score: float, tokens: int) -> CanaryTally:
    """The tally with one more run of ``arm``, and its verdict if the test now reaches one."""
    if arm == "canary":
        counted = replace(
            tally, canary_runs=tally.canary_runs + 1, canary_score=tally.canary_score + score
        )
    else:
        counted = replace(
            tally, stable_runs=tally.stable_runs + 1, stable_score=tally.stable_score + score
        )
    counted = replace(counted, judge_tokens=tally.judge_tokens + tokens)
    stats = counted.stats()
    return replace(counted, decided=stats) if stats.verdict != "running" else counted


_TALLY_COLUMNS = (
    "change_id, task, plan, stable_runs, stable_score, canary_runs, canary_score, judge_tokens, "
    "decided, finished"
)


def _tally(row: Sequence[object]) -> CanaryTally:
    change_id, task, plan, s_runs, s_score, c_runs, c_score, tokens, decided, finished = row
    return CanaryTally(
        change_id=str(change_id),
        task=str(task),
        plan=CanaryPlan.model_validate_json(str(plan)),
        stable_runs=int(str(s_runs)),
        stable_score=float(str(s_score)),
        canary_runs=int(str(c_runs)),
        canary_score=float(str(c_score)),
        judge_tokens=int(str(tokens)),
        decided=CanaryStats.model_validate_json(str(decided)) if decided else None,
        finished=bool(finished),
    )

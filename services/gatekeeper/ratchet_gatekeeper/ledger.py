"""The gatekeeper's own table: the gate runs it issued, their scores, and the pools they used.

Scores arrive as ``run.scored`` events; only a score for a run the gatekeeper issued, scored for a
gate purpose, counts, and only the first one. A measurement waits on them here (no polling), and
a gatekeeper that restarts mid-measurement finds the scores that arrived before the crash. The file
lives in the gatekeeper's home and no other service opens it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

import aiosqlite

from ratchet.contracts import RunScored, utcnow
from ratchet.store.sqlite import open_own_db

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
"""


class GateRunsMissing(TimeoutError):
    """Some gate runs were not scored in time (an executor or evaluator is down or behind)."""


class GateLedger:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.scored: dict[str, RunScored] = {}  # scores of runs a measurement still waits for
        self.arrived = asyncio.Condition()

    @classmethod
    async def open(cls, path: Path) -> Self:
        return cls(await open_own_db(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

    async def issue(self, change_id: str, run_ids: Sequence[str]) -> list[str]:
        """Register runs about to be requested; returns those not scored yet (to request)."""
        await self.db.executemany(
            "INSERT OR IGNORE INTO gate_runs (run_id, change_id) VALUES (?, ?)",
            [(run_id, change_id) for run_id in run_ids],
        )
        await self.db.commit()
        done = await self._load(run_ids)
        return [run_id for run_id in run_ids if run_id not in done]

    async def record(self, score: RunScored) -> bool:
        """Keep the first gate score of a run this gatekeeper issued; False if it does not count."""
        if score.context.purpose != "gate":
            return False
        cursor = await self.db.execute(
            "UPDATE gate_runs SET scored = ? WHERE run_id = ? AND scored IS NULL",
            (score.model_dump_json(), score.run_id),
        )
        await self.db.commit()
        if cursor.rowcount == 0:
            return False
        async with self.arrived:
            self.scored[score.run_id] = score
            self.arrived.notify_all()
        return True

    async def wait(self, run_ids: Sequence[str], timeout_s: float) -> dict[str, RunScored]:
        """The scores of ``run_ids``, once every one has arrived."""
        wanted = set(run_ids)
        self.scored.update(await self._load(run_ids))
        try:
            async with self.arrived:
                await asyncio.wait_for(
                    self.arrived.wait_for(lambda: wanted <= self.scored.keys()), timeout_s
                )
        except TimeoutError:
            missing = len(wanted - self.scored.keys())
            raise GateRunsMissing(
                f"{missing} of {len(wanted)} gate runs not scored within {timeout_s:.0f} s"
            ) from None
        return {run_id: self.scored.pop(run_id) for run_id in run_ids}

    async def _load(self, run_ids: Iterable[str]) -> dict[str, RunScored]:
        ids = list(run_ids)
        found: dict[str, RunScored] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with self.db.execute(
                f"SELECT scored FROM gate_runs WHERE scored IS NOT NULL AND run_id IN ({marks})",
                chunk,
            ) as cursor:
                async for (scored,) in cursor:
                    score = RunScored.model_validate_json(scored)
                    found[score.run_id] = score
        return found

    async def use_pool(self, change_id: str, task: str, pool_sha256: str) -> int:
        """Count this change as tested on the pool (once); returns the pool's count so far."""
        await self.db.execute(
            "INSERT OR IGNORE INTO pool_uses (change_id, task, pool_sha256, at) "
            "VALUES (?, ?, ?, ?)",
            (change_id, task, pool_sha256, utcnow().isoformat()),
        )
        await self.db.commit()
        async with self.db.execute(
            "SELECT COUNT(*) FROM pool_uses WHERE pool_sha256 = ?", (pool_sha256,)
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

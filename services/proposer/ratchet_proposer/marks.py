"""The proposer's own table: where each task's last proposal left off.

A task's next proposal learns from the failures logged after the newest failure its last proposal
used. The mark is that failure's ``logged_at``, a time on the failure store's clock, so a proposer
on another host with a clock of its own neither skips nor recounts failures. The file
(``proposer.db`` in the proposer's home) is the proposer's alone; nothing else opens it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Self

import aiosqlite

from ratchet.audit import utc_text
from ratchet.contracts import utcnow
from ratchet.store.sqlite import open_own_db

# The stores keep failure times to the microsecond: one tick past a mark is "after" it.
TICK = timedelta(microseconds=1)

SCHEMA = """
CREATE TABLE IF NOT EXISTS last_proposals (
    task           TEXT PRIMARY KEY,
    change_id      TEXT NOT NULL,
    failures_until TEXT NOT NULL,
    at             TEXT NOT NULL
);
"""


class ProposalMarks:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> Self:
        return cls(await open_own_db(path, SCHEMA))

    async def close(self) -> None:
        await self.db.close()

    async def since(self, task: str) -> datetime | None:
        """Where the task's next failures start (None: no proposal yet, every failure counts)."""
        async with self.db.execute(
            "SELECT failures_until FROM last_proposals WHERE task = ?", (task,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else datetime.fromisoformat(row[0]) + TICK

    async def mark(self, task: str, change_id: str, failures_until: datetime) -> None:
        """Remember that ``change_id`` used the task's failures up to ``failures_until``."""
        await self.db.execute(
            "INSERT INTO last_proposals (task, change_id, failures_until, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (task) DO UPDATE SET change_id = excluded.change_id, "
            "failures_until = excluded.failures_until, at = excluded.at",
            (task, change_id, utc_text(failures_until), utc_text(utcnow())),
        )
        await self.db.commit()

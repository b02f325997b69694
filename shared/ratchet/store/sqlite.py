"""The embedded backend: one SQLite file that several processes on one machine share.

WAL mode lets readers run while one process writes; ``busy_timeout`` makes a writer wait for the
lock instead of failing. Audit appends take the write lock first (``BEGIN IMMEDIATE``), so two
processes never read the same chain head. Events are stored as their JSON, which keeps
timezones and every field exactly as they were published. A file from an older release gains the
columns added since when first opened: a trail from before records were signed its signature
columns (its old rows stay unsigned), runs and failures from before origins were kept their
``origin`` (the executor, the only origin there was), and runs from before gate runs were placed
their ``gate_*`` columns, filled in once from each gate run's stored context.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from ratchet.audit import AuditSigner, utc_text
from ratchet.contracts import EXECUTOR_ORIGIN, RunCompleted, RunScored
from ratchet.store.base import (
    AuditRecord,
    FailureQuery,
    FailureRecord,
    Store,
    StoredRun,
    gate_place,
    next_audit_record,
)

BUSY_TIMEOUT_MS = 30_000


async def open_own_db(path: Path, schema: str) -> aiosqlite.Connection:
    """A service's own small SQLite file (the gatekeeper's run ledger, the proposer's marks):
    created with its tables if new, in WAL mode like the store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(path)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(schema)
        await db.commit()
    except BaseException:  # say not a database: its thread would keep the service from exiting
        await db.close()
        raise
    return db


ORIGIN_COLUMN = f"TEXT NOT NULL DEFAULT '{EXECUTOR_ORIGIN}'"
# Where a gate run belongs (ratchet.store.base.GATE_PLACE); NULL for live runs
GATE_COLUMNS = {
    "gate_change": "TEXT",
    "gate_stage": "TEXT",
    "gate_case": "TEXT",
    "gate_arm": "TEXT",
    "gate_repeat": "INTEGER",
}
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    completed   TEXT,
    scored      TEXT,
    origin      {ORIGIN_COLUMN},
    gate_change TEXT,
    gate_stage  TEXT,
    gate_case   TEXT,
    gate_arm    TEXT,
    gate_repeat INTEGER
);
CREATE TABLE IF NOT EXISTS failures (
    run_id    TEXT PRIMARY KEY,
    task      TEXT NOT NULL,
    logged_at TEXT NOT NULL,
    problems  TEXT NOT NULL,
    record    TEXT NOT NULL,
    origin    {ORIGIN_COLUMN}
);
CREATE INDEX IF NOT EXISTS failures_by_task_time ON failures (task, logged_at);
CREATE INDEX IF NOT EXISTS failures_by_time ON failures (logged_at);
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY,
    change_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    payload   TEXT NOT NULL,
    at        TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    key_id    TEXT,
    signature TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_change ON audit (change_id, seq);
"""
# Columns added since the first release, by table, each with its type: added to an older file on
# open (before INDEXES, which may use them).
ADDED_COLUMNS = {
    "audit": {"key_id": "TEXT", "signature": "TEXT"},
    "runs": {"origin": ORIGIN_COLUMN, **GATE_COLUMNS},
    "failures": {"origin": ORIGIN_COLUMN},
}
# Run once, when the column they are keyed by is added (after every column of its table): rows
# stored before it get their values from their stored JSON. A gate run's place comes from its
# context, which either event carries; live runs stay NULL.
BACKFILLS = {
    ("runs", "gate_change"): """
UPDATE runs SET
    gate_change = json_extract(coalesce(completed, scored), '$.context.change_id'),
    gate_stage  = json_extract(coalesce(completed, scored), '$.context.stage'),
    gate_case   = json_extract(coalesce(completed, scored), '$.context.case_id'),
    gate_arm    = json_extract(coalesce(completed, scored), '$.context.arm'),
    gate_repeat = json_extract(coalesce(completed, scored), '$.context.repeat')
WHERE json_extract(coalesce(completed, scored), '$.context.purpose') = 'gate'
""",
}
INDEXES = """
CREATE INDEX IF NOT EXISTS failures_by_origin_time ON failures (origin, logged_at);
CREATE INDEX IF NOT EXISTS runs_by_gate_place
    ON runs (gate_change, gate_stage, gate_case, gate_repeat) WHERE gate_change IS NOT NULL;
"""

RUN_COLUMNS = "run_id, task, origin, completed, scored"
AUDIT_COLUMNS = "seq, change_id, kind, actor, payload, at, prev_hash, hash, key_id, signature"


def _any_problem_contains(problems_json: str, needle: str) -> bool:
    """SQL function: Python's case folding, so the filter matches the Mongo backend's."""
    folded = needle.casefold()
    return any(folded in problem.casefold() for problem in json.loads(problems_json))


def _run(row: aiosqlite.Row) -> StoredRun:
    run_id, task, origin, completed, scored = row
    return StoredRun(
        run_id=run_id,
        task=task,
        origin=origin,
        completed=RunCompleted.model_validate_json(completed) if completed else None,
        scored=RunScored.model_validate_json(scored) if scored else None,
    )


def _audit(row: aiosqlite.Row) -> AuditRecord:
    seq, change_id, kind, actor, payload, at, prev_hash, hash_, key_id, signature = row
    return AuditRecord(
        seq=seq,
        change_id=change_id,
        kind=kind,
        actor=actor,
        payload=json.loads(payload),
        at=datetime.fromisoformat(at),
        prev_hash=prev_hash,
        hash=hash_,
        key_id=key_id,
        signature=signature,
    )


async def _add_columns(db: aiosqlite.Connection) -> None:
    """Give the tables of an older file the columns added since, and their rows those columns'
    values where they can be read from what the row holds (under the write lock, so two
    processes opening the same old file do not both add them)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        for table, added in ADDED_COLUMNS.items():
            rows = await db.execute_fetchall(f"PRAGMA table_info({table})")
            present = {row[1] for row in rows}
            missing = [column for column in added if column not in present]
            for column in missing:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {added[column]}")
            for column in missing:
                if backfill := BACKFILLS.get((table, column)):
                    await db.execute(backfill)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


class SqliteStore(Store):
    """Connects on first use, so it can be built where no event loop runs yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._connect_lock = asyncio.Lock()
        # One connection serves all coroutines: a write must not land inside another's transaction.
        self._write_lock = asyncio.Lock()

    async def _conn(self) -> aiosqlite.Connection:
        async with self._connect_lock:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(self.path, isolation_level=None)
                try:
                    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                    await db.execute("PRAGMA journal_mode = WAL")
                    await db.execute("PRAGMA synchronous = NORMAL")
                    await db.create_function(
                        "any_problem_contains", 2, _any_problem_contains, deterministic=True
                    )
                    await db.executescript(SCHEMA)
                    await _add_columns(db)
                    await db.executescript(INDEXES)
                except BaseException:  # as in open_own_db: its thread would hold the process
                    await db.close()
                    raise
                self._db = db
            return self._db

    async def _upsert_run(self, event: RunCompleted | RunScored, column: str) -> StoredRun:
        db = await self._conn()
        place = gate_place(event)
        updated = ", ".join(f"{name} = excluded.{name}" for name in ("origin", *place))
        async with self._write_lock:
            rows = await db.execute_fetchall(
                f"INSERT INTO runs (run_id, task, {column}, origin, {', '.join(place)}) "
                f"VALUES ({', '.join('?' * (4 + len(place)))}) "
                f"ON CONFLICT (run_id) DO UPDATE SET {column} = excluded.{column}, {updated} "
                f"RETURNING {RUN_COLUMNS}",
                (event.run_id, event.task, event.model_dump_json(), event.origin, *place.values()),
            )
        return _run(next(iter(rows)))

    async def save_completed(self, run: RunCompleted) -> StoredRun:
        return await self._upsert_run(run, "completed")

    async def save_scored(self, score: RunScored) -> StoredRun:
        return await self._upsert_run(score, "scored")

    async def get_run(self, run_id: str) -> StoredRun | None:
        db = await self._conn()
        async with db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)) as cur:
            row = await cur.fetchone()
        return _run(row) if row else None

    async def gate_runs(
        self, change_id: str, stage: str, case_ids: list[str], repeats: int
    ) -> list[StoredRun]:
        if not case_ids:
            return []
        db = await self._conn()
        rows = await db.execute_fetchall(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE gate_change = ? AND gate_stage = ? "
            f"AND gate_case IN ({', '.join('?' * len(case_ids))}) AND gate_repeat < ? "
            "ORDER BY gate_case, gate_arm, gate_repeat, run_id LIMIT ?",
            (change_id, stage, *case_ids, repeats, 2 * len(case_ids) * repeats),
        )
        return [_run(row) for row in rows]

    async def add_failure(self, failure: FailureRecord) -> bool:
        db = await self._conn()
        async with self._write_lock:
            cur = await db.execute(
                "INSERT INTO failures (run_id, task, logged_at, problems, record, origin) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO NOTHING",
                (
                    failure.run_id,
                    failure.task,
                    utc_text(failure.logged_at),
                    json.dumps(failure.problems),
                    failure.model_dump_json(),
                    failure.origin,
                ),
            )
            inserted = cur.rowcount == 1
            await cur.close()
        return inserted

    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        conditions: list[str] = []
        params: list[Any] = []
        if query.task is not None:
            conditions.append("task = ?")
            params.append(query.task)
        if query.since is not None:
            conditions.append("logged_at >= ?")
            params.append(utc_text(query.since))
        if query.until is not None:
            conditions.append("logged_at < ?")
            params.append(utc_text(query.until))
        if query.problem is not None:
            conditions.append("any_problem_contains(problems, ?)")
            params.append(query.problem)
        if query.origin is not None:
            conditions.append("origin = ?")
            params.append(query.origin)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        db = await self._conn()
        rows = await db.execute_fetchall(
            f"SELECT record FROM failures {where} ORDER BY logged_at DESC, run_id DESC LIMIT ?",
            (*params, query.limit),
        )
        return [FailureRecord.model_validate_json(record) for (record,) in rows]

    async def count_failures(self, task: str, since: datetime | None = None) -> int:
        db = await self._conn()
        sql = "SELECT COUNT(*) FROM failures WHERE task = ?"
        params: tuple[str, ...] = (task,)
        if since is not None:
            sql += " AND logged_at >= ?"
            params = (task, utc_text(since))
        rows = await db.execute_fetchall(sql, params)
        return int(next(iter(rows))[0])

    async def append_audit(
        self,
        change_id: str,
        kind: str,
        actor: str,
        payload: dict[str, Any],
        *,
        signer: AuditSigner,
    ) -> AuditRecord:
        db = await self._conn()
        async with self._write_lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                heads = await db.execute_fetchall(
                    "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
                )
                head = next(iter(heads), None)
                record = next_audit_record(
                    (head[0], head[1]) if head else None, change_id, kind, actor, payload, signer
                )
                await db.execute(
                    f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.seq,
                        record.change_id,
                        record.kind,
                        record.actor,
                        json.dumps(record.payload),
                        utc_text(record.at),
                        record.prev_hash,
                        record.hash,
                        record.key_id,
                        record.signature,
                    ),
                )
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
        return record

    async def audit(self, change_id: str | None = None) -> list[AuditRecord]:
        db = await self._conn()
        if change_id is None:
            rows = await db.execute_fetchall(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")
        else:
            rows = await db.execute_fetchall(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE change_id = ? ORDER BY seq", (change_id,)
            )
        return [_audit(row) for row in rows]

    async def audit_head(self) -> AuditRecord | None:
        return await self._audit_row(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1")

    async def audit_at(self, seq: int) -> AuditRecord | None:
        return await self._audit_row(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq = ?", (seq,))

    async def _audit_row(self, sql: str, params: tuple[int, ...] = ()) -> AuditRecord | None:
        db = await self._conn()
        rows = await db.execute_fetchall(sql, params)
        row = next(iter(rows), None)
        return _audit(row) if row else None

    async def close(self) -> None:
        async with self._connect_lock:
            if self._db is not None:
                await self._db.close()
                self._db = None

"""The shared backend for several hosts: PostgreSQL through psycopg 3's async API and a small pool.

It keeps what the SQLite backend keeps, the same way: events, failure records and audit payloads
as JSON text (byte-exact, so a record's hash is reproducible from its row), a run upserted by its
id with its origin and ``gate_*`` place columns set by the latest event, a failure stored once.
Instants are ``timestamptz`` (microseconds, as Python keeps them), so time ranges and ordering
compare instants whatever zone a query was written in; text that orders results or breaks ties
(run ids, a gate run's case and arm) is compared byte by byte (``COLLATE "C"``), as SQLite does,
whatever the database's locale. The problem filter matches Python's case folding exactly: each
failure keeps its problems folded beside the record, and the needle is folded the same way
(PostgreSQL text cannot hold NUL, so there a NUL is kept as U+FFFD, in problems and needle alike;
the record itself, JSON, keeps it).

Audit appends run in one transaction that first takes a transaction-scoped advisory lock, so
appenders in every process on every host take turns: each reads the head only after the one
before it committed, and ``seq`` is the primary key besides, so the chain cannot fork. The tables
are created on first use, under another advisory lock (``CREATE TABLE IF NOT EXISTS`` run at once
by two processes can still collide in PostgreSQL's catalog).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from ratchet.audit import AuditSigner
from ratchet.contracts import EXECUTOR_ORIGIN, RunCompleted, RunScored
from ratchet.store.base import (
    GATE_PLACE,
    AuditRecord,
    FailureQuery,
    FailureRecord,
    Store,
    StoredRun,
    gate_place,
    next_audit_record,
)

POOL_MAX = 4  # connections per process: the services' handlers run a few queries at once
CONNECT_TIMEOUT_S = 30.0
# advisory lock keys, per database: "rstore-s" (creating the tables) and "rstore-a" (appending)
SCHEMA_LOCK = 0x7273746F72652D73
AUDIT_LOCK = 0x7273746F72652D61

TEXT = 'TEXT COLLATE "C"'
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id      {TEXT} PRIMARY KEY,
    task        TEXT NOT NULL,
    completed   TEXT,
    scored      TEXT,
    origin      TEXT NOT NULL DEFAULT '{EXECUTOR_ORIGIN}',
    gate_change {TEXT},
    gate_stage  {TEXT},
    gate_case   {TEXT},
    gate_arm    {TEXT},
    gate_repeat INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_gate_place
    ON runs (gate_change, gate_stage, gate_case, gate_repeat) WHERE gate_change IS NOT NULL;
CREATE TABLE IF NOT EXISTS failures (
    run_id          {TEXT} PRIMARY KEY,
    task            TEXT NOT NULL,
    logged_at       TIMESTAMPTZ NOT NULL,
    problems_folded TEXT[] NOT NULL,
    record          TEXT NOT NULL,
    origin          TEXT NOT NULL DEFAULT '{EXECUTOR_ORIGIN}'
);
CREATE INDEX IF NOT EXISTS failures_by_task_time ON failures (task, logged_at);
CREATE INDEX IF NOT EXISTS failures_by_time ON failures (logged_at);
CREATE INDEX IF NOT EXISTS failures_by_origin_time ON failures (origin, logged_at);
CREATE TABLE IF NOT EXISTS audit (
    seq       BIGINT PRIMARY KEY,
    change_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    payload   TEXT NOT NULL,
    at        TIMESTAMPTZ NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    key_id    TEXT,
    signature TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_change ON audit (change_id, seq);
"""

RUN_COLUMNS = "run_id, task, origin, completed, scored"
AUDIT_COLUMNS = "seq, change_id, kind, actor, payload, at, prev_hash, hash, key_id, signature"
Row = tuple[Any, ...]


def _folded(text: str) -> str:
    """``text`` as the problem filter compares it: case-folded, and storable in PostgreSQL."""
    return text.casefold().replace("\x00", "\ufffd")


def _run(row: Row) -> StoredRun:
    run_id, task, origin, completed, scored = row
    return StoredRun(
        run_id=run_id,
        task=task,
        origin=origin,
        completed=RunCompleted.model_validate_json(completed) if completed else None,
        scored=RunScored.model_validate_json(scored) if scored else None,
    )


def _audit(row: Row) -> AuditRecord:
    seq, change_id, kind, actor, payload, at, prev_hash, hash_, key_id, signature = row
    return AuditRecord(
        seq=seq,
        change_id=change_id,
        kind=kind,
        actor=actor,
        payload=json.loads(payload),
        at=at.astimezone(UTC),  # psycopg gives the session's zone; the trail is kept in UTC
        prev_hash=prev_hash,
        hash=hash_,
        key_id=key_id,
        signature=signature,
    )


async def _fetch(conn: AsyncConnection[Any], sql: str, params: Sequence[Any] = ()) -> list[Row]:
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(sql, params)
        return list(await cursor.fetchall())


class PostgresStore(Store):
    """Tables ``runs``, ``failures`` and ``audit`` in the URL's database. Connects on first use,
    so it can be built where no event loop runs yet."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._connect_lock = asyncio.Lock()

    async def _ready(self) -> AsyncConnectionPool[AsyncConnection[Any]]:
        """The pool, opened and the tables created (once per process; idempotent on the
        server). Fails within 30 s when the database cannot be reached."""
        async with self._connect_lock:
            if self._pool is None:
                pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=POOL_MAX,
                    kwargs={"autocommit": True},
                    open=False,
                    # a connection the server dropped (a restart) is replaced before use
                    check=AsyncConnectionPool.check_connection,
                )
                try:
                    await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
                    async with pool.connection() as conn, conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                        for statement in filter(str.strip, SCHEMA.split(";")):
                            await conn.execute(statement)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        pool = await self._ready()
        async with pool.connection() as conn:
            return await _fetch(conn, sql, params)

    async def _upsert_run(self, event: RunCompleted | RunScored, column: str) -> StoredRun:
        place = gate_place(event)
        updated = ", ".join(f"{name} = excluded.{name}" for name in ("origin", *GATE_PLACE))
        rows = await self._query(
            f"INSERT INTO runs (run_id, task, {column}, origin, {', '.join(GATE_PLACE)}) "
            f"VALUES ({', '.join(['%s'] * (4 + len(GATE_PLACE)))}) "
            f"ON CONFLICT (run_id) DO UPDATE SET {column} = excluded.{column}, {updated} "
            f"RETURNING {RUN_COLUMNS}",
            (event.run_id, event.task, event.model_dump_json(), event.origin, *place.values()),
        )
        return _run(rows[0])

    async def save_completed(self, run: RunCompleted) -> StoredRun:
        return await self._upsert_run(run, "completed")

    async def save_scored(self, score: RunScored) -> StoredRun:
        return await self._upsert_run(score, "scored")

    async def get_run(self, run_id: str) -> StoredRun | None:
        rows = await self._query(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = %s", (run_id,))
        return _run(rows[0]) if rows else None

    async def gate_runs(
        self, change_id: str, stage: str, case_ids: list[str], repeats: int
    ) -> list[StoredRun]:
        if not case_ids:
            return []
        rows = await self._query(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE gate_change = %s AND gate_stage = %s "
            "AND gate_case = ANY(%s) AND gate_repeat < %s "
            "ORDER BY gate_case, gate_arm, gate_repeat, run_id LIMIT %s",
            (change_id, stage, case_ids, repeats, 2 * len(case_ids) * repeats),
        )
        return [_run(row) for row in rows]

    async def add_failure(self, failure: FailureRecord) -> bool:
        pool = await self._ready()
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO failures (run_id, task, logged_at, problems_folded, record, origin) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
                (
                    failure.run_id,
                    failure.task,
                    failure.logged_at,
                    [_folded(problem) for problem in failure.problems],
                    failure.model_dump_json(),
                    failure.origin,
                ),
            )
            return cursor.rowcount == 1

    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        conditions: list[str] = []
        params: list[Any] = []
        if query.task is not None:
            conditions.append("task = %s")
            params.append(query.task)
        if query.since is not None:
            conditions.append("logged_at >= %s")
            params.append(query.since)
        if query.until is not None:
            conditions.append("logged_at < %s")
            params.append(query.until)
        if query.problem is not None:
            conditions.append(  # any one problem holds the needle
                "EXISTS (SELECT 1 FROM (SELECT unnest(problems_folded) AS problem) AS p "
                "WHERE strpos(p.problem, %s) > 0)"
            )
            params.append(_folded(query.problem))
        if query.origin is not None:
            conditions.append("origin = %s")
            params.append(query.origin)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._query(
            f"SELECT record FROM failures {where} ORDER BY logged_at DESC, run_id DESC LIMIT %s",
            (*params, query.limit),
        )
        return [FailureRecord.model_validate_json(record) for (record,) in rows]

    async def count_failures(self, task: str, since: datetime | None = None) -> int:
        sql = "SELECT COUNT(*) FROM failures WHERE task = %s"
        params: tuple[Any, ...] = (task,)
        if since is not None:
            sql += " AND logged_at >= %s"
            params = (task, since)
        rows = await self._query(sql, params)
        return int(rows[0][0])

    async def append_audit(
        self,
        change_id: str,
        kind: str,
        actor: str,
        payload: dict[str, Any],
        *,
        signer: AuditSigner,
    ) -> AuditRecord:
        pool = await self._ready()
        async with pool.connection() as conn, conn.transaction():
            # Held until this transaction ends: the next appender, in any process, reads the
            # head only after this record is committed.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_LOCK,))
            heads = await _fetch(conn, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            head = (int(heads[0][0]), str(heads[0][1])) if heads else None
            record = next_audit_record(head, change_id, kind, actor, payload, signer)
            await conn.execute(
                f"INSERT INTO audit ({AUDIT_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.seq,
                    record.change_id,
                    record.kind,
                    record.actor,
                    json.dumps(record.payload),
                    record.at,
                    record.prev_hash,
                    record.hash,
                    record.key_id,
                    record.signature,
                ),
            )
        return record

    async def audit(self, change_id: str | None = None) -> list[AuditRecord]:
        if change_id is None:
            rows = await self._query(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq")
        else:
            rows = await self._query(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE change_id = %s ORDER BY seq",
                (change_id,),
            )
        return [_audit(row) for row in rows]

    async def audit_head(self) -> AuditRecord | None:
        rows = await self._query(f"SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1")
        return _audit(rows[0]) if rows else None

    async def audit_at(self, seq: int) -> AuditRecord | None:
        rows = await self._query(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq = %s", (seq,))
        return _audit(rows[0]) if rows else None

    async def close(self) -> None:
        async with self._connect_lock:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None

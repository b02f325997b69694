"""Where the gatekeeper keeps its own tables: a SQLite file in its home (one gatekeeper, the
embedded default) or PostgreSQL (``checkpoint_url``: several gatekeepers on several hosts share
the ledger and the LangGraph checkpoints).

The ledger's SQL is written once, with ``?`` placeholders and ``ON CONFLICT DO NOTHING`` (both
databases understand it); :class:`PostgresDb` turns the placeholders into psycopg's ``%s``.
Every write goes through :meth:`LedgerDb.transaction`: in SQLite one connection serialised by a
lock (one process writes the file), in PostgreSQL a pooled connection's transaction, where
``FOR UPDATE`` (:attr:`LedgerDb.lock_rows`) serialises writers in other processes too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg import AsyncConnection
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from ratchet.store.sqlite import open_own_db

Row = tuple[Any, ...]
POOL_MAX = 4  # connections per gatekeeper process: a change's thread, scores, queries
# advisory lock key: one gatekeeper at a time creates the tables ("ratchet" in ASCII)
SCHEMA_LOCK = 0x72617463686574
SCHEMA_LOCK_WAIT_S = 120.0
TRY_LOCK = "SELECT pg_try_advisory_lock(%s) AS locked"


class Tx(Protocol):
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


class LedgerDb(Protocol):
    shared: bool  # other processes write it too: what this one has in memory may be stale
    lock_rows: str  # appended to a SELECT that reads a row before changing it

    def transaction(self) -> Any:  # an async context manager giving a Tx
        ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def close(self) -> None: ...


class _SqliteTx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(row) for row in await self.db.execute_fetchall(sql, params)]


class SqliteDb:
    """The gatekeeper's own file; only this process opens it."""

    shared = False
    lock_rows = ""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.connection = db
        # one write transaction at a time on the shared connection, so no commit carries
        # another writer's half-done change
        self.writing = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, schema: str) -> SqliteDb:
        return cls(await open_own_db(path, schema))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.writing:
            try:
                yield _SqliteTx(self.connection)
            except BaseException:
                await self.connection.rollback()
                raise
            await self.connection.commit()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await _SqliteTx(self.connection).fetchall(sql, params)

    async def close(self) -> None:
        await self.connection.close()


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _PostgresTx:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(_pg(sql), params)
            return cursor.rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.executemany(_pg(sql), rows)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(_pg(sql), params)
            return list(await cursor.fetchall())


class PostgresDb:
    """Tables in PostgreSQL, shared by every gatekeeper of the deployment."""

    shared = True
    lock_rows = " FOR UPDATE"

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, pool: AsyncConnectionPool[Any], schema: str) -> PostgresDb:
        """Create the tables if missing, one gatekeeper at a time (``CREATE TABLE IF NOT
        EXISTS`` run concurrently can still collide in PostgreSQL's catalog)."""
        db = cls(pool)
        async with schema_lock(pool), db.transaction() as tx:
            for statement in filter(str.strip, schema.split(";")):
                await tx.execute(statement)
        return db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.connection() as conn, conn.transaction():
            yield _PostgresTx(conn)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.pool.connection() as conn:
            return await _PostgresTx(conn).fetchall(sql, params)

    async def close(self) -> None:
        """The pool is closed by whoever opened it (it serves the checkpointer too)."""


@asynccontextmanager
async def postgres_pool(url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A small pool of connections as LangGraph's PostgreSQL checkpointer needs them
    (autocommit, no prepared statements, rows as dicts); the ledger asks for tuples per
    cursor. Fails within 30 s when the database cannot be reached."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=POOL_MAX,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        open=False,
    )
    await pool.open(wait=True, timeout=30.0)
    try:
        yield pool
    finally:
        await pool.close()


async def setup_checkpoints(pool: AsyncConnectionPool[Any]) -> AsyncPostgresSaver:
    """LangGraph's PostgreSQL checkpointer on ``pool``, its tables created or migrated once
    (under the same advisory lock as the ledger's, so two gatekeepers starting together do not
    both migrate)."""
    saver = AsyncPostgresSaver(pool)
    async with schema_lock(pool):
        await saver.setup()
    return saver


@asynccontextmanager
async def schema_lock(pool: AsyncConnectionPool[Any]) -> AsyncIterator[None]:
    """One gatekeeper at a time creates or migrates tables. A session lock, tried rather than
    waited for: LangGraph's migrations create indexes CONCURRENTLY, which wait for every open
    transaction, a blocked lock request included, so two gatekeepers starting together would
    each wait for the other forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SCHEMA_LOCK_WAIT_S
    async with pool.connection() as conn:
        while not await _locked(conn):
            if loop.time() > deadline:
                raise TimeoutError(
                    f"another gatekeeper held the schema lock {SCHEMA_LOCK_WAIT_S} s"
                )
            await asyncio.sleep(0.1)
        try:
            yield
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


async def _locked(conn: AsyncConnection[Any]) -> bool:
    row = await (await conn.execute(TRY_LOCK, (SCHEMA_LOCK,))).fetchone()
    return bool(row and row["locked"])

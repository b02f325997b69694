"""Where runs, failures and the audit trail live; the backend is chosen by URL.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` is the embedded default (one
machine); ``postgresql://`` or ``postgres://`` (any libpq connection URL) is the shared store
of a deployment on several hosts; ``mongodb://`` or ``mongodb+srv://`` is MongoDB (database from
the URL path, ``ratchet`` when the path is empty).

The PostgreSQL backend is imported only when a PostgreSQL URL is opened, so a service on SQLite
or MongoDB does not load psycopg (import :class:`PostgresStore` from ``ratchet.store.postgres``).
"""

from __future__ import annotations

from pathlib import Path

from ratchet.store.base import AuditRecord, FailureQuery, FailureRecord, Store, StoredRun
from ratchet.store.mongo import MongoStore
from ratchet.store.sqlite import SqliteStore

SQLITE_PREFIX = "sqlite:///"
MONGO_PREFIXES = ("mongodb://", "mongodb+srv://")
POSTGRES_PREFIXES = ("postgresql://", "postgres://")

__all__ = [
    "AuditRecord",
    "FailureQuery",
    "FailureRecord",
    "MongoStore",
    "SqliteStore",
    "Store",
    "StoredRun",
    "open_store",
]


def open_store(url: str) -> Store:
    """The store at ``url``; it connects on first use (``async with open_store(url) as store``)."""
    if url.startswith(SQLITE_PREFIX):
        path = url.removeprefix(SQLITE_PREFIX)
        if not path:
            raise ValueError(f"store URL {url!r} names no file: use sqlite:///path/to.db")
        return SqliteStore(Path(path))
    if url.startswith(POSTGRES_PREFIXES):
        from ratchet.store.postgres import PostgresStore

        return PostgresStore(url)
    if url.startswith(MONGO_PREFIXES):
        return MongoStore(url)
    raise ValueError(
        f"unknown store URL {url!r}: expected sqlite:///path/to.db, postgresql://…, mongodb://… "
        "or mongodb+srv://…"
    )

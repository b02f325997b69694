"""Where runs, failures and the audit trail live; the backend is chosen by URL.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` is the embedded default (one
machine); ``mongodb://`` or ``mongodb+srv://`` is production (database from the URL path,
``ratchet`` when the path is empty).
"""

from __future__ import annotations

from pathlib import Path

from ratchet.store.base import AuditRecord, FailureQuery, FailureRecord, Store, StoredRun
from ratchet.store.mongo import MongoStore
from ratchet.store.sqlite import SqliteStore

SQLITE_PREFIX = "sqlite:///"
MONGO_PREFIXES = ("mongodb://", "mongodb+srv://")

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
    if url.startswith(MONGO_PREFIXES):
        return MongoStore(url)
    raise ValueError(
        f"unknown store URL {url!r}: expected sqlite:///path/to.db, mongodb://… or mongodb+srv://…"
    )

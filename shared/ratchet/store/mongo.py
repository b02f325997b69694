"""The production backend: MongoDB through PyMongo's async API (Motor's successor).

Idempotency rests on unique keys: a run and a failure are keyed by run id, an audit record by its
seq. Two appenders that read the same chain head race for the same seq; the loser gets a
duplicate-key error and retries on the new head, so the chain never forks. Events, failure records
and audit payloads are stored as JSON text, which keeps them (and so the audit hashes) byte-exact:
BSON would cut datetimes to milliseconds and drop their timezone. Audit documents from before
records were signed have no ``key_id`` / ``signature`` fields and read back unsigned; runs and
failures from before origins were kept have no ``origin`` and read back as the executor's. A gate
run's place (its change, stage, case, arm, repeat) is kept in ``gate_*`` fields beside its events,
which a live run does not have; gate runs stored before those fields existed are not found by
:meth:`MongoStore.gate_runs` (their context is inside the events' JSON text).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

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

DEFAULT_DATABASE = "ratchet"
APPEND_ATTEMPTS = 100

Document = dict[str, Any]


def _run(doc: Document) -> StoredRun:
    completed, scored = doc.get("completed"), doc.get("scored")
    return StoredRun(
        run_id=doc["_id"],
        task=doc["task"],
        origin=doc.get("origin", EXECUTOR_ORIGIN),
        completed=RunCompleted.model_validate_json(completed) if completed else None,
        scored=RunScored.model_validate_json(scored) if scored else None,
    )


def _audit(doc: Document) -> AuditRecord:
    return AuditRecord(
        seq=doc["_id"],
        change_id=doc["change_id"],
        kind=doc["kind"],
        actor=doc["actor"],
        payload=json.loads(doc["payload"]),
        at=datetime.fromisoformat(doc["at"]),
        prev_hash=doc["prev_hash"],
        hash=doc["hash"],
        key_id=doc.get("key_id"),
        signature=doc.get("signature"),
    )


def _failure_filter(
    task: str | None,
    since: datetime | None,
    until: datetime | None = None,
    problem: str | None = None,
    origin: str | None = None,
) -> Document:
    filter_: Document = {}
    if task is not None:
        filter_["task"] = task
    if origin is not None:  # a failure from before origins were kept is the executor's
        filter_["origin"] = {"$in": [origin, None]} if origin == EXECUTOR_ORIGIN else origin
    logged_at: Document = {}
    if since is not None:
        logged_at["$gte"] = utc_text(since)
    if until is not None:
        logged_at["$lt"] = utc_text(until)
    if logged_at:
        filter_["logged_at"] = logged_at
    if problem is not None:
        filter_["problems"] = {"$regex": re.escape(problem), "$options": "i"}
    return filter_


class MongoStore(Store):
    """Collections ``runs``, ``failures`` and ``audit`` in the URL's database."""

    def __init__(self, url: str) -> None:
        self._client: AsyncMongoClient[Document] = AsyncMongoClient(url)
        database = self._client.get_default_database(DEFAULT_DATABASE)
        self.database_name = database.name
        self._runs: AsyncCollection[Document] = database["runs"]
        self._failures: AsyncCollection[Document] = database["failures"]
        self._audit: AsyncCollection[Document] = database["audit"]
        self._indexes_lock = asyncio.Lock()
        self._indexes_ready = False

    async def _ready(self) -> None:
        """Create the indexes once per process (idempotent on the server too)."""
        async with self._indexes_lock:
            if not self._indexes_ready:
                await self._failures.create_index([("task", ASCENDING), ("logged_at", DESCENDING)])
                await self._failures.create_index([("logged_at", DESCENDING)])
                await self._failures.create_index(
                    [("origin", ASCENDING), ("logged_at", DESCENDING)]
                )
                await self._audit.create_index([("change_id", ASCENDING), ("_id", ASCENDING)])
                await self._runs.create_index(  # sparse: live runs have no gate fields
                    [
                        (field, ASCENDING)
                        for field in ("gate_change", "gate_stage", "gate_case", "gate_repeat")
                    ],
                    sparse=True,
                )
                self._indexes_ready = True

    async def _upsert_run(self, event: RunCompleted | RunScored, field: str) -> StoredRun:
        await self._ready()
        place = gate_place(event)
        update: Document = {
            "$set": {field: event.model_dump_json(), "origin": event.origin},
            "$setOnInsert": {"task": event.task},
        }
        if place["gate_change"] is None:  # a live run: no gate fields (the index skips it)
            update["$unset"] = dict.fromkeys(place, "")
        else:
            update["$set"].update(place)
        doc = await self._runs.find_one_and_update(
            {"_id": event.run_id}, update, upsert=True, return_document=ReturnDocument.AFTER
        )
        assert doc is not None  # an upsert returning the document after it always has one
        return _run(doc)

    async def save_completed(self, run: RunCompleted) -> StoredRun:
        return await self._upsert_run(run, "completed")

    async def save_scored(self, score: RunScored) -> StoredRun:
        return await self._upsert_run(score, "scored")

    async def get_run(self, run_id: str) -> StoredRun | None:
        await self._ready()
        doc = await self._runs.find_one({"_id": run_id})
        return _run(doc) if doc else None

    async def gate_runs(
        self, change_id: str, stage: str, case_ids: list[str], repeats: int
    ) -> list[StoredRun]:
        if not case_ids:
            return []
        await self._ready()
        cursor = (
            self._runs.find(
                {
                    "gate_change": change_id,
                    "gate_stage": stage,
                    "gate_case": {"$in": case_ids},
                    "gate_repeat": {"$lt": repeats},
                }
            )
            .sort([("gate_case", ASCENDING), ("gate_arm", ASCENDING), ("gate_repeat", ASCENDING)])
            .limit(2 * len(case_ids) * repeats)
        )
        return [_run(doc) async for doc in cursor]

    async def add_failure(self, failure: FailureRecord) -> bool:
        await self._ready()
        try:
            await self._failures.insert_one(
                {
                    "_id": failure.run_id,
                    "task": failure.task,
                    "logged_at": utc_text(failure.logged_at),
                    "problems": failure.problems,
                    "origin": failure.origin,
                    "record": failure.model_dump_json(),
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def failures(self, query: FailureQuery) -> list[FailureRecord]:
        await self._ready()
        cursor = (
            self._failures.find(
                _failure_filter(query.task, query.since, query.until, query.problem, query.origin),
                projection={"record": True},
            )
            .sort([("logged_at", DESCENDING), ("_id", DESCENDING)])
            .limit(query.limit)
        )
        return [FailureRecord.model_validate_json(doc["record"]) async for doc in cursor]

    async def count_failures(self, task: str, since: datetime | None = None) -> int:
        await self._ready()
        return await self._failures.count_documents(_failure_filter(task, since))

    async def append_audit(
        self,
        change_id: str,
        kind: str,
        actor: str,
        payload: dict[str, Any],
        *,
        signer: AuditSigner,
    ) -> AuditRecord:
        await self._ready()
        for _ in range(APPEND_ATTEMPTS):
            head = await self._audit.find_one({}, sort=[("_id", DESCENDING)])
            record = next_audit_record(
                (head["_id"], head["hash"]) if head else None,
                change_id,
                kind,
                actor,
                payload,
                signer,
            )
            try:
                await self._audit.insert_one(
                    {
                        "_id": record.seq,
                        "change_id": record.change_id,
                        "kind": record.kind,
                        "actor": record.actor,
                        "payload": json.dumps(record.payload),
                        "at": utc_text(record.at),
                        "prev_hash": record.prev_hash,
                        "hash": record.hash,
                        "key_id": record.key_id,
                        "signature": record.signature,
                    }
                )
            except DuplicateKeyError:
                # Another appender took this seq first: back off a little and chain onto theirs.
                await asyncio.sleep(random.uniform(0, 0.01))
                continue
            return record
        raise RuntimeError(f"audit append lost the race for seq {APPEND_ATTEMPTS} times in a row")

    async def audit(self, change_id: str | None = None) -> list[AuditRecord]:
        await self._ready()
        filter_: Document = {} if change_id is None else {"change_id": change_id}
        cursor = self._audit.find(filter_).sort("_id", ASCENDING)
        return [_audit(doc) async for doc in cursor]

    async def audit_head(self) -> AuditRecord | None:
        await self._ready()
        doc = await self._audit.find_one({}, sort=[("_id", DESCENDING)])
        return _audit(doc) if doc else None

    async def audit_at(self, seq: int) -> AuditRecord | None:
        await self._ready()
        doc = await self._audit.find_one({"_id": seq})
        return _audit(doc) if doc else None

    async def close(self) -> None:
        await self._client.close()

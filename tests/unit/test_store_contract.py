"""The store contract: every backend must pass this one suite (after LangGraph's checkpointer
conformance tests). SQLite runs always, on a real file; PostgreSQL always too, on the tests' own
server (``postgres_server``, tests/pg.py; skipped only where PostgreSQL is not installed); MongoDB
when ``MONGODB_URI`` is set. On a server each test gets a fresh database, dropped afterwards.

Tampering is done the way an attacker would: by writing the database directly, not through the
store. That part knows each backend's layout; everything else goes through ``Store`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from pg import LocalPostgres

from ratchet.audit import (
    GENESIS_HASH,
    UNSIGNED,
    AuditSigner,
    TrailReport,
    anchor_of,
    record_hash,
    utc_text,
    verify_chain,
    verify_trail,
)
from ratchet.contracts import RunCompleted, RunContext, RunScored, TraceStep
from ratchet.store import FailureQuery, FailureRecord, MongoStore, Store, open_store
from ratchet.store.postgres import PostgresStore

MONGODB_URI = os.environ.get("MONGODB_URI")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Backend(ABC):
    """A place a store can live, plus raw write access to it for the tampering tests."""

    url: str

    @abstractmethod
    def update_audit_row(self, seq: int, fields: dict[str, str]) -> None: ...

    @abstractmethod
    def delete_audit_row(self, seq: int) -> None: ...


class SqliteBackend(Backend):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"

    def update_audit_row(self, seq: int, fields: dict[str, str]) -> None:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with sqlite3.connect(self.path) as db:
            db.execute(f"UPDATE audit SET {assignments} WHERE seq = ?", (*fields.values(), seq))

    def delete_audit_row(self, seq: int) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute("DELETE FROM audit WHERE seq = ?", (seq,))


class PostgresBackend(Backend):
    def __init__(self, server: LocalPostgres) -> None:
        self.server = server
        self.url = server.new_database()
        self.database = urlsplit(self.url).path.removeprefix("/")

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(sql, params)

    def update_audit_row(self, seq: int, fields: dict[str, str]) -> None:
        assignments = ", ".join(f"{name} = %s" for name in fields)
        self._write(f"UPDATE audit SET {assignments} WHERE seq = %s", (*fields.values(), seq))

    def delete_audit_row(self, seq: int) -> None:
        self._write("DELETE FROM audit WHERE seq = %s", (seq,))

    def drop(self) -> None:
        self.server.psql(f"DROP DATABASE {self.database} WITH (FORCE)")


class MongoBackend(Backend):
    def __init__(self, uri: str) -> None:
        from pymongo import MongoClient

        self.database = f"ratchet_test_{uuid.uuid4().hex[:12]}"
        self.url = urlsplit(uri)._replace(path=f"/{self.database}").geturl()
        self.client: MongoClient[dict[str, Any]] = MongoClient(uri)

    def update_audit_row(self, seq: int, fields: dict[str, str]) -> None:
        self.client[self.database]["audit"].update_one({"_id": seq}, {"$set": fields})

    def delete_audit_row(self, seq: int) -> None:
        self.client[self.database]["audit"].delete_one({"_id": seq})

    def drop(self) -> None:
        self.client.drop_database(self.database)
        self.client.close()


@pytest.fixture(
    params=[
        "sqlite",
        "postgres",
        pytest.param(
            "mongo",
            marks=pytest.mark.skipif(
                MONGODB_URI is None, reason="MONGODB_URI is not set: no MongoDB server to test"
            ),
        ),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path / "ratchet.db")
        return
    if request.param == "postgres":  # the server starts once, for the first test that needs it
        postgres = PostgresBackend(request.getfixturevalue("postgres_server"))
        yield postgres
        postgres.drop()
        return
    assert MONGODB_URI is not None
    mongo = MongoBackend(MONGODB_URI)
    yield mongo
    mongo.drop()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with open_store(backend.url) as opened:
        yield opened


def completed(run_id: str, task: str = "math", output: str = "4") -> RunCompleted:
    return RunCompleted(
        run_id=run_id,
        task=task,
        input="2+2?",
        output=output,
        trace=[TraceStep(kind="model", name="agent", input="2+2?", output=output, ms=12.5)],
        prompt_version=3,
        prompt_sha256="p" * 64,
        rules_sha256="r" * 64,
        model="scripted",
        latency_ms=15.0,
        created_at=datetime(2025, 3, 1, 14, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
    )


def scored(run_id: str, task: str = "math", score: float = 0.2) -> RunScored:
    return RunScored(
        run_id=run_id, task=task, score=score, problems=["wrong answer"], scorer="check:exact"
    )


def failure(
    run_id: str,
    logged_at: datetime,
    task: str = "math",
    problems: tuple[str, ...] = ("wrong answer",),
    origin: str = "executor",
) -> FailureRecord:
    return FailureRecord(
        origin=origin,
        run_id=run_id,
        task=task,
        input="2+2?",
        output="5",
        score=0.0,
        problems=list(problems),
        trace=[TraceStep(kind="tool", name="calculator", input="2+2", output="5", ms=1.25)],
        prompt_version=3,
        rules_sha256="r" * 64,
        model="scripted",
        logged_at=logged_at,
    )


# --- runs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scored_first", [False, True], ids=["completed-first", "scored-first"])
async def test_completed_and_scored_join_in_either_order(store: Store, scored_first: bool) -> None:
    run, score = completed("run-1"), scored("run-1")

    if scored_first:
        first = await store.save_scored(score)
        assert (first.completed, first.scored) == (None, score)
        merged = await store.save_completed(run)
    else:
        first = await store.save_completed(run)
        assert (first.completed, first.scored) == (run, None)
        merged = await store.save_scored(score)

    assert (merged.run_id, merged.task, merged.completed, merged.scored) == (
        "run-1",
        "math",
        run,
        score,
    )
    assert await store.get_run("run-1") == merged


async def test_events_round_trip_with_their_timezone(store: Store) -> None:
    run = completed("run-1")
    await store.save_completed(run)

    stored = await store.get_run("run-1")

    assert stored is not None and stored.completed is not None
    assert stored.completed.created_at.utcoffset() == timedelta(hours=2)
    assert stored.completed.model_dump() == run.model_dump()


async def test_redelivered_completed_keeps_the_score(store: Store) -> None:
    run, score = completed("run-1"), scored("run-1")
    await store.save_completed(run)
    await store.save_scored(score)

    again = await store.save_completed(run)

    assert (again.completed, again.scored) == (run, score)
    assert await store.get_run("run-1") == again


async def test_unknown_run_is_none(store: Store) -> None:
    await store.save_completed(completed("run-1"))

    assert await store.get_run("run-2") is None


# --- failures -----------------------------------------------------------------------------------


async def test_add_failure_is_idempotent_and_keeps_the_first(store: Store) -> None:
    original = failure("run-1", T0)

    assert await store.add_failure(original) is True
    assert await store.add_failure(original) is False
    assert await store.add_failure(failure("run-1", T0, problems=("rewritten",))) is False

    assert await store.failures(FailureQuery()) == [original]
    assert await store.count_failures("math") == 1


async def test_failure_round_trips_in_utc(store: Store) -> None:
    paris_time = datetime(2025, 3, 1, 13, 0, 0, 654321, tzinfo=timezone(timedelta(hours=1)))
    await store.add_failure(failure("run-1", paris_time))

    [stored] = await store.failures(FailureQuery())

    assert stored.logged_at == paris_time
    assert stored.logged_at.utcoffset() == timedelta(0)
    assert stored.trace == [
        TraceStep(kind="tool", name="calculator", input="2+2", output="5", ms=1.25)
    ]


async def test_failures_come_newest_first_up_to_the_limit(store: Store) -> None:
    for minute in (3, 0, 4, 1, 2):  # inserted out of order
        await store.add_failure(failure(f"run-{minute}", T0 + timedelta(minutes=minute)))

    newest = await store.failures(FailureQuery(limit=3))

    assert [f.run_id for f in newest] == ["run-4", "run-3", "run-2"]


async def test_failures_filter_by_task(store: Store) -> None:
    await store.add_failure(failure("math-1", T0, task="math"))
    await store.add_failure(failure("chat-1", T0 + timedelta(minutes=1), task="chat"))
    await store.add_failure(failure("math-2", T0 + timedelta(minutes=2), task="math"))

    math = await store.failures(FailureQuery(task="math"))

    assert [f.run_id for f in math] == ["math-2", "math-1"]
    assert await store.failures(FailureQuery(task="unknown")) == []


async def test_failures_filter_by_half_open_time_range(store: Store) -> None:
    for minute in range(5):
        await store.add_failure(failure(f"run-{minute}", T0 + timedelta(minutes=minute)))

    window = await store.failures(
        FailureQuery(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))
    )
    # The same instants, written in another timezone, select the same window.
    tokyo = timezone(timedelta(hours=9))
    window_tokyo = await store.failures(
        FailureQuery(
            since=(T0 + timedelta(minutes=1)).astimezone(tokyo),
            until=(T0 + timedelta(minutes=3)).astimezone(tokyo),
        )
    )

    assert [f.run_id for f in window] == ["run-2", "run-1"]
    assert window_tokyo == window


async def test_failures_filter_by_problem_text(store: Store) -> None:
    await store.add_failure(failure("slow", T0, problems=("ok format", "Step TIMEOUT after 30s")))
    await store.add_failure(failure("wrong", T0 + timedelta(minutes=1), problems=("wrong sum",)))
    await store.add_failure(
        failure("chat", T0 + timedelta(minutes=2), task="chat", problems=("timeout",))
    )
    await store.add_failure(
        failure("regex-like", T0 + timedelta(minutes=3), problems=("expected a.b",))
    )

    assert [f.run_id for f in await store.failures(FailureQuery(problem="timeout"))] == [
        "chat",
        "slow",
    ]
    assert [f.run_id for f in await store.failures(FailureQuery(task="math", problem="Time"))] == [
        "slow"
    ]
    assert [f.run_id for f in await store.failures(FailureQuery(problem="a.b"))] == ["regex-like"]
    assert await store.failures(FailureQuery(problem="a*b")) == []


async def test_failures_at_one_instant_come_by_run_id_byte_order(store: Store) -> None:
    """Ties on ``logged_at`` break by run id compared byte by byte, whatever the database's
    locale would say (uppercase before lowercase, "-" before "_")."""
    for run_id in ("run_c", "Run-b", "run-a", "run-d"):
        await store.add_failure(failure(run_id, T0))

    assert [f.run_id for f in await store.failures(FailureQuery())] == [
        "run_c",
        "run-d",
        "run-a",
        "Run-b",
    ]


async def test_problem_filter_folds_case_beyond_ascii(store: Store) -> None:
    await store.add_failure(failure("fr", T0, problems=("Échec du calcul",)))
    await store.add_failure(failure("en", T0 + timedelta(minutes=1), problems=("echec",)))

    for needle in ("échec", "ÉCHEC", "Échec DU"):
        assert [f.run_id for f in await store.failures(FailureQuery(problem=needle))] == ["fr"]


async def test_a_problem_with_a_nul_character_is_kept_and_found(store: Store) -> None:
    kept = failure("nul", T0, problems=("bad\x00byte", "fine"))
    await store.add_failure(kept)

    assert await store.failures(FailureQuery(problem="D\x00B")) == [kept]
    assert await store.failures(FailureQuery(problem="bad byte")) == []


async def test_a_failure_without_problems_is_kept_and_matches_no_problem(store: Store) -> None:
    bare = failure("bare", T0, problems=())
    assert await store.add_failure(bare) is True

    assert await store.failures(FailureQuery()) == [bare]
    assert await store.failures(FailureQuery(problem="a")) == []


async def test_count_failures_by_task_since(store: Store) -> None:
    for minute in range(4):
        await store.add_failure(failure(f"math-{minute}", T0 + timedelta(minutes=minute)))
    await store.add_failure(failure("chat-0", T0, task="chat"))

    assert await store.count_failures("math") == 4
    assert await store.count_failures("math", since=T0 + timedelta(minutes=2)) == 2
    assert await store.count_failures("chat", since=T0 + timedelta(minutes=2)) == 0


# --- origins (issue 10) ------------------------------------------------------------------------

SHOP = "app:shop"


@pytest.mark.parametrize("scored_first", [False, True], ids=["completed-first", "scored-first"])
async def test_a_run_keeps_its_origin(store: Store, scored_first: bool) -> None:
    run = completed("app:shop/r1").model_copy(update={"origin": SHOP})
    score = scored("app:shop/r1").model_copy(update={"origin": SHOP})

    for event in (score, run) if scored_first else (run, score):
        saved = await (
            store.save_scored(event)
            if isinstance(event, RunScored)
            else store.save_completed(event)
        )
        assert saved.origin == SHOP

    stored = await store.get_run("app:shop/r1")
    assert stored is not None and stored.origin == SHOP and stored.completed == run
    executor_run = await store.save_completed(completed("r2"))
    assert executor_run.origin == "executor"


async def test_failures_show_and_filter_by_origin(store: Store) -> None:
    await store.add_failure(failure("r1", T0))
    await store.add_failure(failure("app:shop/r2", T0 + timedelta(minutes=1), origin=SHOP))
    await store.add_failure(failure("app:desk/r3", T0 + timedelta(minutes=2), origin="app:desk"))

    everything = await store.failures(FailureQuery())
    assert [(f.run_id, f.origin) for f in everything] == [
        ("app:desk/r3", "app:desk"),
        ("app:shop/r2", SHOP),
        ("r1", "executor"),
    ]
    assert [f.run_id for f in await store.failures(FailureQuery(origin=SHOP))] == ["app:shop/r2"]
    assert [f.run_id for f in await store.failures(FailureQuery(origin="executor"))] == ["r1"]
    assert await store.failures(FailureQuery(task="chat", origin=SHOP)) == []
    assert await store.count_failures("math") == 3  # the proposer counts every origin


# --- a change's gate runs (query.runs) ---------------------------------------------------------


def gate_context(
    case: str, arm: str = "candidate", repeat: int = 0, change: str = "c1", stage: str = "measure"
) -> RunContext:
    return RunContext.model_validate(
        {
            "purpose": "gate",
            "change_id": change,
            "case_id": case,
            "stage": stage,
            "arm": arm,
            "repeat": repeat,
        }
    )


def gate_run(run_id: str, context: RunContext, output: str = "4") -> RunCompleted:
    return completed(run_id, output=output).model_copy(update={"context": context})


def gate_score(run_id: str, context: RunContext, score: float = 1.0) -> RunScored:
    return scored(run_id, score=score).model_copy(update={"context": context})


async def test_gate_runs_are_found_by_change_stage_case_and_repeat(store: Store) -> None:
    """Both arms' runs of the cases asked for, repeats below the bound, by case, arm and repeat;
    never another change's, another stage's, or a live run's (whatever its context names)."""
    for case in ("k1", "k2", "k3"):
        for arm in ("current", "candidate"):
            for repeat in range(3):
                context = gate_context(case, arm, repeat)
                run_id = f"c1.nonce.measure.{arm}.{case}.{repeat}"
                await store.save_completed(gate_run(run_id, context, output=f"{arm} {case}"))
                await store.save_scored(gate_score(run_id, context))
    await store.save_scored(gate_score("scored-only", gate_context("k1", "current", 1)))
    await store.save_completed(gate_run("other-change", gate_context("k1", change="c2")))
    await store.save_completed(gate_run("other-stage", gate_context("k1", stage="verify")))
    live = RunContext(change_id="c1", case_id="k1", stage="measure", arm="candidate")
    await store.save_completed(gate_run("live", live))

    found = await store.gate_runs("c1", "measure", ["k2", "k1", "nope"], repeats=2)

    places = [
        (r.completed.context.case_id, r.completed.context.arm, r.completed.context.repeat)
        for r in found
        if r.completed is not None
    ]
    assert places == [
        (case, arm, repeat)
        for case in ("k1", "k2")
        for arm in ("candidate", "current")
        for repeat in (0, 1)
    ]
    assert [r.run_id for r in found if r.completed is None] == ["scored-only"]
    assert len(found) == 9  # 2 cases x 2 arms x 2 repeats, and the run known by its score only
    assert {r.run_id for r in found}.isdisjoint({"other-change", "other-stage", "live"})
    assert all(r.scored is not None for r in found)
    assert await store.gate_runs("c1", "measure", [], repeats=2) == []
    assert [r.run_id for r in await store.gate_runs("c2", "measure", ["k1"], repeats=1)] == [
        "other-change"
    ]


async def test_a_run_id_saved_again_as_a_live_run_leaves_the_gate(store: Store) -> None:
    """The latest event places a run, as it sets its origin: a gate run id that a live run
    reuses is no gate run any more."""
    context = gate_context("k1")
    await store.save_completed(gate_run("r1", context))
    assert [r.run_id for r in await store.gate_runs("c1", "measure", ["k1"], 1)] == ["r1"]

    await store.save_scored(scored("r1"))  # a live score under the same id

    assert await store.gate_runs("c1", "measure", ["k1"], 1) == []


# --- audit trail --------------------------------------------------------------------------------

SIGNER = AuditSigner.generate()


async def test_audit_appends_a_signed_chain_that_verifies(store: Store) -> None:
    first = await store.append_audit("c1", "proposed", "proposer", {"task": "math"}, signer=SIGNER)
    second = await store.append_audit("c2", "proposed", "proposer", {"task": "chat"}, signer=SIGNER)
    third = await store.append_audit(
        "c1", "decided", "alice", {"approved": True, "why": "ok"}, signer=SIGNER
    )

    assert (first.seq, second.seq, third.seq) == (1, 2, 3)
    assert first.prev_hash == GENESIS_HASH
    assert (second.prev_hash, third.prev_hash) == (first.hash, second.hash)
    assert third.hash == record_hash(
        second.hash, 3, "c1", "decided", "alice", {"approved": True, "why": "ok"}, third.at
    )
    trail = await store.audit()
    assert trail == [first, second, third]
    assert await store.audit("c1") == [first, third]
    assert {r.key_id for r in trail} == {SIGNER.key.id}
    assert all(r.signature and SIGNER.key.verifies(r.hash, r.signature) for r in trail)
    assert verify_trail(trail, SIGNER.key, anchor_of(third)) == TrailReport()


async def test_audit_head_and_record_at_a_seq(store: Store) -> None:
    assert await store.audit_head() is None
    assert await store.audit_at(1) is None
    records = [
        await store.append_audit("c1", kind, "gatekeeper", {}, signer=SIGNER)
        for kind in ("proposed", "measured", "decided")
    ]

    assert await store.audit_head() == records[-1]
    assert await store.audit_at(2) == records[1]
    assert await store.audit_at(4) is None


async def test_audit_payload_reads_back_as_appended(store: Store) -> None:
    appended = await store.append_audit(
        "c1",
        "measured",
        "gatekeeper",
        {"at": T0, "ci95": (-0.1, 0.3), "scores": {"a": None}},
        signer=SIGNER,
    )

    assert appended.payload == {
        "at": "2025-03-01T12:00:00Z",
        "ci95": [-0.1, 0.3],
        "scores": {"a": None},
    }
    assert await store.audit() == [appended]
    assert verify_trail([appended], SIGNER.key, anchor_of(appended)) == TrailReport()


async def test_edited_audit_payload_is_reported_by_seq(store: Store, backend: Backend) -> None:
    for kind in ("proposed", "measured", "decided"):
        await store.append_audit("c1", kind, "gatekeeper", {"approved": False}, signer=SIGNER)
    assert verify_chain(await store.audit()) == []

    backend.update_audit_row(2, {"payload": '{"approved": true}'})

    problems = verify_chain(await store.audit())
    assert len(problems) == 1
    assert "seq 2" in problems[0] and "altered" in problems[0]


async def test_rewritten_audit_record_fails_its_signature(store: Store, backend: Backend) -> None:
    records = [
        await store.append_audit("c1", kind, "gatekeeper", {"approved": False}, signer=SIGNER)
        for kind in ("proposed", "decided", "applied")
    ]
    forged = records[1]
    # A careful forger also recomputes the edited record's own hash; it cannot sign it.
    backend.update_audit_row(
        2,
        {
            "actor": "mallory",
            "hash": record_hash(
                forged.prev_hash, 2, "c1", "decided", "mallory", forged.payload, forged.at
            ),
        },
    )

    report = verify_trail(await store.audit(), SIGNER.key, anchor_of(records[-1]))

    assert report.problems == [
        "seq 3: does not link to seq 2 (seq 2 was rewritten)",
        "seq 2: signature does not match (rewritten or forged after signing)",
    ]


async def test_deleted_audit_record_is_reported_as_a_gap(store: Store, backend: Backend) -> None:
    for kind in ("proposed", "measured", "decided", "applied"):
        await store.append_audit("c1", kind, "gatekeeper", {}, signer=SIGNER)

    backend.delete_audit_row(2)

    problems = verify_chain(await store.audit())
    assert len(problems) == 1
    assert "seq 2 missing" in problems[0]


async def test_concurrent_appends_in_one_process_form_one_chain(store: Store) -> None:
    await asyncio.gather(
        *(
            store.append_audit(f"c{i % 3}", "measured", "gatekeeper", {"i": i}, signer=SIGNER)
            for i in range(30)
        )
    )

    records = await store.audit()
    assert [r.seq for r in records] == list(range(1, 31))
    assert sorted(r.payload["i"] for r in records) == list(range(30))
    assert verify_trail(records, SIGNER.key, anchor_of(records[-1])) == TrailReport()


APPENDER = """
import asyncio, sys, time
from pathlib import Path
from ratchet.audit import AuditSigner
from ratchet.store import open_store

async def main(url: str, who: str, count: int, barrier: Path) -> None:
    signer = AuditSigner.load_or_create(barrier / "key.pem")
    async with open_store(url) as store:
        await store.audit()  # connected, schema ready
        (barrier / f"ready-{who}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.005)
        for i in range(count):
            await store.append_audit(f"change-{who}", "measured", who, {"i": i}, signer=signer)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
"""


async def test_two_processes_appending_at_once_form_one_chain(
    store: Store, backend: Backend, tmp_path: Path
) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    count = 60
    appenders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            APPENDER,
            backend.url,
            who,
            str(count),
            str(barrier),
            stderr=asyncio.subprocess.PIPE,
        )
        for who in ("a", "b")
    ]
    async with asyncio.timeout(60):
        while not all((barrier / f"ready-{who}").exists() for who in ("a", "b")):
            await asyncio.sleep(0.01)
        (barrier / "go").touch()
        errors = [(await appender.communicate())[1] for appender in appenders]

    assert errors == [b"", b""]
    assert [appender.returncode for appender in appenders] == [0, 0]
    records = await store.audit()
    assert [r.seq for r in records] == list(range(1, 2 * count + 1))
    assert len(await store.audit("change-a")) == len(await store.audit("change-b")) == count
    key = AuditSigner.load_or_create(barrier / "key.pem").key  # both made or found the same one
    assert verify_trail(records, key, anchor_of(records[-1])) == TrailReport()


OLD_AUDIT_TABLE = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY, change_id TEXT NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL,
    payload TEXT NOT NULL, at TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
)
"""


async def test_a_trail_from_before_signing_reads_unsigned_and_continues_signed(
    tmp_path: Path,
) -> None:
    """A SQLite file written before records were signed: its table gains the new columns, its
    records read back unsigned (each one a problem: nothing tells them from records whose
    signatures were removed), and new records chain onto them, signed."""
    path = tmp_path / "ratchet.db"
    prev_hash = GENESIS_HASH
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(OLD_AUDIT_TABLE)
        for seq in (1, 2):
            at = T0 + timedelta(seconds=seq)
            hash_ = record_hash(prev_hash, seq, "old", "received", "gatekeeper", {}, at)
            db.execute(
                "INSERT INTO audit VALUES (?, 'old', 'received', 'gatekeeper', '{}', ?, ?, ?)",
                (seq, utc_text(at), prev_hash, hash_),
            )
            prev_hash = hash_

    async with open_store(f"sqlite:///{path}") as store:
        old = await store.audit()
        new = await store.append_audit("c1", "received", "gatekeeper", {}, signer=SIGNER)
        trail = await store.audit()

    assert [(r.seq, r.signature) for r in old] == [(1, None), (2, None)]
    assert (new.seq, new.prev_hash) == (3, old[-1].hash)
    report = verify_trail(trail, SIGNER.key, anchor_of(new))
    assert report.problems == [f"seq 1 to 2: {UNSIGNED}"]
    assert report.notes == []


OLD_RUN_TABLES = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, task TEXT NOT NULL, completed TEXT, scored TEXT);
CREATE TABLE failures (
    run_id TEXT PRIMARY KEY, task TEXT NOT NULL, logged_at TEXT NOT NULL,
    problems TEXT NOT NULL, record TEXT NOT NULL
);
"""


async def test_runs_and_failures_from_before_origins_read_as_the_executors(
    tmp_path: Path,
) -> None:
    """A SQLite file written before origins were kept: its tables gain the ``origin`` column,
    its rows (and their JSON, which has no origin) read back as the executor's, the only origin
    there was, and reported runs' failures are added and filtered beside them."""
    path = tmp_path / "ratchet.db"
    old_run, old_failure = completed("old"), failure("old", T0)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_RUN_TABLES)
        db.execute(
            "INSERT INTO runs VALUES ('old', 'math', ?, NULL)",
            (old_run.model_dump_json(exclude={"origin"}),),
        )
        db.execute(
            "INSERT INTO failures VALUES ('old', 'math', ?, '[\"wrong answer\"]', ?)",
            (utc_text(T0), old_failure.model_dump_json(exclude={"origin"})),
        )

    async with open_store(f"sqlite:///{path}") as store:
        stored = await store.get_run("old")
        await store.add_failure(failure("app:shop/new", T0 + timedelta(minutes=1), origin=SHOP))
        by_origin = {
            origin: [f.run_id for f in await store.failures(FailureQuery(origin=origin))]
            for origin in ("executor", SHOP)
        }
        everything = await store.failures(FailureQuery())

    assert stored is not None and stored.origin == "executor" and stored.completed == old_run
    assert by_origin == {"executor": ["old"], SHOP: ["app:shop/new"]}
    assert [(f.run_id, f.origin) for f in everything] == [
        ("app:shop/new", SHOP),
        ("old", "executor"),
    ]


async def test_gate_runs_from_before_they_were_placed_are_found(tmp_path: Path) -> None:
    """A SQLite file written before gate runs were placed: its runs table gains the ``gate_*``
    columns, filled in once from each gate run's stored context (either event's), so a change
    measured before the upgrade still shows its runs; live runs stay out."""
    path = tmp_path / "ratchet.db"
    context = gate_context("k1", "current", 0)
    old_rows = [
        ("g1", gate_run("g1", context).model_dump_json(exclude={"origin"}), None),
        ("g2", None, gate_score("g2", gate_context("k1", "candidate", 0)).model_dump_json()),
        ("live", completed("live").model_dump_json(exclude={"origin"}), None),
    ]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(OLD_RUN_TABLES)
        db.executemany("INSERT INTO runs VALUES (?, 'math', ?, ?)", old_rows)

    async with open_store(f"sqlite:///{path}") as store:
        found = await store.gate_runs("c1", "measure", ["k1"], repeats=1)
        await store.save_completed(gate_run("g3", gate_context("k1", "current", 1)))
        after = await store.gate_runs("c1", "measure", ["k1"], repeats=2)

    assert [r.run_id for r in found] == ["g2", "g1"]  # candidate before current, by name
    assert [r.run_id for r in after] == ["g2", "g1", "g3"]
    with contextlib.closing(sqlite3.connect(path)) as db:
        placed = db.execute("SELECT run_id FROM runs WHERE gate_change IS NOT NULL").fetchall()
    assert sorted(placed) == [("g1",), ("g2",), ("g3",)]


# --- durability ---------------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(backend: Backend) -> None:
    run, score, lost = completed("run-1"), scored("run-1"), failure("run-1", T0)
    async with open_store(backend.url) as store:
        await store.save_completed(run)
        await store.save_scored(score)
        await store.add_failure(lost)
        trail = [
            await store.append_audit("c1", "proposed", "proposer", {"task": "math"}, signer=SIGNER),
            await store.append_audit("c1", "decided", "alice", {"approved": True}, signer=SIGNER),
        ]

    async with open_store(backend.url) as reopened:
        stored = await reopened.get_run("run-1")
        assert stored is not None
        assert (stored.completed, stored.scored) == (run, score)
        assert await reopened.failures(FailureQuery()) == [lost]
        assert await reopened.add_failure(lost) is False
        assert await reopened.audit() == trail
        appended = await reopened.append_audit(
            "c1", "applied", "gatekeeper", {"version": 4}, signer=SIGNER
        )
        assert (appended.seq, appended.prev_hash) == (3, trail[-1].hash)
        assert verify_trail(await reopened.audit(), SIGNER.key, anchor_of(appended)) == (
            TrailReport()
        )


# --- open_store ---------------------------------------------------------------------------------


async def test_sqlite_url_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dirs" / "ratchet.db"

    async with open_store(f"sqlite:///{path}") as store:
        await store.add_failure(failure("run-1", T0))

    assert path.is_file()


@pytest.mark.parametrize(
    ("url", "database"),
    [
        ("mongodb://127.0.0.1:1/", "ratchet"),
        ("mongodb://127.0.0.1:1", "ratchet"),
        ("mongodb://user:pw@127.0.0.1:1,127.0.0.1:2/prod?replicaSet=rs0", "prod"),
    ],
)
async def test_mongodb_url_names_the_database(url: str, database: str) -> None:
    store = open_store(url)  # no server needed: the client connects on first use

    assert isinstance(store, MongoStore)
    assert store.database_name == database
    await store.close()


@pytest.mark.parametrize(
    "url", ["postgresql://127.0.0.1:1/ratchet", "postgres://localhost/ratchet"]
)
async def test_postgres_urls_open_the_postgres_backend(url: str) -> None:
    store = open_store(url)  # no server needed: the pool opens on first use

    assert isinstance(store, PostgresStore)
    assert store.url == url
    await store.close()


@pytest.mark.parametrize("url", ["postgre://localhost/ratchet", "ratchet.db", "sqlite:///"])
def test_unusable_url_is_refused_with_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///path/to\.db"):
        open_store(url)


OPEN_CORRUPT = """
import asyncio, sqlite3, sys
from ratchet.store import open_store

async def main(url: str) -> None:
    try:
        async with open_store(url) as store:
            await store.audit()
    except sqlite3.DatabaseError as exc:
        print(f"refused: {exc}")

asyncio.run(main(sys.argv[1]))
"""


def test_a_store_file_that_is_no_database_is_an_error_and_the_process_exits(
    tmp_path: Path,
) -> None:
    """Before: the failed connection's thread kept the process alive, so a service with a
    corrupt store hung instead of exiting (and `ratchet up` never saw it crash)."""
    path = tmp_path / "ratchet.db"
    path.write_bytes(b"this is not a database" * 100)
    ran = subprocess.run(
        [sys.executable, "-c", OPEN_CORRUPT, f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("refused: file is not a database"), ran.stdout

"""The example app (examples/langgraph_app.py) as its own process against a running Ratchet: its
runs are reported by the SDK as the app's NATS user, each scored once by the evaluator, and the
failed ones logged and stored by the failure store, tagged with the app's origin."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import FailureLogged, RunScored, app_origin
from ratchet.messaging import QUERY_PREFIX, connect
from ratchet.natsproc import free_port
from ratchet.services import SERVICES
from ratchet.settings import ModelSettings, Settings, to_env
from ratchet.store import FailureQuery, FailureRecord

REPO = Path(__file__).resolve().parents[2]
SCORING = tuple(s for s in SERVICES if s.name in ("evaluator", "failure-store"))
RUNS = 40


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:echo"),  # no local model: the app runs its own
        judge=ModelSettings(spec="scripted:judge-no"),
        proposer=ModelSettings(spec="scripted:proposer-fix"),
        apps=["shop"],
    )
    running = start_stack(settings, services=SCORING)
    yield running
    running.stop()


async def test_example_app_runs_are_scored_and_stored(stack: Stack) -> None:
    assert stack.nats is not None
    nc = await connect(stack.nats.settings_for("client"), name="test-example")
    scored: list[RunScored] = []
    logged: list[FailureLogged] = []
    arrived = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        if msg.subject == RunScored.subject:
            scored.append(RunScored.model_validate_json(msg.data))
        else:
            logged.append(FailureLogged.model_validate_json(msg.data))
        arrived.set()

    async def until(done: Callable[[], bool], timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                arrived.clear()
                await arrived.wait()

    try:
        for subject in (RunScored.subject, FailureLogged.subject):
            await nc.subscribe(subject, cb=on_event)
        await nc.flush()
        # a FAKE model (ratchet.scripted) that wraps every answer in words: under the default
        # prompt the demo suite's exact checks fail and its number checks pass
        command = [
            sys.executable, str(REPO / "examples" / "langgraph_app.py"),
            "--model", "scripted:prompt-sensitive", "--inputs", "suite:answer-only",
            "--runs", str(RUNS), "--users", "10", "--app", "shop",
        ]  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            env=to_env(stack.settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.splitlines()[-1])
        assert summary["runs"] == summary["reported"] == summary["published"] == RUNS
        assert (summary["dropped"], summary["undelivered"], summary["errors"]) == (0, 0, 0)
        assert summary["versions"] == {"0": RUNS}

        await until(lambda: len(scored) >= RUNS)
        failed = {s.run_id for s in scored if (s.score or 0.0) < stack.settings.failure_threshold}
        await until(lambda: len(logged) >= len(failed))
        assert len(scored) == RUNS and {s.origin for s in scored} == {app_origin("shop")}
        assert all(s.run_id.startswith("app:shop/") for s in scored)
        assert {f.run_id for f in logged} == failed and 0 < len(failed) < RUNS
        query = FailureQuery(task="answer-only", origin=app_origin("shop"), limit=RUNS + 10)
        reply = await nc.request(
            f"{QUERY_PREFIX}.failures", query.model_dump_json().encode(), timeout=10
        )
        failures = TypeAdapter(list[FailureRecord]).validate_json(reply.data)
        assert {f.run_id for f in failures} == failed and all(f.trace for f in failures)
    finally:
        await nc.close()

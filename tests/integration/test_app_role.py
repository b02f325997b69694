"""Issue 10: the NATS role of an instrumented app, on a real nats-server.

An app (``app-<name>``) may read the prompts and publish its own runs on ``run.reported.<name>``;
the server refuses everything else it might try: scores, runs of the executor's or the gate's,
decisions, proposals, prompt writes, dead letters, queries, another app's reports. Its reports
then join the loop: the evaluator and the failure store score and store them as that app's.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from pydantic import TypeAdapter

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import (
    ChangeApproved,
    ChangeProposed,
    ChangeRejected,
    DeadLetter,
    FailureLogged,
    GateRunRequested,
    RunCompleted,
    RunReported,
    RunRequested,
    RunScored,
)
from ratchet.jetstream import app_user, publish_js
from ratchet.messaging import PROMPTS_BUCKET, QUERY_PREFIX, connect
from ratchet.natsconf import EVERY_QUERY, POLICY_APPROVER
from ratchet.natsproc import LocalNats, free_port, start_nats
from ratchet.prompts import PromptReader
from ratchet.services import SERVICES
from ratchet.settings import ModelSettings, Settings, to_env
from ratchet.store import FailureQuery, FailureRecord

SHOP, DESK = "shop", "desk"
SAID = re.compile(r'permissions violation for publish to "(.*)"')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalNats]:
    """Ratchet's server with two instrumented apps' users."""
    started = start_nats(
        tmp_path / "home", free_port(), log_path=tmp_path / "nats.log", apps=[SHOP, DESK]
    )
    yield started
    started.stop()


FORBIDDEN = [
    RunScored.subject,
    RunCompleted.subject,
    RunRequested.subject,
    GateRunRequested.subject,
    RunReported.subject,  # bare: names no app
    RunReported.subject_of(DESK),  # another app's
    RunReported.subject_of("mallory"),
    FailureLogged.subject,
    ChangeApproved.subject_of(POLICY_APPROVER),
    ChangeApproved.subject_of(SHOP),
    ChangeRejected.subject_of("operator"),
    ChangeProposed.subject_of("proposer"),
    ChangeProposed.subject_of("client"),
    ChangeProposed.subject_of(SHOP),
    f"$KV.{PROMPTS_BUCKET}.answer-only",
    f"dlq.{RunReported.subject_of(SHOP)}",
    "dlq.run.completed",
    *EVERY_QUERY,
]


async def test_the_server_refuses_an_app_everything_but_its_own_reports(server: LocalNats) -> None:
    refused: set[str] = set()

    async def on_error(exc: Exception) -> None:
        if found := SAID.search(str(exc)):
            refused.add(found.group(1))

    nc = await connect(server.settings_for(app_user(SHOP)), name="test-app", on_error=on_error)
    try:
        for subject in FORBIDDEN:
            await nc.publish(subject, b"{}")
        # its own report is stored: JetStream acknowledges it
        ack = await nc.jetstream().publish(RunReported.subject_of(SHOP), b"{}", timeout=5)
        # the server handles a connection's messages in order: once this is answered, every
        # refusal of what was sent before it has arrived
        await nc.request("$JS.API.INFO", b"", timeout=10)
    finally:
        await nc.close()

    assert refused == {subject.lower() for subject in FORBIDDEN}
    assert ack.stream == "RATCHET" and ack.seq == 1


async def test_an_app_reads_and_watches_the_prompts(server: LocalNats) -> None:
    gatekeeper = await connect(server.settings_for("gatekeeper"), name="test-gatekeeper")
    app = await connect(server.settings_for(app_user(SHOP)), name="test-app")
    reader = PromptReader(app)
    try:
        await reader.start()
        kv = await gatekeeper.jetstream().key_value(PROMPTS_BUCKET)
        version = await kv.put("answer-only", json.dumps({"text": "Answer."}).encode())
        await reader.wait_for_version("answer-only", version)
        stored = reader.current("answer-only")
    finally:
        await reader.stop()
        await app.close()
        await gatekeeper.close()
    assert stored is not None and (stored.version, stored.record.text) == (version, "Answer.")


# --- reported runs join the loop --------------------------------------------------------------

SCORING = tuple(s for s in SERVICES if s.name in ("evaluator", "failure-store"))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        judge=ModelSettings(spec="scripted:judge-no"),
        apps=[SHOP],
    )
    running = start_stack(settings, services=SCORING)
    yield running
    running.stop()


def _report(run_id: str) -> RunReported:
    return RunReported(
        id=f"app:shop/{run_id}.reported",
        run_id=run_id,
        task="answer-only",
        input="What is 7 + 5?",
        output="",
        prompt_version=0,
        prompt_sha256="p" * 64,
        rules_sha256="r" * 64,
        model="their-model",
        latency_ms=20.0,
    )


async def test_a_reported_run_is_scored_and_stored_once_as_the_apps(stack: Stack) -> None:
    """The app publishes its report twice (a retry) and one forged report that names an origin:
    one score and one failure, both the app's; the forgery is dead-lettered with the reason."""
    assert stack.nats is not None
    client = await connect(stack.nats.settings_for("client"), name="test-client")
    app = await connect(stack.nats.settings_for(app_user(SHOP)), name="test-app")
    arrived: dict[str, asyncio.Queue[Msg]] = {
        subject: asyncio.Queue()
        for subject in (RunScored.subject, FailureLogged.subject, "dlq.run.reported.shop")
    }
    try:
        for subject, queue in arrived.items():
            await client.subscribe(subject, cb=queue.put)
        await client.flush()
        js = app.jetstream()
        report = _report("r1")
        await publish_js(js, report, subject=RunReported.subject_of(SHOP))
        again = await js.publish(
            RunReported.subject_of(SHOP),
            report.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"{RunReported.subject}:{report.id}"},
            timeout=5,
        )
        forged = {**json.loads(_report("r2").model_dump_json()), "origin": "executor"}
        await js.publish(RunReported.subject_of(SHOP), json.dumps(forged).encode(), timeout=5)

        score = RunScored.model_validate_json((await _next(arrived[RunScored.subject])).data)
        logged = FailureLogged.model_validate_json(
            (await _next(arrived[FailureLogged.subject])).data
        )
        letter = DeadLetter.model_validate_json(
            (await _next(arrived["dlq.run.reported.shop"])).data
        )
        reply = await client.request(
            f"{QUERY_PREFIX}.failures",
            FailureQuery(task="answer-only").model_dump_json().encode(),
            timeout=5,
        )
    finally:
        await app.close()
        await client.close()

    assert again.duplicate  # the retry is the same event: JetStream dropped it
    assert (score.run_id, score.origin, score.score) == ("app:shop/r1", "app:shop", 0.0)
    assert score.scorer == "judge:scripted:judge-no" and score.judge_usage.input_tokens > 0
    assert (logged.run_id, logged.origin) == ("app:shop/r1", "app:shop")
    assert "a reported run names no origin" in letter.reason
    failures = TypeAdapter(list[FailureRecord]).validate_json(reply.data)
    assert [(f.run_id, f.origin, f.model) for f in failures] == [
        ("app:shop/r1", "app:shop", "their-model")
    ]
    # `ratchet failures` shows where each failure ran, and lists one origin's on request
    shown = await asyncio.to_thread(_cli, stack, "failures", "--origin", "app:shop")
    assert "run app:shop/r1" in shown and "from app:shop" in shown
    none = await asyncio.to_thread(_cli, stack, "failures", "--origin", "executor")
    assert "no failures stored from executor" in none


def _cli(stack: Stack, *args: str) -> str:
    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", *args],
        env={**to_env(stack.settings), "PATH": str(Path(sys.executable).parent), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


async def _next(queue: asyncio.Queue[Msg], timeout: float = 30) -> Msg:
    return await asyncio.wait_for(queue.get(), timeout)

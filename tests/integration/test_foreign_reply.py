"""Issue 9 review: nobody can make a service publish onto a subject they chose.

The asker of a query picks its reply subject, and the publisher of a JetStream event may add a
``reply_to`` header (FastStream answers it); either way the answer goes out with the answering
service's own rights. Before the fix, a client pointed ``query.changes`` at
``$KV.prompts.answer-only`` and the gatekeeper overwrote the live prompt with ``[]``, and a
``run.requested`` with ``reply_to: run.completed`` made the executor publish a second, empty
``run.completed``. Now a query whose reply is not an inbox is refused, and events are never
answered. One stack, scripted models, as the least-privileged ``client``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from nats.aio.msg import Msg

from ratchet.cli.up import Stack, start_stack
from ratchet.contracts import Check, RunRequested
from ratchet.messaging import EVENTS_STREAM, PROMPTS_BUCKET, connect, dedup_headers
from ratchet.natsproc import free_port
from ratchet.settings import ModelSettings, Settings

TASK = "answer-only"


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(
        home=tmp_path_factory.mktemp("foreign-reply") / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        agent=ModelSettings(spec="scripted:echo"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:proposer-parrot"),
        min_failures_to_propose=1_000_000,
    )
    running = start_stack(settings)
    yield running
    running.stop()


async def test_replies_and_reply_to_headers_cannot_aim_a_service(stack: Stack) -> None:
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin"), name="test-observer")
    client = await connect(stack.nats.settings_for("client"), name="test-attacker")
    try:
        kv = await admin.jetstream().key_value(PROMPTS_BUCKET)
        before = await kv.get(TASK)
        completed: list[dict[str, object]] = []
        acked = asyncio.Event()

        async def on_completed(msg: Msg) -> None:
            completed.append(json.loads(msg.data) if msg.data else {})

        async def on_executor_ack(msg: Msg) -> None:
            if msg.data != b"+WPI":  # not a heartbeat: the run's ack, or a nak
                assert msg.data in (b"", b"+ACK"), msg.data
                acked.set()

        await admin.subscribe("run.completed", cb=on_completed)
        # the executor acknowledges a run after its handler returned and any answer went out
        await admin.subscribe(f"$JS.ACK.{EVENTS_STREAM}.executor.>", cb=on_executor_ack)
        await admin.flush()

        # 1. a query aimed at the prompt store, then the same query asked properly
        await client.publish("query.changes", b"{}", reply=f"$KV.{PROMPTS_BUCKET}.{TASK}")
        answer = await client.request("query.changes", b"{}", timeout=10)
        assert json.loads(answer.data) == []  # the gatekeeper answers its inbox as ever

        # 2. an event carrying a reply_to header that names a subject the executor may publish
        run = RunRequested(
            task=TASK, input="What is 2 + 2?", check=Check(kind="exact", expected="4")
        )
        await client.jetstream().publish(
            run.subject,
            run.model_dump_json().encode(),
            stream=EVENTS_STREAM,
            headers={**dedup_headers(run), "reply_to": "run.completed"},
            timeout=5,
        )
        await asyncio.wait_for(acked.wait(), timeout=30)

        after = await kv.get(TASK)
        assert after.revision == before.revision and after.value == before.value
        assert [c.get("run_id") for c in completed] == [run.run_id]  # the real one, once
        log = (stack.settings.home / "logs" / "gatekeeper.log").read_text()
        assert (
            log.count(
                "refused query.changes: its reply subject '$KV.prompts.answer-only' is no inbox"
            )
            == 1
        )
    finally:
        await client.close()
        await admin.close()

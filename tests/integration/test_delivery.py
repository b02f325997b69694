"""Delivery guarantees on a real nats-server (the in-memory test broker ignores ack/nak/term):
redelivery of failed handlers, dead letters with reasons, deduplication of republished events."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable

from faststream.nats import NatsBroker

from ratchet.contracts import Check, RunRequested
from ratchet.messaging import (
    DLQ_STREAM,
    EVENTS_STREAM,
    connect,
    dead_letter_subject,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
)
from ratchet.natsproc import LocalNats


async def started_broker(server: LocalNats, seen: Counter[str]) -> NatsBroker:
    """A broker with the executor's durable consumer whose handler fails for inputs starting
    with 'fail' and counts every delivery. It connects as admin, allowed to publish and consume."""
    settings = server.settings_for("admin").model_copy(update={"max_deliver": 3})
    broker = make_broker(settings, name="test")

    @durable_subscriber(broker, RunRequested.subject, durable="executor", settings=settings)
    async def handle(request: RunRequested) -> None:
        seen[request.input] += 1
        if request.input.startswith("fail"):
            raise RuntimeError(f"cannot handle {request.input}")
        if request.input.startswith("stored"):  # a record the handler reads does not parse
            Check.model_validate({"kind": "exact"})

    await broker.start()
    return broker


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
    """Wait for ``condition``, checked every 50 ms, or fail saying ``what`` never happened."""

    async def check() -> None:
        while not await condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        raise AssertionError(f"{what} within {timeout}s") from None


async def drained(server: LocalNats, durable: str = "executor") -> None:
    """Until the consumer has nothing left to deliver and nothing delivered unacknowledged: every
    delivery there will be has been handled, so counting them now counts them all."""
    nc = await connect(server.settings_for("admin"), name="drain-check")
    try:
        js = nc.jetstream()

        async def idle() -> bool:
            info = await js.consumer_info(EVENTS_STREAM, durable)
            return (info.num_pending, info.num_ack_pending) == (0, 0)

        await until(idle, f"consumer {durable} not drained")
    finally:
        await nc.close()


async def stored(server: LocalNats) -> int:
    """Messages in the events stream."""
    nc = await connect(server.settings_for("admin"), name="stream-check")
    try:
        return int((await nc.jetstream().stream_info(EVENTS_STREAM)).state.messages)
    finally:
        await nc.close()


async def next_dead_letter(server: LocalNats, timeout: float = 15) -> dict[str, object]:
    nc = await connect(server.settings_for("admin"), name="dlq-reader")
    try:
        sub = await nc.jetstream().subscribe(
            dead_letter_subject(RunRequested.subject), stream=DLQ_STREAM
        )
        msg = await sub.next_msg(timeout=timeout)
        letter: dict[str, object] = json.loads(msg.data)
        return letter
    finally:
        await nc.close()


async def test_a_failing_handler_is_retried_then_dead_lettered(nats_server: LocalNats) -> None:
    seen: Counter[str] = Counter()
    broker = await started_broker(nats_server, seen)
    try:
        await publish(event_publisher(broker, RunRequested), RunRequested(task="t", input="fail-1"))
        letter = await next_dead_letter(nats_server)
        await drained(nats_server)
        assert seen == Counter({"fail-1": 3})  # max_deliver, no more, no fewer
        assert letter["deliveries"] == 3 and "cannot handle fail-1" in str(letter["reason"])
        assert json.loads(str(letter["payload"]))["input"] == "fail-1"  # nothing lost
    finally:
        await broker.stop()


async def test_a_malformed_message_is_dead_lettered_at_once(nats_server: LocalNats) -> None:
    seen: Counter[str] = Counter()
    broker = await started_broker(nats_server, seen)
    nc = await connect(nats_server.settings_for("admin"), name="bad-publisher")
    try:
        await nc.jetstream().publish(RunRequested.subject, b'{"task": "t"}')  # no input
        letter = await next_dead_letter(nats_server)
        assert letter["deliveries"] == 1 and "malformed" in str(letter["reason"])
        assert "input" in str(letter["reason"]) and letter["payload"] == '{"task": "t"}'
        assert not seen
    finally:
        await nc.close()
        await broker.stop()


async def test_a_model_check_inside_the_handler_is_retried_not_called_malformed(
    nats_server: LocalNats,
) -> None:
    """Only the message failing to parse is malformed; a record the handler reads failing its
    model is a handler failure: retried with backoff, then dead-lettered saying so."""
    seen: Counter[str] = Counter()
    broker = await started_broker(nats_server, seen)
    try:
        request = RunRequested(task="t", input="stored-1")
        await publish(event_publisher(broker, RunRequested), request)
        letter = await next_dead_letter(nats_server)
        await drained(nats_server)
        assert seen == Counter({"stored-1": 3})  # max_deliver deliveries, as for any failure
        assert letter["deliveries"] == 3 and "handler failed 3 times" in str(letter["reason"])
        assert "malformed" not in str(letter["reason"])
    finally:
        await broker.stop()


async def test_a_republished_event_is_delivered_once(nats_server: LocalNats) -> None:
    seen: Counter[str] = Counter()
    broker = await started_broker(nats_server, seen)
    try:
        request = RunRequested(task="t", input="once")
        publisher = event_publisher(broker, RunRequested)
        for _ in range(3):  # a producer retrying after a lost ack
            await publish(publisher, request)
        await publish(publisher, RunRequested(task="t", input="after"))
        await drained(nats_server)
        assert await stored(nats_server) == 2  # the stream kept one copy of the retried event
        assert seen == Counter({"once": 1, "after": 1}), seen  # and it was handled once
    finally:
        await broker.stop()


async def test_work_left_by_a_stopped_consumer_is_picked_up(nats_server: LocalNats) -> None:
    """A service that stops mid-stream loses nothing: the durable consumer keeps the backlog."""
    admin = await connect(nats_server.settings_for("admin"), name="producer")
    try:
        seen: Counter[str] = Counter()
        first = await started_broker(nats_server, seen)
        await first.stop()
        for i in range(20):
            request = RunRequested(task="t", input=f"job-{i}")
            await admin.jetstream().publish(
                request.subject,
                request.model_dump_json().encode(),
                headers={"Nats-Msg-Id": request.id},
            )
        second = await started_broker(nats_server, seen)
        try:
            await drained(nats_server)
            assert seen == Counter({f"job-{i}": 1 for i in range(20)}), seen  # each job once
        finally:
            await second.stop()
    finally:
        await admin.close()

"""The NATS server itself enforces who may publish what (invariants 1 and 2)."""

from __future__ import annotations

import asyncio
import json
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client

from ratchet.contracts import GateRunRequested, RunScored
from ratchet.messaging import EVENTS_STREAM, PROMPTS_BUCKET, connect
from ratchet.natsproc import LocalNats

T = TypeVar("T")


async def _as(
    server: LocalNats, role: str, act: Callable[[Client], Awaitable[T]], timeout: float = 10
) -> tuple[T | None, list[str]]:
    """Do ``act`` as ``role``: its result (None if the server refused it first) and the errors the
    server reported. A refused publish is never answered, so this waits for whichever comes
    first, the answer or the refusal, then for a PING round trip: the server handles a
    connection's messages in order, so any refusal of what ``act`` sent has arrived by then."""
    errors: list[str] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        if "permissions violation" in str(exc).lower():
            refused.set()

    nc = await nats.connect(
        server.url, user=role, password=server.passwords[role], error_cb=on_error
    )
    acting = asyncio.ensure_future(act(nc))
    refusal = asyncio.ensure_future(refused.wait())
    try:
        either: list[asyncio.Future[Any]] = [acting, refusal]
        done, _ = await asyncio.wait(either, timeout=timeout, return_when=FIRST_COMPLETED)
        assert done, f"{role}: neither an answer nor a refusal in {timeout}s"
        result = acting.result() if acting in done else None
        await nc.flush(timeout=int(timeout))
    finally:
        acting.cancel()
        refusal.cancel()
        await nc.close()
    return result, errors


async def _publish_as(server: LocalNats, role: str, subject: str) -> list[str]:
    """Publish through JetStream as ``role``; returns the errors (violations) the server sent."""
    _, errors = await _as(
        server, role, lambda nc: nc.jetstream().publish(subject, b"{}", timeout=5)
    )
    return errors


@pytest.mark.parametrize("role", ["executor", "failure-store", "proposer", "gatekeeper", "client"])
async def test_only_the_evaluator_may_publish_scores(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, RunScored.subject)
    assert any("permissions violation" in v.lower() and "run.scored" in v for v in violations)


async def test_evaluator_publishes_scores(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "evaluator", RunScored.subject) == []


async def _api_as(server: LocalNats, role: str, subject: str, body: dict[str, object]) -> bool:
    """Ask the JetStream API as ``role``: True if it did it, False if the server refused."""
    reply, errors = await _as(
        server, role, lambda nc: nc.request(subject, json.dumps(body).encode(), timeout=5)
    )
    refused = any("permissions violation" in e.lower() for e in errors)
    assert refused == (reply is None), errors
    if reply is not None and reply.data:  # a pull with nothing to deliver answers with headers
        assert "error" not in json.loads(reply.data), reply.data
    return reply is not None


def _create_consumer(durable: str, subject: str) -> tuple[str, dict[str, object]]:
    """The request a service sends to create (or bind to) its durable pull consumer."""
    config = {"name": durable, "durable_name": durable, "filter_subject": subject}
    return (
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{subject}",
        {"stream_name": EVENTS_STREAM, "config": {**config, "ack_policy": "explicit"}},
    )


GATEKEEPER_DURABLES = [
    ("gatekeeper-proposed", "change.proposed"),
    ("gatekeeper-scored", "run.scored"),
    ("gatekeeper-approved", "change.approved"),
    ("gatekeeper-rejected", "change.rejected"),
]


@pytest.mark.parametrize(
    "role", ["client", "executor", "evaluator", "failure-store", "proposer", "approver"]
)
async def test_only_the_gatekeeper_may_request_gate_runs(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, GateRunRequested.subject)
    assert any(
        "permissions violation" in v.lower() and GateRunRequested.subject in v for v in violations
    )


async def test_gatekeeper_requests_gate_runs(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "gatekeeper", GateRunRequested.subject) == []


@pytest.mark.parametrize(("durable", "subject"), GATEKEEPER_DURABLES)
async def test_the_executor_may_not_consume_as_the_gatekeeper(
    nats_server: LocalNats, durable: str, subject: str
) -> None:
    # the gatekeeper's own consumer exists (the gatekeeper may create it) ...
    assert await _api_as(nats_server, "gatekeeper", *_create_consumer(durable, subject))
    # ... and the executor may neither bind to it nor pull from it
    assert not await _api_as(nats_server, "executor", *_create_consumer(durable, subject))
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}"
    assert not await _api_as(nats_server, "executor", pull, {"batch": 1, "expires": 10**8})
    # nor point one of its own durable names at the gatekeeper's subject
    assert not await _api_as(nats_server, "executor", *_create_consumer("executor-gate", subject))


async def test_the_executor_consumes_gate_runs(nats_server: LocalNats) -> None:
    create = _create_consumer("executor-gate", GateRunRequested.subject)
    assert await _api_as(nats_server, "executor", *create)


@pytest.mark.parametrize("role", ["executor", "evaluator", "failure-store", "proposer", "approver"])
async def test_only_the_gatekeeper_may_write_prompts(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, f"$KV.{PROMPTS_BUCKET}.answer-only")
    assert any("permissions violation" in v.lower() for v in violations)


async def test_gatekeeper_writes_prompts(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "gatekeeper", f"$KV.{PROMPTS_BUCKET}.answer-only") == []


@pytest.mark.parametrize("role", ["executor", "evaluator", "proposer", "gatekeeper", "client"])
async def test_only_approvers_may_decide(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, "change.approved")
    assert any("permissions violation" in v.lower() for v in violations)


async def test_wrong_password_is_refused(nats_server: LocalNats) -> None:
    settings = nats_server.settings_for("executor").model_copy(update={"nats_password": "wrong"})
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await connect(settings, name="intruder", reconnect=False)


async def test_only_the_gatekeeper_may_answer_audit_queries(nats_server: LocalNats) -> None:
    """The audit trail has one owner: a client's ``query.audit`` reaches the gatekeeper, and the
    server refuses every other role that tries to take the question."""

    async def connect_as(role: str, **options: object) -> nats.aio.client.Client:
        return await nats.connect(
            nats_server.url, user=role, password=nats_server.passwords[role], **options
        )

    async def refusal_to(role: str) -> list[str]:
        """The violations the server sends ``role`` for subscribing to ``query.audit``."""
        violations: list[str] = []
        refused = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))
            refused.set()

        nc = await connect_as(role, error_cb=on_error)
        try:
            await nc.subscribe("query.audit")
            await asyncio.wait_for(refused.wait(), timeout=2)
        finally:
            await nc.close()
        return violations

    gatekeeper, client = await connect_as("gatekeeper"), await connect_as("client")
    try:

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"from the gatekeeper")

        await gatekeeper.subscribe("query.audit", cb=answer)
        await gatekeeper.flush()
        reply = await client.request("query.audit", b"{}", timeout=2)
        assert reply.data == b"from the gatekeeper"
    finally:
        await client.close()
        await gatekeeper.close()
    for role in ("executor", "evaluator", "failure-store", "proposer", "approver", "client"):
        violations = await refusal_to(role)
        assert any("permissions violation" in v.lower() for v in violations), (role, violations)

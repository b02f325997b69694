"""The NATS server itself enforces who may publish what (invariants 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from ratchet.contracts import GateRunRequested, RunScored
from ratchet.messaging import EVENTS_STREAM, PROMPTS_BUCKET, connect
from ratchet.natsproc import LocalNats


async def _publish_as(server: LocalNats, role: str, subject: str) -> list[str]:
    """Publish through JetStream as ``role``; returns the permission violations the server sent."""
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc = await nats.connect(
        server.url, user=role, password=server.passwords[role], error_cb=on_error
    )
    try:
        with contextlib.suppress(NatsTimeoutError):  # a refused publish is never acknowledged
            await nc.jetstream().publish(subject, b"{}", timeout=1.0)
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return violations


@pytest.mark.parametrize("role", ["executor", "failure-store", "proposer", "gatekeeper", "client"])
async def test_only_the_evaluator_may_publish_scores(nats_server: LocalNats, role: str) -> None:
    violations = await _publish_as(nats_server, role, RunScored.subject)
    assert any("permissions violation" in v.lower() and "run.scored" in v for v in violations)


async def test_evaluator_publishes_scores(nats_server: LocalNats) -> None:
    assert await _publish_as(nats_server, "evaluator", RunScored.subject) == []


async def _api_as(server: LocalNats, role: str, subject: str, body: dict[str, object]) -> bool:
    """Ask the JetStream API as ``role``: True if it did it, False if the server refused."""
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc = await nats.connect(
        server.url, user=role, password=server.passwords[role], error_cb=on_error
    )
    try:
        try:
            reply = await nc.request(subject, json.dumps(body).encode(), timeout=1.0)
        except NatsTimeoutError:  # a refused request is never answered
            reply = None
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    refused = any("permissions violation" in v.lower() for v in violations)
    assert refused == (reply is None), violations
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

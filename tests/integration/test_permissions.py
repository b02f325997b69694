"""The NATS server itself enforces who may publish what (invariants 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from ratchet.contracts import RunScored
from ratchet.messaging import PROMPTS_BUCKET, connect
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

"""The parts of an HA gatekeeper, each against the real thing: the change leases in NATS KV (as
the gatekeeper's NATS user, on a real nats-server), and the run ledger and the checkpoints in a
real PostgreSQL shared by two gatekeepers' worth of connections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from ratchet.contracts import RunContext, RunScored, TokenUsage
from ratchet.messaging import LEASE_BUCKET, LEASE_TTL_S, connect
from ratchet.natsproc import LocalNats
from ratchet_gatekeeper.lease import LeaseBusy, LeaseLost, Leases, lease_key
from ratchet_gatekeeper.ledger import SCHEMA, CanaryPlan, GateLedger
from ratchet_gatekeeper.sql import PostgresDb, postgres_pool, setup_checkpoints


@pytest.fixture
async def gatekeepers(nats_server: LocalNats) -> AsyncIterator[tuple[Leases, Leases, Client]]:
    """Two gatekeepers' leases, each on its own connection as the gatekeeper's user."""
    first = await connect(nats_server.settings_for("gatekeeper"), name="gatekeeper-1")
    second = await connect(nats_server.settings_for("gatekeeper"), name="gatekeeper-2")
    one = Leases(await first.jetstream().key_value(LEASE_BUCKET))
    two = Leases(await second.jetstream().key_value(LEASE_BUCKET))
    yield one, two, first
    await first.close()
    await second.close()


async def test_one_gatekeeper_at_a_time_works_a_change(
    gatekeepers: tuple[Leases, Leases, Client],
) -> None:
    one, two, _ = gatekeepers
    async with one.hold("change-1"):
        with pytest.raises(LeaseBusy):
            await two.take("change-1", wait_s=0.5)
        async with two.hold("change-2"):  # another change is free
            pass
    async with two.hold("change-1", wait_s=0):  # released: taken at once
        pass


async def test_a_dead_holders_lease_expires_on_the_server_a_live_ones_does_not(
    gatekeepers: tuple[Leases, Leases, Client],
) -> None:
    """A holder that stops renewing (it died): its lease is gone after the bucket's TTL, by
    the server's clock, and the standby takes it then, not before. A lease held as long by a
    live holder is still held: its renewals kept it."""
    one, two, _ = gatekeepers
    async with one.hold("alive"):
        await one.take("dead", wait_s=0)  # taken and never renewed nor released
        began = time.monotonic()
        async with two.hold("dead", wait_s=LEASE_TTL_S + 5):
            waited = time.monotonic() - began
        print(f"lease TTL {LEASE_TTL_S} s: the standby took the dead one's after {waited:.1f} s")
        assert LEASE_TTL_S - 3.5 <= waited <= LEASE_TTL_S + 5
        with pytest.raises(LeaseBusy):
            await two.take("alive", wait_s=0)


async def test_a_lost_lease_stops_the_work(gatekeepers: tuple[Leases, Leases, Client]) -> None:
    """Someone else's write to the lease (a takeover): the holder's next renewal fails and its
    work is cancelled with LeaseLost, and it does not delete the other's lease."""
    one, _, connection = gatekeepers
    kv = await connection.jetstream().key_value(LEASE_BUCKET)
    began = time.monotonic()
    with pytest.raises(LeaseLost):
        async with one.hold("change-1"):
            await kv.put(lease_key("change-1"), b'{"holder": "another"}')
            await asyncio.sleep(LEASE_TTL_S * 2)
    assert time.monotonic() - began < LEASE_TTL_S
    assert (await kv.get(lease_key("change-1"))).value == b'{"holder": "another"}'


# --- the shared ledger and checkpoints in PostgreSQL --------------------------------------------


def gate_score(run_id: str, change_id: str) -> RunScored:
    return RunScored(
        id=f"{run_id}.scored",
        run_id=run_id,
        task="task",
        score=1.0,
        prompt_version=1,
        scorer="check:exact",
        context=RunContext(purpose="gate", change_id=change_id),
    )


def live_score(run_id: str, version: int, score: float) -> RunScored:
    return RunScored(
        id=f"{run_id}.scored",
        run_id=run_id,
        task="task",
        score=score,
        prompt_version=version,
        scorer="check:exact",
        judge_usage=TokenUsage(input_tokens=1, output_tokens=1),
    )


@pytest.fixture
async def two_ledgers(postgres: str) -> AsyncIterator[tuple[GateLedger, GateLedger]]:
    """Two gatekeepers' ledgers on one database, each with its own pool (and checkpointer, set
    up at the same moment, as two gatekeepers starting together would)."""
    async with postgres_pool(postgres) as first, postgres_pool(postgres) as second:
        await asyncio.gather(setup_checkpoints(first), setup_checkpoints(second))
        one, two = await asyncio.gather(
            PostgresDb.open(first, SCHEMA), PostgresDb.open(second, SCHEMA)
        )
        yield await GateLedger.on(one), await GateLedger.on(two)


async def test_a_score_taken_by_another_gatekeeper_reaches_the_measurement(
    two_ledgers: tuple[GateLedger, GateLedger],
) -> None:
    """The gatekeepers share the run.scored consumer: a score the other one took still ends
    the wait, once, and a repeat of it does not count."""
    measuring, other = two_ledgers
    runs = [f"change.nonce.measure.current.case-{i}.0" for i in range(3)]
    assert await measuring.issue("change", runs) == runs
    waiting = asyncio.create_task(measuring.wait(runs, timeout_s=10))
    assert await measuring.record(gate_score(runs[0], "change"))
    for run_id in runs[1:]:
        assert await other.record(gate_score(run_id, "change"))
    assert not await other.record(gate_score(runs[1], "change"))  # a redelivery
    assert sorted(await waiting) == runs
    assert await other.issue("change", runs) == []  # a standby resuming requests none again


async def test_two_gatekeepers_count_each_live_run_of_a_canary_once(
    two_ledgers: tuple[GateLedger, GateLedger],
) -> None:
    one, two = two_ledgers
    plan = CanaryPlan(
        share=0.5, stable_version=1, version=2, margin=0.05, alpha=0.05, max_runs=10_000
    )
    await one.start_canary("change", "task", plan)
    scores = [live_score(f"run-{i}", 1 + i % 2, 1.0) for i in range(40)]
    # every score delivered twice, once to each gatekeeper, concurrently
    await asyncio.gather(*(ledger.count_live(s) for s in scores for ledger in (one, two)))
    tally = await two.canary("change")
    assert tally is not None
    assert (tally.stable_runs, tally.canary_runs, tally.judge_tokens) == (20, 20, 80)
    assert [t.change_id for t in await two.unfinished()] == ["change"]
    await one.finish_canary("change")
    assert await two.unfinished() == []
    assert await two.count_live(live_score("run-late", 2, 1.0)) is None

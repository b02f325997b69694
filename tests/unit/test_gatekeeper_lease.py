"""The change lease's clock, against a fake KV bucket whose renewals hang or fail on cue: the
holder counts from when it sent each write (the server's clock for the entry starts no earlier),
bounds each renewal, and stops its work a third of the TTL before the server would forget the
lease, so a standby that takes it then finds the old holder stopped. The real bucket (takeover,
expiry on the server) is tested in tests/integration/test_gatekeeper_failover_parts.py."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from nats.js.kv import KeyValue

import ratchet_gatekeeper.lease as lease_module
from ratchet_gatekeeper.lease import LeaseLost, Leases

TTL_S = 0.6  # the real one is 10 s; the rule is in thirds of it, so a short one tests the same
CREATE_S = 0.1  # how long the create's acknowledgement takes: the lease started before it


class FakeKv:
    """A fake KV bucket: ``create`` answers after ``CREATE_S``; ``update`` hangs for good while
    ``hang`` is set (a server that never answers, longer than any client timeout), and raises
    ``ConnectionError`` while ``failures`` is above zero (counting it down)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.time = loop.time
        self.created_at: float | None = None  # when the create was sent
        self.hang = False
        self.failures = 0
        self.revision = 0
        self.updates: list[float] = []  # when each update was sent
        self.deleted: list[int] = []

    async def create(self, key: str, value: bytes) -> int:
        self.created_at = self.time()
        await asyncio.sleep(CREATE_S)
        self.revision += 1
        return self.revision

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        self.updates.append(self.time())
        if self.hang:
            await asyncio.Event().wait()
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("no server")
        assert last == self.revision
        self.revision += 1
        return self.revision

    async def delete(self, key: str, last: int | None = None) -> bool:
        assert last is not None
        self.deleted.append(last)
        return True


async def test_a_renewal_that_hangs_stops_the_work_before_the_server_forgets_the_lease() -> None:
    kv = FakeKv()
    leases = Leases(cast(KeyValue, kv), ttl_s=TTL_S)
    kv.hang = True
    stopped_at: float | None = None
    with pytest.raises(LeaseLost, match="not renewed within"):
        async with asyncio.timeout(TTL_S * 5):  # the test's own bound: the old code hung here
            async with leases.hold("change-1"):
                try:
                    await asyncio.Event().wait()  # the work: it goes on until cancelled
                except asyncio.CancelledError:
                    stopped_at = kv.time()
                    raise
    assert kv.created_at is not None and stopped_at is not None
    worked = stopped_at - kv.created_at  # from when the server's clock may have started
    print(f"TTL {TTL_S} s, renewals hang: the work stopped {worked:.3f} s after the create")
    assert len(kv.updates) == 1  # one renewal, a third of the TTL in, never answered
    assert TTL_S * 2 / 3 - 0.05 <= worked < TTL_S * 5 / 6  # stopped with time to spare
    assert kv.deleted == []  # a lost lease is not released: it is no longer this holder's


async def test_a_renewal_that_fails_briefly_is_retried_and_the_lease_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lease_module, "RETRY_S", TTL_S / 30)
    kv = FakeKv()
    leases = Leases(cast(KeyValue, kv), ttl_s=TTL_S)
    kv.failures = 2  # the first renewal and its first retry: NATS is away for a moment
    async with leases.hold("change-1"):
        await asyncio.sleep(TTL_S * 1.5)  # the work outlives the TTL: renewals kept the lease
    assert len(kv.updates) >= 4  # the failed two, then renewals every third of the TTL
    assert kv.deleted == [kv.revision]  # released, naming the revision written last

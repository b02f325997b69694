"""One gatekeeper works a change at a time: a lease per change in the NATS KV bucket
``gate_leases`` (:data:`ratchet.messaging.LEASE_BUCKET`).

Several gatekeepers share the durable consumers, so a change's proposal, its decision and its
canary's scores may each reach a different one. Before a gatekeeper works a change's thread it
takes the change's lease with a KV create, which succeeds only when no lease exists; while it
works it renews the lease every third of :data:`LEASE_TTL_S` (a compare-and-set on the revision
it wrote last); after, it deletes it (compare-and-set too, so it never deletes another's).

Expiry needs no clock but the server's: the bucket's ``max_age`` removes an entry
``LEASE_TTL_S`` after its last write, so the lease of a gatekeeper that died (or lost NATS for
that long) is gone, and the next create succeeds. Per-message TTLs would need nats-server 2.11
and ``allow_msg_ttl``; a deadline in the value would trust each host's clock. A holder whose
renewal is refused, or whose last renewal that succeeded was sent two thirds of the TTL ago, has
lost the lease (each try is bounded by a third of the TTL): its work is cancelled
(:class:`LeaseLost`) a third of the TTL before the server would forget the lease, so it has
stopped before a standby can take it, and the message comes back, to it or to whoever holds the
lease then. Every step of a change's thread is idempotent and checkpointed in the shared
PostgreSQL, so the next holder resumes where the last checkpoint left it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ratchet.messaging import LEASE_TTL_S

log = logging.getLogger("ratchet.gatekeeper")
RETRY_S = 0.5  # how often a gatekeeper waiting for a lease tries again


class LeaseBusy(RuntimeError):
    """Another gatekeeper works this change; the message is left for later (nacked)."""


class LeaseLost(RuntimeError):
    """This gatekeeper's lease ran out or was taken over while it worked: its work stopped."""


def lease_key(change_id: str) -> str:
    """The change's key: a hash, since change ids may hold characters KV keys may not."""
    return "c" + hashlib.sha256(change_id.encode()).hexdigest()[:40]


class Leases:
    """The leases of one gatekeeper process, named by a holder id unique to it."""

    def __init__(self, kv: KeyValue, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.kv = kv
        self.ttl_s = ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def take(self, change_id: str, wait_s: float) -> int:
        """Take the change's lease, waiting up to ``wait_s`` for its holder to release it or
        die; the revision written. :class:`LeaseBusy` if it is still held then."""
        revision, _ = await self._take(change_id, wait_s)
        return revision

    async def _take(self, change_id: str, wait_s: float) -> tuple[int, float]:
        """:meth:`take`, and when (loop time) the create that took it was sent: the server's
        clock for the lease started no earlier."""
        value = json.dumps({"holder": self.holder, "change_id": change_id}).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            sent = loop.time()
            try:
                return await self.kv.create(lease_key(change_id), value), sent
            except KeyWrongLastSequenceError:
                left = deadline - loop.time()
                if left <= 0:
                    raise LeaseBusy(f"change {change_id} is worked by another gatekeeper") from None
                await asyncio.sleep(min(RETRY_S, left))

    @asynccontextmanager
    async def hold(self, change_id: str, *, wait_s: float | None = None) -> AsyncIterator[None]:
        """Work ``change_id`` under its lease: taken (waiting up to ``wait_s``, by default a
        TTL and a bit, time enough for a dead holder's lease to expire), renewed meanwhile,
        released after. Losing it cancels the block's work and raises :class:`LeaseLost`."""
        key = lease_key(change_id)
        revision, sent = await self._take(change_id, self.ttl_s + 2.0 if wait_s is None else wait_s)
        worker = asyncio.current_task()
        assert worker is not None
        lost: list[str] = []

        async def renew() -> None:
            """Renew every third of the TTL. The server restarts the lease's clock when a write
            lands, which is after it was sent, so the holder counts from each send that
            succeeded, and gives up a third of the TTL before the server would forget the lease
            (``expires``): by then a standby may take it, and this holder must have stopped."""
            nonlocal revision
            loop = asyncio.get_running_loop()
            third = self.ttl_s / 3
            expires = sent + self.ttl_s - third  # by the last successful send
            value = json.dumps({"holder": self.holder, "change_id": change_id}).encode()
            pause = third
            while True:
                await asyncio.sleep(min(pause, max(0.0, expires - loop.time())))
                attempt = loop.time()
                try:
                    # each try bounded (nats-py would wait 5 s), and never past ``expires``
                    async with asyncio.timeout_at(min(attempt + third, expires)):
                        revision = await self.kv.update(key, value, last=revision)
                    expires, pause = attempt + self.ttl_s - third, third
                    continue
                except KeyWrongLastSequenceError:
                    lost.append("it expired or another gatekeeper took it")
                except Exception as exc:  # NATS away, or too slow: try again while it holds
                    if loop.time() < expires:
                        log.warning("renewing the lease of %s failed: %s", change_id, exc)
                        pause = RETRY_S
                        continue
                    lost.append(f"not renewed within {self.ttl_s - third:g} s ({exc!r})")
                worker.cancel()
                return

        heartbeat = asyncio.create_task(renew())
        try:
            yield
        except asyncio.CancelledError:
            if lost and worker.uncancel() == 0:
                raise LeaseLost(f"lost the lease of {change_id}: {lost[0]}") from None
            raise
        finally:
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat  # a renewal under way lands first: the release names its revision
            if not lost:
                try:
                    await self.kv.delete(key, last=revision)
                except Exception as exc:  # it expires anyway
                    log.warning("releasing the lease of %s failed: %s", change_id, exc)

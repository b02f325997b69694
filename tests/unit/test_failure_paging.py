"""Paged failure queries (``query.failures`` with ``paged``) on a real SQLite store file.

The stores know no cursor, so a page after a key re-reads a time window (see
``ratchet_failure_store.paging``); failures logged at the same microsecond are where that could
lose or repeat one. Here a third of them share instants, their sizes differ by three orders of
magnitude, and every page, at every budget and limit, must join into exactly the store's own
newest-first list, each page within its budget.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ratchet.contracts import utcnow
from ratchet.queries import FailureKey, FailuresQuery
from ratchet.store import FailureQuery, FailureRecord, Store, open_store
from ratchet_failure_store.paging import failures_after, failures_page

FAILURES = 120


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    rng = random.Random(7)
    base = utcnow()
    async with open_store(f"sqlite:///{tmp_path / 'ratchet.db'}") as opened:
        for i in range(FAILURES):
            # many share an instant, or are a microsecond apart; the rest are spread out
            at = base - timedelta(microseconds=rng.choice([0, 1, 2, 5, 1000, 2000 * i]))
            size = rng.choice([10, 100, 16_000])
            await opened.add_failure(
                FailureRecord(
                    run_id=f"r{i:03d}",
                    task="t",
                    input="i" * size,
                    output="o" * size,
                    score=0.0,
                    prompt_version=1,
                    rules_sha256="r",
                    model="m",
                    logged_at=at,
                )
            )
        yield opened


@pytest.mark.parametrize("budget", [40_000, 100_000, 786_432])
@pytest.mark.parametrize("limit", [1, 7, 50, FAILURES, 500])
async def test_pages_join_into_exactly_the_stores_list(
    store: Store, budget: int, limit: int
) -> None:
    everything = await store.failures(FailureQuery(task="t", limit=1000))
    assert len(everything) == FAILURES
    asking: FailuresQuery | None = FailuresQuery(task="t", limit=limit, paged=True)
    got: list[FailureRecord] = []
    pages = 0
    while asking is not None:
        page, note = await failures_page(store, asking, budget)
        assert len(page.model_dump_json().encode()) <= budget
        assert note == ""  # every failure fits whole
        pages += 1
        got += page.failures
        asking = page.next_query(asking, limit - len(got))
    assert got == everything[:limit]
    # a page holds what fits: 32 KB failures make several pages of a small budget
    big = sum(len(f.output) > 1000 for f in everything[:limit])
    assert pages >= big * 32_000 // budget


async def test_after_a_key_continues_where_the_last_list_ended(store: Store) -> None:
    everything = await store.failures(FailureQuery(task="t", limit=1000))
    first = await failures_after(store, FailuresQuery(task="t", limit=10))
    after = FailureKey.of(first[-1])
    following = await failures_after(store, FailuresQuery(task="t", limit=10, after=after))
    assert first + following == everything[:20]

"""Failures read after a key, and paged replies of whole failures (``query.failures`` with
``paged``).

The stores list failures newest first (by ``logged_at``, then ``run_id``, both descending) and
filter by a half-open time range, but know no cursor: the failures after a key are read as those
logged before one microsecond past its instant (the ``until`` bound, which the stores compare
at microseconds), less the ones at that very instant that the key has passed, which come first.

A page holds whole failures (within the message limits, :func:`within_limits`) for as long as
they fit in the reply's bytes, read from the store a batch at a time, so a page of a few large
failures never reads a thousand. One failure always fits (the message limits keep its JSON well
under a reply); were it not to, it is shown with shorter texts, and the reply says so.
"""

from __future__ import annotations

from datetime import timedelta

from ratchet.audit import utc_text
from ratchet.queries import (
    MAX_FAILURES_PER_QUERY,
    REPLY_TEXT_CHARS,
    FailureKey,
    FailuresPage,
    FailuresQuery,
)
from ratchet.store import FailureQuery, FailureRecord, Store
from ratchet_failure_store.recorder import within_limits

READ_BATCH = 50  # failures read from the store at a time while a page fills
PAGE_OVERHEAD = len(FailuresPage(failures=[], more=False).model_dump_json().encode())


def key_of(failure: FailureRecord | FailureKey) -> tuple[str, str]:
    """Where a failure stands, as the stores sort (descending): the larger, the newer."""
    return utc_text(failure.logged_at), failure.run_id


async def read_after(
    store: Store, query: FailureQuery, after: FailureKey | None, count: int
) -> list[FailureRecord]:
    """At most ``count`` failures matching ``query``'s filters, newest first, after ``after``
    (from the newest if None)."""
    filters = query.model_dump(include=set(FailureQuery.model_fields))
    if after is None:
        return await store.failures(FailureQuery(**{**filters, "limit": count}))
    bound = after.logged_at + timedelta(microseconds=1)
    until = bound if query.until is None else min(query.until, bound)
    passed = key_of(after)
    skipped = 1  # the failure at the key itself, when it is still stored
    while True:
        asked = count + skipped
        found = await store.failures(FailureQuery(**{**filters, "until": until, "limit": asked}))
        kept = [f for f in found if key_of(f) < passed]
        if len(kept) >= count or len(found) < asked:
            return kept[:count]
        # more failures share the key's instant than were skipped: they lead the list, so all
        # of them were seen unless the whole list was such
        skipped = len(found) - len(kept) if kept else 2 * asked


async def failures_after(store: Store, query: FailuresQuery) -> list[FailureRecord]:
    """What a query asks for, at most ``MAX_FAILURES_PER_QUERY``."""
    return await read_after(store, query, query.after, min(query.limit, MAX_FAILURES_PER_QUERY))


def _encoded_size(failure: FailureRecord) -> int:
    return len(failure.model_dump_json().encode()) + 1  # and its comma


async def failures_page(
    store: Store, query: FailuresQuery, budget: int
) -> tuple[FailuresPage, str]:
    """The page ``query`` asks for, in at most ``budget`` bytes of JSON, and a note for the
    reader if a failure's texts had to be shortened to fit (else "")."""
    wanted = min(query.limit, MAX_FAILURES_PER_QUERY)
    shown: list[FailureRecord] = []
    size = PAGE_OVERHEAD
    note = ""
    after = query.after
    while True:
        asked = min(wanted - len(shown), READ_BATCH) + 1  # one more: are there more?
        batch = await read_after(store, query, after, asked)
        for failure in batch:
            whole = within_limits(failure)
            grown = size + _encoded_size(whole)
            if len(shown) == wanted or (shown and grown > budget):
                return FailuresPage(failures=shown, more=True), note
            if grown > budget:  # alone and still too large: never seen within the limits
                whole, note = _shortened(failure, budget - size)
                grown = size + _encoded_size(whole)
            shown.append(whole)
            size = grown
            after = FailureKey.of(failure)
        if len(batch) < asked:
            return FailuresPage(failures=shown, more=False), note


def _shortened(failure: FailureRecord, budget: int) -> tuple[FailureRecord, str]:
    for chars in REPLY_TEXT_CHARS:
        cut = within_limits(failure, chars)
        if _encoded_size(cut) <= budget:
            break
    return cut, (
        f"run {failure.run_id}'s input, output and trace texts cut to {chars} characters to "
        "fit in one reply"
    )

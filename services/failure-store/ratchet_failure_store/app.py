"""Failure store service: persists every run and score, logs failures, answers queries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import FailureGroup, FailureLogged, RunCompleted, RunScored
from ratchet.grouping import group_failures
from ratchet.messaging import (
    QUERY_PREFIX,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
)
from ratchet.queries import FailureCount
from ratchet.settings import Settings, get_settings
from ratchet.store import FailureQuery, FailureRecord, open_store
from ratchet_failure_store.recorder import FailureRecorder


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or get_settings()
    broker = make_broker(settings, name="failure-store")
    logged = event_publisher(broker, FailureLogged)
    recorder: FailureRecorder | None = None  # opened at start, closed at stop

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        nonlocal recorder
        store = open_store(settings.resolved_store_url())
        recorder = FailureRecorder(store, threshold=settings.failure_threshold)
        try:
            yield
        finally:
            await store.close()

    def started() -> FailureRecorder:
        if recorder is None:
            raise RuntimeError("the failure store app has not started")
        return recorder

    async def publish_if_failure(event: FailureLogged | None) -> None:
        if event is not None:
            await publish(logged, event)

    @durable_subscriber(
        broker, RunCompleted.subject, durable="failure-store-completed", settings=settings
    )
    async def on_run_completed(run: RunCompleted) -> None:
        await publish_if_failure(await started().on_completed(run))

    @durable_subscriber(
        broker, RunScored.subject, durable="failure-store-scored", settings=settings
    )
    async def on_run_scored(score: RunScored) -> None:
        await publish_if_failure(await started().on_scored(score))

    @broker.subscriber(f"{QUERY_PREFIX}.failures", description="Stored failures matching a query.")
    async def query_failures(query: FailureQuery) -> list[FailureRecord]:
        return await started().store.failures(query)

    @broker.subscriber(
        f"{QUERY_PREFIX}.count", description="How many failures a task has had since a moment."
    )
    async def query_count(query: FailureCount) -> int:
        return await started().store.count_failures(query.task, query.since)

    @broker.subscriber(
        f"{QUERY_PREFIX}.groups", description="A task's failures grouped by problem."
    )
    async def query_groups(query: FailureQuery) -> list[FailureGroup]:
        failures = await started().store.failures(query)
        return group_failures([(f.run_id, f.problems) for f in failures])

    return FastStream(
        broker,
        lifespan=lifespan,
        specification=AsyncAPI(
            title="Ratchet failure store", description="Stores runs and failures; groups failures."
        ),
    )

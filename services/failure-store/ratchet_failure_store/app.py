"""Failure store service: persists every run and score, logs failures, answers queries."""

from __future__ import annotations

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
from ratchet.settings import get_settings
from ratchet.store import FailureQuery, FailureRecord, Store, open_store
from ratchet_failure_store.recorder import FailureRecorder

settings = get_settings()
broker = make_broker(settings, name="failure-store")
app = FastStream(
    broker,
    specification=AsyncAPI(
        title="Ratchet failure store", description="Stores runs and failures; groups failures."
    ),
)
logged = event_publisher(broker, FailureLogged)
state: dict[str, FailureRecorder] = {}


@app.on_startup
async def start() -> None:
    store = open_store(settings.resolved_store_url())
    state["recorder"] = FailureRecorder(store, threshold=settings.failure_threshold)


@app.after_shutdown
async def stop() -> None:
    if "recorder" in state:
        await state["recorder"].store.close()


def _store() -> Store:
    return state["recorder"].store


async def _publish_if_failure(event: FailureLogged | None) -> None:
    if event is not None:
        await publish(logged, event)


@durable_subscriber(
    broker, RunCompleted.subject, durable="failure-store-completed", settings=settings
)
async def on_run_completed(run: RunCompleted) -> None:
    await _publish_if_failure(await state["recorder"].on_completed(run))


@durable_subscriber(broker, RunScored.subject, durable="failure-store-scored", settings=settings)
async def on_run_scored(score: RunScored) -> None:
    await _publish_if_failure(await state["recorder"].on_scored(score))


@broker.subscriber(f"{QUERY_PREFIX}.failures", description="Stored failures matching a query.")
async def query_failures(query: FailureQuery) -> list[FailureRecord]:
    return await _store().failures(query)


@broker.subscriber(f"{QUERY_PREFIX}.groups", description="A task's failures grouped by problem.")
async def query_groups(query: FailureQuery) -> list[FailureGroup]:
    failures = await _store().failures(query)
    return group_failures([(f.run_id, f.problems) for f in failures])

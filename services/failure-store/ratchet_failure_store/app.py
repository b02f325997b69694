"""Failure store service: persists every run and score, logs failures, answers queries.

Runs come from the executor (``run.completed``) and from instrumented apps
(``run.reported.<app>``, read as the ``run.completed`` of :meth:`RunReported.completed`, with the
origin the subject names), so production failures join the same store, groups and proposer,
each tagged with where it ran.

Query replies fit in one NATS message: at most ``MAX_FAILURES_PER_QUERY`` failures are read, each
is shown within the message limits (a record stored before the limits existed is cut for the
reply, never in the store). A paged ``query.failures`` (``ratchet failures``) answers as many
whole failures as fit and whether more follow, and is asked again after the last one
(:mod:`ratchet_failure_store.paging`). Otherwise failures that do not fit in one reply are shown
with shorter texts, so a reader gets every failure it asked for (the proposer compares them with
their groups), and only past the shortest texts are the oldest left out; a reply says what it
did in a header (:func:`ratchet.queries.list_reply`), which the CLI shows.

``query.runs`` shows people (the review console, the CLI) what the two prompts of a change
answered on the gate's cases: the runs are the failure store's, like every other. The proposer
may not ask it (the server refuses it): it must never see the gate's cases.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream import FastStream, Path
from faststream.nats import NatsResponse
from faststream.specification import AsyncAPI

from ratchet.contracts import FailureLogged, RunCompleted, RunReported, RunScored
from ratchet.grouping import group_failures
from ratchet.messaging import (
    QUERY_PREFIX,
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
    reported_run,
)
from ratchet.queries import (
    MAX_FAILURES_PER_QUERY,
    REPLY_BYTES,
    TRIMMED_HEADER,
    FailureCount,
    FailuresQuery,
    RunsQuery,
    list_reply,
)
from ratchet.settings import Settings, get_settings
from ratchet.store import FailureQuery, FailureRecord, open_store
from ratchet_failure_store.gate_runs import cases_in_reply, gate_cases
from ratchet_failure_store.paging import failures_after, failures_page
from ratchet_failure_store.recorder import FailureRecorder, shown_in_reply, within_limits


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
        broker,
        RunReported.subject_of("{app}"),
        durable="failure-store-reported",
        settings=settings,
        description="Store a run an instrumented app reported, as one from the app the subject "
        "names (the server lets only that app publish there).",
    )
    async def on_run_reported(report: RunReported, app: str = Path()) -> None:
        run = reported_run(settings, report, app)
        await publish_if_failure(await started().on_completed(run))

    @durable_subscriber(
        broker, RunScored.subject, durable="failure-store-scored", settings=settings
    )
    async def on_run_scored(score: RunScored) -> None:
        await publish_if_failure(await started().on_scored(score))

    async def failures(query: FailureQuery) -> list[FailureRecord]:
        bounded = query.model_copy(update={"limit": min(query.limit, MAX_FAILURES_PER_QUERY)})
        return await started().store.failures(bounded)

    @broker.subscriber(
        f"{QUERY_PREFIX}.failures",
        description="Stored failures matching a query, newest first. Paged: a FailuresPage of "
        "whole failures, as many as fit in a reply, and whether more follow (ask again after "
        "the last); else one array of all asked for, texts shortened if they must be to fit.",
    )
    async def query_failures(query: FailuresQuery) -> NatsResponse:
        store = started().store
        if query.paged:
            page, note = await failures_page(store, query, REPLY_BYTES)
            headers = {"content-type": "application/json"}
            if note:
                headers[TRIMMED_HEADER] = note
            return NatsResponse(body=page.model_dump_json().encode(), headers=headers)
        shown, shortened = shown_in_reply(await failures_after(store, query), REPLY_BYTES)
        return list_reply(shown, noun="failures", shortened=shortened)

    @broker.subscriber(
        f"{QUERY_PREFIX}.count", description="How many failures a task has had since a moment."
    )
    async def query_count(query: FailureCount) -> int:
        return await started().store.count_failures(query.task, query.since)

    @broker.subscriber(
        f"{QUERY_PREFIX}.groups", description="A task's failures grouped by problem."
    )
    async def query_groups(query: FailureQuery) -> NatsResponse:
        found = await failures(query)
        problems = [(f.run_id, f.problems) for f in map(within_limits, found)]
        # a few hundred failures take ~0.2 s to group: off the event loop, where runs are stored
        groups = await asyncio.to_thread(group_failures, problems)
        return list_reply(groups, noun="groups")

    @broker.subscriber(
        f"{QUERY_PREFIX}.runs",
        description="A change's gate runs on the cases asked for (at most 50), both arms, by "
        "case; no run ids. For people: the proposer may not ask it.",
    )
    async def query_runs(query: RunsQuery) -> NatsResponse:
        runs = await started().store.gate_runs(
            query.change_id, query.stage, query.case_ids, query.repeats
        )
        shown, shortened = cases_in_reply(gate_cases(query.case_ids, runs), REPLY_BYTES)
        return list_reply(shown, noun="cases", shortened=shortened)

    return FastStream(
        broker,
        lifespan=lifespan,
        specification=AsyncAPI(
            title="Ratchet failure store", description="Stores runs and failures; groups failures."
        ),
    )

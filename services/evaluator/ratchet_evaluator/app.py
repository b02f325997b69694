"""Evaluator service: reads ``run.completed`` and the runs apps report (``run.reported.<app>``),
publishes ``run.scored``; nothing else.

It runs apart from the executor and from the apps so that an agent never grades itself. Scale it
by starting more replicas: they share the durable consumers and split the runs. A reported run is
scored as the ``run.completed`` of :meth:`RunReported.completed`, attributed to the app its
subject names, which only that app's NATS user may publish; its score carries that origin.
"""

from __future__ import annotations

from faststream import FastStream, Path
from faststream.specification import AsyncAPI

from ratchet.contracts import RunCompleted, RunReported, RunScored
from ratchet.messaging import (
    durable_subscriber,
    event_publisher,
    make_broker,
    publish,
    reported_run,
)
from ratchet.models import make_chat_model, model_label
from ratchet.settings import Settings, get_settings
from ratchet_evaluator.judge import Judge
from ratchet_evaluator.scoring import score_run


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or get_settings()
    judge = Judge(
        make_chat_model(settings.judge, local_port=settings.local_model_port),
        label=model_label(settings.judge),
        attempts=settings.judge_attempts,
    )
    broker = make_broker(settings, name="evaluator")
    scored = event_publisher(broker, RunScored)

    async def score(run: RunCompleted) -> None:
        await publish(scored, await score_run(run, judge, sample_rate=settings.judge_sample_rate))

    @durable_subscriber(
        broker,
        RunCompleted.subject,
        durable="evaluator",
        settings=settings,
        description="Score the run: programmatic check when it carries one, else the LLM judge "
        "(live runs: if sampled at judge_sample_rate).",
    )
    async def on_run_completed(run: RunCompleted) -> None:
        await score(run)

    @durable_subscriber(
        broker,
        RunReported.subject_of("{app}"),
        durable="evaluator-reported",
        settings=settings,
        description="Score a run an instrumented app reported, as one from the app the subject "
        "names (the server lets only that app publish there).",
    )
    async def on_run_reported(report: RunReported, app: str = Path()) -> None:
        await score(reported_run(settings, report, app))

    return FastStream(
        broker,
        specification=AsyncAPI(title="Ratchet evaluator", description="Scores every finished run."),
    )

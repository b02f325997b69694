"""Evaluator service: reads ``run.completed``, publishes ``run.scored``; nothing else.

It runs apart from the executor so that an agent never grades itself. Scale it by starting more
replicas: they share the durable consumer and split the runs.
"""

from __future__ import annotations

from faststream import FastStream
from faststream.specification import AsyncAPI

from ratchet.contracts import RunCompleted, RunScored
from ratchet.messaging import durable_subscriber, event_publisher, make_broker, publish
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

    @durable_subscriber(
        broker,
        RunCompleted.subject,
        durable="evaluator",
        settings=settings,
        description="Score the run: programmatic check when it carries one, else the LLM judge.",
    )
    async def on_run_completed(run: RunCompleted) -> None:
        await publish(scored, await score_run(run, judge))

    return FastStream(
        broker,
        specification=AsyncAPI(title="Ratchet evaluator", description="Scores every finished run."),
    )

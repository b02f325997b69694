"""Service wiring with FastStream's in-memory broker: subjects, payload types and publishers.

The in-memory broker ignores ack/nak/term, so delivery guarantees are tested against a real
server in tests/integration/test_delivery.py; this checks that each app routes what it should."""

from __future__ import annotations

from faststream.nats import TestNatsBroker

from ratchet.contracts import Check, RunCompleted, RunScored
from ratchet_evaluator.app import broker as evaluator_broker
from ratchet_evaluator.app import on_run_completed, scored


def completed(output: str) -> RunCompleted:
    return RunCompleted(
        run_id="r1",
        task="t",
        input="What is 7 + 5?",
        check=Check(kind="exact", expected="12"),
        output=output,
        prompt_version=1,
        prompt_sha256="p",
        rules_sha256="r",
        model="fake",
        latency_ms=1.0,
    )


async def test_evaluator_turns_a_completed_run_into_one_score() -> None:
    async with TestNatsBroker(evaluator_broker) as broker:
        await broker.publish(completed("The answer is 12."), RunCompleted.subject)
        on_run_completed.mock.assert_called_once()
        [call] = scored.mock.call_args_list
        score = RunScored.model_validate(call.args[0])
        assert score.run_id == "r1" and score.score == 0.0 and score.scorer == "check:exact"
        assert score.id == "r1.scored"


async def test_evaluator_passes_the_right_answer() -> None:
    async with TestNatsBroker(evaluator_broker) as broker:
        await broker.publish(completed("12"), RunCompleted.subject)
        assert RunScored.model_validate(scored.mock.call_args.args[0]).score == 1.0

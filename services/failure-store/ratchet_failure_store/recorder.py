"""Joins each run with its score, in whatever order they arrive, and spots failures."""

from __future__ import annotations

from ratchet.contracts import (
    INPUT_CHARS,
    NAME_CHARS,
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    PROBLEMS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    FailureLogged,
    RunCompleted,
    RunScored,
    clip,
    utcnow,
)
from ratchet.queries import shortened_to_fit
from ratchet.store import FailureRecord, Store, StoredRun


class FailureRecorder:
    def __init__(self, store: Store, *, threshold: float) -> None:
        self.store = store
        self.threshold = threshold

    async def on_completed(self, run: RunCompleted) -> FailureLogged | None:
        return await self._check(await self.store.save_completed(run))

    async def on_scored(self, score: RunScored) -> FailureLogged | None:
        return await self._check(await self.store.save_scored(score))

    async def _check(self, stored: StoredRun) -> FailureLogged | None:
        """A live run scored under the threshold is a failure; gate runs never are (the
        proposer must not see the gate set). Returns the event to publish, also on a redelivery,
        since the first attempt may have stored the failure and crashed before publishing."""
        run, score = stored.completed, stored.scored
        if run is None or score is None or score.score is None:
            return None
        if score.score >= self.threshold or run.context.purpose != "live":
            return None
        await self.store.add_failure(
            FailureRecord(
                run_id=run.run_id,
                task=run.task,
                input=run.input,
                output=run.output,
                score=score.score,
                problems=score.problems,
                trace=run.trace,
                prompt_version=run.prompt_version,
                rules_sha256=run.rules_sha256,
                model=run.model,
                logged_at=utcnow(),
                origin=run.origin,
            )
        )
        return FailureLogged(
            id=f"{run.run_id}.failure",
            run_id=run.run_id,
            task=run.task,
            score=score.score,
            problems=score.problems,
            origin=run.origin,
        )


def within_limits(failure: FailureRecord, chars: int | None = None) -> FailureRecord:
    """``failure`` with its texts within the message limits, and its input, output and trace texts
    within ``chars`` if given: what a reply shows (the store keeps the whole record). A failure
    logged since the limits exist is within them already; one stored before may hold a 700 KB
    output, which would make every reply that lists it too large to send."""
    input_chars, output_chars, trace_chars = (
        limit if chars is None else min(limit, chars)
        for limit in (INPUT_CHARS, OUTPUT_CHARS, TRACE_TEXT_CHARS)
    )
    if _fits(failure, input_chars, output_chars, trace_chars):
        return failure
    trace = failure.trace
    if len(trace) > TRACE_STEPS:
        trace = [*trace[: TRACE_STEPS - 1], trace[-1]]
    return failure.model_copy(
        update={
            "input": clip(failure.input, input_chars),
            "output": clip(failure.output, output_chars),
            "problems": [clip(p, PROBLEM_CHARS) for p in failure.problems[:PROBLEMS]],
            "trace": [
                step.model_copy(
                    update={
                        "name": clip(step.name, NAME_CHARS),
                        "input": clip(step.input, trace_chars),
                        "output": clip(step.output, trace_chars),
                    }
                )
                for step in trace
            ],
        }
    )


def _fits(failure: FailureRecord, input_chars: int, output_chars: int, trace_chars: int) -> bool:
    return (
        len(failure.input) <= input_chars
        and len(failure.output) <= output_chars
        and len(failure.problems) <= PROBLEMS
        and all(len(p) <= PROBLEM_CHARS for p in failure.problems)
        and len(failure.trace) <= TRACE_STEPS
        and all(
            len(step.name) <= NAME_CHARS
            and len(step.input) <= trace_chars
            and len(step.output) <= trace_chars
            for step in failure.trace
        )
    )


def shown_in_reply(failures: list[FailureRecord], budget: int) -> tuple[list[FailureRecord], str]:
    """Every one of ``failures`` in one reply of ``budget`` bytes if that can be done by cutting
    their inputs, outputs and trace texts (:func:`ratchet.queries.shortened_to_fit`), so a
    reader, the proposer say, gets the failures it asked for, only shortened, with a note saying
    so; else cut to the shortest, and the reply leaves out the oldest that still do not fit."""
    return shortened_to_fit(
        failures, within_limits, texts="inputs, outputs and trace texts", budget=budget
    )

"""Score one finished run: crashed runs fail, a run's own check beats the judge.

The scored event's id is derived from the run id, so scoring a redelivered run twice publishes the
same id and JetStream drops the duplicate. A judge that gives no usable verdict leaves the run
unscored (``score=None``) with the reason, rather than guessing a score; an error from the judge
model call itself propagates, so the message is redelivered and, if it keeps failing, dead-lettered.

Checks run in a worker thread: the regex search releases the GIL and has a time limit
(:mod:`ratchet_evaluator.checks`), so a catastrophic pattern costs that thread 0.2 s and never
holds the event loop, where the other runs are being scored. Problems are cut to their
limits here (a judge may write many, or long ones), so the scored event is always valid.
"""

from __future__ import annotations

import asyncio

from ratchet.contracts import (
    NAME_CHARS,
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    PROBLEMS,
    REASON_CHARS,
    RunCompleted,
    RunScored,
    clip,
)
from ratchet_evaluator.checks import run_check
from ratchet_evaluator.judge import Judge, JudgeError

CRASH_SCORER = "crash"
NO_SCORER = "none"
NO_SCORER_REASON = "the run has no check and no judge is configured"
OUTPUT_CUT = f"the output was cut to its limit of {OUTPUT_CHARS} characters before scoring"


async def score_run(run: RunCompleted, judge: Judge | None) -> RunScored:
    """The ``run.scored`` event for ``run``; only runs without a check reach the judge."""
    if run.error is not None:
        return _scored(run, 0.0, [f"run crashed: {run.error}"], CRASH_SCORER)
    if run.check is not None:
        score, problems = await asyncio.to_thread(run_check, run.check, run.output)
        return _scored(run, score, problems, f"check:{run.check.kind}")
    if judge is None:
        return _scored(run, None, [], NO_SCORER, unscored_reason=NO_SCORER_REASON)
    scorer = f"judge:{judge.label}"
    try:
        verdict = await judge.judge(run.task, run.input, run.output)
    except JudgeError as exc:
        return _scored(run, None, [], scorer, unscored_reason=str(exc))
    return _scored(run, 1.0 if verdict.finished else 0.0, verdict.problems, scorer)


def _scored(
    run: RunCompleted,
    score: float | None,
    problems: list[str],
    scorer: str,
    *,
    unscored_reason: str | None = None,
) -> RunScored:
    if problems and "output" in run.truncated:  # a failure the cut may explain: say so
        problems = [*problems[: PROBLEMS - 1], OUTPUT_CUT]
    return RunScored(
        id=f"{run.run_id}.scored",
        run_id=run.run_id,
        task=run.task,
        context=run.context,
        score=score,
        problems=[clip(problem, PROBLEM_CHARS) for problem in problems[:PROBLEMS]],
        scorer=clip(scorer, NAME_CHARS),
        unscored_reason=None if unscored_reason is None else clip(unscored_reason, REASON_CHARS),
        prompt_version=run.prompt_version,
    )

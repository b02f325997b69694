"""Score one finished run: crashed runs fail, a run's own check beats the judge.

The scored event's id is derived from the run id, so scoring a redelivered run twice publishes the
same id and JetStream drops the duplicate. A judge that gives no usable verdict leaves the run
unscored (``score=None``) with the reason, rather than guessing a score; an error from the judge
model call itself propagates, so the message is redelivered and, if it keeps failing, dead-lettered.

Online scoring: live runs without a check (most of what instrumented apps report) reach the judge
only if sampled, at ``sample_rate``, decided by a hash of the run id, so a redelivered run is
decided the same way and its score event stays one. An unsampled run is still published, unscored
with the reason, so it is counted and stored. Gate runs are always judged: the gate's test needs
every one. The judge's tokens, retries included, travel on the score (``judge_usage``).

Checks run in a worker thread: the regex search releases the GIL and has a time limit
(:mod:`ratchet_evaluator.checks`), so a catastrophic pattern costs that thread 0.2 s and never
holds the event loop, where the other runs are being scored. Problems are cut to their
limits here (a judge may write many, or long ones), so the scored event is always valid.
"""

from __future__ import annotations

import asyncio
import hashlib

from ratchet.contracts import (
    NAME_CHARS,
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    PROBLEMS,
    REASON_CHARS,
    RunCompleted,
    RunScored,
    TokenUsage,
    clip,
)
from ratchet_evaluator.checks import run_check
from ratchet_evaluator.judge import Judge, JudgeError

CRASH_SCORER = "crash"
NO_SCORER = "none"
NO_SCORER_REASON = "the run has no check and no judge is configured"
OUTPUT_CUT = f"the output was cut to its limit of {OUTPUT_CHARS} characters before scoring"


def not_sampled_reason(rate: float) -> str:
    return f"not sampled for judging (rate {rate:g})"


def sampled_for_judging(run_id: str, rate: float) -> bool:
    """Whether the judge scores the live run ``run_id`` at sampling rate ``rate``: a hash of the
    run id, so every delivery of a run, on any evaluator replica, decides alike."""
    digest = hashlib.sha256(f"judge-sample\x00{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < rate * 2**64


async def score_run(
    run: RunCompleted, judge: Judge | None, *, sample_rate: float = 1.0
) -> RunScored:
    """The ``run.scored`` event for ``run``; only runs without a check reach the judge, and of
    those, live runs only if sampled at ``sample_rate``."""
    if run.error is not None:
        return _scored(run, 0.0, [f"run crashed: {run.error}"], CRASH_SCORER)
    if run.check is not None:
        score, problems = await asyncio.to_thread(run_check, run.check, run.output)
        return _scored(run, score, problems, f"check:{run.check.kind}")
    if judge is None:
        return _scored(run, None, [], NO_SCORER, unscored_reason=NO_SCORER_REASON)
    if run.context.purpose == "live" and not sampled_for_judging(run.run_id, sample_rate):
        return _scored(run, None, [], NO_SCORER, unscored_reason=not_sampled_reason(sample_rate))
    scorer = f"judge:{judge.label}"
    try:
        verdict, usage = await judge.judge(run.task, run.input, run.output)
    except JudgeError as exc:
        return _scored(run, None, [], scorer, unscored_reason=str(exc), judge_usage=exc.usage)
    score = 1.0 if verdict.finished else 0.0
    return _scored(run, score, verdict.problems, scorer, judge_usage=usage)


def _scored(
    run: RunCompleted,
    score: float | None,
    problems: list[str],
    scorer: str,
    *,
    unscored_reason: str | None = None,
    judge_usage: TokenUsage | None = None,
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
        origin=run.origin,
        judge_usage=judge_usage or TokenUsage(),
    )

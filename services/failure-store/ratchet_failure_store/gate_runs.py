"""A change's gate runs as ``query.runs`` shows them: by case, each arm's runs on it, so a
reviewer sees what the two prompts answered on the cases the candidate fixed and broke.

The runs come from the ``runs`` table (only the failure store reads it); a reply holds no run id
(:class:`ratchet.queries.GateRun` says why) and its texts are cut to the message limits, and
shorter where the reply would not fit otherwise (:func:`ratchet.queries.shortened_to_fit`).
"""

from __future__ import annotations

from ratchet.contracts import (
    ERROR_CHARS,
    INPUT_CHARS,
    OUTPUT_CHARS,
    PROBLEM_CHARS,
    PROBLEMS,
    Check,
    clip,
)
from ratchet.queries import GateCase, GateRun, shortened_to_fit
from ratchet.store import StoredRun

ARMS = ("current", "candidate")  # the order a case shows its runs in
SHORT_PROBLEMS = 3  # problems a run keeps once a reply has to shorten its texts


def gate_cases(case_ids: list[str], runs: list[StoredRun]) -> list[GateCase]:
    """The cases of ``case_ids`` that have runs among ``runs``, in the order asked for, each with
    its runs (current arm first, by repeat) and the input and check they ran on."""
    by_case: dict[str, list[GateRun]] = {}
    asked: dict[str, tuple[str, Check | None]] = {}
    for stored in runs:
        event = stored.completed or stored.scored
        context = event.context if event else None
        if context is None or context.purpose != "gate" or None in (context.case_id, context.arm):
            continue  # the store places gate runs only; this keeps any other out of a reply
        case_id = str(context.case_id)
        by_case.setdefault(case_id, []).append(_shown(stored))
        if stored.completed is not None:
            asked.setdefault(case_id, (stored.completed.input, stored.completed.check))
    cases = []
    for case_id in dict.fromkeys(case_ids):  # each once, in the order asked
        if case_id in by_case:
            text, check = asked.get(case_id, (None, None))
            ordered = sorted(by_case[case_id], key=lambda run: (ARMS.index(run.arm), run.repeat))
            cases.append(GateCase(case_id=case_id, input=text, check=check, runs=ordered))
    return cases


def _shown(stored: StoredRun) -> GateRun:
    run, score = stored.completed, stored.scored
    event = run or score
    assert event is not None and event.context.arm is not None
    return GateRun(
        arm=event.context.arm,
        repeat=event.context.repeat,
        output=run.output if run else None,
        error=run.error if run else None,
        prompt_version=run.prompt_version if run else event.prompt_version,
        score=score.score if score else None,
        scorer=score.scorer if score else None,
        unscored_reason=score.unscored_reason if score else None,
        problems=list(score.problems) if score else [],
    )


def within_limits(case: GateCase, chars: int | None = None) -> GateCase:
    """``case`` with its input, outputs, errors and problems within the message limits, and
    within ``chars`` if given (then each run keeps its first ``SHORT_PROBLEMS`` problems)."""

    def cut(text: str | None, limit: int) -> str | None:
        return None if text is None else clip(text, limit if chars is None else min(limit, chars))

    problems = PROBLEMS if chars is None else SHORT_PROBLEMS
    return case.model_copy(
        update={
            "input": cut(case.input, INPUT_CHARS),
            "runs": [
                run.model_copy(
                    update={
                        "output": cut(run.output, OUTPUT_CHARS),
                        "error": cut(run.error, ERROR_CHARS),
                        "problems": [cut(p, PROBLEM_CHARS) for p in run.problems[:problems]],
                    }
                )
                for run in case.runs
            ],
        }
    )


def cases_in_reply(cases: list[GateCase], budget: int) -> tuple[list[GateCase], str]:
    """Every case in one reply of ``budget`` bytes, with texts as short as that takes (and a note
    saying so); past the shortest, the reply leaves out the last cases."""
    return shortened_to_fit(
        cases, within_limits, texts="inputs, outputs, errors and problems", budget=budget
    )

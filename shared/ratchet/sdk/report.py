"""One finished run of an app, as the ``run.reported`` event the SDK publishes.

An app's texts can be of any size, so, like the executor, the SDK cuts them to the limits of
:mod:`ratchet.contracts` (:func:`ratchet.contracts.clip`) and names what it cut in
``truncated``: a 700 KB answer becomes a valid report instead of one nobody can publish. What
cannot be cut without changing its meaning (the task name, the run id, a check) is refused in
one line (:class:`ReportError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import ValidationError

from ratchet.contracts import (
    ERROR_CHARS,
    INPUT_CHARS,
    NAME_CHARS,
    OUTPUT_CHARS,
    TRACE_STEPS,
    TRACE_TEXT_CHARS,
    Check,
    RunReported,
    TokenUsage,
    TraceStep,
    app_origin,
    clip,
    new_id,
)
from ratchet.sdk.served import Prompt

StepKind = Literal["model", "tool", "error"]
Expected = str | float | list[str]


class ReportError(ValueError):
    """The run cannot be reported as given (a task name that is no task name, say)."""


class Trace:
    """The steps of one run, bounded while they are recorded: each text is cut to its limit as
    it arrives, and only the first ``TRACE_STEPS - 1`` steps and the latest are kept (the last
    one holds the answer or the error), so a run of a thousand steps costs sixteen."""

    def __init__(self) -> None:
        self._head: list[TraceStep] = []
        self._last: TraceStep | None = None
        self.count = 0
        self.cut = False  # a step was left out or a text cut

    def add(
        self, kind: StepKind, name: str, *, input: Any = "", output: Any = "", ms: float = 0.0
    ) -> None:
        texts = [text if isinstance(text, str) else str(text) for text in (name, input, output)]
        limits = (NAME_CHARS, TRACE_TEXT_CHARS, TRACE_TEXT_CHARS)
        if any(len(text) > limit for text, limit in zip(texts, limits, strict=True)):
            self.cut = True
        name, input, output = (clip(text, limit) for text, limit in zip(texts, limits, strict=True))
        step = TraceStep(kind=kind, name=name, input=input, output=output, ms=max(0.0, ms))
        self.count += 1
        if len(self._head) < TRACE_STEPS - 1:
            self._head.append(step)
            return
        if self._last is not None:
            self.cut = True
        self._last = step

    def steps(self) -> list[TraceStep]:
        return [*self._head, self._last] if self._last is not None else list(self._head)

    @classmethod
    def of(cls, steps: Iterable[TraceStep | Mapping[str, Any]]) -> Trace:
        """A trace of steps given as :class:`TraceStep` or as mappings of its fields."""
        trace = cls()
        for step in steps:
            fields = step.model_dump() if isinstance(step, TraceStep) else dict(step)
            trace.add(
                fields.get("kind", "model"),
                fields.get("name", ""),
                input=fields.get("input", ""),
                output=fields.get("output", ""),
                ms=float(fields.get("ms", 0.0)),
            )
        return trace


def as_check(check: Check | Mapping[str, Any] | None, expected: Expected | None) -> Check | None:
    """The run's check: given as one, or ``expected`` as a shorthand: a text must equal it
    (``exact``), a number must be the last number in the output (``number``), a list of texts
    must contain the output (``any_of``)."""
    if check is not None and expected is not None:
        raise ReportError("give a check or an expected answer, not both")
    if check is not None:
        return check if isinstance(check, Check) else Check.model_validate(check)
    if expected is None:
        return None
    if isinstance(expected, str):
        return Check(kind="exact", expected=expected)
    if isinstance(expected, list):
        return Check(kind="any_of", expected=expected)
    return Check(kind="number", expected=float(expected))


def reported_id(app: str, run_id: str) -> str:
    """The event id of a report: from the run id (a retried report is the same event, which
    JetStream drops as a duplicate) and the app (two apps' run ids never collide)."""
    return f"{app_origin(app)}/{run_id}.reported"


def build_report(
    app: str,
    *,
    task: str,
    input: str,
    output: str,
    prompt: Prompt,
    trace: Trace | Iterable[TraceStep | Mapping[str, Any]] = (),
    usage: TokenUsage | Mapping[str, int] | None = None,
    latency_ms: float = 0.0,
    check: Check | Mapping[str, Any] | None = None,
    expected: Expected | None = None,
    run_id: str | None = None,
    model: str = "unknown",
    error: str | None = None,
) -> RunReported:
    """The event for one run of ``app``, cut to the limits; :class:`ReportError` if it cannot
    be one."""
    run_id = run_id or new_id()
    try:
        steps = trace if isinstance(trace, Trace) else Trace.of(trace)
        cuts = {
            "input": len(input) > INPUT_CHARS,
            "output": len(output) > OUTPUT_CHARS,
            "trace": steps.cut,
            "error": error is not None and len(error) > ERROR_CHARS,
            "model": len(model) > NAME_CHARS,
        }
        return RunReported(
            id=reported_id(app, run_id),
            run_id=run_id,
            task=task,
            input=clip(input, INPUT_CHARS),
            check=as_check(check, expected),
            output=clip(output, OUTPUT_CHARS),
            trace=steps.steps(),
            prompt_version=prompt.version,
            prompt_sha256=prompt.sha256,
            rules_sha256=prompt.rules_sha256,
            model=clip(model, NAME_CHARS),
            usage=usage if isinstance(usage, TokenUsage) else TokenUsage(**(usage or {})),
            latency_ms=max(0.0, latency_ms),
            error=None if error is None else clip(error, ERROR_CHARS),
            truncated=[name for name, cut in cuts.items() if cut],
        )
    except ValidationError as exc:
        raise _refused(exc) from None


# where the parts of a report that are validated on their own sit in the report
_PARTS = {Check.__name__: "check.", TokenUsage.__name__: "usage.", TraceStep.__name__: "trace."}


def _refused(exc: ValidationError) -> ReportError:
    """The first reason, in one line, naming the field as the caller gave it (the event id is
    made from the run id: a run id that is too long is named as the run id)."""
    first = min(exc.errors(), key=lambda error: tuple(error["loc"][:1]) == ("id",))
    where = _PARTS.get(exc.title, "") + ".".join(str(part) for part in first["loc"])
    return ReportError(f"cannot report the run: {where or exc.title}: {first['msg']}")

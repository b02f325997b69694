"""Task suites as data: a task's initial prompt plus the cases that measure it.

A suite is one task with three disjoint splits. Its ``learn`` cases are run as traffic whose
failures the proposer may read; its ``gate`` cases are the pool every proposed change is measured
on before and after, and the proposer never sees them; its ``holdout`` cases are sealed: no gate
decision uses them, and they are measured only after a change is kept, to report the real lift and
to catch a gate pool that repeated proposals have overfit. Keeping suites in JSON files lets a team
add tasks, or import real ones from BIG-bench, without touching code.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ratchet.contracts import INPUT_CHARS, PROMPT_CHARS, CaseId, Check

SUITE_NAME_PATTERN = r"^[a-z0-9_-]+$"
GATE_MIN, GATE_MAX = 1, 500
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


class Case(BaseModel):
    """One input with the programmatic check its output must pass."""

    model_config = ConfigDict(extra="forbid")

    id: CaseId  # the limits of a run's messages, so every case can be run
    input: str = Field(min_length=1, max_length=INPUT_CHARS)
    check: Check

    @field_validator("check")
    @classmethod
    def _expected_fits_kind(cls, check: Check) -> Check:
        """Catch a check that could never pass (wrong ``expected`` type) when the file loads."""
        expected = check.expected
        if check.kind == "exact" and not isinstance(expected, str):
            raise ValueError("an exact check needs a string 'expected'")
        if check.kind == "any_of" and not (isinstance(expected, list) and expected):
            raise ValueError("an any_of check needs a non-empty list 'expected'")
        if check.kind == "number" and not isinstance(expected, int | float):
            raise ValueError("a number check needs a numeric 'expected'")
        if check.kind == "regex":
            if not isinstance(expected, str):
                raise ValueError("a regex check needs a string 'expected'")
            try:
                re.compile(expected)
            except re.error as exc:
                raise ValueError(f"invalid regex {expected!r}: {exc}") from exc
        if check.kind == "json_shape" and not (isinstance(expected, dict) and expected):
            raise ValueError("a json_shape check needs a non-empty object 'expected'")
        return check


class Suite(BaseModel):
    """A task: its name, its initial prompt, and disjoint learn, gate and holdout cases."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SUITE_NAME_PATTERN, description="The task name.")
    description: str
    prompt: str = Field(
        min_length=1, max_length=PROMPT_CHARS, description="The task's initial prompt."
    )
    learn: list[Case] = Field(
        description="Run as ordinary traffic; their failures are what the proposer reads."
    )
    gate: list[Case] = Field(
        description="The pool every proposed change is measured on, current against candidate. "
        "The proposer never sees it."
    )
    holdout: list[Case] = Field(
        default=[],
        description="Sealed cases: no gate decision uses them and the proposer never sees them. "
        "Measured only after a change is kept, to report the real lift and to catch a gate pool "
        "that repeated proposals have overfit.",
    )
    repeats: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Runs per case and prompt when measuring a change: more for a flaky task, "
        "where repeats halve the noise of a case and show which cases are flaky.",
    )
    source: str | None = Field(default=None, description="Where the cases came from.")

    @model_validator(mode="after")
    def _valid_split(self) -> Suite:
        """Splits that share a case would let the proposer fit the measurement itself."""
        if not GATE_MIN <= len(self.gate) <= GATE_MAX:
            raise ValueError(
                f"gate must hold {GATE_MIN} to {GATE_MAX} cases, it holds {len(self.gate)}"
            )
        ids = [case.id for case in self.learn + self.gate + self.holdout]
        duplicate_ids = sorted({i for i in ids if ids.count(i) > 1})
        if duplicate_ids:
            raise ValueError(
                f"case ids must be unique across learn, gate and holdout; repeated: {duplicate_ids}"
            )
        splits = {"learn": self.learn, "gate": self.gate, "holdout": self.holdout}
        inputs = {split: {case.input for case in cases} for split, cases in splits.items()}
        for first, second in (("learn", "gate"), ("learn", "holdout"), ("gate", "holdout")):
            shared_inputs = inputs[first] & inputs[second]
            if shared_inputs:
                raise ValueError(
                    f"{first} and {second} share inputs ({len(shared_inputs)}), "
                    f"e.g. {sorted(shared_inputs)[:3]}; every input must sit in one split only"
                )
        return self

    def gate_pool_sha256(self) -> str:
        """SHA-256 (hex) of the gate cases, in file order, as canonical JSON.

        The gatekeeper counts how many proposals were tested against each pool by this hash, so
        editing or rotating the gate pool starts a new count. Learn and holdout do not enter it.
        """
        cases = [case.model_dump(mode="json") for case in self.gate]
        canonical = json.dumps(cases, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_suite(path: str | Path) -> Suite:
    """Read one suite file; any problem is a ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read suite file: {exc}") from exc
    try:
        return Suite.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid suite: {exc}") from exc


def save_suite(suite: Suite, path: str | Path) -> None:
    """Write a suite as indented JSON, leaving out default values so the file stays easy to edit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(suite.model_dump_json(indent=2, exclude_defaults=True) + "\n", encoding="utf-8")


def load_suites(directory: str | Path) -> dict[str, Suite]:
    """Every ``*.json`` suite in a folder, by task name (two files for one task is an error)."""
    suites: dict[str, Suite] = {}
    origin: dict[str, Path] = {}
    for path in sorted(Path(directory).glob("*.json")):
        suite = load_suite(path)
        if suite.name in suites:
            raise ValueError(
                f"{path}: task {suite.name!r} is already defined in {origin[suite.name]}"
            )
        suites[suite.name] = suite
        origin[suite.name] = path
    return suites


def import_bigbench(
    task_json_path: str | Path,
    *,
    name: str | None = None,
    gate_size: int = 220,
    holdout_size: int = 100,
    learn_size: int = 60,
    seed: int = 0,
) -> Suite:
    """Turn a BIG-bench ``task.json`` into a suite with a seeded, reproducible three-way split.

    The examples are shuffled with ``seed``; the gate takes the first ``gate_size``, the holdout
    the next ``holdout_size`` and learn the next ``learn_size`` (fewer if the file runs out), so a
    given seed always yields the same gate pool and another seed rotates it. The default name is
    the folder holding the file (BIG-bench keeps each task in ``<task>/task.json``).
    """
    path = Path(task_json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read BIG-bench task: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a BIG-bench task is a JSON object, got {type(data).__name__}")
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}: 'examples' must be a non-empty list")
    if not GATE_MIN <= gate_size <= GATE_MAX:
        raise ValueError(f"gate_size must be {GATE_MIN} to {GATE_MAX}, got {gate_size}")
    if holdout_size < 0:
        raise ValueError(f"holdout_size must be 0 or more, got {holdout_size}")
    if learn_size < 0:
        raise ValueError(f"learn_size must be 0 or more, got {learn_size}")

    task_name = name if name is not None else _slug(path.resolve().parent.name)
    if not re.match(SUITE_NAME_PATTERN, task_name):
        raise ValueError(f"task name {task_name!r} must match {SUITE_NAME_PATTERN}")

    seen: set[str] = set()
    cases: list[Case] = []
    for index, example in enumerate(examples):
        case = _case_from_example(example, f"{task_name}-{index:04d}", path, index)
        if case.input not in seen:  # a repeated input would leak between splits
            seen.add(case.input)
            cases.append(case)
    if len(cases) < gate_size + holdout_size:
        raise ValueError(
            f"{path}: {len(cases)} distinct examples, fewer than gate_size + holdout_size = "
            f"{gate_size} + {holdout_size} = {gate_size + holdout_size}; "
            "lower the gate or holdout size"
        )

    random.Random(seed).shuffle(cases)
    description = str(data.get("description") or "").strip()
    prompt = str(data.get("task_prefix") or "").strip() or description
    if not prompt:
        raise ValueError(f"{path}: no 'task_prefix' or 'description' to use as the initial prompt")
    return Suite(
        name=task_name,
        description=description or f"BIG-bench task {task_name}",
        prompt=prompt,
        gate=cases[:gate_size],
        holdout=cases[gate_size : gate_size + holdout_size],
        learn=cases[gate_size + holdout_size : gate_size + holdout_size + learn_size],
        source=f"BIG-bench {data.get('name', task_name)} ({path}), seed {seed}",
    )


def _case_from_example(example: Any, case_id: str, path: Path, index: int) -> Case:
    """Generative examples check the target; multiple-choice ones accept the keys scored 1."""
    where = f"{path}: examples[{index}]"
    if not isinstance(example, dict):
        raise ValueError(f"{where} must be an object")
    text = example.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where} has no string 'input'")
    if "target" in example:
        return Case(id=case_id, input=text, check=_target_check(example["target"], where))
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"{where} has neither 'target' nor a non-empty 'target_scores'")
    right = [str(choice) for choice, score in scores.items() if score == 1]
    if not right:
        raise ValueError(f"{where}: no choice in 'target_scores' scores 1")
    options = "\n".join(f"- {choice}" for choice in scores)
    return Case(
        id=case_id,
        input=f"{text}\nOptions:\n{options}",
        check=Check(kind="any_of", expected=right),
    )


def _target_check(target: Any, where: str) -> Check:
    if isinstance(target, list):
        answers = [str(t) for t in target if isinstance(t, str | int | float)]
        if not answers or len(answers) != len(target):
            raise ValueError(f"{where}: 'target' list must hold strings or numbers")
        if len(answers) > 1:
            return Check(kind="any_of", expected=answers)
        target = answers[0]
    if isinstance(target, bool) or not isinstance(target, str | int | float):
        raise ValueError(f"{where}: 'target' must be a string, a number or a list of them")
    answer = str(target).strip()
    if _NUMBER.fullmatch(answer):
        return Check(kind="number", expected=float(answer))
    return Check(kind="exact", expected=answer)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "task"

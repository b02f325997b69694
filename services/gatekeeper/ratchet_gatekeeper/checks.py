"""Plain checks the gatekeeper applies: proposal validation and the before/after statistics."""

from __future__ import annotations

import difflib
import math
import re

from scipy import stats

from ratchet.contracts import ArmResult, ChangeProposed, Measurement
from ratchet.rules import Rules

RESERVED_TARGETS = {"rules", "behavior_rules", "behavior-rules", "system"}

# Phrases that switch the pinned rules off or turn them around.
_CONTRADICTIONS = [
    r"\bignore\b.{0,30}\b(rules?|instructions?|guidelines?)\b",
    r"\bdisregard\b.{0,30}\b(rules?|instructions?|guidelines?)\b",
    r"\b(rules?|guidelines?)\b.{0,20}\b(do not|don't|no longer)\s+apply\b",
    r"\b(may|can|should|feel free to)\b.{0,20}"
    r"\b(make (things|facts|answers|it) up|invent|fabricate|guess)\b",
    r"\bnever\s+(say|admit)\b.{0,30}\b(don't|do not)\s+know\b",
    r"\b(pretend|claim)\b.{0,30}\b(ran|used|called)\b.{0,20}\btool",
    r"\bRULES \(never break\)",
]


def rules_conflicts(proposal: str, rules: Rules) -> list[str]:
    """Why a proposed task prompt touches or contradicts the pinned rules (empty: it does not)."""
    found = []
    lowered = proposal.lower()
    for rule in rules.rules:
        if rule.lower() in lowered:
            found.append(f"restates the pinned rule {rule!r}: rules are not in the prompt store")
    for pattern in _CONTRADICTIONS:
        match = re.search(pattern, proposal, flags=re.IGNORECASE)
        if match:
            found.append(f"contradicts the pinned rules: {match.group(0)!r}")
    return found


def validate(change: ChangeProposed, *, current_version: int | None, rules: Rules) -> list[str]:
    """Everything wrong with a proposal before any measurement is spent on it."""
    problems = []
    if change.task.lower() in RESERVED_TARGETS:
        problems.append(f"{change.task!r} is not a task prompt: the behavior rules are pinned")
    if current_version is None:
        problems.append(f"task {change.task!r} has no prompt in the store")
    elif change.base_version != current_version:
        problems.append(
            f"proposal is based on version {change.base_version}, "
            f"but the current version is {current_version}"
        )
    if not change.proposed_prompt.strip():
        problems.append("the proposed prompt is empty")
    problems += rules_conflicts(change.proposed_prompt, rules)
    return problems


def success_rate(scores: dict[str, float | None], threshold: float) -> float:
    """Share of cases that passed; an unscored case counts as not passed."""
    if not scores:
        return 0.0
    return sum(s is not None and s >= threshold for s in scores.values()) / len(scores)


def measure(
    current: dict[str, float | None], candidate: dict[str, float | None], threshold: float
) -> Measurement:
    """Paired comparison on the same cases, with a t interval for the mean difference."""
    if set(current) != set(candidate):
        raise ValueError("both arms must be measured on the same gate cases")
    cases = sorted(current)

    def passed(scores: dict[str, float | None], case: str) -> int:
        score = scores.get(case)
        return int(score is not None and score >= threshold)

    diffs = {case: passed(candidate, case) - passed(current, case) for case in cases}
    values = list(diffs.values())
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    else:
        half = 1.0
    return Measurement(
        cases=n,
        current=ArmResult(success_rate=success_rate(current, threshold), scores=current),
        candidate=ArmResult(success_rate=success_rate(candidate, threshold), scores=candidate),
        per_case_diff=diffs,
        diff=mean,
        ci95=(round(max(-1.0, mean - half), 4), round(min(1.0, mean + half), 4)),
    )


def prompt_diff(before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), "current", "proposed", lineterm=""
    )
    return "\n".join(lines)

"""Plain checks the gatekeeper applies before measuring: is the proposal a valid task prompt?"""

from __future__ import annotations

import difflib
import re

from ratchet.contracts import ChangeProposed
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


def validate(
    change: ChangeProposed,
    *,
    current_version: int | None,
    rules: Rules,
    canary_of: str | None = None,
) -> list[str]:
    """Everything wrong with a proposal before any measurement is spent on it. ``canary_of``:
    the change whose canary the task's current version is, if it is one."""
    problems = []
    if change.task.lower() in RESERVED_TARGETS:
        problems.append(f"{change.task!r} is not a task prompt: the behavior rules are pinned")
    if canary_of is not None:
        problems.append(
            f"task {change.task!r} has change {canary_of} in canary: propose again once it is "
            "promoted or rolled back"
        )
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


def prompt_diff(before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), "current", "proposed", lineterm=""
    )
    return "\n".join(lines)

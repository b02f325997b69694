"""The policy approver's rules: decide a waiting change from the gate's evidence alone.

Auto-approval still goes through the gate, so every change keeps its audit trail. The rule only
reads the gate's test; nothing is approved on a raw difference:

- ``superior`` (default): approve when the paired sequential test showed the candidate better;
- ``min-lift:X``: as ``superior``, and the estimated lift is at least X (e.g. ``min-lift:0.05``).

Never approved by policy, whatever the rule: a non-inferiority change (made for another reason
than being better; it needs a person), and any change measured on a gate pool past its budget of
proposals (the pool may be overfit; rotate it).
"""

from __future__ import annotations

import math

from ratchet.contracts import Measurement

DEFAULT_RULE = "superior"


def parse_rule(rule: str) -> float:
    """The minimum lift a rule adds to significance (0 for ``superior``); else an error."""
    if rule == DEFAULT_RULE:
        return 0.0
    if rule.startswith("min-lift:"):
        try:
            lift = float(rule.split(":", 1)[1])
        except ValueError:
            lift = math.nan
        if 0 <= lift <= 1:
            return lift
    raise ValueError(f"unknown approval rule {rule!r}; use superior or min-lift:X")


def policy_decision(measurement: Measurement, rule: str) -> tuple[bool, str]:
    """(approve?, why), from the gate's evidence alone."""
    min_lift = parse_rule(rule)
    m = measurement
    numbers = (
        f"lift {m.lift:+.1%} (95% lower bound {m.lower_bound:+.1%}) on {m.cases} cases, "
        f"test {m.verdict.replace('_', '-')} at look {m.stopped_at}/{len(m.looks)}"
    )
    if m.test != "superiority":
        return False, f"{numbers}; a non-inferiority change needs a person"
    if m.pool_overused:
        return False, (
            f"{numbers}; the gate pool has been tested by {m.proposals_on_pool} proposals "
            f"(budget {m.pool_budget}) and may be overfit: rotate it, or decide in person"
        )
    if m.verdict != "superior":
        return False, f"{numbers}; not shown better"
    if m.lift < min_lift:
        return False, f"{numbers}; shown better, but the lift is under {min_lift:.0%}"
    return True, f"{numbers}; shown better"

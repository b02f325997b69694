"""The policy approver: decides waiting changes by a rule a person chose, and signs as itself.

Auto-approval still goes through the gate, so every change keeps its audit trail (the seed's
advice). Rules:

- ``no-regression`` (default): approve when the candidate fails no case the current prompt
  passed, and passes more cases overall;
- ``min-lift:X``: approve when the success rate rises by at least X (e.g. ``min-lift:0.05``).
"""

from __future__ import annotations

import math

from faststream import FastStream

from ratchet.contracts import ChangeApproved, ChangeAwaitingApproval, ChangeRejected, Measurement
from ratchet.messaging import durable_subscriber, event_publisher, make_broker, publish
from ratchet.settings import Settings


def parse_rule(rule: str) -> float | None:
    """None for ``no-regression``, the minimum lift for ``min-lift:X``; else an error."""
    if rule == "no-regression":
        return None
    if rule.startswith("min-lift:"):
        try:
            lift = float(rule.split(":", 1)[1])
        except ValueError:
            lift = math.nan
        if 0 <= lift <= 1:  # a negative lift would approve changes that make things worse
            return lift
    raise ValueError(f"unknown approval rule {rule!r}; use no-regression or min-lift:X")


def policy_decision(measurement: Measurement, rule: str) -> tuple[bool, str]:
    """(approve?, why), from the gate measurement alone."""
    min_lift = parse_rule(rule)
    before, after = measurement.current.success_rate, measurement.candidate.success_rate
    numbers = f"success {before:.0%} -> {after:.0%} on {measurement.cases} gate cases"
    if min_lift is not None:
        verdict = measurement.diff >= min_lift
        sign = ">=" if verdict else "<"
        return verdict, f"{numbers}; lift {measurement.diff:+.0%} {sign} {min_lift:.0%}"
    worse = sorted(case for case, d in measurement.per_case_diff.items() if d < 0)
    if worse:
        return False, f"{numbers}; worse on {len(worse)} case(s): {', '.join(worse[:5])}"
    if measurement.diff <= 0:
        return False, f"{numbers}; no case improved"
    return True, f"{numbers}; better overall and worse on no case"


def build_approver_app(settings: Settings, rule: str) -> FastStream:
    parse_rule(rule)  # an unknown rule fails here, before connecting
    broker = make_broker(settings, name="policy-approver")
    approved = event_publisher(broker, ChangeApproved)
    rejected = event_publisher(broker, ChangeRejected)
    approver = f"policy:{rule}"

    @durable_subscriber(
        broker, ChangeAwaitingApproval.subject, durable="policy-approver", settings=settings
    )
    async def decide(waiting: ChangeAwaitingApproval) -> None:
        ok, why = policy_decision(waiting.measurement, rule)
        decision_type = ChangeApproved if ok else ChangeRejected
        decision = decision_type(
            id=f"{waiting.change_id}.decision",
            change_id=waiting.change_id,
            approver=approver,
            reason=why,
        )
        await publish(approved if ok else rejected, decision)

    return FastStream(broker)

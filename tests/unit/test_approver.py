"""The policy approver's rules, decided from the gate measurement alone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ratchet.approver import parse_rule, policy_decision
from ratchet.contracts import Measurement
from ratchet_gatekeeper.checks import measure

THRESHOLD = 0.7


def measured(current: Sequence[float], candidate: Sequence[float]) -> Measurement:
    """A measurement over cases named g0, g1, ...; 1.0 passes and 0.0 fails."""
    return measure(
        {f"g{i}": s for i, s in enumerate(current)},
        {f"g{i}": s for i, s in enumerate(candidate)},
        THRESHOLD,
    )


# --- no-regression ------------------------------------------------------------------------------


def test_no_regression_approves_better_and_never_worse() -> None:
    ok, why = policy_decision(measured([1, 0, 0, 1], [1, 1, 0, 1]), "no-regression")

    assert ok
    assert "50% -> 75%" in why
    assert "4 gate cases" in why


def test_no_regression_rejects_a_case_that_got_worse_and_names_it() -> None:
    # Better overall (2 of 4 -> 3 of 4), but g3 regressed.
    ok, why = policy_decision(measured([1, 0, 0, 1], [1, 1, 1, 0]), "no-regression")

    assert not ok
    assert "g3" in why
    assert "worse on 1 case" in why


def test_no_regression_rejects_no_improvement() -> None:
    ok, why = policy_decision(measured([1, 0, 1], [1, 0, 1]), "no-regression")

    assert not ok
    assert "no case improved" in why


def test_no_regression_names_at_most_five_worse_cases() -> None:
    ok, why = policy_decision(measured([1] * 7, [0] * 7), "no-regression")

    assert not ok
    assert "worse on 7 case(s)" in why
    assert "g4" in why and "g5" not in why


# --- min-lift -----------------------------------------------------------------------------------


def test_min_lift_approves_a_lift_at_the_threshold() -> None:
    # 10 cases, one more passes: a lift of exactly 0.1.
    ok, why = policy_decision(measured([0] * 10, [1] + [0] * 9), "min-lift:0.1")

    assert ok
    assert ">=" in why


def test_min_lift_rejects_a_lift_below_the_threshold() -> None:
    ok, why = policy_decision(measured([0] * 20, [1] + [0] * 19), "min-lift:0.1")

    assert not ok
    assert "+5%" in why and "< 10%" in why


def test_min_lift_looks_at_the_overall_rate_only() -> None:
    """Unlike no-regression, min-lift accepts a regressed case when the overall lift is enough."""
    m = measured([1, 0, 0, 0], [0, 1, 1, 0])

    assert policy_decision(m, "min-lift:0.1")[0]
    assert not policy_decision(m, "no-regression")[0]


def test_min_lift_rejects_a_drop() -> None:
    ok, _ = policy_decision(measured([1, 1], [1, 0]), "min-lift:0")

    assert not ok


# --- parse_rule ---------------------------------------------------------------------------------


def test_parse_rule() -> None:
    assert parse_rule("no-regression") is None
    assert parse_rule("min-lift:0.05") == 0.05


@pytest.mark.parametrize("rule", ["yolo", "min-lift:", "min-lift:lots", "No-Regression", ""])
def test_unknown_rule_is_an_error(rule: str) -> None:
    with pytest.raises(ValueError, match="unknown approval rule"):
        parse_rule(rule)


def test_policy_decision_refuses_an_unknown_rule() -> None:
    with pytest.raises(ValueError):
        policy_decision(measured([0], [1]), "always")

"""The policy approver's rules: they read the gate's test, never a raw difference."""

from __future__ import annotations

import pytest
from conftest import measurement

from ratchet_approver.policy import parse_rule, policy_decision


def test_superior_approves_what_the_test_showed_better() -> None:
    ok, why = policy_decision(measurement(), "superior")

    assert ok
    assert "shown better" in why and "look 2/4" in why and "+30.0%" in why


@pytest.mark.parametrize("verdict", ["futile", "not_shown"])
def test_superior_rejects_what_the_test_did_not_show(verdict: str) -> None:
    ok, why = policy_decision(measurement(verdict=verdict), "superior")

    assert not ok and "not shown better" in why


def test_a_large_raw_difference_without_significance_is_rejected() -> None:
    """+20 points on a handful of cases is noise until the test says otherwise."""
    noisy = measurement(verdict="not_shown", cases=5, lift=0.2, lower_bound=-0.4)

    assert not policy_decision(noisy, "superior")[0]
    assert not policy_decision(noisy, "min-lift:0.05")[0]


def test_min_lift_adds_a_minimum_on_top_of_significance() -> None:
    small = measurement(lift=0.03, lower_bound=0.001)

    assert policy_decision(small, "superior")[0]
    ok, why = policy_decision(small, "min-lift:0.05")
    assert not ok and "under 5%" in why
    assert policy_decision(measurement(lift=0.06), "min-lift:0.05")[0]


def test_a_non_inferiority_change_always_needs_a_person() -> None:
    rollback = measurement(test="non-inferiority", margin=0.05, verdict="non_inferior")

    ok, why = policy_decision(rollback, "superior")

    assert not ok and "needs a person" in why


def test_a_pool_past_its_budget_turns_auto_approval_off() -> None:
    worn = measurement(proposals_on_pool=51, pool_budget=50)

    ok, why = policy_decision(worn, "superior")

    assert not ok and "may be overfit" in why and "51 proposals" in why
    assert policy_decision(measurement(proposals_on_pool=50, pool_budget=50), "superior")[0]


def test_parse_rule() -> None:
    assert parse_rule("superior") == 0.0
    assert parse_rule("min-lift:0.05") == 0.05


@pytest.mark.parametrize(
    "rule", ["yolo", "min-lift:", "min-lift:lots", "min-lift:-0.1", "no-regression", ""]
)
def test_unknown_rule_is_an_error(rule: str) -> None:
    with pytest.raises(ValueError, match="unknown approval rule"):
        parse_rule(rule)

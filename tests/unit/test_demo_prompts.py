"""What the demo says and asks a person (no services needed)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from ratchet.contracts import ArmResult, Measurement, TokenUsage
from ratchet.demo import DemoReport, ask_person, print_summary


def test_ask_person_shows_the_choices_and_insists_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["maybe", "n", "it explains instead of answering"])
    monkeypatch.setattr("builtins.input", lambda *_: next(answers))
    console = Console(file=io.StringIO(), record=True, width=100)
    assert ask_person(console) == (False, "it explains instead of answering")
    shown = console.export_text()
    assert shown.count("Approve this change? [y/n]") == 2  # asked again after "maybe"


def report(outcome: str, before: float, after: float) -> DemoReport:
    arm = {"success_rate": 0.0, "scores": {}}
    measurement = Measurement(
        cases=4,
        current=ArmResult.model_validate({**arm, "success_rate": before}),
        candidate=ArmResult.model_validate({**arm, "success_rate": after}),
        per_case_diff={},
        diff=after - before,
        ci95=(-1.0, 1.0),
    )
    return DemoReport(
        task="t",
        model="m",
        learn_cases=4,
        learn_success_rate=0.25,
        failures=3,
        groups=[],
        measurement=measurement,
        outcome=outcome,
        runs=16,
        tokens=TokenUsage(),
        seconds=1.0,
    )


@pytest.mark.parametrize(
    ("outcome", "before", "after", "says"),
    [
        ("kept", 0.25, 0.75, "helped on the gate set (+50%)"),
        ("kept", 0.5, 0.5, "did not help either"),
        ("rolled_back", 0.5, 0.75, "rolled back"),
        ("rejected", 0.5, 0.5, "prompt is unchanged"),
    ],
)
def test_the_summary_says_plainly_what_happened(
    outcome: str, before: float, after: float, says: str
) -> None:
    console = Console(file=io.StringIO(), record=True, width=120)
    print_summary(report(outcome, before, after), console)
    assert says in console.export_text()

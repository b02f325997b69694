"""What the demo says and asks a person (no services needed)."""

from __future__ import annotations

import io

import pytest
from conftest import measurement
from rich.console import Console

from ratchet.cli.demo import DemoReport, ask_person, print_summary
from ratchet.contracts import TokenUsage


def test_ask_person_shows_the_choices_and_insists_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["maybe", "n", "it explains instead of answering"])
    monkeypatch.setattr("builtins.input", lambda *_: next(answers))
    console = Console(file=io.StringIO(), record=True, width=100)
    assert ask_person(console) == (False, "it explains instead of answering")
    shown = console.export_text()
    assert shown.count("Approve this change? [y/n]") == 2  # asked again after "maybe"


def report(outcome: str, verdict: str) -> DemoReport:
    return DemoReport(
        task="t",
        model="m",
        learn_cases=4,
        learn_success_rate=0.25,
        failures=3,
        groups=[],
        measurement=measurement(verdict=verdict),
        outcome=outcome,
        runs=16,
        tokens=TokenUsage(),
        seconds=1.0,
    )


@pytest.mark.parametrize(
    ("outcome", "verdict", "says"),
    [
        ("kept", "superior", "showed the change better (+30%, an overestimate"),
        ("kept", "not_shown", "approved without being shown better"),
        ("rolled_back", "superior", "rolled back"),
        ("rejected", "futile", "could not show the change better"),
        ("rejected", "superior", "prompt is unchanged"),
    ],
)
def test_the_summary_says_plainly_what_happened(outcome: str, verdict: str, says: str) -> None:
    console = Console(file=io.StringIO(), record=True, width=120)
    print_summary(report(outcome, verdict), console)
    shown = console.export_text()
    assert says in shown
    assert "lower bound +8.0%" in shown  # the evidence, not only a raw rate

"""The pinned rules file (loaded, hashed, refused when malformed) and the agent's tools."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ratchet.rules import Rules, RulesError, compose_system_prompt, load_rules
from ratchet.tools import calculator, get_tools, word_count

REPO_RULES = Path(__file__).parents[2] / "config" / "behavior_rules.json"


def write_rules(path: Path, rules: list[str]) -> Path:
    path.write_text(json.dumps({"version": 1, "rules": rules}))
    return path


# --- rules --------------------------------------------------------------------------------------


def test_shipped_rules_file_loads() -> None:
    rules = load_rules(REPO_RULES)

    assert len(rules.rules) >= 1
    assert all(rule.strip() for rule in rules.rules)
    assert len(rules.sha256) == 64


def test_rules_hash_changes_when_the_file_changes(tmp_path: Path) -> None:
    path = write_rules(tmp_path / "rules.json", ["Never make things up."])
    before = load_rules(path)
    same = load_rules(path)

    write_rules(path, ["Never make things up.", "Never delete files."])
    after = load_rules(path)

    assert before.sha256 == same.sha256
    assert after.sha256 != before.sha256
    assert after.rules == ("Never make things up.", "Never delete files.")


def test_rules_hash_covers_the_bytes_not_only_the_rules(tmp_path: Path) -> None:
    """An edit anywhere in the reviewed file (even a version bump) shows in every run's record."""
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"version": 1, "rules": ["A."]}))
    first = load_rules(path).sha256
    path.write_text(json.dumps({"version": 2, "rules": ["A."]}))

    assert load_rules(path).sha256 != first


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{not json", id="malformed-json"),
        pytest.param(json.dumps({"version": 1}), id="missing-rules"),
        pytest.param(json.dumps({"rules": []}), id="empty-list"),
        pytest.param(json.dumps({"rules": "Never lie."}), id="rules-not-a-list"),
        pytest.param(json.dumps({"rules": ["ok", 3]}), id="rule-not-text"),
        pytest.param(json.dumps(["Never lie."]), id="top-level-not-an-object"),
    ],
)
def test_malformed_rules_file_is_refused_naming_the_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken_rules.json"
    path.write_text(content)

    with pytest.raises(RulesError, match=re.escape(str(path))):
        load_rules(path)


def test_missing_rules_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(RulesError, match=re.escape(str(path))):
        load_rules(path)


def test_composed_prompt_puts_rules_before_the_task() -> None:
    rules = Rules(rules=("Never lie.", "Never delete files."), sha256="x")

    composed = compose_system_prompt(rules, "Answer briefly.")

    assert composed.startswith("RULES (never break):\n- Never lie.\n- Never delete files.")
    assert composed.endswith("TASK:\nAnswer briefly.")


# --- calculator ---------------------------------------------------------------------------------


def calc(expression: str) -> str:
    result = calculator.invoke({"expression": expression})
    assert isinstance(result, str)
    return result


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3", "5"),
        ("2 + 3 * 4", "14"),
        ("(2 + 3) * 4", "20"),
        ("12 * (3 + 4)", "84"),
        ("10 - 4 - 3", "3"),
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),
        ("7 // 2", "3"),
        ("7 % 4", "3"),
        ("2 ** 10", "1024"),
        ("-3 + 5", "2"),
        ("2 ** 3 ** 2", "512"),
        ("0.5 * 4", "2"),
    ],
)
def test_calculator_arithmetic(expression: str, expected: str) -> None:
    assert calc(expression) == expected


def test_calculator_caps_the_exponent() -> None:
    assert calc("2 ** 64") == str(2**64)
    assert calc("2 ** 65").startswith("error:")
    assert "exponent" in calc("2 ** 1000000")


def test_calculator_division_by_zero_is_an_error_string() -> None:
    assert calc("1 / 0").startswith("error:")
    assert calc("5 % 0").startswith("error:")


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('echo hacked')",
        "x + 1",
        "open('/etc/passwd')",
        "(1).__class__",
        "'a' * 3",
        "[1, 2]",
        "True + 1",
        "lambda: 1",
        "1 +",
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression: str) -> None:
    assert calc(expression).startswith("error:")


def test_word_count() -> None:
    assert word_count.invoke({"text": "one two  three\nfour"}) == "4"


def test_get_tools_by_name() -> None:
    assert [t.name for t in get_tools(["word_count"])] == ["word_count"]
    assert {t.name for t in get_tools()} == {"calculator", "word_count"}


def test_get_tools_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="shell"):
        get_tools(["calculator", "shell"])


@pytest.mark.parametrize("expression", ["(10**64)**64 * (10**64)**64", "((9**64)**64)**64"])
def test_calculator_result_too_large_is_an_error_string(expression: str) -> None:
    assert calc(expression).startswith("error:")

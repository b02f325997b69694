"""Programmatic checks: right answers pass; wrong or badly formatted ones fail with their cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from ratchet.contracts import Check
from ratchet.scripted import scripted_model
from ratchet.suites import load_suite
from ratchet_evaluator.checks import BROKEN_CHECK, run_check

DEMO_SUITE = Path(__file__).parents[2] / "config" / "suites" / "demo.json"


def check(kind: str, expected: Any, **options: Any) -> Check:
    return Check.model_validate({"kind": kind, "expected": expected, **options})


def passes(c: Check, output: str) -> bool:
    score, problems = run_check(c, output)
    assert (score == 1.0) == (not problems), "a pass has no problems, a failure has some"
    assert score in (0.0, 1.0)
    return score == 1.0


# --- exact and any_of ---------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["42", "  42\n", "\n42 "])
def test_exact_ignores_surrounding_whitespace(output: str) -> None:
    assert passes(check("exact", "42"), output)


def test_exact_ignores_case_unless_asked() -> None:
    assert passes(check("exact", "Positive"), "positive")
    score, problems = run_check(check("exact", "Positive", case_sensitive=True), "positive")

    assert score == 0.0
    assert problems == [
        "expected 'Positive', got 'positive'",
        "output differs from the expected answer only in letter case",
    ]


def test_exact_does_not_forgive_a_trailing_period() -> None:
    score, problems = run_check(check("exact", "42"), "42.")

    assert score == 0.0
    assert problems == [
        "expected '42', got '42.'",
        "the expected answer is present but wrapped in extra text",
    ]


def test_exact_says_when_the_answer_is_wrapped_in_extra_text() -> None:
    score, problems = run_check(check("exact", "42"), "The answer is 42.")

    assert score == 0.0
    assert problems == [
        "expected '42', got 'The answer is 42.'",
        "the expected answer is present but wrapped in extra text",
    ]


@pytest.mark.parametrize("output", ["The answer is 17.", "I don't know.", "420"])
def test_exact_says_when_the_answer_is_missing(output: str) -> None:
    score, problems = run_check(check("exact", "42"), output)

    assert score == 0.0
    assert problems[-1] == "the expected answer is missing from the output"


def test_exact_reports_an_empty_output() -> None:
    assert run_check(check("exact", "42"), "   ") == (0.0, ["output is empty, expected '42'"])


def test_exact_quotes_a_long_output_shortened_on_one_line() -> None:
    output = "line one\nline two " + "word " * 100
    _, problems = run_check(check("exact", "42"), output)

    quoted = problems[0].removeprefix("expected '42', got ")
    assert "\n" not in quoted
    assert quoted.startswith("'line one line two word")
    assert quoted.endswith("…'")
    assert len(quoted) <= 122


@pytest.mark.parametrize("output", ["4", "four", "FOUR", " 4 "])
def test_any_of_accepts_each_listed_answer(output: str) -> None:
    assert passes(check("any_of", ["4", "four"]), output)


def test_any_of_names_every_accepted_answer_and_the_cause() -> None:
    score, problems = run_check(check("any_of", ["4", "four"]), "There are four letters.")

    assert score == 0.0
    assert problems == [
        "expected one of '4', 'four', got 'There are four letters.'",
        "the expected answer is present but wrapped in extra text",
    ]
    assert run_check(check("any_of", ["4", "four"]), "5")[1][-1] == (
        "the expected answer is missing from the output"
    )


# --- regex --------------------------------------------------------------------------------------


def test_regex_matches_anywhere_with_the_pattern_as_written() -> None:
    assert passes(check("regex", "(?i)blue"), "The sky is Blue.")
    assert not passes(check("regex", "blue"), "The sky is Blue.")
    assert passes(check("regex", r"(?i)^\s*yes\.?\s*$"), "Yes.\n")
    assert not passes(check("regex", r"(?i)^\s*yes\.?\s*$"), "Yes, it is.")


def test_regex_failure_shows_pattern_and_output() -> None:
    score, problems = run_check(check("regex", r"^\d{4}-\d{2}-\d{2}$"), "March 5, 2024")

    assert score == 0.0
    assert problems == [r"output does not match /^\d{4}-\d{2}-\d{2}$/, got 'March 5, 2024'"]


def test_an_invalid_regex_is_reported_as_a_broken_check_not_a_bad_output() -> None:
    score, problems = run_check(check("regex", "(unclosed"), "anything")

    assert score == 0.0
    assert len(problems) == 1
    assert problems[0].startswith(f"{BROKEN_CHECK}: invalid regex '(unclosed'")


# --- number -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("12", 12),
        ("The answer is: 12.", 12),
        ("3 hours is 180 minutes", 180),
        ("It costs 1,234 dollars.", 1234),
        ("about 1,234,567.5 people", 1234567.5),
        ("The temperature fell to -5 degrees.", -5),
        ("The temperature fell to \u22125 degrees.", -5),
        ("pi is roughly 3.14", 3.14),
        ("first 7, then 8, finally 9", 9),
        ("1,2,3", 3),
        ("$0.50", 0.5),
    ],
)
def test_number_reads_the_last_number(output: str, expected: float) -> None:
    assert passes(check("number", expected), output)


def test_number_does_not_read_a_hyphen_as_a_minus_sign() -> None:
    assert passes(check("number", 5), "code x-5")
    assert passes(check("number", 5), "on 2024-03-05")


def test_number_reports_the_difference_and_the_tolerance() -> None:
    score, problems = run_check(check("number", 23), "I think it is 17.")

    assert score == 0.0
    assert problems == ["number 17 differs from expected 23 (tolerance 0)"]
    assert run_check(check("number", 4, tolerance=0.1), "3.5")[1] == [
        "number 3.5 differs from expected 4 (tolerance 0.1)"
    ]


def test_number_within_tolerance_passes() -> None:
    assert passes(check("number", 3.14159, tolerance=0.01), "3.14")
    assert not passes(check("number", 3.14159), "3.14")


def test_number_reports_an_output_without_a_number() -> None:
    score, problems = run_check(check("number", 12), "twelve")

    assert score == 0.0
    assert problems == ["no number in output, expected 12, got 'twelve'"]


def test_a_number_check_with_a_text_expected_is_broken() -> None:
    score, problems = run_check(check("number", "12"), "12")

    assert score == 0.0
    assert problems == [f"{BROKEN_CHECK}: a number check needs a numeric expected, got str"]


# --- json_shape ---------------------------------------------------------------------------------


PERSON = {"name": "Ana", "age": "int"}


@pytest.mark.parametrize(
    "output",
    [
        '{"name": "Ana", "age": 31}',
        '  {"name": "Ana", "age": 31, "city": "Oslo"}\n',
        '```json\n{"name": "Ana", "age": 31}\n```',
        '```\n{"name": "Ana",\n "age": 31}\n```',
    ],
)
def test_json_shape_accepts_an_object_alone_or_in_one_fence(output: str) -> None:
    assert passes(check("json_shape", PERSON), output)


@pytest.mark.parametrize(
    "output",
    [
        'Here it is: {"name": "Ana", "age": 31}',
        '{"name": "Ana", "age": 31}.',
        'Sure!\n```json\n{"name": "Ana", "age": 31}\n```',
    ],
)
def test_json_shape_rejects_text_around_the_object(output: str) -> None:
    assert run_check(check("json_shape", PERSON), output) == (
        0.0,
        ["output has extra text around the JSON object"],
    )


def test_json_shape_reports_output_that_is_no_json_object() -> None:
    score, problems = run_check(check("json_shape", PERSON), "Ana is 31")
    assert score == 0.0
    assert problems == ["output is not a JSON object: Expecting value: line 1 column 1 (char 0)"]

    assert run_check(check("json_shape", PERSON), '["Ana", 31]')[1] == [
        "output is not a JSON object: it is a JSON list"
    ]


def test_json_shape_names_each_missing_key_and_wrong_type() -> None:
    shape = {"name": "str", "age": "int", "tags": "list", "address": "dict", "member": "bool"}
    output = '{"name": "Ana", "age": "31", "tags": [], "member": 1}'

    score, problems = run_check(check("json_shape", shape), output)

    assert score == 0.0
    assert problems == [
        "key 'age' should be int, got str",
        "key 'address' missing",
        "key 'member' should be bool, got int",
    ]


def test_json_shape_types_follow_json_numbers() -> None:
    assert passes(check("json_shape", {"price": "float"}), '{"price": 40}')
    assert passes(check("json_shape", {"price": "float"}), '{"price": 40.5}')
    assert run_check(check("json_shape", {"age": "int"}), '{"age": 31.0}')[1] == [
        "key 'age' should be int, got float"
    ]
    assert run_check(check("json_shape", {"age": "int"}), '{"age": true}')[1] == [
        "key 'age' should be int, got bool"
    ]
    assert run_check(check("json_shape", {"age": "int"}), '{"age": null}')[1] == [
        "key 'age' should be int, got null"
    ]


def test_json_shape_literal_values_must_equal() -> None:
    expected = {"city": "Oslo", "rainy": True, "days": 3}

    assert passes(check("json_shape", expected), '{"city": "Oslo", "rainy": true, "days": 3.0}')
    score, problems = run_check(
        check("json_shape", expected), '{"city": "oslo", "rainy": 1, "days": 4}'
    )
    assert score == 0.0
    assert problems == [
        'key \'city\' should be "Oslo", got "oslo"',
        "key 'rainy' should be true, got 1",
        "key 'days' should be 3, got 4",
    ]


# --- the shipped suite --------------------------------------------------------------------------


def bare_and_wrapped_answers() -> list[tuple[str, Check, str, str]]:
    """Each demo case the scripted agent can answer: its bare answer and "The answer is: X."."""
    model = scripted_model("prompt-sensitive")
    suite = load_suite(DEMO_SUITE)
    cases = []
    for case in [*suite.learn, *suite.gate]:
        if case.check.kind == "regex":
            continue  # the scripted agent knows no answer for a pattern
        bare, wrapped = (
            model.invoke([SystemMessage(content=prompt), HumanMessage(content=case.input)]).text
            for prompt in ("Reply with only the final answer.", "Help the user.")
        )
        cases.append((case.id, case.check, bare, wrapped))
    return cases


def test_bare_answers_pass_every_demo_check_and_wrapped_ones_only_number_checks() -> None:
    answers = bare_and_wrapped_answers()
    assert len(answers) >= 20

    for case_id, case_check, bare, wrapped in answers:
        assert passes(case_check, bare), (case_id, bare, run_check(case_check, bare))
        assert passes(case_check, wrapped) == (case_check.kind == "number"), (case_id, wrapped)

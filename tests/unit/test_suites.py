"""Task suites: the shipped suites are valid, BIG-bench files import, bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ratchet.contracts import Check
from ratchet.suites import Case, Suite, import_bigbench, load_suite, load_suites, save_suite

REPO = Path(__file__).parents[2]
SUITES_DIR = REPO / "config" / "suites"
BIGBENCH_DIR = REPO.parent / "shared" / "datasets" / "bigbench"
BIGBENCH_TASKS = ["object_counting", "word_sorting", "arithmetic_3_digit_addition"]

needs_bigbench = pytest.mark.skipif(
    not BIGBENCH_DIR.is_dir(), reason=f"BIG-bench task files not found at {BIGBENCH_DIR}"
)


def write_task(tmp_path: Path, task: Any, folder: str = "my_task") -> Path:
    path = tmp_path / folder / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task), encoding="utf-8")
    return path


def all_cases(suite: Suite) -> list[Case]:
    return suite.learn + suite.gate


# --- the shipped suites -------------------------------------------------------------------------


def test_demo_suite_is_a_usable_task() -> None:
    suite = load_suite(SUITES_DIR / "demo.json")

    assert suite.name == "answer-only"
    assert 20 <= len(all_cases(suite)) <= 50
    assert len(suite.learn) >= 15 and len(suite.gate) >= 15
    ids = [case.id for case in all_cases(suite)]
    assert len(ids) == len(set(ids))
    assert not {c.input for c in suite.learn} & {c.input for c in suite.gate}
    kinds = {case.check.kind for case in all_cases(suite)}
    assert kinds == {"exact", "any_of", "regex", "number", "json_shape"}
    assert all(len(case.input) < 120 for case in all_cases(suite)), "a 135M model runs these"


def test_smoke_suite_is_four_and_four() -> None:
    suite = load_suite(SUITES_DIR / "smoke.json")

    assert (len(suite.learn), len(suite.gate)) == (4, 4)


def test_load_suites_indexes_the_config_folder_by_task_name() -> None:
    suites = load_suites(SUITES_DIR)

    assert {"answer-only", "smoke"} <= suites.keys()
    assert all(name == suite.name for name, suite in suites.items())


def test_two_files_for_one_task_are_refused(tmp_path: Path) -> None:
    suite = load_suite(SUITES_DIR / "smoke.json")
    save_suite(suite, tmp_path / "a.json")
    save_suite(suite, tmp_path / "b.json")

    with pytest.raises(ValueError, match="already defined"):
        load_suites(tmp_path)


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    suite = load_suite(SUITES_DIR / "demo.json")
    path = tmp_path / "nested" / "demo.json"

    save_suite(suite, path)

    assert load_suite(path) == suite


# --- validation ---------------------------------------------------------------------------------


def suite_dict(**overrides: Any) -> dict[str, Any]:
    case = {"id": "g1", "input": "What is 1 + 1?", "check": {"kind": "number", "expected": 2}}
    data: dict[str, Any] = {
        "name": "t",
        "description": "d",
        "prompt": "p",
        "learn": [{**case, "id": "l1", "input": "What is 2 + 2?"}],
        "gate": [case],
    }
    return {**data, **overrides}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"gate": []}, "gate must hold 1 to 200"),
        (
            {
                "learn": [
                    {"id": "g1", "input": "other", "check": {"kind": "exact", "expected": "x"}}
                ]
            },
            "unique",
        ),
        (
            {
                "learn": [
                    {
                        "id": "l1",
                        "input": "What is 1 + 1?",
                        "check": {"kind": "number", "expected": 2},
                    }
                ]
            },
            "share inputs",
        ),
        (
            {"gate": [{"id": "g1", "input": "q", "check": {"kind": "any_of", "expected": "x"}}]},
            "any_of check needs",
        ),
        (
            {"gate": [{"id": "g1", "input": "q", "check": {"kind": "regex", "expected": "("}}]},
            "invalid regex",
        ),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_suite_file_is_a_clear_error(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(suite_dict(**overrides)), encoding="utf-8")

    with pytest.raises(ValueError, match=message) as raised:
        load_suite(path)
    assert str(path) in str(raised.value)


def test_gate_of_200_is_allowed_and_201_is_not() -> None:
    def cases(n: int) -> list[Case]:
        return [
            Case(id=f"g{i}", input=f"q{i}", check=Check(kind="exact", expected="a"))
            for i in range(n)
        ]

    Suite(name="t", description="", prompt="p", learn=[], gate=cases(200))
    with pytest.raises(ValueError, match="gate must hold"):
        Suite(name="t", description="", prompt="p", learn=[], gate=cases(201))


# --- BIG-bench import ---------------------------------------------------------------------------


@needs_bigbench
@pytest.mark.parametrize("task", BIGBENCH_TASKS)
def test_real_bigbench_task_imports(task: str) -> None:
    suite = import_bigbench(BIGBENCH_DIR / task / "task.json", gate_size=30, learn_size=60)

    assert suite.name == task
    assert (len(suite.gate), len(suite.learn)) == (30, 60)
    assert suite.prompt
    assert not {c.input for c in suite.learn} & {c.input for c in suite.gate}


@needs_bigbench
def test_bigbench_answer_kinds_follow_the_targets() -> None:
    counting = import_bigbench(BIGBENCH_DIR / "object_counting" / "task.json")
    sorting = import_bigbench(BIGBENCH_DIR / "word_sorting" / "task.json")
    addition = import_bigbench(BIGBENCH_DIR / "arithmetic_3_digit_addition" / "task.json")

    assert {c.check.kind for c in all_cases(counting)} == {"any_of"}  # ["three", "3"]
    assert {c.check.kind for c in all_cases(sorting)} == {"exact"}
    assert {c.check.kind for c in all_cases(addition)} == {"number"}  # "551"
    assert sorting.prompt == "Sort the following words alphabetically:"  # its task_prefix
    assert counting.prompt.startswith("Questions that involve enumerating")  # its description


@needs_bigbench
def test_bigbench_split_is_deterministic_and_seeded() -> None:
    path = BIGBENCH_DIR / "word_sorting" / "task.json"

    first = import_bigbench(path, gate_size=20, learn_size=20)
    again = import_bigbench(path, gate_size=20, learn_size=20)
    other_seed = import_bigbench(path, gate_size=20, learn_size=20, seed=1)

    assert first == again
    assert [c.id for c in first.gate] != [c.id for c in other_seed.gate]


def test_split_is_disjoint_and_respects_sizes(tmp_path: Path) -> None:
    examples = [{"input": f"word{i} word", "target": f"word word{i}"} for i in range(50)]
    examples.append(dict(examples[0]))  # a repeated input must not land in both sets
    path = write_task(tmp_path, {"description": "Sort.", "examples": examples})

    suite = import_bigbench(path, gate_size=10, learn_size=100)

    assert len(suite.gate) == 10
    assert len(suite.learn) == 40  # what remains of the 50 distinct inputs
    assert not {c.id for c in suite.learn} & {c.id for c in suite.gate}
    assert not {c.input for c in suite.learn} & {c.input for c in suite.gate}
    assert suite.name == "my_task"


def test_multiple_choice_and_list_targets_become_any_of(tmp_path: Path) -> None:
    path = write_task(
        tmp_path,
        {
            "task_prefix": "Pick the colour.",
            "examples": [
                {"input": "Sky?", "target_scores": {"red": 0, "blue": 1, "azure": 1}},
                {"input": "How many legs has a cat?", "target": ["four", "4"]},
                {"input": "Capital of Italy?", "target": "Rome"},
                {"input": "Half of 9?", "target": "4.5"},
            ],
        },
    )

    suite = import_bigbench(path, name="colours", gate_size=4, learn_size=0)
    by_input = {case.input.split("\n")[0]: case for case in suite.gate}

    sky = by_input["Sky?"]
    assert sky.check == Check(kind="any_of", expected=["blue", "azure"])
    assert "- red" in sky.input and "- blue" in sky.input  # choices are shown to the model
    assert by_input["How many legs has a cat?"].check == Check(
        kind="any_of", expected=["four", "4"]
    )
    assert by_input["Capital of Italy?"].check == Check(kind="exact", expected="Rome")
    assert by_input["Half of 9?"].check == Check(kind="number", expected=4.5)
    assert suite.prompt == "Pick the colour."
    assert suite.name == "colours"


def test_imported_suite_saves_and_loads(tmp_path: Path) -> None:
    path = write_task(tmp_path, {"description": "d", "examples": [{"input": "a", "target": "b"}]})
    suite = import_bigbench(path, gate_size=1)

    save_suite(suite, tmp_path / "out.json")

    assert load_suite(tmp_path / "out.json") == suite


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read BIG-bench task"),
        ("[]", "JSON object"),
        (json.dumps({"description": "d"}), "'examples' must be a non-empty list"),
        (json.dumps({"description": "d", "examples": [{"target": "x"}]}), r"examples\[0\] has no"),
        (json.dumps({"description": "d", "examples": [{"input": "q"}]}), "neither 'target'"),
        (
            json.dumps(
                {"description": "d", "examples": [{"input": "q", "target_scores": {"a": 0}}]}
            ),
            "scores 1",
        ),
        (json.dumps({"description": "d", "examples": [{"input": "q", "target": {}}]}), "'target'"),
        (json.dumps({"examples": [{"input": "q", "target": "a"}]}), "initial prompt"),
        (json.dumps({"description": "d", "examples": [{"input": "q", "target": "a"}]}), "fewer"),
    ],
)
def test_malformed_bigbench_file_is_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "broken" / "task.json"
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")

    with pytest.raises(ValueError, match=message) as raised:
        import_bigbench(path, gate_size=2 if "fewer" in message else 1)
    assert str(path) in str(raised.value)


def test_bad_import_arguments_are_refused(tmp_path: Path) -> None:
    path = write_task(tmp_path, {"description": "d", "examples": [{"input": "a", "target": "b"}]})

    with pytest.raises(ValueError, match="gate_size"):
        import_bigbench(path, gate_size=0)
    with pytest.raises(ValueError, match="task name"):
        import_bigbench(path, name="Not Valid")

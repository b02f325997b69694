"""Task suites: the shipped suites are valid, BIG-bench files import, bad files fail clearly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ratchet.contracts import Check
from ratchet.scripted import _answer_for
from ratchet.suites import (
    GATE_MAX,
    Case,
    Suite,
    import_bigbench,
    load_suite,
    load_suites,
    save_suite,
)
from ratchet_evaluator.checks import run_check

REPO = Path(__file__).parents[2]
SUITES_DIR = REPO / "config" / "suites"
SHIPPED = sorted(SUITES_DIR.glob("*.json"))
GENERATOR = REPO / "scripts" / "gen_demo_suite.py"
BIGBENCH_DIR = REPO.parent / "shared" / "datasets" / "bigbench"
BIGBENCH_TASKS = ["object_counting", "word_sorting", "arithmetic_3_digit_addition"]
ALL_BIGBENCH = sorted(p.parent.name for p in BIGBENCH_DIR.glob("*/task.json"))

needs_bigbench = pytest.mark.skipif(
    not BIGBENCH_DIR.is_dir(), reason=f"BIG-bench task files not found at {BIGBENCH_DIR}"
)


def write_task(tmp_path: Path, task: Any, folder: str = "my_task") -> Path:
    path = tmp_path / folder / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task), encoding="utf-8")
    return path


def all_cases(suite: Suite) -> list[Case]:
    return suite.learn + suite.gate + suite.holdout


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_demo_suite", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# --- the shipped suites -------------------------------------------------------------------------


def test_demo_suite_is_a_usable_task() -> None:
    suite = load_suite(SUITES_DIR / "demo.json")

    assert suite.name == "answer-only"
    assert suite.prompt == "Help the user."
    assert len(suite.gate) >= 150, "a paired sequential test needs pools of a few hundred"
    assert len(suite.holdout) >= 80
    assert 30 <= len(suite.learn) <= 60
    ids = [case.id for case in all_cases(suite)]
    assert len(ids) == len(set(ids))
    inputs = [case.input for case in all_cases(suite)]
    assert len(inputs) == len(set(inputs)), "the scripted agent's oracle is keyed by input"
    kinds = {case.check.kind for case in all_cases(suite)}
    assert kinds == {"exact", "any_of", "number", "json_shape"}  # no regex: no oracle answer
    assert all(len(case.input) < 120 for case in all_cases(suite)), "a 135M model runs these"
    assert "gen_demo_suite.py" in (suite.source or "")


@pytest.mark.parametrize("split", ["learn", "gate", "holdout"])
def test_demo_splits_are_mostly_format_sensitive(split: str) -> None:
    """About 70% of each split fails when the right answer is wrapped in a sentence."""
    cases: list[Case] = getattr(load_suite(SUITES_DIR / "demo.json"), split)

    format_sensitive = [c for c in cases if c.check.kind != "number"]
    assert 0.6 <= len(format_sensitive) / len(cases) <= 0.8
    assert {c.check.kind for c in cases} == {"exact", "any_of", "number", "json_shape"}


def test_demo_learn_has_failing_exact_questions() -> None:
    """The change-cycle tests gather failures from the first exact learn cases."""
    exact = [c for c in load_suite(SUITES_DIR / "demo.json").learn if c.check.kind == "exact"]

    assert len(exact) >= 10
    for case in exact:
        answer = _answer_for(case.check.kind, case.check.expected)
        assert run_check(case.check, f"The answer is: {answer}.")[0] == 0.0, case.id


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_case_passes_its_own_answer(path: Path) -> None:
    """What the scripted agent replies under a prompt asking for only the final answer passes;
    under the demo's initial prompt ("The answer is: X.") only number checks pass."""
    suite = load_suite(path)
    for case in all_cases(suite):
        answer = _answer_for(case.check.kind, case.check.expected)
        if answer is None:
            assert case.check.kind == "regex" and suite.name != "answer-only", case.id
            continue  # the scripted agent knows no answer for a pattern
        assert run_check(case.check, answer) == (1.0, []), (case.id, answer)
        wrapped, _ = run_check(case.check, f"The answer is: {answer}.")
        assert wrapped == (1.0 if case.check.kind == "number" else 0.0), (case.id, answer)


def test_shipped_demo_is_the_generator_output_for_its_default_seed(tmp_path: Path) -> None:
    generator = load_generator()
    out = tmp_path / "demo.json"

    assert generator.main(["--seed", str(generator.DEFAULT_SEED), "--out", str(out)]) == 0

    assert generator.DEFAULT_SEED == 7
    shipped = (SUITES_DIR / "demo.json").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == shipped, "rerun scripts/gen_demo_suite.py"


def test_generator_is_deterministic_for_a_seed() -> None:
    generator = load_generator()

    first, again, other = (
        generator.build_suite(3),
        generator.build_suite(3),
        generator.build_suite(4),
    )

    assert first.model_dump_json() == again.model_dump_json()
    assert first.gate_pool_sha256() != other.gate_pool_sha256()
    assert "--seed 3" in (first.source or "")


def test_generator_runs_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "suites" / "demo.json"
    ran = subprocess.run(
        [sys.executable, str(GENERATOR), "--seed", "11", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert ran.returncode == 0, ran.stderr
    suite = load_suite(out)
    assert (len(suite.gate), len(suite.holdout), len(suite.learn)) == (220, 80, 41)
    assert "220 gate + 80 holdout" in ran.stdout


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
    assert load_suite(path).holdout == suite.holdout != []


def test_an_empty_holdout_is_left_out_of_the_saved_file(tmp_path: Path) -> None:
    suite = load_suite(SUITES_DIR / "smoke.json")

    save_suite(suite, tmp_path / "smoke.json")

    assert suite.holdout == []
    assert "holdout" not in json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"))


# --- the gate pool hash -------------------------------------------------------------------------


def test_gate_pool_hash_is_sha256_of_the_canonical_gate_json() -> None:
    suite = load_suite(SUITES_DIR / "demo.json")
    canonical = json.dumps(
        [case.model_dump(mode="json") for case in suite.gate], sort_keys=True, separators=(",", ":")
    )

    assert suite.gate_pool_sha256() == hashlib.sha256(canonical.encode()).hexdigest()
    assert suite.gate_pool_sha256() == load_suite(SUITES_DIR / "demo.json").gate_pool_sha256()


def test_gate_pool_hash_changes_with_the_gate_only() -> None:
    suite = load_suite(SUITES_DIR / "demo.json")
    pool = suite.gate_pool_sha256()
    edited_case = suite.gate[0].model_copy(update={"input": suite.gate[0].input + " "})

    assert suite.model_copy(update={"learn": [], "holdout": []}).gate_pool_sha256() == pool
    assert suite.model_copy(update={"gate": suite.gate[::-1]}).gate_pool_sha256() != pool
    assert suite.model_copy(update={"gate": suite.gate[1:]}).gate_pool_sha256() != pool
    edited = suite.model_copy(update={"gate": [edited_case, *suite.gate[1:]]})
    assert edited.gate_pool_sha256() != pool


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
        ({"gate": []}, "gate must hold 1 to 500"),
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
            "learn and gate share inputs",
        ),
        (
            {
                "holdout": [
                    {
                        "id": "g1",
                        "input": "What is 3 + 3?",
                        "check": {"kind": "number", "expected": 6},
                    }
                ]
            },
            "unique across learn, gate and holdout",
        ),
        (
            {
                "holdout": [
                    {
                        "id": "h1",
                        "input": "What is 1 + 1?",
                        "check": {"kind": "number", "expected": 2},
                    }
                ]
            },
            "gate and holdout share inputs",
        ),
        (
            {
                "holdout": [
                    {
                        "id": "h1",
                        "input": "What is 2 + 2?",
                        "check": {"kind": "number", "expected": 4},
                    }
                ]
            },
            "learn and holdout share inputs",
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


def test_gate_of_500_is_allowed_and_501_is_not() -> None:
    def cases(n: int) -> list[Case]:
        return [
            Case(id=f"g{i}", input=f"q{i}", check=Check(kind="exact", expected="a"))
            for i in range(n)
        ]

    assert GATE_MAX == 500
    Suite(name="t", description="", prompt="p", learn=[], gate=cases(500))
    with pytest.raises(ValueError, match="gate must hold"):
        Suite(name="t", description="", prompt="p", learn=[], gate=cases(501))


def test_a_valid_holdout_loads(tmp_path: Path) -> None:
    holdout = [{"id": "h1", "input": "What is 3 + 3?", "check": {"kind": "number", "expected": 6}}]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(suite_dict(holdout=holdout)), encoding="utf-8")

    suite = load_suite(path)

    assert [case.id for case in suite.holdout] == ["h1"]
    assert Suite.model_validate(suite_dict()).holdout == []  # optional, empty by default


# --- BIG-bench import ---------------------------------------------------------------------------


@needs_bigbench
@pytest.mark.parametrize("task", BIGBENCH_TASKS)
def test_real_bigbench_task_imports(task: str) -> None:
    suite = import_bigbench(BIGBENCH_DIR / task / "task.json", gate_size=30, learn_size=60)

    assert suite.name == task
    assert (len(suite.gate), len(suite.holdout), len(suite.learn)) == (30, 100, 60)
    assert suite.prompt
    assert not {c.input for c in suite.learn} & {c.input for c in suite.gate}


@needs_bigbench
@pytest.mark.parametrize("task", ALL_BIGBENCH)
def test_every_bigbench_task_imports_with_the_default_pools(task: str) -> None:
    suite = import_bigbench(BIGBENCH_DIR / task / "task.json")

    assert (len(suite.gate), len(suite.holdout), len(suite.learn)) == (220, 100, 60)
    splits = [suite.learn, suite.gate, suite.holdout]
    inputs = [{c.input for c in split} for split in splits]
    assert sum(map(len, inputs)) == len(set().union(*inputs)), "the splits are disjoint"
    assert "seed 0" in (suite.source or "")


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
    assert first.gate_pool_sha256() == again.gate_pool_sha256()
    assert [c.id for c in first.gate] != [c.id for c in other_seed.gate]
    assert first.gate_pool_sha256() != other_seed.gate_pool_sha256()  # a new seed rotates it


def test_import_defaults_take_gate_then_holdout_then_learn(tmp_path: Path) -> None:
    examples = [{"input": f"What is {i} + 1?", "target": str(i + 1)} for i in range(400)]
    path = write_task(tmp_path, {"description": "Add.", "examples": examples})

    suite = import_bigbench(path)
    reference = import_bigbench(path, gate_size=400, holdout_size=0, learn_size=0)

    assert (len(suite.gate), len(suite.holdout), len(suite.learn)) == (220, 100, 60)
    shuffled = [case.id for case in reference.gate]  # the same seeded order, all in one split
    assert [c.id for c in suite.gate] == shuffled[:220]
    assert [c.id for c in suite.holdout] == shuffled[220:320]
    assert [c.id for c in suite.learn] == shuffled[320:380]


def test_learn_may_come_up_short_but_gate_and_holdout_may_not(tmp_path: Path) -> None:
    examples = [{"input": f"word{i} word", "target": f"word word{i}"} for i in range(340)]
    path = write_task(tmp_path, {"description": "Sort.", "examples": examples})

    suite = import_bigbench(path)
    assert (len(suite.gate), len(suite.holdout), len(suite.learn)) == (220, 100, 20)
    with pytest.raises(ValueError, match=r"340 distinct examples.*gate_size \+ holdout_size"):
        import_bigbench(path, gate_size=250)


def test_split_is_disjoint_and_respects_sizes(tmp_path: Path) -> None:
    examples = [{"input": f"word{i} word", "target": f"word word{i}"} for i in range(50)]
    examples.append(dict(examples[0]))  # a repeated input must not land in both sets
    path = write_task(tmp_path, {"description": "Sort.", "examples": examples})

    suite = import_bigbench(path, gate_size=10, holdout_size=5, learn_size=100)

    assert len(suite.gate) == 10
    assert len(suite.holdout) == 5
    assert len(suite.learn) == 35  # what remains of the 50 distinct inputs
    ids = [c.id for c in all_cases(suite)]
    inputs = [c.input for c in all_cases(suite)]
    assert len(set(ids)) == len(ids) == 50
    assert len(set(inputs)) == len(inputs)
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

    suite = import_bigbench(path, name="colours", gate_size=4, holdout_size=0, learn_size=0)
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
    suite = import_bigbench(path, gate_size=1, holdout_size=0)

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
        import_bigbench(path, gate_size=2 if "fewer" in message else 1, holdout_size=0)
    assert str(path) in str(raised.value)


def test_bad_import_arguments_are_refused(tmp_path: Path) -> None:
    path = write_task(tmp_path, {"description": "d", "examples": [{"input": "a", "target": "b"}]})

    with pytest.raises(ValueError, match="gate_size"):
        import_bigbench(path, gate_size=0)
    with pytest.raises(ValueError, match="gate_size"):
        import_bigbench(path, gate_size=GATE_MAX + 1)
    with pytest.raises(ValueError, match="holdout_size"):
        import_bigbench(path, gate_size=1, holdout_size=-1)
    with pytest.raises(ValueError, match="learn_size"):
        import_bigbench(path, gate_size=1, learn_size=-1)
    with pytest.raises(ValueError, match="task name"):
        import_bigbench(path, name="Not Valid")


def test_cli_import_defaults_and_message(tmp_path: Path) -> None:
    examples = [{"input": f"What is {i} + 2?", "target": str(i + 2)} for i in range(350)]
    path = write_task(tmp_path, {"description": "Add.", "examples": examples})
    suites = tmp_path / "suites"

    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "suite", "import", str(path), "--seed", "3"],
        env={**os.environ, "RATCHET_SUITES_DIR": str(suites)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert ran.returncode == 0, ran.stderr
    assert "30 learn + 220 gate + 100 holdout" in " ".join(ran.stdout.split())
    suite = load_suite(suites / "my_task.json")
    assert suite == import_bigbench(path, seed=3)

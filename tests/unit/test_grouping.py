"""Failure grouping: recovers known causes from evaluator problem texts, and handles edge cases."""

from __future__ import annotations

from collections import Counter

import pytest
from sklearn.metrics import adjusted_rand_score

from ratchet.grouping import NO_PROBLEMS, group_failures

# Problem texts as an evaluator writes them, by the cause a person would name. Wording, numbers,
# quoted values and ids vary within each cause; several failures carry more than one problem.
# Both sets were used to choose the distance threshold in ratchet.grouping.
Labelled = dict[str, list[list[str]]]

ANSWER_AND_RUNTIME: Labelled = {
    "verbose answer": [
        ["expected '42', got 'The answer is 42.'"],
        ["expected 'Paris', got 'The capital of France is Paris.'"],
        ["expected '7', got 'There are 7 days in a week.'"],
        ["expected 'blue', got 'I believe the answer is blue.'"],
        ["expected 'yes', got 'Yes, that is correct.'"],
        ["expected 'H2O', got 'The chemical formula for water is H2O.'"],
        ["expected '1989', got 'The wall fell in 1989.'"],
        ["answer has extra words around it"],
        ["the answer is right but has extra words around it: 'Sure! It is 12.'"],
        ["extra words around the answer", "expected '3', got 'Three, i.e. 3.'"],
        ["expected 'Tokyo', got 'Tokyo is the capital of Japan.'"],
    ],
    "invalid json": [
        ["output is not valid JSON"],
        ["output is not valid JSON: Expecting value: line 1 column 1 (char 0)"],
        ["output is not valid JSON: Unterminated string starting at: line 3 column 12 (char 40)"],
        ["output is not valid JSON: Expecting ',' delimiter: line 2 column 5 (char 18)"],
        ["output is not valid JSON (it is wrapped in ```json fences)"],
        ["could not parse the output as JSON: Extra data: line 1 column 23 (char 22)"],
        ["invalid JSON in output: Expecting property name enclosed in double quotes"],
        ["output is not valid JSON", "missing key 'name'"],
        ["JSON parse error: Expecting value: line 4 column 9 (char 77)"],
        ["output is not valid JSON: trailing comma at line 6"],
    ],
    "number off": [
        ["number 17 is off from expected 23"],
        ["number 3.5 is off from expected 4 (tolerance 0.1)"],
        ["number -2 is off from expected 2"],
        ["number 1200 is off from expected 1250 (tolerance 10)"],
        ["number 0.33 is off from expected 0.25"],
        ["the last number 99 is off from the expected 100"],
        ["number 56 is off from expected 65: digits swapped"],
        ["arithmetic slip: number 124 is off from expected 144"],
        ["number 8 is off from expected 6", "answer has no units"],
        ["number 2024 is off from expected 2023 (tolerance 0)"],
    ],
    "crash": [
        ["run crashed: TimeoutError: model call exceeded 30s"],
        ["run crashed: TimeoutError after 60 s"],
        ["run crashed: TimeoutError"],
        ["run crashed: ConnectionError: connection refused to 127.0.0.1:8080"],
        ["run crashed: RateLimitError: 429 Too Many Requests (request 9f8e7d6c5b4a3921)"],
        ["run crashed: APIConnectionError: server at http://localhost:11434 unreachable"],
        ["run crashed: TimeoutError: no tokens for 45.5 s in run 01JD8ZK3Q4M5N6P7R8S9T0V1W2"],
        ["run crashed: KeyError: 'choices'"],
        ["run crashed: TimeoutError: model call exceeded 120s"],
        ["run crashed: ConnectionResetError: [Errno 104] Connection reset by peer"],
    ],
    "refusal": [
        ["the model refused to answer"],
        ["the model refused: 'I cannot help with that request.'"],
        ["refused to answer, citing its safety policy"],
        ["the model refused to answer a harmless question"],
        ["refused: 'Sorry, I can't do that.'"],
        ["the agent refused the task instead of answering it"],
        ["the model refused to answer: 'As an AI, I am unable to provide that.'"],
        ["refused to answer the question about dosage 5 mg"],
        ["answer is a refusal: 'I won't answer that.'"],
        ["the model refused and gave no answer"],
    ],
}


SHAPE_AND_TOOLS: Labelled = {
    "wrong value": [
        ["expected 'Paris', got 'London'"],
        ["expected '42', got '24'"],
        ["expected 'blue', got 'green'"],
        ["expected 'yes', got 'no'"],
        ["expected '1989', got '1991'"],
        ["wrong answer: expected 'Au', got 'Ag'"],
        ["expected 'Tokyo', got 'Kyoto'"],
        ["expected 'O(n log n)', got 'O(n)'"],
        ["expected 'true', got 'false'"],
    ],
    "json shape": [
        ["missing key 'name'"],
        ["missing key 'age'", "key 'email' should be str, got int"],
        ["key 'count' should be int, got str"],
        ["missing keys 'id' and 'total'"],
        ["key 'tags' should be list, got str"],
        ["missing key 'status' in the JSON object"],
        ["key 'price' should be float, got str"],
        ["key 'active' should be bool, got str"],
    ],
    "pattern": [
        [r"pattern '^\d{4}-\d{2}$' not found in output"],
        ["pattern 'ISO-8601 date' not found in output"],
        ["no match for pattern '[A-Z]{3}'"],
        ["pattern '^SELECT' not found in output"],
        ["output does not match the pattern '^#'"],
        ["pattern 'Dear .*,' not found in output"],
        ["the required pattern was not found in the output"],
    ],
    "language": [
        ["answered in French instead of English"],
        ["the reply is in German, the user wrote in English"],
        ["answered in Spanish instead of English"],
        ["language mismatch: answered in French, question in English"],
        ["responded in Italian instead of English"],
        ["answer is in Dutch; expected English"],
        ["answered in Portuguese instead of English"],
    ],
    "unknown tool": [
        ["called unknown tool 'search_web'"],
        ["called unknown tool 'get_weather' with args {'city': 'Oslo'}"],
        ["tool 'calculator' was called with invalid arguments"],
        ["called unknown tool 'browse'"],
        ["tool call failed: unknown tool 'sql_query'"],
        ["tool 'lookup' was called with invalid arguments: missing 'id'"],
        ["called a tool that does not exist: 'summarise'"],
        ["called unknown tool 'python' 3 times"],
    ],
}


def labelled_items(
    labelled: Labelled = ANSWER_AND_RUNTIME,
) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """Failures in an interleaved order (as they would arrive), and each run id's true cause."""
    items: list[tuple[str, list[str]]] = []
    cause_of: dict[str, str] = {}
    longest = max(len(failures) for failures in labelled.values())
    for i in range(longest):
        for cause, failures in labelled.items():
            if i < len(failures):
                run_id = f"{cause.replace(' ', '-')}-{i}"
                items.append((run_id, failures[i]))
                cause_of[run_id] = cause
    return items, cause_of


@pytest.mark.parametrize(
    "labelled", [ANSWER_AND_RUNTIME, SHAPE_AND_TOOLS], ids=["answer-and-runtime", "shape-and-tools"]
)
def test_groups_recover_known_causes(labelled: Labelled) -> None:
    items, cause_of = labelled_items(labelled)
    # A cap well above the number of causes: the distance threshold alone decides the groups.
    groups = group_failures(items, max_groups=20)

    group_of = {run_id: index for index, group in enumerate(groups) for run_id in group.run_ids}
    run_ids = [run_id for run_id, _ in items]
    assert sorted(group_of) == sorted(run_ids), "every failure lands in exactly one group"
    ari = adjusted_rand_score(
        [cause_of[run_id] for run_id in run_ids], [group_of[run_id] for run_id in run_ids]
    )
    labels = [group.label for group in groups]
    assert ari >= 0.8, labels
    # The largest groups are the causes, one each; whatever is left over is an odd one out.
    majority = [
        Counter(cause_of[r] for r in group.run_ids).most_common(1)[0][0] for group in groups
    ]
    assert sorted(majority[: len(labelled)]) == sorted(labelled), labels


def test_groups_are_sorted_sized_and_exemplified() -> None:
    items, _ = labelled_items()
    groups = group_failures(items, examples=2)

    assert [(-g.size, g.label) for g in groups] == sorted((-g.size, g.label) for g in groups)
    raw_texts = {"; ".join(problems) for _, problems in items}
    for group in groups:
        assert group.size == len(group.run_ids)
        assert 1 <= len(group.examples) <= 2
        assert len(set(group.examples)) == len(group.examples)
        assert set(group.examples) <= raw_texts
        assert group.label in raw_texts or group.label.endswith("…")


def test_numbers_quotes_and_ids_do_not_split_a_pattern() -> None:
    items = [
        ("a", ["expected '42', got 'The answer is 42.'"]),
        ("b", ["expected 'Paris', got 'The capital of France is Paris.'"]),
        ("c", ["run crashed: TimeoutError in run 9f8e7d6c5b4a3921 after 30s"]),
        ("d", ["run crashed: TimeoutError in run 0a1b2c3d4e5f6789 after 125.5s"]),
    ]
    groups = group_failures(items)
    assert sorted(sorted(group.run_ids) for group in groups) == [["a", "b"], ["c", "d"]]


def test_specifics_shared_across_causes_do_not_join_them() -> None:
    items = [
        ("a", ["expected 'Paris', got 'The capital of France is Paris.'"]),
        ("b", ["expected '42', got 'The answer to everything is 42.'"]),
        ("c", ["run crashed: TimeoutError after 30s on 'The capital of France is Paris.'"]),
        ("d", ["run crashed: TimeoutError after 125.5s on 'The answer to everything is 42.'"]),
    ]
    groups = group_failures(items)
    assert sorted(sorted(group.run_ids) for group in groups) == [["a", "b"], ["c", "d"]]


def test_a_few_unrelated_failures_stay_apart() -> None:
    problems = [
        "output is not valid JSON",
        "the model refused to answer",
        "run crashed: TimeoutError",
        "answer has extra words around it",
    ]
    groups = group_failures([(f"r{i}", [p]) for i, p in enumerate(problems)])
    assert sorted(group.label for group in groups) == sorted(problems)


def test_max_groups_caps_the_number_of_groups() -> None:
    items, _ = labelled_items()
    groups = group_failures(items, max_groups=2)
    assert len(groups) == 2
    assert sum(group.size for group in groups) == len(items)


def test_no_items_gives_no_groups() -> None:
    assert group_failures([]) == []


def test_one_item_is_one_group() -> None:
    [group] = group_failures([("r1", ["output is not valid JSON"])])
    assert group.size == 1
    assert group.run_ids == ["r1"]
    assert group.label == "output is not valid JSON"
    assert group.examples == ["output is not valid JSON"]


def test_identical_problems_are_one_group_with_one_example() -> None:
    items = [(f"r{i}", ["answer has extra words around it"]) for i in range(5)]
    [group] = group_failures(items)
    assert group.size == 5
    assert group.run_ids == [f"r{i}" for i in range(5)]
    assert group.examples == ["answer has extra words around it"]


def test_failures_without_problems_get_their_own_group() -> None:
    items = [
        ("r1", []),
        ("r2", ["output is not valid JSON"]),
        ("r3", ["", "  "]),
        ("r4", ["output is not valid JSON: Expecting value: line 1 column 1 (char 0)"]),
    ]
    groups = group_failures(items)
    by_label = {group.label: group for group in groups}
    assert by_label[NO_PROBLEMS].run_ids == ["r1", "r3"]
    assert by_label[NO_PROBLEMS].examples == [NO_PROBLEMS]
    assert len(groups) == 2


def test_only_failures_without_problems() -> None:
    [group] = group_failures([("r1", []), ("r2", [])])
    assert (group.label, group.run_ids) == (NO_PROBLEMS, ["r1", "r2"])


def test_problems_without_words_do_not_break_grouping() -> None:
    groups = group_failures([("r1", ["???"]), ("r2", ["42"]), ("r3", ["output is not valid JSON"])])
    assert sum(group.size for group in groups) == 3


def test_long_labels_are_shortened() -> None:
    problem = "the answer rambles " * 20
    [group] = group_failures([("r1", [problem])])
    assert len(group.label) <= 120
    assert group.label.endswith("…")
    assert group.examples == [problem.strip()]


def test_output_is_deterministic_and_independent_of_arrival_order() -> None:
    items, _ = labelled_items()
    first = group_failures(items)
    assert group_failures(items) == first

    reordered = group_failures(list(reversed(items)))
    assert [(g.label, g.size, sorted(g.run_ids)) for g in reordered] == [
        (g.label, g.size, sorted(g.run_ids)) for g in first
    ]


@pytest.mark.parametrize(("max_groups", "examples"), [(0, 3), (8, -1)])
def test_rejects_nonsense_limits(max_groups: int, examples: int) -> None:
    with pytest.raises(ValueError):
        group_failures([("r1", ["x"])], max_groups=max_groups, examples=examples)

"""ratchet.grouping (plain numpy) gives the same groups as the scikit-learn pipeline it replaced.

The reference below is the former implementation: TfidfVectorizer features (characters within
words, plus words when any document has one), cosine distances, and AgglomerativeClustering with
average linkage on the precomputed distances, cut at the threshold or at ``max_groups``. It is
compared on every corpus tests/unit/test_grouping.py uses and on seeded random corpora of failure
problems (sizes 1 to 300, varied vocabularies, duplicates, ties). Groups must be identical as sets
of run ids, with the same labels and examples; distances agree to 1e-12 (in fact bit for bit).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.sparse import hstack
from sklearn.cluster import AgglomerativeClustering
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_distances
from test_grouping import ANSWER_AND_RUNTIME, SHAPE_AND_TOOLS, labelled_items

from ratchet import grouping
from ratchet.contracts import FailureGroup
from ratchet.grouping import DISTANCE_THRESHOLD, group_failures

Items = list[tuple[str, list[str]]]
MAX_GROUPS = (1, 2, 3, 8, 20)


def reference_distances(docs: list[str]) -> NDArray[np.float64]:
    if len(docs) == 1:
        return np.zeros((1, 1))
    vectorizers = [TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)]
    if any(re.search(r"\w\w", doc) for doc in docs):
        vectorizers.append(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True))
    matrix = hstack([vectorizer.fit_transform(docs) for vectorizer in vectorizers])
    distances: NDArray[np.float64] = cosine_distances(matrix)
    return distances


def reference_cluster(distances: NDArray[np.float64], max_groups: int) -> NDArray[np.intp]:
    if len(distances) == 1:
        return np.zeros(1, dtype=np.intp)
    clusters: NDArray[np.intp] = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage="average",
        distance_threshold=DISTANCE_THRESHOLD,
    ).fit_predict(distances)
    if clusters.max() + 1 > max_groups:
        clusters = AgglomerativeClustering(
            n_clusters=max_groups, metric="precomputed", linkage="average"
        ).fit_predict(distances)
    return clusters


def partition(clusters: NDArray[np.intp]) -> list[list[int]]:
    return sorted(np.flatnonzero(clusters == c).tolist() for c in np.unique(clusters))


def described(groups: list[FailureGroup]) -> list[tuple[str, int, list[str], list[str]]]:
    """Groups as an unordered collection: label, size, run ids and examples of each."""
    return sorted((g.label, g.size, g.run_ids, g.examples) for g in groups)


def assert_same_grouping(items: Items, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = sorted({grouping._document(problems) for _, problems in items})
    ours, theirs = grouping._distances(docs), reference_distances(docs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    for max_groups in MAX_GROUPS:
        assert partition(grouping._cluster(ours, max_groups)) == partition(
            reference_cluster(theirs, max_groups)
        ), f"max_groups={max_groups}"

    for max_groups in (3, 8):
        new = group_failures(items, max_groups=max_groups)
        with monkeypatch.context() as patch:
            patch.setattr(grouping, "_distances", reference_distances)
            patch.setattr(grouping, "_cluster", reference_cluster)
            old = group_failures(items, max_groups=max_groups)
        assert described(new) == described(old), f"max_groups={max_groups}"


# Every corpus tests/unit/test_grouping.py groups.
EXISTING: dict[str, Items] = {
    "answer-and-runtime": labelled_items(ANSWER_AND_RUNTIME)[0],
    "shape-and-tools": labelled_items(SHAPE_AND_TOOLS)[0],
    "numbers-quotes-ids": [
        ("a", ["expected '42', got 'The answer is 42.'"]),
        ("b", ["expected 'Paris', got 'The capital of France is Paris.'"]),
        ("c", ["run crashed: TimeoutError in run 9f8e7d6c5b4a3921 after 30s"]),
        ("d", ["run crashed: TimeoutError in run 0a1b2c3d4e5f6789 after 125.5s"]),
    ],
    "shared-specifics": [
        ("a", ["expected 'Paris', got 'The capital of France is Paris.'"]),
        ("b", ["expected '42', got 'The answer to everything is 42.'"]),
        ("c", ["run crashed: TimeoutError after 30s on 'The capital of France is Paris.'"]),
        ("d", ["run crashed: TimeoutError after 125.5s on 'The answer to everything is 42.'"]),
    ],
    "unrelated": [
        (f"r{i}", [p])
        for i, p in enumerate(
            [
                "output is not valid JSON",
                "the model refused to answer",
                "run crashed: TimeoutError",
                "answer has extra words around it",
            ]
        )
    ],
    "one": [("r1", ["output is not valid JSON"])],
    "identical": [(f"r{i}", ["answer has extra words around it"]) for i in range(5)],
    "without-problems": [
        ("r1", []),
        ("r2", ["output is not valid JSON"]),
        ("r3", ["", "  "]),
        ("r4", ["output is not valid JSON: Expecting value: line 1 column 1 (char 0)"]),
    ],
    "only-without-problems": [("r1", []), ("r2", [])],
    "no-words": [("r1", ["???"]), ("r2", ["42"]), ("r3", ["output is not valid JSON"])],
    "long": [("r1", ["the answer rambles " * 20])],
}
EXISTING["reversed"] = list(reversed(EXISTING["answer-and-runtime"]))


@pytest.mark.parametrize("name", sorted(EXISTING))
def test_existing_corpora(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_grouping(EXISTING[name], monkeypatch)


# Random corpora. Problems are built from evaluator-like phrases, a random vocabulary and
# specifics (quoted values, numbers, ids) that normalisation removes; some failures repeat an
# earlier one's problems, some have none or only punctuation.
PHRASES = [
    problem for failures in [*ANSWER_AND_RUNTIME.values(), *SHAPE_AND_TOOLS.values()]
    for problems in failures for problem in problems
]  # fmt: skip
COMMON = ["the", "a", "is", "of", "to", "in", "not", "no", "answer", "output", "expected", "got"]


def random_word(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))


def random_problem(rng: random.Random, vocabulary: list[str], alphabet: str) -> str:
    kind = rng.random()
    if kind < 0.05:
        return rng.choice(["???", "!", "-- ; --", "42", "  "])
    words = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
    if kind < 0.35:
        words = rng.choice(PHRASES).split() + words[: rng.randint(0, 3)]
    for _ in range(rng.randint(0, 2)):
        specific = rng.choice(
            [
                f"'{random_word(rng, alphabet)}'",
                f'"{random_word(rng, alphabet)} {random_word(rng, alphabet)}"',
                str(rng.randint(-50, 100_000)),
                f"{rng.random() * 100:.2f}",
                f"{rng.getrandbits(64):016x}",
            ]
        )
        words.insert(rng.randint(0, len(words)), specific)
    return " ".join(words)


def random_corpus(seed: int) -> Items:
    rng = random.Random(seed)
    size = [1, 2, 3, 5, 8, 13][seed // 5 % 6] if seed % 5 == 0 else rng.randint(1, 300)
    greek = "".join(chr(c) for c in range(0x3B1, 0x3B9))
    alphabet = rng.choice([string.ascii_lowercase, "abcde", greek, "aeioulmnrst"])
    own = [random_word(rng, alphabet) for _ in range(rng.randint(0, 80))]
    vocabulary = COMMON[: rng.randint(1, len(COMMON))] + own
    items: Items = []
    for i in range(size):
        if items and rng.random() < 0.25:
            problems = list(rng.choice(items)[1])  # a duplicate failure
        else:
            count = rng.choice([0, 1, 1, 1, 1, 2, 2, 3])
            problems = [random_problem(rng, vocabulary, alphabet) for _ in range(count)]
        items.append((f"run-{seed}-{i}", problems))
    return items


def tied_corpora() -> Iterator[tuple[str, Items]]:
    """Corpora full of equal distances, where the order of merges decides the groups."""
    greek = [chr(c) for c in range(0x3B1, 0x3CA)]  # alpha to omega
    letters = greek + list(string.ascii_lowercase)
    # Nothing shared: every distance is 1.
    yield "disjoint", [(f"r{i}", [letter]) for i, letter in enumerate(letters)]
    # One shared word and one of many words of the same shape: every distance is the same.
    yield "same-shape", [(f"r{i}", [f"shared w{x}{x}"]) for i, x in enumerate(letters)]
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    pairs = [f"{a} {b}" for a in words for b in words if a != b]
    yield "permutations", [(f"r{i}", [p]) for i, p in enumerate(pairs)]
    rng = random.Random(0)
    for seed in range(3):
        yield (
            f"two-letter-{seed}",
            [
                (f"r{i}", [" ".join(rng.choice(letters) * 2 for _ in range(rng.randint(1, 3)))])
                for i in range(rng.randint(20, 80))
            ],
        )


SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_corpora(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    print(f"seed {seed}: {len(random_corpus(seed))} failures")
    assert_same_grouping(random_corpus(seed), monkeypatch)


TIED = dict(tied_corpora())


@pytest.mark.parametrize("name", list(TIED))
def test_tied_corpora(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_grouping(TIED[name], monkeypatch)


def test_random_corpora_cover_the_range() -> None:
    """The seeded corpora span small and large inputs, duplicates and empty failures."""
    corpora = [random_corpus(seed) for seed in SEEDS]
    sizes = [len(items) for items in corpora]
    assert min(sizes) == 1 and max(sizes) >= 250, sizes
    distinct = [len({grouping._document(p) for _, p in items}) for items in corpora]
    assert any(d < s for d, s in zip(distinct, sizes, strict=True)), "some duplicates"
    assert any(not p for items in corpora for _, p in items), "some failures without problems"

"""Group a task's failures by their problems, so that many failures read as a few patterns.

Evaluator problems are short texts that differ mostly in their specifics: numbers, quoted values,
ids. Those are normalised away, failures are compared by cosine distance between TF-IDF vectors of
word and character n-grams, and average-linkage agglomerative clustering cut at a fixed distance
picks the number of groups. It needs no model or network, takes well under a second for hundreds
of failures on a small CPU (the distance matrix is quadratic in distinct problem texts), and gives
the same groups for the same failures, whatever order they arrive in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import hstack
from sklearn.cluster import AgglomerativeClustering
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_distances

from ratchet.contracts import EXAMPLE_CHARS, FailureGroup, clip

NO_PROBLEMS = "no problems recorded"
# Average cosine distance below which failures count as one pattern. On the labelled sets in
# tests/unit/test_grouping.py cuts from 0.74 to 0.88 recover the causes (adjusted Rand index 0.8 or
# more); above 0.84 unrelated failures that share only a quoted value start to merge.
DISTANCE_THRESHOLD = 0.82
LABEL_CHARS = 120

# A quoted value: '...' (apostrophes inside words allowed), "..." or `...`.
_QUOTED = re.compile(r"""(?<!\w)'(?:[^'\n]|'(?=\w))*'(?!\w)|"[^"\n]*"|`[^`\n]*`""")
# Run ids, hashes, ULIDs, UUIDs: 8+ word characters or dashes mixing letters and digits.
_ID = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])[\w-]{8,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![a-z_])[-+]?\d+(?:[.,:]\d+)*", re.IGNORECASE)


def group_failures(
    items: Sequence[tuple[str, list[str]]], *, max_groups: int = 8, examples: int = 3
) -> list[FailureGroup]:
    """Group ``(run_id, problems)`` failures by what their problems say, largest group first.

    At most ``max_groups`` groups; each is labelled with the problem text nearest its centre and
    carries up to ``examples`` distinct problem texts, the most typical first.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    if examples < 0:
        raise ValueError(f"examples must not be negative, got {examples}")
    if not items:
        return []

    raw_texts = [_raw_text(problems) for _, problems in items]
    docs = [_document(problems) for _, problems in items]
    # Identical documents are clustered once, weighted by how often they occur.
    counts = Counter(docs)
    unique_docs = sorted(counts)
    weights = np.array([counts[doc] for doc in unique_docs], dtype=np.float64)
    distances = _distances(unique_docs)
    cluster_of_doc = _cluster(distances, max_groups)

    groups: list[FailureGroup] = []
    for cluster in np.unique(cluster_of_doc):
        members = np.flatnonzero(cluster_of_doc == cluster)
        # A member's total distance to the group, counting repeats: the lowest is the most typical.
        spread = distances[np.ix_(members, members)] @ weights[members]
        spread_of = {unique_docs[m]: float(s) for m, s in zip(members, spread, strict=True)}
        indices = [i for i, doc in enumerate(docs) if doc in spread_of]
        by_typicality = sorted(indices, key=lambda i: (spread_of[docs[i]], raw_texts[i]))
        typical = list(dict.fromkeys(raw_texts[i] for i in by_typicality))
        groups.append(
            FailureGroup(
                label=_shorten(typical[0]),
                size=len(indices),
                run_ids=[items[i][0] for i in indices],
                examples=[clip(text, EXAMPLE_CHARS) for text in typical[:examples]],
            )
        )
    return sorted(groups, key=lambda group: (-group.size, group.label))


def _raw_text(problems: list[str]) -> str:
    """What a person reads for one failure."""
    return "; ".join(p.strip() for p in problems if p.strip()) or NO_PROBLEMS


def _document(problems: list[str]) -> str:
    """What is compared for one failure: its problems without specifics, in a fixed order.

    Failures without problems become the empty document, which is at distance 1 from every other.
    """
    return " ; ".join(sorted({_normalise(p) for p in problems if p.strip()}))


def _normalise(problem: str) -> str:
    """Replace specifics by placeholders, so "expected '42'" and "expected '17'" look alike."""
    text = _QUOTED.sub(" qvalue ", problem)
    text = _ID.sub(" qid ", text)
    text = _NUMBER.sub(" qnum ", text)
    return " ".join(text.lower().split())


def _distances(docs: list[str]) -> NDArray[np.float64]:
    """Pairwise cosine distances; words carry meaning, characters catch inflections and typos."""
    if len(docs) == 1:
        return np.zeros((1, 1))
    vectorizers = [TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)]
    # Character n-grams exist in any non-empty document, words may not ("???").
    if any(re.search(r"\w\w", doc) for doc in docs):
        vectorizers.append(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True))
    matrix = hstack([vectorizer.fit_transform(docs) for vectorizer in vectorizers])
    distances: NDArray[np.float64] = cosine_distances(matrix)
    return distances


def _cluster(distances: NDArray[np.float64], max_groups: int) -> NDArray[np.intp]:
    """Cluster ids per document: cut at the threshold, or into ``max_groups`` if that is fewer."""
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


def _shorten(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1].rstrip() + "…"

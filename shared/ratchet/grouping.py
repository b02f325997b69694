"""Group a task's failures by their problems, so that many failures read as a few patterns.

Evaluator problems are short texts that differ mostly in their specifics: numbers, quoted values,
ids. Those are normalised away, failures are compared by cosine distance between TF-IDF vectors of
word and character n-grams, and average-linkage agglomerative clustering cut at a fixed distance
picks the number of groups. It needs no model or network, takes well under a second for hundreds
of failures on a small CPU (the distance matrix is quadratic in distinct problem texts), and gives
the same groups for the same failures, whatever order they arrive in.

Everything is plain numpy: the failure store must stay small in memory, and scikit-learn and
SciPy would more than double its resident size for two short computations. The features and the
clustering are the ones scikit-learn's ``TfidfVectorizer`` and ``AgglomerativeClustering``
(average linkage by SciPy's nearest-neighbour chain) computed before. Sums are taken in the same
order, so the distances agree to the last bit and equal distances break ties the same way;
``tests/unit/test_grouping_equivalence.py`` checks that the groups are identical.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from ratchet.contracts import EXAMPLE_CHARS, FailureGroup, clip

NO_PROBLEMS = "no problems recorded"
# Average cosine distance below which failures count as one pattern. On the labelled sets in
# tests/unit/test_grouping.py cuts from 0.74 to 0.88 recover the causes (adjusted Rand index 0.8 or
# more); above 0.84 unrelated failures that share only a quoted value start to merge.
DISTANCE_THRESHOLD = 0.82
LABEL_CHARS = 120
# Character n-grams of 2 to 4 characters, taken within words padded with a space on each side:
# they catch inflections and typos ("refused", "refusal"). Words and word pairs carry meaning.
CHAR_NGRAMS = (2, 4)
WORD_NGRAMS = (1, 2)

# A quoted value: '...' (apostrophes inside words allowed), "..." or `...`.
_QUOTED = re.compile(r"""(?<!\w)'(?:[^'\n]|'(?=\w))*'(?!\w)|"[^"\n]*"|`[^`\n]*`""")
# Run ids, hashes, ULIDs, UUIDs: 8+ word characters or dashes mixing letters and digits.
_ID = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])[\w-]{8,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![a-z_])[-+]?\d+(?:[.,:]\d+)*", re.IGNORECASE)
# A word: two or more word characters (one letter carries no meaning).
_WORD = re.compile(r"\b\w\w+\b")


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


class _Sparse(NamedTuple):
    """A sparse matrix as (row, column, value) entries, sorted by row, then column."""

    rows: NDArray[np.intp]
    columns: NDArray[np.intp]
    values: NDArray[np.float64]
    shape: tuple[int, int]


def _distances(docs: list[str]) -> NDArray[np.float64]:
    """Pairwise cosine distances; words carry meaning, characters catch inflections and typos.

    Each document becomes a TF-IDF vector of its character n-grams followed by one of its word
    n-grams; each part has length 1, so words and characters weigh the same, and the two together
    are normalised again before the cosine.
    """
    if len(docs) == 1:
        return np.zeros((1, 1))
    blocks = [_tfidf([_char_ngrams(doc) for doc in docs])]
    # Character n-grams exist in any non-empty document, words may not ("???").
    if any(re.search(r"\w\w", doc) for doc in docs):
        blocks.append(_tfidf([_word_ngrams(doc) for doc in docs]))
    return _cosine_distances(_unit_rows(_side_by_side(blocks)))


def _char_ngrams(doc: str) -> Counter[str]:
    """Each word padded with one space on each side, and its substrings of 2 to 4 characters.

    A padded word shorter than ``n`` has no n-grams ("a" gives " a", "a " and " a ", nothing
    of 4), so n-grams never span two words and word starts and ends are marked.
    """
    low, high = CHAR_NGRAMS
    grams: Counter[str] = Counter()
    for word in doc.lower().split():
        padded = f" {word} "
        for n in range(low, min(high, len(padded)) + 1):
            grams.update(padded[i : i + n] for i in range(len(padded) - n + 1))
    return grams


def _word_ngrams(doc: str) -> Counter[str]:
    """Words of two or more word characters, and each pair of neighbours joined by a space."""
    words = _WORD.findall(doc.lower())
    low, high = WORD_NGRAMS
    grams: Counter[str] = Counter()
    for n in range(low, high + 1):
        grams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return grams


def _tfidf(counts: list[Counter[str]]) -> _Sparse:
    """TF-IDF rows of length 1, one per document, one column per n-gram.

    Term frequency is sublinear, ``1 + log(count)``, so a repeated n-gram does not dominate.
    Inverse document frequency is smoothed, ``1 + log((1 + documents) / (1 + documents with the
    n-gram))``: as if one more document held every n-gram once, so no weight is zero or infinite.
    Columns are numbered in order of first appearance (documents in order, each document's
    n-grams as the analyser yields them): the order the reference implementation sums in.
    """
    # dict.fromkeys keeps the first-seen order, and so does each Counter.
    first_seen = dict.fromkeys(itertools.chain.from_iterable(counts))
    column_of = {gram: column for column, gram in enumerate(first_seen)}
    lengths = [len(doc_counts) for doc_counts in counts]
    rows = np.repeat(np.arange(len(counts), dtype=np.intp), lengths)
    columns = np.fromiter(
        (column_of[gram] for doc_counts in counts for gram in doc_counts), np.intp, sum(lengths)
    )
    frequencies = np.fromiter(
        (f for doc_counts in counts for f in doc_counts.values()), np.float64, sum(lengths)
    )
    order = np.lexsort((columns, rows))
    rows, columns, frequencies = rows[order], columns[order], frequencies[order]
    tf = np.log(frequencies) + 1.0
    documents_with = np.bincount(columns, minlength=len(column_of)).astype(np.float64)
    idf = np.log(np.full(len(column_of), len(counts) + 1.0) / (documents_with + 1.0)) + 1.0
    matrix = _Sparse(rows, columns, tf * idf[columns], (len(counts), len(column_of)))
    return _unit_rows(matrix)


def _side_by_side(blocks: list[_Sparse]) -> _Sparse:
    """The blocks' columns one after the other, for the same rows."""
    offsets = np.cumsum([0] + [block.shape[1] for block in blocks])
    rows = np.concatenate([block.rows for block in blocks])
    columns = np.concatenate(
        [b.columns + offset for b, offset in zip(blocks, offsets[:-1], strict=True)]
    )
    values = np.concatenate([block.values for block in blocks])
    order = np.lexsort((columns, rows))
    return _Sparse(
        rows[order], columns[order], values[order], (blocks[0].shape[0], int(offsets[-1]))
    )


def _unit_rows(matrix: _Sparse) -> _Sparse:
    """Each non-empty row divided by its Euclidean length; empty rows stay empty.

    The squares are summed as a running total in column order (not pairwise), the order the
    reference implementation uses, so lengths agree to the last bit.
    """
    values = matrix.values.copy()
    bounds = np.searchsorted(matrix.rows, np.arange(matrix.shape[0] + 1))
    for start, end in itertools.pairwise(bounds.tolist()):
        if end > start:
            total = np.cumsum(np.square(values[start:end]))[-1]
            if total > 0.0:
                values[start:end] /= np.sqrt(total)
    return matrix._replace(values=values)


def _cosine_distances(matrix: _Sparse) -> NDArray[np.float64]:
    """``1 - x . y`` for every pair of unit rows: 0 for the same direction, 1 for nothing shared.

    The dot products are accumulated one column at a time, in column order: each column adds the
    products of its values to the pairs of rows that both have it. Only columns held by two or
    more rows matter (the diagonal is 0 by definition), and most n-grams are rarer than that.
    """
    n = matrix.shape[0]
    similarity = np.zeros((n, n))
    order = np.lexsort((matrix.rows, matrix.columns))
    rows, columns, values = matrix.rows[order], matrix.columns[order], matrix.values[order]
    bounds = np.flatnonzero(np.diff(columns, prepend=-1, append=-1))
    for start, end in itertools.pairwise(bounds.tolist()):
        if end - start > 1:
            members = rows[start:end]
            similarity[np.ix_(members, members)] += np.outer(values[start:end], values[start:end])
    distances = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def _cluster(distances: NDArray[np.float64], max_groups: int) -> NDArray[np.intp]:
    """Cluster ids per document: cut at the threshold, or into ``max_groups`` if that is fewer.

    The merges of average linkage, lowest first, are replayed from single documents: all merges
    below the threshold, or, if that leaves more than ``max_groups`` clusters, the first merges
    down to ``max_groups``.
    """
    n = len(distances)
    if n == 1:
        return np.zeros(1, dtype=np.intp)
    merges = _average_linkage(distances)
    above = sum(1 for _, _, height in merges if height >= DISTANCE_THRESHOLD)
    n_groups = min(above + 1, max_groups)
    cluster = np.arange(n)
    for a, b, _ in merges[: n - n_groups]:
        cluster[cluster == cluster[b]] = cluster[a]  # b's cluster joins a's
    ids: NDArray[np.intp] = np.unique(cluster, return_inverse=True)[1]
    return ids


def _average_linkage(distances: NDArray[np.float64]) -> list[tuple[int, int, float]]:
    """The merges ``(document a, document b, height)`` of average linkage, lowest first.

    Average linkage: two clusters are as far apart as the mean distance over all pairs of their
    members; starting from single documents, the two nearest clusters merge until one is left.
    Merging never brings a cluster nearer to a third than the nearer of its two parts was, so any
    two clusters that are each other's nearest neighbours can merge as soon as they are found
    without changing the result. The nearest-neighbour chain finds such pairs: from any cluster,
    step to its nearest neighbour, then to that one's, until two clusters point at each other;
    merge them and go on from the rest of the chain. Each step is one scan of a row, and there
    are at most about 3n steps, so the whole is O(n^2) time over an n x n matrix.

    Ties: a step prefers the previous cluster on the chain (so the chain cannot cycle), then the
    lowest index; merges of equal height keep the order they were found in. These are SciPy's
    rules, so the groups are the same as the reference's even when distances tie (distance 1,
    nothing shared, is common). A merged cluster keeps the higher index of its two parts, and its
    distance to each other cluster is the size-weighted mean of its parts' distances.
    """
    n = len(distances)
    between = distances.copy()  # distances between current clusters; inf for none
    np.fill_diagonal(between, np.inf)
    size = np.ones(n, dtype=np.intp)
    chain: list[int] = []
    merges: list[tuple[int, int, float]] = []
    for _ in range(n - 1):
        if not chain:
            chain.append(int(np.flatnonzero(size)[0]))
        while True:
            x = chain[-1]
            nearest = int(np.argmin(between[x]))
            if len(chain) > 1 and not between[x, nearest] < between[x, chain[-2]]:
                break
            chain.append(nearest)
        a, b = sorted((chain.pop(), chain.pop()))
        merges.append((a, b, float(between[a, b])))
        size_a, size_b = int(size[a]), int(size[b])
        size[a] = 0
        size[b] = size_a + size_b
        others = np.flatnonzero(size)
        others = others[others != b]
        merged = (size_a * between[others, a] + size_b * between[others, b]) / (size_a + size_b)
        between[others, b] = merged
        between[b, others] = merged
        between[a, :] = np.inf
        between[:, a] = np.inf
    order = sorted(range(len(merges)), key=lambda k: merges[k][2])  # stable
    return [merges[k] for k in order]


def _shorten(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1].rstrip() + "…"

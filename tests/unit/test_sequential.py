"""The gate's decision procedure (ratchet.sequential) pinned on hand-made cases.

Boundaries are computed once per distinct set of information fractions (``obf_bounds`` is
cached), so the tests share a few designs: the default one for a 220-case pool (looks at 25, 50,
..., 200) and the classical 4-look one at one-sided 0.025.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from ratchet import sequential
from ratchet.sequential import (
    Design,
    LookResult,
    analyse,
    design_for_pool,
    obf_bounds,
    regression_shown,
    z_statistic,
)

DEFAULT = design_for_pool(220)  # looks 25, 50, ..., 200
EIGHTHS = tuple(k / 8 for k in range(1, 9))


def sample(plus: int, minus: int, n: int, repeats: int = 1) -> list[int]:
    """``plus`` cases the candidate wins by ``repeats``, ``minus`` it loses by as much, ties."""
    assert plus + minus <= n
    return [repeats] * plus + [-repeats] * minus + [0] * (n - plus - minus)


def z_of(plus: int, minus: int) -> float:
    return (plus - minus) / math.sqrt(plus + minus)


def closest(n: int, bound: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(plus, minus) counts over ``n`` cases whose z sits just at/above and just below ``bound``."""
    pairs = [(p, m) for p in range(n + 1) for m in range(n + 1 - p) if p + m > 0]
    above = min((pm for pm in pairs if z_of(*pm) >= bound), key=lambda pm: z_of(*pm))
    below = max((pm for pm in pairs if z_of(*pm) < bound), key=lambda pm: z_of(*pm))
    return above, below


# --- boundaries ---------------------------------------------------------------------------------


def test_known_obrien_fleming_constants() -> None:
    four = obf_bounds((0.25, 0.5, 0.75, 1.0), 0.025)
    expected = [2.024 / math.sqrt(t) for t in (0.25, 0.5, 0.75, 1.0)]
    assert four == pytest.approx(expected, abs=2e-3)  # 4.048, 2.862, 2.337, 2.024
    assert obf_bounds((1.0,), 0.05) == pytest.approx((1.645,), abs=1e-3)
    assert Design(looks=(50,)).efficacy_bounds == pytest.approx((1.6449,), abs=1e-4)


def test_default_design_bounds_decrease_and_keep_the_obf_shape() -> None:
    assert DEFAULT.looks == (25, 50, 75, 100, 125, 150, 175, 200)
    assert DEFAULT.alpha == 0.05 and DEFAULT.margin == 0 and DEFAULT.repeats == 1
    bounds = DEFAULT.efficacy_bounds
    assert len(bounds) == 8
    assert all(b > a for a, b in zip(bounds[1:], bounds, strict=False))
    constant = bounds[-1]
    assert bounds == pytest.approx([constant / math.sqrt(t) for t in EIGHTHS], abs=1e-5)
    # more looks cost more at the last one than a fixed test, but not much
    assert 1.645 < constant < 1.80
    assert DEFAULT.efficacy_bounds == obf_bounds(EIGHTHS, 0.05)


def test_the_first_default_look_can_only_stop_for_futility() -> None:
    """At 25 cases the largest possible z is sqrt(25) = 5 < 5.05: look 1 never crosses."""
    assert math.sqrt(25) < DEFAULT.efficacy_bounds[0]
    result = analyse(sample(25, 0, 25), DEFAULT, 1)
    assert result.z == pytest.approx(5.0)
    assert result.verdict == "continue"


# --- crossing, futility, ties -------------------------------------------------------------------


def test_all_positive_differences_cross_early() -> None:
    result = analyse(sample(50, 0, 50), DEFAULT, 2)
    assert result.verdict == "superior"
    assert result.z == pytest.approx(math.sqrt(50))
    assert result.lift == 1.0
    assert result.lower_bound > 0.8
    # a clear but not overwhelming win at the same look: 20 fixed, 2 broken of 50
    assert analyse(sample(20, 2, 50), DEFAULT, 2).verdict == "superior"


def test_a_strongly_negative_sample_stops_for_futility() -> None:
    first = analyse(sample(0, 15, 25), DEFAULT, 1)
    assert first.verdict == "futile"
    assert first.conditional_power is not None
    assert first.conditional_power < DEFAULT.futility_cp
    assert first.lift == pytest.approx(-0.6)
    assert first.lower_bound < 0
    assert analyse(sample(5, 25, 100), DEFAULT, 4).verdict == "futile"


def test_a_tie_never_crosses_and_is_not_shown_at_the_last_look() -> None:
    verdicts = []
    for look, n in enumerate(DEFAULT.looks, 1):
        result = analyse([0] * n, DEFAULT, look)
        assert result.z == 0.0 and result.lift == 0.0
        assert result.lower_bound <= 0
        verdicts.append(result.verdict)
    assert "superior" not in verdicts
    assert verdicts[-1] == "not_shown"
    # balanced wins and losses are a tie too
    assert analyse(sample(40, 40, 200), DEFAULT, 8).verdict == "not_shown"


@pytest.mark.parametrize("look", [2, 4, 8])
def test_the_verdict_flips_exactly_at_the_boundary(look: int) -> None:
    n, bound = DEFAULT.looks[look - 1], DEFAULT.efficacy_bounds[look - 1]
    above, below = closest(n, bound)
    assert bound <= z_of(*above) < bound + 0.01  # the closest achievable z on each side
    assert bound - 0.01 < z_of(*below) < bound
    hit, miss = analyse(sample(*above, n), DEFAULT, look), analyse(sample(*below, n), DEFAULT, look)
    assert hit.z >= hit.efficacy_bound == bound
    assert hit.verdict == "superior"
    assert miss.z < bound
    assert miss.verdict == ("not_shown" if look == len(DEFAULT.looks) else "continue")
    assert hit.lower_bound >= 0 > miss.lower_bound


@pytest.mark.parametrize("repeats", [1, 2])
def test_the_lower_bound_agrees_with_the_verdict(repeats: int) -> None:
    design = design_for_pool(220, repeats=repeats)  # the same fractions: cached bounds
    rng = np.random.default_rng(repeats)
    seen: dict[str, int] = {}
    for _ in range(300):
        look = int(rng.integers(2, len(design.looks) + 1))
        n = design.looks[look - 1]
        p_candidate = 0.5 + rng.uniform(-0.15, 0.3)
        diffs = rng.binomial(repeats, p_candidate, n) - rng.binomial(repeats, 0.5, n)
        result = analyse(diffs.tolist(), design, look)
        seen[result.verdict] = seen.get(result.verdict, 0) + 1
        assert (result.verdict == "superior") == (result.lower_bound >= 0), result
        assert (result.z >= result.efficacy_bound) == (result.verdict == "superior")
        low, high = result.ci95
        assert low <= result.lift <= high
    assert seen.get("superior", 0) > 30 and len(seen) >= 3  # the sample covers both sides


def test_bad_looks_and_case_counts_raise() -> None:
    with pytest.raises(ValueError, match="case count"):
        analyse([1] * 30, DEFAULT, 1)
    with pytest.raises(ValueError):
        analyse([1] * 25, DEFAULT, 0)
    with pytest.raises(ValueError):
        analyse([1] * 25, DEFAULT, 9)


# --- non-inferiority and repeats ----------------------------------------------------------------


def test_non_inferiority_within_five_points() -> None:
    design = Design(looks=(50,), margin=0.05)
    assert design.test == "non-inferiority"
    ties = analyse([0] * 50, design, 1)
    assert ties.verdict == "non_inferior"
    assert ties.z == pytest.approx(math.sqrt(50))  # every shifted difference is +0.05
    assert ties.lower_bound >= -0.05
    worse = analyse(sample(2, 12, 50), design, 1)  # 10 cases of 50 lost: -20 points
    assert worse.verdict == "not_shown"
    assert worse.lower_bound < -0.05
    assert worse.lift == pytest.approx(-0.2)
    # the same ties show no superiority
    assert analyse([0] * 50, Design(looks=(50,)), 1).verdict == "not_shown"


def test_non_inferiority_agrees_with_its_lower_bound() -> None:
    design = Design(looks=(50,), margin=0.05)
    rng = np.random.default_rng(7)
    verdicts = set()
    for _ in range(200):
        diffs = rng.binomial(1, rng.uniform(0.3, 0.6), 50) - rng.binomial(1, 0.5, 50)
        result = analyse(diffs.tolist(), design, 1)
        verdicts.add(result.verdict)
        assert (result.verdict == "non_inferior") == (result.lower_bound >= -0.05 - 1e-12)
    assert verdicts == {"non_inferior", "not_shown"}


def test_repeats_bound_the_differences() -> None:
    design = Design(looks=(50,), repeats=3)
    result = analyse(sample(30, 0, 50, repeats=3), design, 1)
    assert result.verdict == "superior"
    assert result.lift == pytest.approx(0.6)  # shares of runs, not of cases
    mixed = [3, -3, 2, -2, 1, -1, 0] * 7 + [3]
    assert analyse(mixed, design, 1).n == 50
    for bad in (4, -4):
        with pytest.raises(ValueError, match="outside"):
            analyse([bad] + [0] * 49, design, 1)
    with pytest.raises(ValueError, match="outside"):
        analyse([2] + [0] * 49, Design(looks=(50,)), 1)


# --- the all-flaky suite ------------------------------------------------------------------------


def gate_verdicts(
    diffs: npt.NDArray[np.int64], design: Design
) -> tuple[list[str], npt.NDArray[np.int64]]:
    """Every row through the looks with ``analyse`` itself, memoised on the counts of wins and
    losses (``analyse`` depends on a sample only through them when repeats is 1)."""
    assert design.repeats == 1
    memo: dict[tuple[int, int, int], LookResult] = {}
    verdicts = ["continue"] * diffs.shape[0]
    stopped = np.zeros(diffs.shape[0], dtype=np.int64)
    alive = np.arange(diffs.shape[0])
    for look, n in enumerate(design.looks, 1):
        plus = (diffs[alive, :n] > 0).sum(axis=1)
        minus = (diffs[alive, :n] < 0).sum(axis=1)
        still = []
        for row, p, m in zip(alive.tolist(), plus.tolist(), minus.tolist(), strict=True):
            key = (look, p, m)
            if key not in memo:
                memo[key] = analyse(sample(p, m, n), design, look)
            verdict = memo[key].verdict
            if verdict == "continue":
                still.append(row)
            else:
                verdicts[row], stopped[row] = verdict, n
        alive = np.array(still, dtype=np.int64)
    return verdicts, stopped


def test_a_neutral_change_on_an_all_flaky_suite_is_kept_at_most_alpha() -> None:
    """Every case a coin flip under both prompts: the keep rate is the test's real level."""
    trials = 20_000
    rng = np.random.default_rng(2026)
    n = DEFAULT.max_cases
    diffs = rng.binomial(1, 0.5, (trials, n)) - rng.binomial(1, 0.5, (trials, n))
    verdicts, stopped = gate_verdicts(diffs.astype(np.int64), DEFAULT)
    kept = verdicts.count("superior") / trials
    se = math.sqrt(0.05 * 0.95 / trials)
    assert kept <= 0.05 + 3 * se, kept
    assert kept > 0.01  # the test is not simply dead
    assert "continue" not in verdicts
    assert verdicts.count("futile") > trials / 2  # futility stops most of them early
    assert stopped.mean() < 0.8 * n


def test_a_fixed_single_look_is_exact_on_flaky_cases() -> None:
    """One look at 1.645: the McNemar z keeps a neutral change about 5 % of the time."""
    design = Design(looks=(200,))
    rng = np.random.default_rng(5)
    diffs = rng.binomial(1, 0.5, (10_000, 200)) - rng.binomial(1, 0.5, (10_000, 200))
    verdicts, _ = gate_verdicts(diffs.astype(np.int64), design)
    kept = verdicts.count("superior") / 10_000
    assert abs(kept - 0.05) < 3 * math.sqrt(0.05 * 0.95 / 10_000) + 0.005


# --- the pool's design --------------------------------------------------------------------------


@pytest.fixture
def no_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Designs without their (slow) boundary computation: these tests are about the looks."""

    def fake(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
        return (2.0,) * len(fractions)

    monkeypatch.setattr(sequential, "obf_bounds", fake)


@pytest.mark.usefixtures("no_bounds")
@pytest.mark.parametrize(
    ("pool", "looks"),
    [
        (220, (25, 50, 75, 100, 125, 150, 175, 200)),
        (500, (25, 50, 75, 100, 125, 150, 175, 200)),  # never more than max_cases
        (160, (18, 35, 52, 70, 88, 105, 122, 140)),  # 20 kept back for verify
        (50, (10, 20, 30, 40)),  # a fifth kept back; looks at least 10 cases apart
        (20, (16,)),  # one fixed-size test
        (4, (4,)),  # too small for a reserve or a second look
        (1, (1,)),
    ],
)
def test_design_for_pool(pool: int, looks: tuple[int, ...]) -> None:
    design = design_for_pool(pool)
    assert design.looks == looks
    assert design.max_cases == looks[-1]
    assert pool - design.max_cases >= min(20, pool // 5)


@pytest.mark.usefixtures("no_bounds")
def test_design_for_pool_options_and_invalid_input() -> None:
    assert design_for_pool(220, n_looks=4).looks == (50, 100, 150, 200)
    assert design_for_pool(220, n_looks=1).looks == (200,)
    assert design_for_pool(120, max_cases=100, verify_reserve=20).looks[-1] == 100
    design = design_for_pool(220, margin=0.05, repeats=3, alpha=0.1)
    assert (design.margin, design.repeats, design.alpha) == (0.05, 3, 0.1)
    for pool in (0, -5):
        with pytest.raises(ValueError, match="empty"):
            design_for_pool(pool)
    for bad in ({"alpha": 0.0}, {"alpha": 0.5}, {"margin": 1.0}, {"margin": -0.1}, {"repeats": 0}):
        with pytest.raises(ValueError):
            design_for_pool(220, **bad)
    for looks in ((), (0, 10), (10, 10), (20, 10)):
        with pytest.raises(ValueError, match="looks"):
            Design(looks=looks)


# --- the check after applying -------------------------------------------------------------------


def test_regression_shown() -> None:
    assert regression_shown([]) == (False, 1.0)
    shown, upper = regression_shown(sample(0, 20, 100))
    assert shown and upper < 0
    shown, upper = regression_shown([0] * 100)
    assert not shown and upper == pytest.approx(0.0)
    assert not regression_shown(sample(20, 20, 100))[0]
    assert not regression_shown(sample(30, 0, 100))[0]
    assert not regression_shown([-1, -1])[0]  # two losses prove nothing (z = -1.41)
    assert regression_shown([-1] * 3)[0]  # three do at one-sided 5 % (z = -1.73)
    # within a margin a small loss is no regression; ties never are
    assert regression_shown(sample(0, 3, 100))[0]
    assert not regression_shown(sample(0, 3, 100), margin=0.05)[0]
    assert not regression_shown([0] * 100, margin=0.05)[0]
    assert regression_shown(sample(0, 20, 100), margin=0.05)[0]
    # repeats: differences in runs, the bound in shares of runs
    shown, upper = regression_shown(sample(0, 30, 100, repeats=3), 3)
    assert shown and -0.5 < upper < 0


def test_regression_shown_agrees_with_its_upper_bound() -> None:
    rng = np.random.default_rng(11)
    outcomes = set()
    for _ in range(300):
        n = int(rng.integers(20, 101))
        diffs = rng.binomial(1, rng.uniform(0.3, 0.55), n) - rng.binomial(1, 0.5, n)
        shown, upper = regression_shown(diffs.tolist())
        outcomes.add(shown)
        assert shown == (z_statistic(diffs.tolist()) <= -1.6448536)
        if diffs.any():  # all ties: a zero-width interval at 0, and no regression
            assert shown == (upper <= 0)
    assert outcomes == {True, False}


def test_futility_never_stops_a_change_already_at_the_design_lift() -> None:
    """On few cases the conditional power under a 10-point lift is low even when every case
    improved; stopping then would throw away the clearest evidence there is."""
    design = Design(looks=(2, 4, 6, 8, 10, 12, 14, 16))  # eight looks on a 20-case pool
    all_fixed = analyse([1] * 2, design, 1)
    assert all_fixed.verdict == "continue"
    assert all_fixed.conditional_power is not None
    assert all_fixed.conditional_power < design.futility_cp  # it would have stopped before
    assert analyse([1] * 8, design, 4).verdict == "superior"

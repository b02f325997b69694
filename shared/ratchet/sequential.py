"""The gate's decision procedure: a paired group-sequential test on per-case differences.

Both prompts run on the same cases, so each case gives one integer difference ``d`` (candidate
passes minus current passes over ``repeats`` runs). The statistic at a look with ``n`` cases is

    z = sum(d + r*m) / sqrt(sum((d + r*m)**2))

with ``r`` repeats and margin ``m`` (0 for superiority). It is the paired score statistic
(McNemar's z when ``r`` is 1), standard normal when the true lift is ``-m``, and defined for any
sample that is not all zeros, however small. It is compared at a few planned looks with
O'Brien-Fleming-type boundaries (``C / sqrt(t)`` at information fraction ``t``), with ``C``
chosen so the chance of ever crossing under the null is ``alpha`` (one-sided): early looks demand
overwhelming evidence, the last one little more than a fixed test would. Between looks, the test
stops for futility when the conditional power to show ``design_lift`` has fallen below
``futility_cp`` while the estimate is still below that lift; futility never adds false approvals
(it is non-binding: the boundaries ignore it), it only spends fewer runs on changes that will
not make it.

Bounds reported with a verdict invert the same statistic, so "superior" and "lower bound above
zero" always agree. The lower bound uses the look's efficacy boundary (a repeated confidence
bound, valid whenever the test stopped). The lift estimate of an approved change is still biased
upward: it was selected for looking good.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import NDArray

# The standard normal's functions, from the standard library: scipy.stats would add about 70 MB
# to the gatekeeper's resident memory for these four lines.
_NORMAL = NormalDist()
_erfc = np.frompyfunc(math.erfc, 1, 1)


def _sf(z: float) -> float:
    """P(Z >= z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _isf(p: float) -> float:
    """The z with P(Z >= z) = p."""
    return -_NORMAL.inv_cdf(p)


def _sf_array(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return 0.5 * np.asarray(_erfc(z / math.sqrt(2.0)), dtype=np.float64)


def _bisect(f: Callable[[float], float], low: float, high: float, tol: float) -> float:
    """The root of an increasing-or-decreasing ``f`` between ``low`` and ``high`` (signs differ)."""
    f_low = f(low)
    while high - low > tol:
        middle = (low + high) / 2
        f_middle = f(middle)
        if (f_middle > 0) == (f_low > 0):
            low, f_low = middle, f_middle
        else:
            high = middle
    return (low + high) / 2


Verdict = Literal["continue", "superior", "non_inferior", "futile", "not_shown"]
MIN_LOOK_CASES = 10  # fewer cases between looks tell too little to be worth a stop


@lru_cache(maxsize=128)
def obf_bounds(fractions: tuple[float, ...], alpha: float) -> tuple[float, ...]:
    """O'Brien-Fleming-type z boundaries ``C / sqrt(t_k)`` with overall one-sided level alpha."""

    def excess(c: float) -> float:
        return _crossing_probability(tuple(c / math.sqrt(t) for t in fractions), fractions) - alpha

    # the one-look boundary is a lower end for C and Bonferroni's alpha / K an upper one
    low = _isf(alpha) - 0.01
    high = _isf(alpha / len(fractions)) + 0.01
    c = _bisect(excess, low, high, tol=1e-7)
    return tuple(round(c / math.sqrt(t), 6) for t in fractions)


def _crossing_probability(bounds: tuple[float, ...], fractions: tuple[float, ...]) -> float:
    """P(Z_k >= bounds[k] at some look) for a standard Brownian motion observed at ``fractions``
    (numerical integration of the continuation density on a grid, Armitage-McPherson-Rowe)."""
    step = 0.01
    crossed = 0.0
    grid = np.empty(0)
    density = np.empty(0)
    previous_t = 0.0
    for bound, t in zip(bounds, fractions, strict=True):
        upper = bound * math.sqrt(t)  # the boundary on the B-value scale, B(t) = Z sqrt(t)
        spread = math.sqrt(t - previous_t)
        if previous_t == 0.0:
            crossed += _sf(upper / spread)
        else:
            weights = density * step
            crossed += float(np.sum(weights * _sf_array((upper - grid) / spread)))
        new_grid = np.arange(-8.0, upper, step)
        if previous_t == 0.0:
            z = new_grid / spread
            density = np.exp(-0.5 * z * z) / (spread * math.sqrt(2 * math.pi))
        else:
            gap = (new_grid[:, None] - grid[None, :]) / spread
            kernel = np.exp(-0.5 * gap * gap) / (spread * math.sqrt(2 * math.pi))
            density = kernel @ (density * step)
        grid, previous_t = new_grid, t
    return crossed


@dataclass(frozen=True)
class Design:
    """A planned test: the looks (cumulative cases), its level and what it tests."""

    looks: tuple[int, ...]
    alpha: float = 0.05
    margin: float = 0.0  # 0: superiority; > 0: non-inferiority within this share (0.05 = 5 points)
    repeats: int = 1
    design_lift: float = 0.10  # the lift futility stopping protects the power to find
    futility_cp: float = 0.40
    efficacy_bounds: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        looks = self.looks
        if not looks or looks[0] < 1 or any(b <= a for a, b in pairwise(looks)):
            raise ValueError(f"looks must be increasing positive case counts, got {looks}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be 1 or more, got {self.repeats}")
        fractions = tuple(n / looks[-1] for n in looks)
        object.__setattr__(self, "efficacy_bounds", obf_bounds(fractions, self.alpha))

    @property
    def max_cases(self) -> int:
        return self.looks[-1]

    @property
    def test(self) -> Literal["superiority", "non-inferiority"]:
        return "non-inferiority" if self.margin > 0 else "superiority"


def design_for_pool(
    pool_size: int,
    *,
    max_cases: int = 200,
    n_looks: int = 8,
    verify_reserve: int = 20,
    alpha: float = 0.05,
    margin: float = 0.0,
    repeats: int = 1,
) -> Design:
    """Evenly spaced looks up to ``max_cases``, leaving ``verify_reserve`` cases of the pool
    unused by the decision (fresh cases for the check after applying). A pool too small for the
    reserve keeps a fifth of itself instead, and looks are at least ``MIN_LOOK_CASES`` apart
    (a small pool gets fewer looks; a tiny one a single, fixed-size test)."""
    if pool_size < 1:
        raise ValueError("the gate pool is empty")
    if max_cases < 1 or n_looks < 1 or verify_reserve < 0:
        raise ValueError(
            f"need max_cases >= 1, n_looks >= 1, verify_reserve >= 0; got {max_cases}, "
            f"{n_looks}, {verify_reserve}"
        )
    reserve = min(verify_reserve, pool_size // 5)
    n_max = min(max_cases, pool_size - reserve)
    n_looks = max(1, min(n_looks, n_max // MIN_LOOK_CASES))
    looks = tuple(sorted({max(1, round(n_max * k / n_looks)) for k in range(1, n_looks + 1)}))
    return Design(looks=looks, alpha=alpha, margin=margin, repeats=repeats)


@dataclass(frozen=True)
class LookResult:
    """What one look at the data says. Lifts and bounds are shares (0.05 = 5 points)."""

    look: int  # 1-based
    n: int  # cases so far
    lift: float  # mean per-case difference, candidate minus current
    z: float
    efficacy_bound: float
    conditional_power: float | None  # None at the last look
    lower_bound: float  # repeated one-sided bound at this look's boundary
    ci95: tuple[float, float]  # unadjusted two-sided 95% interval, for orientation only
    verdict: Verdict


def paired_interval(
    diffs: Sequence[int], repeats: int = 1, z_crit: float = 1.959964
) -> tuple[float, float]:
    """(lower, upper): the margins -m at which the statistic would equal ``z_crit``."""
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / n
    if n <= z_crit**2:
        return -1.0, 1.0
    half = z_crit * math.sqrt(variance / (n - z_crit**2))
    return max(-1.0, (mean - half) / repeats), min(1.0, (mean + half) / repeats)


def z_statistic(diffs: Sequence[int], repeats: int = 1, margin: float = 0.0) -> float:
    shifted = [d + repeats * margin for d in diffs]
    square_sum = sum(s * s for s in shifted)
    return sum(shifted) / math.sqrt(square_sum) if square_sum > 0 else 0.0


def analyse(diffs: Sequence[int], design: Design, look: int) -> LookResult:
    """The verdict at ``look`` (1-based) from the per-case differences of the cases so far."""
    n = len(diffs)
    if not 1 <= look <= len(design.looks) or n != design.looks[look - 1]:
        raise ValueError(f"look {look} of {design.looks} needs its case count, got {n} cases")
    r, m = design.repeats, design.margin
    if any(abs(d) > r for d in diffs):
        raise ValueError(f"a per-case difference lies outside [-{r}, {r}]")
    z = z_statistic(diffs, r, m)
    bound = design.efficacy_bounds[look - 1]
    last = look == len(design.looks)
    cp = None if last else _conditional_power(diffs, design, z, n)
    verdict: Verdict
    if z >= bound:
        verdict = "superior" if m == 0 else "non_inferior"
    elif last:
        verdict = "not_shown"
    elif cp is not None and cp < design.futility_cp and not _on_track(diffs, design):
        verdict = "futile"
    else:
        verdict = "continue"
    lower, _ = paired_interval(diffs, r, bound)
    return LookResult(
        look=look,
        n=n,
        lift=sum(diffs) / (n * r),
        z=z,
        efficacy_bound=bound,
        conditional_power=cp,
        lower_bound=lower,
        ci95=paired_interval(diffs, r, 1.959964),
        verdict=verdict,
    )


def _on_track(diffs: Sequence[int], design: Design) -> bool:
    """Is the estimate already at the lift the design hopes for? Then futility never stops it:
    on few cases the conditional power under ``design_lift`` can be low even for a large lift."""
    target = design.design_lift if design.margin == 0 else 0.0
    return sum(diffs) / (len(diffs) * design.repeats) >= target


def _conditional_power(diffs: Sequence[int], design: Design, z: float, n: int) -> float:
    """Chance of crossing the last boundary if the true lift is ``design_lift`` (for a
    non-inferiority test: if the candidate is as good as the current prompt) from here on."""
    r = design.repeats
    shift = r * (design.margin + (design.design_lift if design.margin == 0 else 0.0))
    # per-case second moment of the shifted differences; under the alternative E[d^2] >= shift
    second_moment = max(sum((d + r * design.margin) ** 2 for d in diffs) / n, shift)
    t = n / design.max_cases
    drift = shift * math.sqrt(design.max_cases) / math.sqrt(second_moment)
    final = design.efficacy_bounds[-1]
    b_value = z * math.sqrt(t)
    return _sf((final - b_value - drift * (1 - t)) / math.sqrt(1 - t))


def regression_shown(
    diffs: Sequence[int], repeats: int = 1, *, alpha: float = 0.05, margin: float = 0.0
) -> tuple[bool, float]:
    """(shown?, upper bound): do the differences show the candidate worse than the control by
    more than ``margin``, one-sided at ``alpha``? Used after applying, on fresh cases."""
    if not diffs:
        return False, 1.0
    z_crit = _isf(alpha)
    shown = z_statistic(diffs, repeats, margin) <= -z_crit
    _, upper = paired_interval(diffs, repeats, z_crit)
    return shown, upper

"""The canary's decision: is the new version worse than the stable one on live traffic?

While a change is in canary, live runs are split between two versions by their rollout key
(:func:`ratchet.prompts.serve`), and each scored run adds one score in [0, 1] to its version's
arm. The gatekeeper looks after every counted score, as long as it likes, and must still keep its
error rates. So the decision comes from a *confidence sequence*: an interval of the lift (canary
mean minus stable mean) that holds at every number of runs at once, not only at one fixed in
advance (an ordinary interval, looked at after every run, sooner or later misses by chance).

The boundary. Take one arm, its scores ``X_1, X_2, ...`` with conditional mean ``mu`` given all
runs before (of both arms), ``S = sum(X_i - mu)`` over its ``n`` runs and ``V = n / 4``. A score
in [0, 1] is sub-Gaussian with variance proxy 1/4 (Hoeffding's lemma), so for every ``lam``,
``exp(lam * S - lam**2 * V / 2)`` is a nonnegative supermartingale that starts at 1; mixed over
``lam ~ N(0, 1/rho)`` (Robbins' normal mixture) it still is one, in closed form

    M = sqrt(rho / (V + rho)) * exp(S**2 / (2 * (V + rho))).

Each run adds to one arm only (which one does not depend on its score), and its score has its
arm's mean given everything before, so for fixed ``lam_c, lam_s`` the product of the two arms'
exponentials is a supermartingale too; mixing each over its own ``N(0, 1/rho)`` gives the product
of the two mixtures, ``M_c * M_s``. By Ville's inequality it ever reaches ``1 / alpha`` with
probability at most ``alpha``. So with probability at least ``1 - alpha``, at every moment at
once, both means lie in the ellipse

    S_c**2 / (V_c + rho) + S_s**2 / (V_s + rho) < K,
    K = 2 log(1 / alpha) + log((V_c + rho) / rho) + log((V_s + rho) / rho),

and the lift ``mu_c - mu_s``, the ellipse's shadow in that direction, in

    (mean_c - mean_s) +- sqrt(K * ((V_c + rho) / n_c**2 + (V_s + rho) / n_s**2)).

This is narrower than the two arms' own intervals at ``alpha / 2`` each, added up (the arms'
terms add in quadrature and ``alpha`` is not split): by 27% at an even split (400 or 1000 runs
per arm) and by 12% at a 10% share, so a canary needs about 45% or 22% fewer runs for one width.
Without runs in an arm the width is infinite and the interval is [-1, 1]. The width shrinks as
both arms grow; while one arm has over about ten times the other's runs (a canary share under
10%), more runs of the larger one alone widen it a little (its log term grows faster than its
variance term shrinks): the smaller arm limits the canary then.

``rho`` sets where the width is smallest for its size. It is fixed in advance (the bound holds for
any fixed ``rho``): ``rho = V* / (log(1/alpha) + log(1 + log(1/alpha)))``, close to the value that
minimises the width of an even split with ``V* = n*/4``, at ``n* = DESIGN_RUNS`` = 400 runs per
arm, the few hundred runs a clearly better or worse change needs. Tuned to 100 or 800 runs
instead, the width changes by a few percent (``benchmarks/canary.py`` prints it).

Verdicts (:func:`evaluate`): "worse" when the upper bound is below 0 (rolled back), "not_worse"
when the lower bound is above ``-margin`` (promoted), "undecided" when the canary arm reached
``max_runs`` first (rolled back: the safe side), else "running"; "worse" is checked first. A truly
equal change is rolled back as worse only when the interval misses above, and a change truly
worse by the margin is promoted only when it misses below: each at most ``alpha``, however often
one looks. The bound is conservative: pass/fail scores at a pass rate of one half reach the
variance proxy, every other rate has less variance. It assumes the runs of an arm share one mean;
under drifting traffic it bounds the average of the runs' means, and both arms drift alike
because the split is by key, not by time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from ratchet.contracts import CanaryStats

DESIGN_RUNS = 400  # runs per arm where the width is tuned to be smallest (see above)
VARIANCE_PROXY = 0.25  # of any score in [0, 1]


@lru_cache(maxsize=64)
def mixture_rho(alpha: float, design_runs: int = DESIGN_RUNS) -> float:
    """The normal mixture's precision, tuned to an even split of ``design_runs`` runs per arm."""
    log_a = math.log(1.0 / alpha)
    return design_runs * VARIANCE_PROXY / (log_a + math.log(1.0 + log_a))


def arm_terms(runs: int, alpha: float, rho: float | None = None) -> tuple[float, float]:
    """One arm's part of the width: ``log((V + rho) / rho)`` and ``(V + rho) / n**2``."""
    rho = mixture_rho(alpha) if rho is None else rho
    v = runs * VARIANCE_PROXY
    return math.log((v + rho) / rho), (v + rho) / runs**2 if runs > 0 else math.inf


def half_width(canary_runs: int, stable_runs: int, alpha: float, rho: float | None = None) -> float:
    """How far the lift may be from its estimate, at every number of runs at once, with
    probability ``1 - alpha``; infinite while an arm has no runs."""
    log_c, var_c = arm_terms(canary_runs, alpha, rho)
    log_s, var_s = arm_terms(stable_runs, alpha, rho)
    return math.sqrt((2.0 * math.log(1.0 / alpha) + log_c + log_s) * (var_c + var_s))


def evaluate(
    *,
    stable_version: int,
    canary_version: int,
    stable_runs: int,
    stable_score: float,
    canary_runs: int,
    canary_score: float,
    margin: float,
    alpha: float,
    max_runs: int,
    judge_tokens: int = 0,
) -> CanaryStats:
    """The canary's statistics and verdict from each arm's runs and sum of scores."""
    both = stable_runs > 0 and canary_runs > 0
    lift = canary_score / canary_runs - stable_score / stable_runs if both else 0.0
    width = half_width(canary_runs, stable_runs, alpha)
    lower, upper = max(-1.0, lift - width), min(1.0, lift + width)
    if upper < 0:
        verdict = "worse"
    elif lower > -margin:
        verdict = "not_worse"
    elif canary_runs >= max_runs:
        verdict = "undecided"
    else:
        verdict = "running"
    return CanaryStats(
        stable_version=stable_version,
        canary_version=canary_version,
        stable_runs=stable_runs,
        stable_score=stable_score,
        canary_runs=canary_runs,
        canary_score=canary_score,
        lift=lift,
        lower=lower,
        upper=upper,
        margin=margin,
        alpha=alpha,
        verdict=verdict,
        judge_tokens=judge_tokens,
    )


OUTCOMES = {
    "running": "in canary",
    "not_worse": "shown no worse than the margin: promoted",
    "worse": "shown worse: rolled back",
    "undecided": "not shown no worse within its runs: rolled back",
    "stopped": "stopped by a reviewer: rolled back",
}


def describe(stats: CanaryStats) -> str:
    """The canary's evidence in one line of plain text (the outcome's reason in the audit trail,
    ``ratchet changes``, ``ratchet show``)."""
    return (
        f"{OUTCOMES[stats.verdict]}; lift {stats.lift:+.1%} (anytime {1 - stats.alpha:.0%} "
        f"interval {stats.lower:+.1%} to {stats.upper:+.1%}, margin {stats.margin:.0%}) on "
        f"{stats.canary_runs} canary (v{stats.canary_version}) and {stats.stable_runs} stable "
        f"(v{stats.stable_version}) live runs; {stats.judge_tokens} judge tokens"
    )


def describe_steps(
    by_kind: Mapping[str, Mapping[str, Any]], live: CanaryStats | None = None
) -> list[str]:
    """A change's canary in words, from its audit records' payloads by kind: how it started,
    and how it ended, or (``live``, from ``query.changes``) where its counts stand."""
    lines = []
    if started := by_kind.get("canary"):
        lines.append(
            f"canary: v{started['version']} serves {started['share']:.0%} of live traffic (by "
            f"rollout key), v{started['stable_version']} the rest; promoted once shown at most "
            f"{started['margin']:.0%} worse, rolled back once shown worse or after "
            f"{started['max_runs']} canary runs (anytime-valid test, alpha {started['alpha']:g})"
        )
    outcome = by_kind.get("promoted") or by_kind.get("canary_rolled_back")
    if outcome is not None:
        stats = CanaryStats.model_validate(outcome["stats"])
        lines.append(f"canary outcome: {describe(stats)}; now v{outcome['version']}")
    elif started and live is not None:
        lines.append(f"canary so far: {describe(live)}")
    return lines

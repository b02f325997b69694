"""The canary's test (ratchet.canary): its boundary is the derivation's, it narrows as runs come
in, and its verdicts are the documented ones, edge cases included. The error rates under repeated
looks are benchmarks/canary.py's (docs/benchmarks.md); a small run of it is checked here too."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ratchet import canary
from ratchet.contracts import CanaryStats

REPO = Path(__file__).resolve().parents[2]
ALPHA, MARGIN = 0.05, 0.05


def stats(stable: tuple[int, float], candidate: tuple[int, float], **settings: Any) -> CanaryStats:
    """The test on (runs, sum of scores) of the stable and the canary arm."""
    options: dict[str, Any] = {"margin": MARGIN, "alpha": ALPHA, "max_runs": 5000, **settings}
    return canary.evaluate(
        stable_version=3,
        canary_version=4,
        stable_runs=stable[0],
        stable_score=stable[1],
        canary_runs=candidate[0],
        canary_score=candidate[1],
        **options,
    )


def product_mixture(s_c: float, s_s: float, n_c: int, n_s: int, rho: float) -> float:
    """Both arms' normal mixtures multiplied, as the module's docstring derives them."""
    total = 1.0
    for s, n in ((s_c, n_c), (s_s, n_s)):
        v = n / 4
        total *= math.sqrt(rho / (v + rho)) * math.exp(s**2 / (2 * (v + rho)))
    return total


@pytest.mark.parametrize(("n_c", "n_s"), [(1, 1), (40, 360), (500, 500), (3000, 27000)])
def test_the_bounds_are_where_the_mixture_reaches_one_over_alpha(n_c: int, n_s: int) -> None:
    """At the interval's end the centred sums lie on the ellipse, at the point whose lift is
    furthest: there the product of the mixtures is exactly 1/alpha (Ville's threshold)."""
    rho = canary.mixture_rho(ALPHA)
    a2, b2 = (n_c / 4 + rho) / n_c**2, (n_s / 4 + rho) / n_s**2
    width = canary.half_width(n_c, n_s, ALPHA)
    # the furthest point: mean_c - mu_c = -a2 * t, mean_s - mu_s = b2 * t, width = (a2 + b2) * t
    t = width / (a2 + b2)
    s_c, s_s = n_c * (-a2 * t), n_s * (b2 * t)
    assert product_mixture(s_c, s_s, n_c, n_s, rho) == pytest.approx(1 / ALPHA, rel=1e-9)


@pytest.mark.parametrize("share", [0.5, 0.2, 0.1])
def test_the_interval_narrows_as_runs_come_in(share: float) -> None:
    """Run by run, at the canary shares of the benchmark: each arm grows in its share."""
    ratio = round((1 - share) / share)
    widths = [canary.half_width(n, ratio * n, ALPHA) for n in range(1, 5000)]
    assert all(a > b for a, b in itertools.pairwise(widths))
    assert canary.half_width(10**7, ratio * 10**7, ALPHA) < 0.005  # and to nothing


def test_the_smaller_arm_limits_the_interval() -> None:
    """More runs of the smaller arm always narrow it; more of an arm already over about ten times
    the other's widen it a little (its log term grows faster than its variance term shrinks),
    as the module's docstring says."""
    for small in (1, 10, 100, 1000):
        widths = [canary.half_width(small + k, 100 * small, ALPHA) for k in range(0, 50 * small)]
        assert all(a > b for a, b in itertools.pairwise(widths))
        swapped = [canary.half_width(100 * small, small + k, ALPHA) for k in range(3)]
        assert swapped == pytest.approx(widths[:3], rel=1e-12)  # symmetric
    wider = canary.half_width(100, 100_000, ALPHA)
    assert canary.half_width(100, 1_000, ALPHA) < wider < 1.2 * canary.half_width(100, 1_000, ALPHA)


def test_an_arm_without_runs_leaves_the_lift_unbounded() -> None:
    assert canary.half_width(0, 100, ALPHA) == math.inf
    assert canary.half_width(100, 0, ALPHA) == math.inf
    for stable_arm, canary_arm in [((0, 0.0), (0, 0.0)), ((50, 25.0), (0, 0.0)), ((0, 0), (9, 9))]:
        s = stats(stable_arm, canary_arm)
        assert (s.lift, s.lower, s.upper, s.verdict) == (0.0, -1.0, 1.0, "running")


def test_rho_is_tuned_to_the_design_runs() -> None:
    """The tuned rho gives an even split of DESIGN_RUNS per arm a narrower interval than rho
    tuned for far fewer or far more runs would (the bound holds for any rho fixed in advance)."""
    n = canary.DESIGN_RUNS
    tuned = canary.half_width(n, n, ALPHA)
    for design in (n // 8, n * 8):
        other = canary.mixture_rho(ALPHA, design)
        assert tuned < canary.half_width(n, n, ALPHA, rho=other)
    # narrower even than adding two per-arm Hoeffding intervals at alpha/2 each, which hold at
    # one fixed n only
    hoeffding = 2 * math.sqrt(math.log(4 / ALPHA) / (2 * n))
    assert tuned < hoeffding


def test_verdicts() -> None:
    # far worse: 300 runs each, 30% against 70%
    worse = stats((300, 210.0), (300, 90.0))
    assert worse.verdict == "worse" and worse.upper < 0 and worse.lift == pytest.approx(-0.4)
    # equal and large: the interval is inside (-margin, +margin)
    equal = stats((20000, 10000.0), (20000, 10000.0))
    assert equal.verdict == "not_worse" and equal.lower > -MARGIN and equal.lift == 0.0
    # far better
    better = stats((300, 90.0), (300, 210.0))
    assert better.verdict == "not_worse" and better.lower > 0
    # not enough runs either way
    assert stats((300, 150.0), (300, 150.0)).verdict == "running"
    # the canary arm reached max_runs undecided: rolled back (the safe side)
    assert stats((900, 450.0), (100, 50.0), max_runs=100).verdict == "undecided"
    # ... but a verdict reached on that very run stands
    assert stats((300, 210.0), (300, 90.0), max_runs=300).verdict == "worse"


def test_worse_is_checked_first() -> None:
    """Shown worse and, under a wide margin, also shown no worse than the margin: rolled back."""
    s = stats((20000, 12000.0), (20000, 11000.0), margin=0.5)
    assert s.upper < 0 and s.lower > -0.5
    assert s.verdict == "worse"


def test_more_passes_in_the_canary_only_raise_its_bounds() -> None:
    previous = None
    for passes in range(0, 201, 10):
        s = stats((200, 100.0), (200, float(passes)))
        if previous is not None:
            assert s.lower >= previous.lower and s.upper >= previous.upper
            order = ["worse", "running", "not_worse"]
            assert order.index(s.verdict) >= order.index(previous.verdict)
        previous = s
    assert previous is not None and previous.verdict == "not_worse"


def test_stats_carry_what_decided() -> None:
    s = stats((400, 200.0), (100, 20.0), judge_tokens=1234)
    assert (s.stable_version, s.canary_version) == (3, 4)
    assert (s.stable_runs, s.stable_score, s.canary_runs, s.canary_score) == (400, 200.0, 100, 20.0)
    assert (s.margin, s.alpha, s.judge_tokens) == (MARGIN, ALPHA, 1234)
    line = canary.describe(s)
    assert "shown worse: rolled back" in line
    assert f"lift {s.lift:+.1%}" in line and f"{s.lower:+.1%} to {s.upper:+.1%}" in line
    assert "100 canary (v4) and 400 stable (v3) live runs; 1234 judge tokens" in line


def test_the_steps_in_words() -> None:
    started = {
        "version": 4, "stable_version": 3, "share": 0.2, "margin": 0.05, "max_runs": 5000,
        "alpha": 0.05,
    }  # fmt: skip
    running = stats((40, 20.0), (10, 5.0))
    lines = canary.describe_steps({"canary": started}, running)
    assert lines[0].startswith("canary: v4 serves 20% of live traffic (by rollout key), v3 the")
    assert "after 5000 canary runs" in lines[0]
    assert lines[1] == f"canary so far: {canary.describe(running)}"
    done = stats((300, 210.0), (300, 90.0))
    outcome = {"version": 5, "stats": done.model_dump(mode="json")}
    lines = canary.describe_steps({"canary": started, "canary_rolled_back": outcome}, running)
    assert lines[1] == f"canary outcome: {canary.describe(done)}; now v5"
    assert canary.describe_steps({}) == []


def test_the_benchmark_keeps_both_error_rates_under_alpha(tmp_path: Path) -> None:
    """A small run of benchmarks/canary.py: it checks its verdicts against ratchet.canary and
    fails if an error rate exceeds alpha."""
    out = tmp_path / "canary.json"
    ran = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "canary.py"),
            *("--error-sims", "200", "--sims", "50", "--shares", "0.2,0.5"),
            *("--lifts=-0.2,0.1", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    results = json.loads(out.read_text())
    for row in results["errors"]:
        assert row["equal"]["verdicts"]["worse"] <= ALPHA * row["equal"]["sims"]
        assert row["worse_by_margin"]["verdicts"]["not_worse"] <= ALPHA * row["equal"]["sims"]
    decided = {(r["lift"], r["share"]): r["verdicts"] for r in results["runs"]}
    assert decided[(-0.2, 0.5)]["worse"] == 50 and decided[(0.1, 0.5)]["not_worse"] == 50

"""Canary: the error rates and the runs of the canary's anytime-valid test, by seeded simulation.

Each simulated canary is a stream of live runs. A run goes to the canary version with
probability ``share`` (the hash split of ``ratchet.prompts.in_canary`` behaves so over many
keys), and passes (score 1) or fails (score 0) with its version's true pass rate: the stable
version's is ``--stable``, the canary's that plus the true lift. After EVERY run the test is
looked at, as the gatekeeper does after every counted score, until its verdict is not
"running": the library's interval (``ratchet.canary.arm_terms``, tabulated per number of runs)
and its verdict rule, vectorised over the simulations. Every 50th decision is checked against
``ratchet.canary.evaluate`` itself, so what is measured is the library's rule.

Reported, with the settings:

1. error rates, each of ``--error-sims`` canaries per share: a truly equal change rolled back as
   "worse" (false rollback), and a change truly worse by the margin promoted (false promotion).
   Both must stay at or below alpha; the exact 95% upper confidence bound of each rate is shown.
   Rollbacks at ``max_runs`` ("undecided") are counted apart: they are the safe side of a test
   that ran out of runs, not a verdict of "worse";
2. runs to decide, ``--sims`` canaries per (true lift, share): the outcome shares and the median
   and 90th percentile of the live runs (both versions) and of the canary version's runs.

Pass/fail scores at a pass rate of one half (the default ``--stable 0.5``) have the largest
variance a score in [0, 1] can have at that mean, so they are the hardest case for the bound.

    .venv/bin/python benchmarks/canary.py                      # about a minute on 2 cores
    .venv/bin/python benchmarks/canary.py --error-sims 500 --sims 100 --json canary.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from ratchet import canary
from ratchet.settings import GateSettings

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
VERDICTS = ("not_worse", "worse", "undecided")
BLOCK = 512  # runs simulated per step for every canary still running
CROSS_CHECK_EVERY = 50


@dataclass(frozen=True)
class Config:
    seed: int = 0
    stable: float = 0.5
    shares: tuple[float, ...] = (0.1, 0.2, 0.5)
    lifts: tuple[float, ...] = (-0.20, -0.10, -0.05, 0.0, 0.05, 0.10)
    margin: float = GateSettings().canary_margin
    alpha: float = GateSettings().canary_alpha
    max_runs: int = GateSettings().canary_max_runs
    sims: int = 1000
    error_sims: int = 10_000


@dataclass
class Outcome:
    """How a batch of simulated canaries ended."""

    share: float
    lift: float
    sims: int
    verdicts: dict[str, int]
    runs_median: float
    runs_p90: float
    canary_runs_median: float
    canary_runs_p90: float

    def rate(self, verdict: str) -> float:
        return self.verdicts[verdict] / self.sims


class ArmTerms:
    """``ratchet.canary.arm_terms`` for n = 0, 1, 2, ... runs, tabulated and grown on demand."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.logs = np.array([0.0])
        self.variances = np.array([np.inf])

    def upto(self, n: int) -> tuple[FloatArray, FloatArray]:
        if n >= len(self.logs):
            grown = [canary.arm_terms(k, self.alpha) for k in range(len(self.logs), 2 * n + 1)]
            self.logs = np.concatenate([self.logs, np.array([g[0] for g in grown])])
            self.variances = np.concatenate([self.variances, np.array([g[1] for g in grown])])
        return self.logs, self.variances


def lift_bounds(
    nc: IntArray, sc: IntArray, ns: IntArray, ss: IntArray, terms: ArmTerms
) -> tuple[FloatArray, FloatArray]:
    """Vectorised ``ratchet.canary.evaluate``'s interval: [-1, 1] while an arm has no runs."""
    logs, variances = terms.upto(int(max(nc.max(), ns.max())))
    both = (nc > 0) & (ns > 0)
    mean_c = np.divide(sc, nc, out=np.zeros(nc.shape), where=both)
    mean_s = np.divide(ss, ns, out=np.zeros(ns.shape), where=both)
    lift = mean_c - mean_s
    k = 2.0 * np.log(1.0 / terms.alpha) + logs[nc] + logs[ns]
    width = np.sqrt(k * (variances[nc] + variances[ns]))
    return np.maximum(-1.0, lift - width), np.minimum(1.0, lift + width)


def simulate(
    config: Config, share: float, lift: float, sims: int, rng: np.random.Generator
) -> Outcome:
    """``sims`` canaries of one true lift at one share, each looked at after every run."""
    p = {"stable": config.stable, "canary": config.stable + lift}
    terms = ArmTerms(config.alpha)
    counts = {k: np.zeros(sims, np.int64) for k in ("nc", "sc", "ns", "ss")}
    runs_done = np.zeros(sims, np.int64)
    verdict = np.full(sims, -1, np.int64)  # index into VERDICTS once decided
    runs_at = np.zeros(sims, np.int64)
    canary_at = np.zeros(sims, np.int64)
    cross_checks = 0
    while (active := np.flatnonzero(verdict < 0)).size:
        to_canary = rng.random((active.size, BLOCK)) < share
        passes = rng.random((active.size, BLOCK)) < np.where(to_canary, p["canary"], p["stable"])
        nc = counts["nc"][active, None] + np.cumsum(to_canary, axis=1)
        sc = counts["sc"][active, None] + np.cumsum(to_canary & passes, axis=1)
        ns = counts["ns"][active, None] + np.cumsum(~to_canary, axis=1)
        ss = counts["ss"][active, None] + np.cumsum(~to_canary & passes, axis=1)
        lower, upper = lift_bounds(nc, sc, ns, ss, terms)
        worse = upper < 0
        not_worse = ~worse & (lower > -config.margin)
        undecided = ~worse & ~not_worse & (nc >= config.max_runs)
        decided = worse | not_worse | undecided
        stops = decided.any(axis=1)
        first = np.argmax(decided, axis=1)
        for row in np.flatnonzero(stops):
            sim, step = active[row], first[row]
            verdict[sim] = (
                0 if not_worse[row, step] else 1 if worse[row, step] else 2  # VERDICTS' order
            )
            runs_at[sim] = runs_done[sim] + step + 1
            canary_at[sim] = nc[row, step]
            if sim % CROSS_CHECK_EVERY == 0:
                cross_checks += 1
                stats_ = canary.evaluate(
                    stable_version=1,
                    canary_version=2,
                    stable_runs=int(ns[row, step]),
                    stable_score=float(ss[row, step]),
                    canary_runs=int(nc[row, step]),
                    canary_score=float(sc[row, step]),
                    margin=config.margin,
                    alpha=config.alpha,
                    max_runs=config.max_runs,
                )
                assert stats_.verdict == VERDICTS[verdict[sim]], (stats_, VERDICTS[verdict[sim]])
                if step > 0:  # one run earlier, the library still said "running"
                    before = canary.evaluate(
                        stable_version=1,
                        canary_version=2,
                        stable_runs=int(ns[row, step - 1]),
                        stable_score=float(ss[row, step - 1]),
                        canary_runs=int(nc[row, step - 1]),
                        canary_score=float(sc[row, step - 1]),
                        margin=config.margin,
                        alpha=config.alpha,
                        max_runs=config.max_runs,
                    )
                    assert before.verdict == "running", before
        going = ~stops
        for name, values in (("nc", nc), ("sc", sc), ("ns", ns), ("ss", ss)):
            counts[name][active[going]] = values[going, -1]
        runs_done[active[going]] += BLOCK
    assert cross_checks > 0 or sims < CROSS_CHECK_EVERY
    return Outcome(
        share=share,
        lift=lift,
        sims=sims,
        verdicts={name: int((verdict == i).sum()) for i, name in enumerate(VERDICTS)},
        runs_median=float(np.median(runs_at)),
        runs_p90=float(np.percentile(runs_at, 90)),
        canary_runs_median=float(np.median(canary_at)),
        canary_runs_p90=float(np.percentile(canary_at, 90)),
    )


def upper_95(events: int, trials: int) -> float:
    """The exact (Clopper-Pearson) one-sided 95% upper confidence bound of a rate."""
    return 1.0 if events == trials else float(stats.beta.ppf(0.95, events + 1, trials - events))


def rng_for(config: Config, *key: float) -> np.random.Generator:
    """One independent, repeatable stream per experiment cell."""
    words = [config.seed, *(round(k * 10_000) + 1_000_000 for k in key)]
    return np.random.default_rng(words)


def main(argv: list[str] | None = None) -> int:
    default = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--stable", type=float, default=default.stable, help="stable pass rate")
    parser.add_argument("--shares", default=",".join(map(str, default.shares)))
    parser.add_argument("--lifts", default=",".join(map(str, default.lifts)), help="true lifts")
    parser.add_argument("--margin", type=float, default=default.margin)
    parser.add_argument("--alpha", type=float, default=default.alpha)
    parser.add_argument("--max-runs", type=int, default=default.max_runs, help="canary-arm runs")
    parser.add_argument("--sims", type=int, default=default.sims, help="canaries per table cell")
    parser.add_argument("--error-sims", type=int, default=default.error_sims)
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    config = Config(
        seed=args.seed,
        stable=args.stable,
        shares=tuple(float(s) for s in args.shares.split(",")),
        lifts=tuple(float(x) for x in args.lifts.split(",")),
        margin=args.margin,
        alpha=args.alpha,
        max_runs=args.max_runs,
        sims=args.sims,
        error_sims=args.error_sims,
    )
    began = time.monotonic()
    print(f"settings: {json.dumps(asdict(config))}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}; boundary: normal mixture, "
        f"rho {canary.mixture_rho(config.alpha):.2f} (tuned to {canary.DESIGN_RUNS} runs per arm)"
    )
    print("\nhalf-width of the lift's interval, even split, by runs per arm:")
    sizes = (100, 400, 1000, 3000, 10000)
    print(f"{'rho tuned to':>14} " + " ".join(f"{n:>7}" for n in sizes))
    for design in (100, canary.DESIGN_RUNS, 800):
        rho = canary.mixture_rho(config.alpha, design)
        cells = " ".join(f"{canary.half_width(n, n, config.alpha, rho):>7.4f}" for n in sizes)
        print(f"{design:>9} runs {cells}")

    results: dict[str, Any] = {"settings": asdict(config), "errors": [], "runs": []}
    failed: list[str] = []
    print(f"\n1. error rates, {config.error_sims} canaries per share, looked at after every run")
    print(
        f"{'share':>6} {'false rollback':>15} {'95% upper':>10} {'(undecided)':>12}   "
        f"{'false promotion':>16} {'95% upper':>10}"
    )
    for share in config.shares:
        equal = simulate(config, share, 0.0, config.error_sims, rng_for(config, 1, share))
        worse = simulate(
            config, share, -config.margin, config.error_sims, rng_for(config, 2, share)
        )
        rollbacks, promotions = equal.verdicts["worse"], worse.verdicts["not_worse"]
        print(
            f"{share:>6.2f} {equal.rate('worse'):>15.4f} "
            f"{upper_95(rollbacks, equal.sims):>10.4f} {equal.rate('undecided'):>12.4f}   "
            f"{worse.rate('not_worse'):>16.4f} {upper_95(promotions, worse.sims):>10.4f}"
        )
        results["errors"].append({"equal": asdict(equal), "worse_by_margin": asdict(worse)})
        if max(equal.rate("worse"), worse.rate("not_worse")) > config.alpha:
            failed.append(f"share {share}: an error rate above alpha {config.alpha}")

    print(
        f"\n2. runs to decide, {config.sims} canaries per cell (stable pass rate "
        f"{config.stable:.0%}); runs = live runs of both versions, canary = the canary's own"
    )
    print(
        f"{'lift':>6} {'share':>6} {'promoted':>9} {'worse':>7} {'undecided':>10} "
        f"{'runs p50':>9} {'p90':>7} {'canary p50':>11} {'p90':>7}"
    )
    for lift in config.lifts:
        for share in config.shares:
            cell = simulate(config, share, lift, config.sims, rng_for(config, 3, lift, share))
            print(
                f"{lift:>+6.2f} {share:>6.2f} {cell.rate('not_worse'):>9.3f} "
                f"{cell.rate('worse'):>7.3f} {cell.rate('undecided'):>10.3f} "
                f"{cell.runs_median:>9.0f} {cell.runs_p90:>7.0f} "
                f"{cell.canary_runs_median:>11.0f} {cell.canary_runs_p90:>7.0f}"
            )
            results["runs"].append(asdict(cell))
    print(f"\ntook {time.monotonic() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    for problem in failed:
        print(f"FAILED: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

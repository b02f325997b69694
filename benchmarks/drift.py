"""Drift: the gate against a ground-truth world, in process.

A FAKE world (:mod:`ratchet.world`) gives every (case, task prompt) pair a latent pass probability,
so the true effect of every proposed change is known. Side by side, on the same simulated
proposals, this measures:

- ``ratchet-gate``: the gate's decision procedure, ``ratchet.sequential`` (paired group-sequential
  test, ``design_for_pool`` with the library's defaults unless a flag overrides them). Each
  decision runs both prompts on the same cases, the first ``looks[-1]`` cases of a fresh random
  permutation of the gate pool, and stops at the first look whose verdict is not ``continue``.
  A change is approved only on ``superior``. In the histories the gate then runs its check after
  applying, as the gatekeeper does: the applied prompt and a fresh control (the current prompt),
  both on the next up to ``--verify-cases`` cases of the same permutation (cases the decision did
  not use), and rolls back if ``regression_shown``;
- ``seed-rule``: the seed lesson's rule. Run the current and the candidate prompt once each on a
  fixed set of 50 tasks; keep unless the candidate's success rate is worse by more than 2 points
  (integer counts: keep iff ``100 * (cur - cand) <= 2 * 50``, i.e. ``cand >= cur - 1``);
- ``no-regression``, ``min-lift:0.05``: Ratchet's previous policy rules on 21 fixed cases, for
  reference (no case worse and one better; lift >= 5 points, i.e. 2 cases of 21).

Two experiments:

1. keep rates per true effect size (``--effects`` points, capped so the candidate's true success
   stays in [2 %, 98 %]) and for the default proposer's mix of effects, at each base success, each
   proposal in a fresh world with its own gate pool drawn from ``--population`` cases;
2. histories: ``--histories`` worlds, each with one fixed gate pool, where ``--steps`` proposals
   from the default fake proposer (true effect ~ N(-1, 6) points) are decided one after another
   and kept changes become the current prompt. Reported: the final true success against the start,
   the share of histories that ended below their start, keep rates by true effect, runs spent,
   and the gate's rollbacks after applying by the sign of the true effect.

Model runs count the decision's runs (two arms x cases x repeats); the verify step's runs are
counted apart. ``analyse`` depends on a sample only through how many cases show each difference,
so the benchmark memoises it on those counts (same verdicts, far fewer calls).

    .venv/bin/python benchmarks/drift.py                    # full size, under a minute
    .venv/bin/python benchmarks/drift.py --proposals 500 --histories 40 --json drift.json

``--e2e``: mode (b), the same loop end to end through the real services: ``ratchet.cli.up``'s
nats-server and every service as a process, the executor's model ``scripted:world`` (the same
world, ``RATCHET_WORLD__*``), the policy approver (``ratchet approver --rule superior``). Each of
``--cycles`` cycles runs the suite's learn cases live until a failure is logged, asks the real
proposer (``ratchet propose world``, model ``scripted:world-proposer``: true effect ~ N(-1, 6)
points), and waits until the gatekeeper and the approver have finished the change (rejected, or
applied, verified and kept with its holdout measured, or rolled back). Reported per cycle: the
true effect, verdict, look, runs and outcome; at the end the final true success against the
start, keeps by the sign of the true effect and runs per proposal. The world model's draws and
the proposer's are not seeded, so two runs differ.

    .venv/bin/python benchmarks/drift.py --e2e --cycles 6
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ratchet.sequential import Design, LookResult, analyse, design_for_pool, regression_shown
from ratchet.world import (
    BASE_PROMPT,
    MAX_SUCCESS,
    MIN_SUCCESS,
    FakeProposer,
    World,
    WorldSettings,
    level_for,
    pass_probability,
)

if TYPE_CHECKING:
    from ratchet.cli.up import Stack
    from ratchet.settings import GateSettings
    from ratchet.suites import Suite

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

GATE = "ratchet-gate"
SEED_RULE = "seed-rule"
NO_REGRESSION = "no-regression"
MIN_LIFT = "min-lift:0.05"
RULES = (GATE, SEED_RULE, NO_REGRESSION, MIN_LIFT)
RULE_NOTES = {
    GATE: "paired group-sequential test (ratchet.sequential), kept iff superior",
    SEED_RULE: "50 fixed tasks, 1 run per arm, keep unless worse by > 2 points",
    NO_REGRESSION: "21 fixed cases, 1 run per arm, keep iff no case worse and one better",
    MIN_LIFT: "21 fixed cases, 1 run per arm, keep iff lift >= 5 points",
}
SEED_TASKS, OLD_GATE = 50, 21
FIXED_TEST_RUNS = 400  # a fixed 200-case test, both arms once
BUCKETS = ((-math.inf, -5.0), (-5.0, -1.0), (-1.0, 1.0), (1.0, 5.0), (5.0, 10.0), (10.0, math.inf))

TARGETS = {
    "effect_-5_kept_max": 0.01,
    "effect_0_kept_max": 0.05,
    "effect_10_kept_min": 0.80,
    "effect_20_kept_min": 0.99,
    "histories_not_below_start_min": 0.99,
    "runs_per_decision_max": 0.6 * FIXED_TEST_RUNS,
}
SIGNS = ("worse", "neutral", "better")  # true effect < 0, == 0, > 0


@dataclass(frozen=True)
class Config:
    seed: int = 0
    proposals: int = 5000
    bases: tuple[float, ...] = (0.5, 0.8)
    effects: tuple[float, ...] = (-5.0, 0.0, 5.0, 10.0, 20.0)  # points
    histories: int = 200
    steps: int = 50
    history_bases: tuple[float, ...] = (0.5, 0.8)
    pool: int = 220
    population: int = 20_000
    # None: the library's default (design_for_pool, Design)
    max_cases: int | None = None
    looks: int | None = None
    verify_reserve: int | None = None
    alpha: float | None = None
    futility_cp: float | None = None
    verify_cases: int = 100  # fresh cases the check after applying runs (the gatekeeper's default)
    deterministic_share: float = 0.5
    unevenness: float = 0.25
    proposer_mean: float = -1.0  # points
    proposer_sd: float = 6.0  # points
    batch: int = 1000


@dataclass
class Tally:
    """Decisions of one rule in one setting."""

    decisions: int = 0
    kept: int = 0
    runs: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    kept_lift_sum: float = 0.0  # the lift the measurement showed, summed over kept changes
    kept_at_last_look: int = 0  # kept changes whose decision used every case of the design

    def add(self, kept: Bools, runs: Ints) -> None:
        self.decisions += int(kept.size)
        self.kept += int(kept.sum())
        self.runs += int(runs.sum())

    def row(self) -> dict[str, Any]:
        low, high = wilson(self.kept, self.decisions)
        return {
            "decisions": self.decisions,
            "kept": self.kept,
            "keep_rate": self.kept / self.decisions if self.decisions else float("nan"),
            "ci95": [low, high],
            "runs_per_decision": self.runs / self.decisions if self.decisions else float("nan"),
            "verdicts": dict(sorted(self.verdicts.items())),
            "mean_shown_lift_of_kept": self.kept_lift_sum / self.kept if self.kept else None,
            "kept_at_last_look": self.kept_at_last_look,
        }


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the rules ----------------------------------------------------------------------------------


def make_design(cfg: Config) -> Design:
    """``design_for_pool`` for the gate pool, with the library's defaults unless overridden."""
    overrides = {
        name: value
        for name, value in (
            ("max_cases", cfg.max_cases),
            ("n_looks", cfg.looks),
            ("verify_reserve", cfg.verify_reserve),
        )
        if value is not None
    }
    if cfg.alpha is None:
        design = design_for_pool(cfg.pool, **overrides)
    else:
        design = design_for_pool(cfg.pool, alpha=cfg.alpha, **overrides)
    if cfg.futility_cp is not None:
        design = dataclasses.replace(design, futility_cp=cfg.futility_cp)
    return design


def gate_decide(diffs: Sequence[int], design: Design) -> LookResult:
    """The gate's verdict on one change: looks in order, stop at the first that is not continue."""
    result: LookResult | None = None
    for look, n in enumerate(design.looks, 1):
        result = analyse(list(diffs[:n]), design, look)
        if result.verdict != "continue":
            break
    assert result is not None
    return result


class Gate:
    """:func:`gate_decide` for many changes at once, ``analyse`` memoised on its sufficient
    statistic: how many cases so far show each difference -r..r (every quantity it computes is a
    sum over the cases)."""

    def __init__(self, design: Design) -> None:
        self.design = design
        self.values = np.arange(-design.repeats, design.repeats + 1)
        self.memo: dict[tuple[int, tuple[int, ...]], LookResult] = {}

    def look(self, look: int, counts: tuple[int, ...]) -> LookResult:
        key = (look, counts)
        result = self.memo.get(key)
        if result is None:
            diffs = [int(v) for v, c in zip(self.values, counts, strict=True) for _ in range(c)]
            result = self.memo[key] = analyse(diffs, self.design, look)
        return result

    def decide(self, diffs: Ints) -> list[LookResult]:
        """The final look's result of each row of ``diffs`` (rows are changes)."""
        results: list[LookResult | None] = [None] * diffs.shape[0]
        alive = np.arange(diffs.shape[0])
        for look, n in enumerate(self.design.looks, 1):
            if alive.size == 0:
                break
            counts = (diffs[alive, :n, None] == self.values).sum(axis=1)
            still = []
            for row, key in zip(alive.tolist(), counts.tolist(), strict=True):
                result = self.look(look, tuple(key))
                if result.verdict == "continue":
                    still.append(row)
                else:
                    results[row] = result
            alive = np.asarray(still, dtype=np.int64)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]


def fixed_rule(rule: str, cur: Ints, cand: Ints) -> Bools:
    """Keep decisions of a fixed-set rule; rows are decisions, columns cases (one run each)."""
    k = cur.shape[1]
    cur_total, cand_total = cur.sum(axis=1), cand.sum(axis=1)
    if rule == SEED_RULE:  # worse by at most 2 points, in integers
        return np.asarray(100 * (cur_total - cand_total) <= 2 * k)
    if rule == NO_REGRESSION:
        diff = cand - cur
        return np.asarray(~(diff < 0).any(axis=1) & (diff > 0).any(axis=1))
    if rule == MIN_LIFT:  # lift >= 5 points, in integers
        return np.asarray(100 * (cand_total - cur_total) >= 5 * k)
    raise ValueError(rule)


def cases_for(rule: str, design: Design) -> int:
    return {GATE: design.max_cases, SEED_RULE: SEED_TASKS}.get(rule, OLD_GATE)


# --- one batch of decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """N independent decisions: each a world seed, a gate pool, a current and a candidate prompt."""

    seeds: Ints  # (N,)
    pools: Ints  # (N, pool) case indices; the fixed rules use the first columns
    cur_id: Ints  # (N,)
    cur_success: npt.NDArray[np.float64]  # (N,)
    cand_id: Ints
    cand_success: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Decided:
    """Decisions of a batch. For the gate: both arms were run on the whole permuted pool, so the
    cases from ``n_stop`` on are fresh for the check after applying."""

    kept: Bools  # (N,)
    cur: Ints  # (N, cases) passes of the current prompt, in the order the cases are used
    cand: Ints
    n_stop: Ints  # (N,) cases the decision used


def decide(
    batch: Batch, rule: str, gate: Gate, cfg: Config, rng: np.random.Generator, tally: Tally
) -> Decided:
    """Run ``rule`` on every decision of the batch (both arms sampled from the world)."""
    design = gate.design
    n_dec = batch.seeds.shape[0]
    if rule == GATE:
        order = rng.permuted(batch.pools, axis=1)
        repeats = design.repeats
    else:
        order = batch.pools[:, : cases_for(rule, design)]
        repeats = 1
    seeds = batch.seeds[:, None]

    def runs(prompt_id: Ints, success: npt.NDArray[np.float64]) -> Ints:
        mu = level_for(success, cfg.deterministic_share, cfg.unevenness)[:, None]
        p = pass_probability(
            seeds, order, prompt_id[:, None], mu, cfg.deterministic_share, cfg.unevenness
        )
        return np.asarray(rng.binomial(repeats, p), dtype=np.int64)

    cur = runs(batch.cur_id, batch.cur_success)
    cand = runs(batch.cand_id, batch.cand_success)
    if rule != GATE:
        kept = fixed_rule(rule, cur, cand)
        n_stop = np.full(n_dec, order.shape[1], dtype=np.int64)
        tally.add(kept, 2 * n_stop)
        return Decided(kept, cur, cand, n_stop)
    results = gate.decide(cand[:, : design.max_cases] - cur[:, : design.max_cases])
    kept = np.array([r.verdict == "superior" for r in results], dtype=np.bool_)
    n_stop = np.array([r.n for r in results], dtype=np.int64)
    for result in results:
        tally.verdicts[result.verdict] = tally.verdicts.get(result.verdict, 0) + 1
        if result.verdict == "superior":
            tally.kept_lift_sum += result.lift
            tally.kept_at_last_look += result.look == len(design.looks)
    tally.add(kept, 2 * n_stop * design.repeats)
    return Decided(kept, cur, cand, n_stop)


def verify(decided: Decided, rows: Ints, repeats: int, verify_cases: int) -> tuple[Bools, Ints]:
    """The check after applying for the changes ``rows``: the applied (candidate) prompt against a
    fresh control (the current prompt) on the next up to ``verify_cases`` cases after those the
    decision used (the gatekeeper reuses the decision's cases only when none are left).
    (rolled back?, cases run) per row."""
    rolled_back = np.zeros(rows.size, dtype=np.bool_)
    cases = np.zeros(rows.size, dtype=np.int64)
    pool = decided.cur.shape[1]
    for i, j in enumerate(rows.tolist()):
        start = int(decided.n_stop[j])
        fresh = slice(start, start + verify_cases) if start < pool else slice(0, verify_cases)
        diffs = decided.cand[j, fresh] - decided.cur[j, fresh]
        rolled_back[i] = regression_shown(diffs.tolist(), repeats)[0]
        cases[i] = diffs.size
    return rolled_back, cases


# --- experiment 1: keep rate per effect size ----------------------------------------------------


def used_effect(base: float, effect: float) -> float:
    """``effect`` (points) capped so the candidate's true success stays in the proposer's range."""
    high, low = round((MAX_SUCCESS - base) * 100, 9), round((MIN_SUCCESS - base) * 100, 9)
    return min(max(effect, low), high)


def effect_sizes(cfg: Config, gate: Gate, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Each fixed effect, then the default proposer's mix (``None``: effects drawn from
    N(proposer_mean, proposer_sd) points, capped like the fake proposer's), at each base."""
    rows = []
    for base in cfg.bases:
        for requested in (*cfg.effects, None):
            effect = None if requested is None else used_effect(base, requested)
            tallies = {rule: Tally() for rule in RULES}
            effect_sum = 0.0
            done = 0
            while done < cfg.proposals:
                n = min(cfg.batch, cfg.proposals - done)
                pools = np.stack(
                    [rng.choice(cfg.population, cfg.pool, replace=False) for _ in range(n)]
                ).astype(np.int64)
                batch = Batch(
                    seeds=rng.integers(0, 2**62, n, dtype=np.int64),
                    pools=pools,
                    cur_id=np.zeros(n, dtype=np.int64),
                    cur_success=np.full(n, base),
                    cand_id=np.ones(n, dtype=np.int64),
                    cand_success=np.full(n, base + effect / 100)
                    if effect is not None
                    else np.clip(
                        base + rng.normal(cfg.proposer_mean, cfg.proposer_sd, n) / 100,
                        MIN_SUCCESS,
                        MAX_SUCCESS,
                    ),
                )
                effect_sum += float((batch.cand_success - base).sum()) * 100
                for rule in RULES:
                    decide(batch, rule, gate, cfg, rng, tallies[rule])
                done += n
            for rule in RULES:
                rows.append(
                    {
                        "base": base,
                        "effect": requested,  # None: the proposer's mix
                        "effect_used": effect,
                        "mean_effect": effect_sum / cfg.proposals,
                        "rule": rule,
                        **tallies[rule].row(),
                    }
                )
    return rows


# --- experiment 2: histories --------------------------------------------------------------------


def histories(
    cfg: Config, gate: Gate, base: float, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Every rule lives its own histories, from the same worlds, pools and proposer seeds. The
    gate's approved changes go through the check after applying; the other rules have none."""
    h = cfg.histories
    world_seeds = rng.integers(0, 2**62, h, dtype=np.int64)
    proposer_seeds = rng.integers(0, 2**62, h, dtype=np.int64)
    pools = np.stack(
        [rng.choice(cfg.population, cfg.pool, replace=False) for _ in range(h)]
    ).astype(np.int64)
    rows = []
    for rule in RULES:
        worlds = [
            World(
                WorldSettings(
                    seed=int(s),
                    base_success=base,
                    deterministic_share=cfg.deterministic_share,
                    unevenness=cfg.unevenness,
                )
            )
            for s in world_seeds
        ]
        proposers = [
            FakeProposer(w, mean=cfg.proposer_mean / 100, sd=cfg.proposer_sd / 100, seed=int(s))
            for w, s in zip(worlds, proposer_seeds, strict=True)
        ]
        current = [BASE_PROMPT] * h
        tally = Tally()
        effects: list[float] = []
        kept_flags: list[bool] = []
        approved_by_sign = dict.fromkeys(SIGNS, 0)
        rolled_back_by_sign = dict.fromkeys(SIGNS, 0)
        verify_cases = 0
        for _ in range(cfg.steps):
            proposals = [p.propose(c) for p, c in zip(proposers, current, strict=True)]
            parsed_cur = [w.parse(c) for w, c in zip(worlds, current, strict=True)]
            parsed_cand = [w.parse(t) for w, (t, _) in zip(worlds, proposals, strict=True)]
            batch = Batch(
                seeds=world_seeds,
                pools=pools,
                cur_id=np.array([i for i, _ in parsed_cur], dtype=np.int64),
                cur_success=np.array([s for _, s in parsed_cur]),
                cand_id=np.array([i for i, _ in parsed_cand], dtype=np.int64),
                cand_success=np.array([s for _, s in parsed_cand]),
            )
            decided = decide(batch, rule, gate, cfg, rng, tally)
            kept = decided.kept.copy()
            if rule == GATE:
                rows_kept = np.flatnonzero(kept)
                rolled, cases = verify(decided, rows_kept, gate.design.repeats, cfg.verify_cases)
                verify_cases += int(cases.sum())
                for j, back in zip(rows_kept.tolist(), rolled.tolist(), strict=True):
                    sign = effect_sign(proposals[j][1])
                    approved_by_sign[sign] += 1
                    rolled_back_by_sign[sign] += int(back)
                kept[rows_kept[rolled]] = False
            for j, (text, effect) in enumerate(proposals):
                effects.append(effect)
                kept_flags.append(bool(kept[j]))
                if kept[j]:
                    current[j] = text
        start = base
        final = np.array([w.true_success(c) for w, c in zip(worlds, current, strict=True)])
        change = (final - start) * 100
        eff = np.array(effects) * 100
        kept_arr = np.array(kept_flags)
        buckets = []
        for low, high in BUCKETS:
            inside = (eff >= low) & (eff < high)
            n_in, k_in = int(inside.sum()), int(kept_arr[inside].sum())
            buckets.append(
                {
                    "effect_points": [low, high],
                    "proposals": n_in,
                    "kept": k_in,
                    "keep_rate": k_in / n_in if n_in else None,
                }
            )
        rows.append(
            {
                "base": base,
                "rule": rule,
                "start": start,
                "final_mean": float(final.mean()),
                "change_points": {
                    "mean": float(change.mean()),
                    "p5": float(np.percentile(change, 5)),
                    "median": float(np.median(change)),
                    "p95": float(np.percentile(change, 95)),
                },
                "share_below_start": float((final < start - 1e-12).mean()),
                "kept_per_history": float(kept_arr.sum() / h),
                "runs_per_proposal": tally.runs / tally.decisions,
                "buckets": buckets,
                "verify": None
                if rule != GATE
                else {
                    "approved_by_sign": approved_by_sign,
                    "rolled_back_by_sign": rolled_back_by_sign,
                    "checks": sum(approved_by_sign.values()),
                    "rolled_back": sum(rolled_back_by_sign.values()),
                    "cases": verify_cases,
                    "runs": 2 * verify_cases * gate.design.repeats,
                    "runs_per_proposal": 2 * verify_cases * gate.design.repeats / tally.decisions,
                },
            }
        )
    return rows


def effect_sign(effect: float) -> str:
    return "worse" if effect < -1e-12 else "better" if effect > 1e-12 else "neutral"


# --- report -------------------------------------------------------------------------------------


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def targets(
    effect_rows: list[dict[str, Any]], history_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    checks = []

    def check(name: str, value: float, limit: float, ok: bool) -> None:
        checks.append({"target": name, "value": value, "limit": limit, "met": ok})

    gate_rows = [r for r in effect_rows if r["rule"] == GATE]
    for row in gate_rows:
        base, effect, rate = row["base"], row["effect"], row["keep_rate"]
        where = f"base {base:.0%}, {effect_label(row)}: kept"
        if effect is None:
            continue
        if effect == -5:
            check(f"{where} <= 1%", rate, TARGETS["effect_-5_kept_max"], rate <= 0.01)
        elif effect == 0:
            check(f"{where} <= 5%", rate, TARGETS["effect_0_kept_max"], rate <= 0.05)
        elif effect == 10:
            check(f"{where} >= 80%", rate, TARGETS["effect_10_kept_min"], rate >= 0.80)
        elif effect == 20:
            check(f"{where} >= 99%", rate, TARGETS["effect_20_kept_min"], rate >= 0.99)
    limit = TARGETS["runs_per_decision_max"]
    for row in gate_rows:
        runs = row["runs_per_decision"]
        name = f"base {row['base']:.0%}, {effect_label(row)}: runs/decision <= {limit:.0f}"
        check(name, runs, limit, runs <= limit)
    for row in history_rows:
        if row["rule"] == GATE:
            share = 1 - row["share_below_start"]
            name = f"histories at base {row['base']:.0%} ending >= start >= 99%"
            check(name, share, TARGETS["histories_not_below_start_min"], share >= 0.99)
    for row in history_rows:
        if row["rule"] == GATE:
            runs = row["runs_per_proposal"]
            name = f"histories at base {row['base']:.0%}: runs/decision <= {limit:.0f}"
            check(name, runs, limit, runs <= limit)
    return checks


def effect_label(row: dict[str, Any]) -> str:
    """The effect actually used, and the one asked for if the cap changed it."""
    used, asked = row["effect_used"], row["effect"]
    if asked is None:
        return "default proposer mix"
    return f"effect {used:+g}" + ("" if used == asked else f" (asked {asked:+g}, capped)")


def effect_cell(row: dict[str, Any]) -> str:
    if row["effect"] is None:
        return f"mix (mean {row['mean_effect']:+.1f})"
    return f"{row['effect_used']:+g}"


def render(
    cfg: Config,
    design: Design,
    effect_rows: list[dict[str, Any]],
    history_rows: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    out: Callable[[str], None],
) -> None:
    out("\n## Keep rate by true effect (each proposal in a fresh world and gate pool)\n")
    out("| base | effect (pt) | rule | kept | 95% CI | runs/decision | ÷ fixed 200-case (400) |")
    out("|---:|---:|---|---:|---|---:|---:|")
    for r in effect_rows:
        low, high = r["ci95"]
        out(
            f"| {r['base']:.0%} | {effect_cell(r)} | {r['rule']} | {pct(r['keep_rate'], 2)} | "
            f"{pct(low, 2)} to {pct(high, 2)} | {r['runs_per_decision']:.0f} | "
            f"{r['runs_per_decision'] / FIXED_TEST_RUNS:.2f} |"
        )
    out(
        f"\nmix: each candidate's true effect drawn from the default proposer's "
        f"N({cfg.proposer_mean:+g}, {cfg.proposer_sd:g}) points."
    )
    capped = sorted(
        {(r["base"], r["effect"], r["effect_used"]) for r in effect_rows if r["effect"] is not None}
        - {(r["base"], r["effect"], r["effect"]) for r in effect_rows}
    )
    for base, asked, used in capped:
        out(
            f"At base {base:.0%} the {asked:+g} effect is capped at {used:+g} "
            f"(true success within [{MIN_SUCCESS:.0%}, {MAX_SUCCESS:.0%}])."
        )
    gate_rows = [r for r in effect_rows if r["rule"] == GATE]
    out("\nGate verdicts (share of decisions) and the mean lift shown for kept changes:\n")
    out("| base | effect (pt) | superior | futile | not_shown | shown lift of kept (pt) |")
    out("|---:|---:|---:|---:|---:|---:|")
    for r in gate_rows:
        v, n = r["verdicts"], r["decisions"]
        shown = r["mean_shown_lift_of_kept"]
        out(
            f"| {r['base']:.0%} | {effect_cell(r)} | {pct(v.get('superior', 0) / n)} | "
            f"{pct(v.get('futile', 0) / n)} | {pct(v.get('not_shown', 0) / n)} | "
            f"{'-' if shown is None else f'{100 * shown:+.1f}'} |"
        )
    out(
        f"\n## Histories: {cfg.histories} x {cfg.steps} proposals, true effect ~ "
        f"N({cfg.proposer_mean:+g}, {cfg.proposer_sd:g}) points\n"
    )
    labels = [bucket_label(b) for b in BUCKETS]
    out(
        "| base | rule | final (mean) | change pt: mean [p5, median, p95] | ended below start | "
        "kept/history | runs/proposal | kept by true effect (pt): " + ", ".join(labels) + " |"
    )
    out("|---:|---|---:|---|---:|---:|---:|---|")
    for r in history_rows:
        c = r["change_points"]
        by_bucket = ", ".join(pct(b["keep_rate"], 0) for b in r["buckets"])
        out(
            f"| {r['base']:.0%} | {r['rule']} | {pct(r['final_mean'])} | "
            f"{c['mean']:+.1f} [{c['p5']:+.1f}, {c['median']:+.1f}, {c['p95']:+.1f}] | "
            f"{pct(r['share_below_start'])} | {r['kept_per_history']:.1f} | "
            f"{r['runs_per_proposal']:.0f} | {by_bucket} |"
        )
    first = next((r for r in history_rows if r["rule"] == GATE), None)
    if first is not None:
        counts = ", ".join(
            f"{label}: {b['proposals']}" for label, b in zip(labels, first["buckets"], strict=True)
        )
        out(f"\nProposals per true-effect bucket (gate, base {first['base']:.0%}): {counts}")
    out(
        f"\nThe gate's check after applying (up to {cfg.verify_cases} fresh cases, "
        "regression_shown): rolled back / approved, by true effect\n"
    )
    out(
        "| base | worse (< 0) | neutral (= 0) | better (> 0) | fresh cases/check | "
        "verify runs/proposal | decision + verify runs/proposal |"
    )
    out("|---:|---:|---:|---:|---:|---:|---:|")
    for r in history_rows:
        v = r["verify"]
        if v is None:
            continue
        signs = " | ".join(
            f"{v['rolled_back_by_sign'][s]} / {v['approved_by_sign'][s]}" for s in SIGNS
        )
        per_check = v["cases"] / v["checks"] if v["checks"] else float("nan")
        out(
            f"| {r['base']:.0%} | {signs} | {per_check:.0f} | {v['runs_per_proposal']:.1f} | "
            f"{r['runs_per_proposal'] + v['runs_per_proposal']:.0f} |"
        )
    out("\n## Done-when targets (Ratchet's gate)\n")
    for c in checks:
        value = c["value"]
        shown = f"{value:.1f}" if c["limit"] > 1 else pct(value, 2)
        out(f"- [{'x' if c['met'] else ' '}] {c['target']}: {shown}")
    met = sum(c["met"] for c in checks)
    out(f"\n{met} of {len(checks)} targets met.")


def bucket_label(bucket: tuple[float, float]) -> str:
    low, high = bucket
    if math.isinf(low):
        return f"< {high:+g}"
    if math.isinf(high):
        return f">= {low:+g}"
    return f"[{low:+g}, {high:+g})"


def parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


# --- mode (b): end to end through the real services ---------------------------------------------

E2E_TASK = "world"
TERMINAL = {"invalid", "stale", "rejected", "rolled_back"}  # and "holdout" (or "kept") after a keep


@dataclass(frozen=True)
class E2EConfig:
    cycles: int = 6
    seed: int = 0  # the world's seed and the suite's draw of cases
    base: float = 0.5
    pool: int = 220
    learn: int = 10
    holdout: int = 60
    deterministic_share: float = 0.5
    unevenness: float = 0.25
    latency_s: float = 0.0
    rule: str = "superior"
    # None: the gatekeeper's defaults (GateSettings)
    max_cases: int | None = None
    looks: int | None = None
    verify_reserve: int | None = None
    alpha: float | None = None
    verify_cases: int | None = None
    cycle_timeout_s: float = 300.0


def e2e_gate_settings(cfg: E2EConfig) -> GateSettings:
    from ratchet.settings import GateSettings

    overrides = {
        name: value
        for name, value in (
            ("max_cases", cfg.max_cases),
            ("looks", cfg.looks),
            ("verify_reserve", cfg.verify_reserve),
            ("alpha", cfg.alpha),
            ("verify_cases", cfg.verify_cases),
        )
        if value is not None
    }
    return GateSettings.model_validate(
        {**overrides, "holdout_cases": max(1, cfg.holdout), "run_timeout_s": 120}
    )


def e2e_world_env(cfg: E2EConfig) -> dict[str, str]:
    """``RATCHET_WORLD__*``: the world the executor's model lives in."""
    return {
        "RATCHET_WORLD__SEED": str(cfg.seed),
        "RATCHET_WORLD__BASE_SUCCESS": str(cfg.base),
        "RATCHET_WORLD__DETERMINISTIC_SHARE": str(cfg.deterministic_share),
        "RATCHET_WORLD__UNEVENNESS": str(cfg.unevenness),
        "RATCHET_WORLD__LATENCY_S": str(cfg.latency_s),
    }


def run_e2e(cfg: E2EConfig, home: Path) -> dict[str, Any]:
    """Start the stack and the policy approver in ``home``, run the cycles, stop everything."""
    import subprocess
    import tempfile

    from ratchet.cli.up import start_stack
    from ratchet.natsproc import free_port
    from ratchet.settings import ModelSettings, Settings, to_env
    from ratchet.suites import Suite, save_suite
    from ratchet.world import world_suite

    suite = Suite.model_validate(
        world_suite(n_learn=cfg.learn, n_gate=cfg.pool, n_holdout=cfg.holdout, seed=cfg.seed)
    )
    suites_dir = Path(tempfile.mkdtemp(prefix="suites-", dir=home))
    save_suite(suite, suites_dir / "world.json")
    settings = Settings(
        home=home / "home",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        suites_dir=suites_dir,
        agent=ModelSettings(spec="scripted:world"),
        judge=ModelSettings(spec="scripted:judge-yes"),
        proposer=ModelSettings(spec="scripted:world-proposer"),
        min_failures_to_propose=1_000_000,  # proposals come from `ratchet propose` only
        gate=e2e_gate_settings(cfg),
    )
    os.environ.update(e2e_world_env(cfg))  # start_stack hands its environment to every service
    stack = start_stack(settings)
    log = open(settings.home / "logs" / "policy-approver.log", "wb")  # noqa: SIM115
    approver = subprocess.Popen(
        [sys.executable, "-m", "ratchet.cli", "approver", "--rule", cfg.rule],
        env=to_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return asyncio.run(e2e_cycles(cfg, stack, suite))
    finally:
        approver.terminate()
        approver.wait(timeout=10)
        log.close()
        stack.stop()


async def e2e_cycles(cfg: E2EConfig, stack: Stack, suite: Suite) -> dict[str, Any]:
    """``--cycles`` times: live traffic on the learn cases until a failure is logged, then
    ``ratchet propose world`` (the real proposer with ``scripted:world-proposer``), then wait for
    the gate (and the policy approver) to finish the change."""
    from collections import Counter

    from ratchet.cli.client import fetch_trail, submit_and_wait
    from ratchet.contracts import ChangeProposed, RunRequested
    from ratchet.messaging import EVENTS_STREAM, connect
    from ratchet.prompts import read_current
    from ratchet.settings import to_env

    world = World(
        WorldSettings(
            seed=cfg.seed,
            base_success=cfg.base,
            deterministic_share=cfg.deterministic_share,
            unevenness=cfg.unevenness,
            latency_s=cfg.latency_s,
        )
    )
    assert stack.nats is not None
    admin = await connect(stack.nats.settings_for("admin"), name="drift-e2e-admin")
    try:  # the policy approver must be listening before the first change waits for it
        deadline = time.monotonic() + 60
        while True:
            try:
                await admin.jetstream().consumer_info(EVENTS_STREAM, "policy-approver")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError("the policy approver never subscribed") from None
                await asyncio.sleep(0.1)
    finally:
        await admin.close()

    nc = await connect(stack.nats.settings_for("client"), name="drift-e2e")
    proposals: asyncio.Queue[ChangeProposed] = asyncio.Queue()
    gate_runs: Counter[str] = Counter()  # run.scored of gate runs seen, by change id

    async def on_proposed(msg: Any) -> None:
        await proposals.put(ChangeProposed.model_validate_json(msg.data))

    async def on_scored(msg: Any) -> None:
        data = json.loads(msg.data)
        if data.get("context", {}).get("purpose") == "gate":
            gate_runs[data["context"]["change_id"]] += 1

    await nc.subscribe(ChangeProposed.subject_of("*"), cb=on_proposed)
    await nc.subscribe("run.scored", cb=on_scored)
    await nc.flush()
    js = nc.jetstream()
    env = to_env(stack.settings)
    rows: list[dict[str, Any]] = []
    try:
        start = await read_current(js, E2E_TASK)
        assert start is not None
        for cycle in range(1, cfg.cycles + 1):
            began = time.perf_counter()
            current = await read_current(js, E2E_TASK)
            assert current is not None
            # live traffic: the proposer learns from failures of the learn cases only
            learn_runs = failures = 0
            for _ in range(20):
                results = await asyncio.gather(
                    *(
                        submit_and_wait(
                            nc,
                            RunRequested(task=E2E_TASK, input=case.input, check=case.check),
                            timeout=60,
                            threshold=stack.settings.failure_threshold,
                        )
                        for case in suite.learn
                    )
                )
                learn_runs += len(results)
                failures += sum(logged for _, _, logged in results)
                if failures:
                    break
            asked = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ratchet.cli",
                "propose",
                E2E_TASK,
                env={**env, "COLUMNS": "200"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            said, _ = await asyncio.wait_for(asked.communicate(), 60)
            if asked.returncode != 0:
                raise RuntimeError(f"ratchet propose failed: {said.decode()[-2000:]}")
            change = await asyncio.wait_for(proposals.get(), 30)
            trail = await e2e_wait_for_end(
                functools.partial(fetch_trail, nc, change.change_id),
                holdout=cfg.holdout > 0,
                timeout=cfg.cycle_timeout_s,
            )
            by_kind = {r.kind: r.payload for r in trail}
            measured = by_kind.get("measured")
            verified = by_kind.get("verified")
            holdout = by_kind.get("holdout")
            outcome = next(
                k for k in ("invalid", "stale", "rejected", "rolled_back", "kept") if k in by_kind
            )
            cur_success = world.true_success(current.record.text)
            cand_success = world.true_success(change.proposed_prompt)
            rows.append(
                {
                    "cycle": cycle,
                    "change_id": change.change_id,
                    "base_version": change.base_version,
                    "current_success": cur_success,
                    "candidate_success": cand_success,
                    "true_effect": cand_success - cur_success,
                    "verdict": measured["verdict"] if measured else None,
                    "look": measured["stopped_at"] if measured else None,
                    "looks": len(measured["looks"]) if measured else None,
                    "cases": measured["cases"] if measured else 0,
                    "runs": measured["runs"] if measured else 0,
                    "lift": measured["lift"] if measured else None,
                    "lower_bound": measured["lower_bound"] if measured else None,
                    "decision": "approved"
                    if "approved" in by_kind
                    else "rejected"
                    if "rejected" in by_kind
                    else None,
                    "approver": next(
                        (r.actor for r in trail if r.kind in ("approved", "rejected")), None
                    ),
                    "outcome": outcome,
                    "problems": by_kind.get("invalid", {}).get("problems", []),
                    "verify_cases": verified["cases"] if verified else 0,
                    "verify_runs": 2 * verified["cases"] * suite.repeats if verified else 0,
                    "verify_reason": verified["reason"] if verified else None,
                    "holdout_lift": holdout["lift"] if holdout else None,
                    "holdout_runs": 2 * holdout["cases"] * suite.repeats if holdout else 0,
                    "learn_runs": learn_runs,
                    "learn_failures": failures,
                    "gate_runs_seen": gate_runs[change.change_id],
                    "seconds": time.perf_counter() - began,
                }
            )
        final = await read_current(js, E2E_TASK)
        assert final is not None
        return {
            "start_success": world.true_success(start.record.text),
            "final_success": world.true_success(final.record.text),
            "final_version": final.version,
            "cycles": rows,
        }
    finally:
        await nc.close()


async def e2e_wait_for_end(fetch: Callable[[], Any], *, holdout: bool, timeout: float) -> list[Any]:
    """The change's audit trail once it has ended (after a keep: once the holdout is in)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            trail = await fetch()
        except Exception:  # the gatekeeper has not received the change yet
            trail = []
        kinds = {r.kind for r in trail}
        if kinds & TERMINAL or ("holdout" if holdout else "kept") in kinds:
            return list(trail)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the change did not finish within {timeout:.0f} s: {kinds}")
        await asyncio.sleep(0.25)


def e2e_summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["cycles"]
    n = len(rows)
    by_sign = {s: {"proposals": 0, "kept": 0, "approved": 0, "rolled_back": 0} for s in SIGNS}
    for r in rows:
        tally = by_sign[effect_sign(r["true_effect"])]
        tally["proposals"] += 1
        tally["kept"] += r["outcome"] == "kept"
        tally["approved"] += r["decision"] == "approved"
        tally["rolled_back"] += r["outcome"] == "rolled_back"
    buckets = []
    for low, high in BUCKETS:
        inside = [r for r in rows if low <= 100 * r["true_effect"] < high]
        kept = sum(r["outcome"] == "kept" for r in inside)
        buckets.append(
            {
                "effect_points": [low, high],
                "proposals": len(inside),
                "kept": kept,
                "keep_rate": kept / len(inside) if inside else None,
            }
        )
    runs = sum(r["runs"] for r in rows)
    verify = sum(r["verify_runs"] for r in rows)
    holdout = sum(r["holdout_runs"] for r in rows)
    return {
        "proposals": n,
        "kept": sum(r["outcome"] == "kept" for r in rows),
        "by_sign": by_sign,
        "buckets": buckets,
        "runs_per_proposal": runs / n if n else float("nan"),
        "verify_runs_per_proposal": verify / n if n else float("nan"),
        "holdout_runs_per_proposal": holdout / n if n else float("nan"),
        "learn_runs_per_proposal": sum(r["learn_runs"] for r in rows) / n if n else float("nan"),
        "gate_runs_seen": sum(r["gate_runs_seen"] for r in rows),
        "gate_runs_expected": runs + verify + holdout,
    }


def render_e2e(result: dict[str, Any], summary: dict[str, Any], out: Callable[[str], None]) -> None:
    out("\n## Cycles (each: live learn runs until a failure, `ratchet propose world`, the gate)\n")
    out(
        "| cycle | change | true success: current -> candidate | true effect (pt) | verdict | "
        "look | cases | runs | shown lift [lower bound] | decision | outcome | verify | "
        "holdout lift | learn runs | s |"
    )
    out("|---:|---|---|---:|---|---:|---:|---:|---|---|---|---|---:|---:|---:|")
    for r in result["cycles"]:
        look = "-" if r["look"] is None else f"{r['look']}/{r['looks']}"
        shown = (
            "-" if r["lift"] is None else f"{100 * r['lift']:+.1f} [{100 * r['lower_bound']:+.1f}]"
        )
        verify = (
            "-" if not r["verify_cases"] else f"{r['verify_cases']} cases, {r['verify_runs']} runs"
        )
        hold = "-" if r["holdout_lift"] is None else f"{100 * r['holdout_lift']:+.1f}"
        out(
            f"| {r['cycle']} | {r['change_id'][:8]} | {pct(r['current_success'], 2)} -> "
            f"{pct(r['candidate_success'], 2)} | {100 * r['true_effect']:+.2f} | "
            f"{r['verdict'] or '-'} | {look} | {r['cases']} | {r['runs']} | {shown} | "
            f"{r['decision'] or '-'} | {r['outcome']} | {verify} | {hold} | {r['learn_runs']} | "
            f"{r['seconds']:.1f} |"
        )
    for r in result["cycles"]:
        if r["problems"]:
            out(f"\ncycle {r['cycle']} invalid: {'; '.join(r['problems'])}")
    start, final = result["start_success"], result["final_success"]
    out("\n## The history\n")
    labels = [bucket_label(b) for b in BUCKETS]
    out(
        "| base | rule | start | final | change pt | ended below start | kept/history | "
        "runs/proposal | kept by true effect (pt): " + ", ".join(labels) + " |"
    )
    out("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    by_bucket = ", ".join(
        "-" if b["keep_rate"] is None else f"{b['kept']}/{b['proposals']}"
        for b in summary["buckets"]
    )
    out(
        f"| {start:.0%} | {GATE} (e2e) | {pct(start, 2)} | {pct(final, 2)} | "
        f"{100 * (final - start):+.2f} | {'yes' if final < start - 1e-12 else 'no'} | "
        f"{summary['kept']} of {summary['proposals']} | {summary['runs_per_proposal']:.0f} | "
        f"{by_bucket} |"
    )
    out("\nKept / proposals by the sign of the true effect, and the check after applying:\n")
    out("| true effect | proposals | approved | rolled back by verify | kept |")
    out("|---|---:|---:|---:|---:|")
    for sign in SIGNS:
        t = summary["by_sign"][sign]
        out(f"| {sign} | {t['proposals']} | {t['approved']} | {t['rolled_back']} | {t['kept']} |")
    out(
        f"\nModel runs per proposal: decision {summary['runs_per_proposal']:.0f}, verify "
        f"{summary['verify_runs_per_proposal']:.1f}, holdout "
        f"{summary['holdout_runs_per_proposal']:.1f}, live learn runs "
        f"{summary['learn_runs_per_proposal']:.1f}. Gate runs scored, seen by a client "
        f"subscription: {summary['gate_runs_seen']} (decision + verify + holdout: "
        f"{summary['gate_runs_expected']})."
    )


def e2e_main(cfg: E2EConfig, json_path: Path | None, keep_home: bool) -> int:
    import shutil
    import tempfile

    from ratchet.sequential import design_for_pool

    gate = e2e_gate_settings(cfg)
    design = design_for_pool(
        cfg.pool,
        max_cases=gate.max_cases,
        n_looks=gate.looks,
        verify_reserve=gate.verify_reserve,
        alpha=gate.alpha,
    )
    settings = {
        **asdict(cfg),
        "world_env": e2e_world_env(cfg),
        "suite": f"ratchet.world.world_suite(n_learn={cfg.learn}, n_gate={cfg.pool}, "
        f"n_holdout={cfg.holdout}, seed={cfg.seed}), repeats 1",
        "models": {
            "agent": "scripted:world (FAKE; draws unseeded)",
            "judge": "scripted:judge-yes (unused: every case has an exact check)",
            "proposer": "scripted:world-proposer (FAKE; true effect ~ N(-1, 6) points, unseeded)",
        },
        "approver": f"ratchet approver --rule {cfg.rule}",
        "gate": gate.model_dump(),
        "design": {
            "looks": design.looks,
            "alpha": design.alpha,
            "repeats": design.repeats,
            "design_lift": design.design_lift,
            "futility_cp": design.futility_cp,
            "efficacy_bounds": design.efficacy_bounds,
        },
    }
    print(
        "# Drift benchmark, end to end: the gate through the real services against a FAKE "
        "ground-truth world (ratchet.world)\n"
    )
    for key, value in settings.items():
        print(f"{key}: {value}")
    home = Path(tempfile.mkdtemp(prefix="ratchet-drift-e2e-"))
    started = time.perf_counter()
    try:
        result = run_e2e(cfg, home)
    except BaseException:
        print(f"\nfailed; logs kept in {home}/home/logs", file=sys.stderr)
        raise
    elapsed = time.perf_counter() - started
    summary = e2e_summary(result)
    render_e2e(result, summary, print)
    print(
        f"\nelapsed {elapsed:.0f} s (stack start-up included); python "
        f"{platform.python_version()}, {os.cpu_count()} cpus"
    )
    if keep_home:
        print(f"state and logs kept in {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    if json_path:
        json_path.write_text(
            json.dumps(
                {"settings": settings, **result, "summary": summary, "elapsed_s": elapsed},
                indent=2,
                default=float,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    default = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument(
        "--proposals", type=int, default=default.proposals, help="proposals per effect size"
    )
    parser.add_argument("--bases", default="0.5,0.8", help="base success rates")
    parser.add_argument(
        "--effects",
        default="-5,0,5,10,20",
        help="true effects in points; write --effects=-5,0 (with =)",
    )
    parser.add_argument("--histories", type=int, default=default.histories)
    parser.add_argument("--steps", type=int, default=default.steps, help="proposals per history")
    parser.add_argument("--history-bases", default="0.5,0.8")
    parser.add_argument("--pool", type=int, default=default.pool, help="gate pool size")
    parser.add_argument("--population", type=int, default=default.population)
    library = "default: the library's (design_for_pool, Design)"
    parser.add_argument("--max-cases", type=int, default=default.max_cases, help=library)
    parser.add_argument("--looks", type=int, default=default.looks, help=library)
    parser.add_argument("--verify-reserve", type=int, default=default.verify_reserve, help=library)
    parser.add_argument(
        "--alpha", type=float, default=default.alpha, help="one-sided, over all looks; " + library
    )
    parser.add_argument("--futility-cp", type=float, default=default.futility_cp, help=library)
    parser.add_argument(
        "--verify-cases",
        type=int,
        default=default.verify_cases,
        help="fresh cases the check after applying runs",
    )
    parser.add_argument("--deterministic-share", type=float, default=default.deterministic_share)
    parser.add_argument("--unevenness", type=float, default=default.unevenness)
    parser.add_argument("--proposer-mean", type=float, default=default.proposer_mean)
    parser.add_argument("--proposer-sd", type=float, default=default.proposer_sd)
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    e2e = parser.add_argument_group(
        "end to end (--e2e)",
        "mode (b): a real nats-server, every service and the policy approver, with the world "
        "model; "
        "--seed, --pool, --max-cases, --looks, --verify-reserve, --alpha, --verify-cases, "
        "--deterministic-share, --unevenness and --json apply too",
    )
    e2e.add_argument("--e2e", action="store_true", help="run through the real services")
    e2e.add_argument("--cycles", type=int, default=E2EConfig.cycles, help="proposals, in order")
    e2e.add_argument("--base", type=float, default=E2EConfig.base, help="the base prompt's success")
    e2e.add_argument("--learn", type=int, default=E2EConfig.learn, help="learn cases (live runs)")
    e2e.add_argument("--holdout", type=int, default=E2EConfig.holdout, help="holdout cases")
    e2e.add_argument("--latency", type=float, default=E2EConfig.latency_s, help="s per model call")
    e2e.add_argument("--rule", default=E2EConfig.rule, help="the policy approver's rule")
    e2e.add_argument("--keep-home", action="store_true", help="keep the stack's state and logs")
    args = parser.parse_args(argv)
    if args.e2e:
        if args.futility_cp is not None:
            parser.error("--futility-cp is not a service setting; the services use the library's")
        if args.cycles < 1 or args.learn < 1:
            parser.error("--cycles and --learn must be at least 1")
        return e2e_main(
            E2EConfig(
                cycles=args.cycles,
                seed=args.seed,
                base=args.base,
                pool=args.pool,
                learn=args.learn,
                holdout=args.holdout,
                deterministic_share=args.deterministic_share,
                unevenness=args.unevenness,
                latency_s=args.latency,
                rule=args.rule,
                max_cases=args.max_cases,
                looks=args.looks,
                verify_reserve=args.verify_reserve,
                alpha=args.alpha,
                verify_cases=args.verify_cases,
            ),
            args.json,
            args.keep_home,
        )
    cfg = Config(
        seed=args.seed,
        proposals=args.proposals,
        bases=parse_floats(args.bases),
        effects=parse_floats(args.effects),
        histories=args.histories,
        steps=args.steps,
        history_bases=parse_floats(args.history_bases),
        pool=args.pool,
        population=args.population,
        max_cases=args.max_cases,
        looks=args.looks,
        verify_reserve=args.verify_reserve,
        alpha=args.alpha,
        futility_cp=args.futility_cp,
        verify_cases=args.verify_cases,
        deterministic_share=args.deterministic_share,
        unevenness=args.unevenness,
        proposer_mean=args.proposer_mean,
        proposer_sd=args.proposer_sd,
    )
    design = make_design(cfg)
    gate = Gate(design)
    if cfg.pool < max(design.max_cases, SEED_TASKS, OLD_GATE):
        parser.error(f"--pool {cfg.pool} is smaller than the cases a rule needs")
    settings = {
        **asdict(cfg),
        "design": {
            "looks": design.looks,
            "alpha": design.alpha,
            "margin": design.margin,
            "repeats": design.repeats,
            "design_lift": design.design_lift,
            "futility_cp": design.futility_cp,
            "efficacy_bounds": design.efficacy_bounds,
        },
        "rules": RULE_NOTES,
    }
    print("# Drift benchmark: the gate against a FAKE ground-truth world (ratchet.world)\n")
    for key, value in settings.items():
        print(f"{key}: {value}")
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    effect_rows = effect_sizes(cfg, gate, rng)
    effects_s = time.perf_counter() - started
    history_rows = [row for base in cfg.history_bases for row in histories(cfg, gate, base, rng)]
    elapsed = time.perf_counter() - started
    checks = targets(effect_rows, history_rows)
    render(cfg, design, effect_rows, history_rows, checks, print)
    print(
        f"\nelapsed {elapsed:.0f} s (effect sizes {effects_s:.0f} s, histories "
        f"{elapsed - effects_s:.0f} s); python {platform.python_version()}, numpy "
        f"{np.__version__}, {os.cpu_count()} cpus"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": settings,
                    "effect_sizes": effect_rows,
                    "histories": history_rows,
                    "targets": checks,
                    "elapsed_s": elapsed,
                },
                indent=2,
                default=float,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

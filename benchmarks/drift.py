"""Drift: the gate against a ground-truth world, in process.

A FAKE world (:mod:`ratchet.world`) gives every (case, task prompt) pair a latent pass probability,
so the true effect of every proposed change is known. Side by side, on the same simulated
proposals, this measures:

- ``ratchet-gate``: the gate's decision procedure, ``ratchet.sequential`` (paired group-sequential
  test, ``design_for_pool``). Each decision runs both prompts on the same cases, the first
  ``looks[-1]`` cases of a fresh random permutation of the gate pool, and stops at the first look
  whose verdict is not ``continue``. A change is kept only on ``superior``;
- ``seed-rule``: the seed lesson's rule. Run the current and the candidate prompt once each on a
  fixed set of 50 tasks; keep unless the candidate's success rate is worse by more than 2 points
  (integer counts: keep iff ``100 * (cur - cand) <= 2 * 50``, i.e. ``cand >= cur - 1``);
- ``no-regression``, ``min-lift:0.05``: Ratchet's previous policy rules on 21 fixed cases, for
  reference (no case worse and one better; lift >= 5 points, i.e. 2 cases of 21).

Two experiments:

1. keep rates per true effect size (``--effects`` points) at each base success, each proposal in a
   fresh world with its own gate pool drawn from ``--population`` cases;
2. histories: ``--histories`` worlds, each with one fixed gate pool, where ``--steps`` proposals
   from the default fake proposer (true effect ~ N(-1, 6) points) are decided one after another
   and kept changes become the current prompt. Reported: the final true success against the start,
   the share of histories that ended below their start, keep rates by true effect, runs spent.

Model runs count gate runs only (two arms x cases x repeats); the gatekeeper's verify step after
applying is not simulated.

    .venv/bin/python benchmarks/drift.py                    # full size, a few minutes
    .venv/bin/python benchmarks/drift.py --proposals 500 --histories 40 --json drift.json

TODO(--e2e): mode (b), end to end through the real services (nats-server, executor, evaluator,
gatekeeper, policy approver) with ``scripted:world`` and ``scripted:world-proposer``, a few
cycles, the same report. Not built yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ratchet.sequential import Design, LookResult, analyse, design_for_pool
from ratchet.world import (
    BASE_PROMPT,
    FakeProposer,
    World,
    WorldSettings,
    level_for,
    pass_probability,
)

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
    max_cases: int = 200
    looks: int = 4
    verify_reserve: int = 20
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
        }


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the rules ----------------------------------------------------------------------------------


def gate_decide(diffs: Sequence[int], design: Design) -> LookResult:
    """The gate's verdict on one change: looks in order, stop at the first that is not continue."""
    result: LookResult | None = None
    for look, n in enumerate(design.looks, 1):
        result = analyse(list(diffs[:n]), design, look)
        if result.verdict != "continue":
            break
    assert result is not None
    return result


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


def decide(
    batch: Batch, rule: str, design: Design, cfg: Config, rng: np.random.Generator, tally: Tally
) -> Bools:
    """Run ``rule`` on every decision of the batch (both arms sampled from the world)."""
    n_dec = batch.seeds.shape[0]
    if rule == GATE:
        order = rng.permuted(batch.pools, axis=1)[:, : design.max_cases]
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
        tally.add(kept, np.full(n_dec, 2 * order.shape[1], dtype=np.int64))
        return kept
    diffs = (cand - cur).tolist()
    kept = np.zeros(n_dec, dtype=np.bool_)
    spent = np.zeros(n_dec, dtype=np.int64)
    for j, row in enumerate(diffs):
        result = gate_decide(row, design)
        kept[j] = result.verdict == "superior"
        spent[j] = 2 * result.n * design.repeats
        tally.verdicts[result.verdict] = tally.verdicts.get(result.verdict, 0) + 1
        if kept[j]:
            tally.kept_lift_sum += result.lift
    tally.add(kept, spent)
    return kept


# --- experiment 1: keep rate per effect size ----------------------------------------------------


def effect_sizes(cfg: Config, design: Design, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    for base in cfg.bases:
        for effect in cfg.effects:
            tallies = {rule: Tally() for rule in RULES}
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
                    cand_success=np.full(n, base + effect / 100),
                )
                for rule in RULES:
                    decide(batch, rule, design, cfg, rng, tallies[rule])
                done += n
            for rule in RULES:
                rows.append({"base": base, "effect": effect, "rule": rule, **tallies[rule].row()})
    return rows


# --- experiment 2: histories --------------------------------------------------------------------


def histories(
    cfg: Config, design: Design, base: float, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Every rule lives its own histories, from the same worlds, pools and proposer seeds."""
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
            kept = decide(batch, rule, design, cfg, rng, tally)
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
            }
        )
    return rows


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
        where = f"base {base:.0%}, effect {effect:+g}: kept"
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
        name = f"base {row['base']:.0%}, effect {row['effect']:+g}: runs/decision <= {limit:.0f}"
        check(name, runs, limit, runs <= limit)
    for row in history_rows:
        if row["rule"] == GATE:
            share = 1 - row["share_below_start"]
            name = f"histories at base {row['base']:.0%} ending >= start >= 99%"
            check(name, share, TARGETS["histories_not_below_start_min"], share >= 0.99)
    return checks


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
            f"| {r['base']:.0%} | {r['effect']:+g} | {r['rule']} | {pct(r['keep_rate'], 2)} | "
            f"{pct(low, 2)} to {pct(high, 2)} | {r['runs_per_decision']:.0f} | "
            f"{r['runs_per_decision'] / FIXED_TEST_RUNS:.2f} |"
        )
    gate_rows = [r for r in effect_rows if r["rule"] == GATE]
    out("\nGate verdicts (share of decisions) and the mean lift shown for kept changes:\n")
    out("| base | effect (pt) | superior | futile | not_shown | shown lift of kept (pt) |")
    out("|---:|---:|---:|---:|---:|---:|")
    for r in gate_rows:
        v, n = r["verdicts"], r["decisions"]
        shown = r["mean_shown_lift_of_kept"]
        out(
            f"| {r['base']:.0%} | {r['effect']:+g} | {pct(v.get('superior', 0) / n)} | "
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
    out("\n## Done-when targets (Ratchet's gate)\n")
    for c in checks:
        value = c["value"]
        shown = f"{value:.0f}" if c["limit"] > 1 else pct(value, 2)
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
    parser.add_argument("--max-cases", type=int, default=default.max_cases)
    parser.add_argument("--looks", type=int, default=default.looks)
    parser.add_argument("--verify-reserve", type=int, default=default.verify_reserve)
    parser.add_argument("--deterministic-share", type=float, default=default.deterministic_share)
    parser.add_argument("--unevenness", type=float, default=default.unevenness)
    parser.add_argument("--proposer-mean", type=float, default=default.proposer_mean)
    parser.add_argument("--proposer-sd", type=float, default=default.proposer_sd)
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    args = parser.parse_args(argv)
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
        deterministic_share=args.deterministic_share,
        unevenness=args.unevenness,
        proposer_mean=args.proposer_mean,
        proposer_sd=args.proposer_sd,
    )
    design = design_for_pool(
        cfg.pool, max_cases=cfg.max_cases, n_looks=cfg.looks, verify_reserve=cfg.verify_reserve
    )
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
    effect_rows = effect_sizes(cfg, design, rng)
    effects_s = time.perf_counter() - started
    history_rows = [row for base in cfg.history_bases for row in histories(cfg, design, base, rng)]
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

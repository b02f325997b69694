"""The gate's evidence in words, the same wherever a person decides (``ratchet show``, the demo).

Plain text only: callers print it without markup, so nothing in it can restyle a terminal.
"""

from __future__ import annotations

from typing import Any

from ratchet.contracts import Measurement

VERDICTS = {
    "superior": "shown better",
    "non_inferior": "shown no worse than the margin",
    "futile": "stopped early: it would not be shown better",
    "not_shown": "not shown better after every look",
}


def _ids(ids: list[str], flaky: set[str], limit: int = 12) -> str:
    shown = [f"{i} (flaky)" if i in flaky else i for i in ids[:limit]]
    more = f", and {len(ids) - limit} more" if len(ids) > limit else ""
    return (", ".join(shown) + more) if ids else "none"


def describe(m: Measurement) -> list[str]:
    """What a person needs to decide, from the gate's measurement."""
    flaky = set(m.flaky)
    test = "superiority" if m.test == "superiority" else f"non-inferiority, margin {m.margin:.0%}"
    runs_per_arm = m.cases * m.repeats
    lines = [
        f"verdict: {VERDICTS[m.verdict]} ({test} test, one-sided alpha {m.alpha:g}), "
        f"stopped at look {m.stopped_at} of {len(m.looks)} ({m.cases} of up to {m.looks[-1]} "
        "cases)",
        f"lift: {m.lift:+.1%}  95% CI {m.ci95[0]:+.1%} to {m.ci95[1]:+.1%} (unadjusted)  "
        f"one-sided 95% lower bound {m.lower_bound:+.1%} (valid under early stopping)",
        f"success: current {m.current_passes}/{runs_per_arm} -> candidate "
        f"{m.candidate_passes}/{runs_per_arm} ({m.cases} cases x {m.repeats} repeat(s)); "
        f"{m.runs} model runs spent",
        f"fixed {len(m.fixed)}: {_ids(m.fixed, flaky)}",
        f"broken {len(m.broken)}: {_ids(m.broken, flaky)}",
    ]
    if m.repeats > 1:
        lines.append(f"flaky cases (repeats disagreed): {len(m.flaky)}")
    if m.unscored:
        lines.append(f"unscored runs (counted as failed): {m.unscored}")
    pool = (
        f"gate pool {m.pool_sha256[:12]} ({m.pool_size} cases): {m.proposals_on_pool} "
        f"proposal(s) tested on it, budget {m.pool_budget}"
    )
    if m.pool_overused:
        pool += ": past budget, it may be overfit; auto-approval is off until it is rotated"
    lines.append(pool)
    lines.append(f"note: {m.note}")
    return lines


def describe_after(by_kind: dict[str, dict[str, Any]]) -> list[str]:
    """The checks after applying: the fresh control and the sealed holdout, where they ran."""
    lines = []
    if verified := by_kind.get("verified"):
        lines.append(
            f"verify: applied {verified['applied_passes']} vs control "
            f"{verified['control_passes']} passes on {verified['cases']} "
            f"{'fresh' if verified['fresh'] else 'reused'} cases; {verified['reason']}"
        )
    if holdout := by_kind.get("holdout"):
        low, high = holdout["ci95"]
        line = (
            f"holdout: lift {holdout['lift']:+.1%} (95% CI {low:+.1%} to {high:+.1%}) on "
            f"{holdout['cases']} sealed cases; the gate measured {holdout['gate_lift']:+.1%}"
        )
        if holdout["pool_overfit_warning"]:
            line += ": the holdout contradicts the gate's lower bound; the pool may be overfit"
        lines.append(line)
    return lines

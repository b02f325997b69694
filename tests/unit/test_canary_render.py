"""What `ratchet changes` and `ratchet show` print of a canary, from audit records and the live
counts of ``query.changes``: its start, its counts while it runs, its outcome with its stats,
and the judge's tokens per step; untrusted text around it stays literal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from ratchet import canary
from ratchet.cli.render import changes_table, print_evidence
from ratchet.contracts import CanaryStats, ChangeCanaryStarted, ChangePromoted
from ratchet.queries import summarize
from ratchet.store import AuditRecord

CHANGE, TASK = "change-7", "world"


def stats(verdict: str = "running", **changes: Any) -> CanaryStats:
    fields: dict[str, Any] = {
        "stable_version": 3, "canary_version": 4, "stable_runs": 400, "stable_score": 200.0,
        "canary_runs": 100, "canary_score": 60.0, "lift": 0.1, "lower": -0.04, "upper": 0.24,
        "margin": 0.05, "alpha": 0.05, "verdict": verdict, "judge_tokens": 900,
    }  # fmt: skip
    return CanaryStats(**{**fields, **changes})


def record(seq: int, kind: str, payload: dict[str, Any]) -> AuditRecord:
    return AuditRecord(
        seq=seq,
        change_id=CHANGE,
        kind=kind,
        actor="gatekeeper",
        payload=payload,
        at=datetime(2026, 12, 1, 12, seq, tzinfo=UTC),
        prev_hash="0" * 64,
        hash=f"{seq:064x}",
    )


STARTED = ChangeCanaryStarted(
    id=f"{CHANGE}.canary.started",
    change_id=CHANGE,
    task=TASK,
    version=4,
    stable_version=3,
    share=0.2,
    margin=0.05,
    max_runs=5000,
)
HOLDOUT = {
    "cases": 10, "current_passes": 5, "candidate_passes": 6, "lift": 0.1, "ci95": [-0.2, 0.4],
    "gate_lift": 0.2, "gate_lower_bound": 0.01, "pool_overfit_warning": False, "judge_tokens": 3,
}  # fmt: skip
RECEIVED = {"task": TASK, "base_version": 3, "rationale": "[red]x[/red]", "model": None}
TRAIL = [
    record(1, "received", RECEIVED),
    record(2, "awaiting_approval", {"prompt_diff": "-a\n+b", "judge_tokens": 12}),
    record(3, "applied", {"task": TASK, "version": 4}),
    record(4, "holdout", HOLDOUT),
    record(5, "canary", {**STARTED.model_dump(mode="json"), "alpha": 0.05}),
]


def printed(trail: list[AuditRecord], live: CanaryStats | None = None) -> str:
    out = Console(width=400, record=True, color_system=None)
    print_evidence(trail, out, live=live)
    return " ".join(out.export_text().split())


def test_show_prints_the_start_and_the_counts_while_it_runs() -> None:
    running = stats()
    text = printed(TRAIL, running)
    assert (
        "canary: v4 serves 20% of live traffic (by rollout key), v3 the rest; promoted once shown "
        "at most 5% worse, rolled back once shown worse or after 5000 canary runs (anytime-valid "
        "test, alpha 0.05)"
    ) in text
    assert f"canary so far: {canary.describe(running)}" in text
    assert "judge tokens: 15 (measure 12, holdout 3)" in text


def test_show_prints_the_outcome_with_its_stats() -> None:
    decided = stats("not_worse", lower=-0.01)
    promoted = ChangePromoted(
        id=f"{CHANGE}.promoted",
        change_id=CHANGE,
        task=TASK,
        version=5,
        stats=decided,
        reason=canary.describe(decided),
    )
    trail = [*TRAIL, record(6, "promoted", promoted.model_dump(mode="json"))]
    text = printed(trail, live=stats())  # an outcome wins over any live counts
    assert f"canary outcome: {canary.describe(decided)}; now v5" in text
    assert "canary so far" not in text
    assert "judge tokens: 915 (measure 12, holdout 3, canary (live runs) 900)" in text
    assert "rationale: [red]x[/red]" in text  # its markup printed as written


def test_changes_lists_the_canary_states() -> None:
    done = stats("worse", lift=-0.2, lower=-0.3, upper=-0.1)
    rolled_back = {"change_id": CHANGE, "task": TASK, "version": 5, "stats": done.model_dump()}
    trail = [*TRAIL, record(6, "canary_rolled_back", rolled_back)]
    [finished] = summarize(trail, canaries={CHANGE: stats()})  # the trail's outcome wins
    assert (finished.status, finished.canary) == ("canary_rolled_back", done)
    [running] = summarize(TRAIL, canaries={CHANGE: stats()})
    assert (running.status, running.canary) == ("canary", stats())
    [plain] = summarize(TRAIL[:3])
    assert plain.canary is None

    out = Console(width=400, record=True, color_system=None)
    out.print(changes_table([finished, running, plain]))
    lines = out.export_text().splitlines()
    assert "rolled back by canary" in lines[3]
    assert "worse: 100 canary (v4) / 400 stable runs, lift -20.0% (-30.0% to -10.0%)" in lines[3]
    assert "in canary" in lines[4]
    assert "100 canary (v4) / 400 stable runs, lift +10.0% (-4.0% to +24.0%)" in lines[4]
    assert "applied" in lines[5] and "canary (v" not in lines[5]

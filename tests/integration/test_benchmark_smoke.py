"""The benchmarks run end to end: benchmarks/pipeline.py stores every published run, on both
sides; benchmarks/hostile.py times the clean runs and accounts for every poisoned one.

No timing is asserted: the figures belong in docs/benchmarks.md, not in a pass/fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_benchmark_stores_every_run_on_both_sides(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    ran = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "pipeline.py"),
            *("--runs", "20", "--warmup", "5", "--serial", "3", "--window", "8"),
            *("--json", str(results)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "services / raw throughput" in ran.stdout
    summary = json.loads(results.read_text())["summary"]
    for side in ("services", "raw"):
        assert summary[side]["published"] == 20 + 5 + 3
        assert summary[side]["stored"] == summary[side]["published"]
        assert summary[side]["runs_per_s"] > 0


def test_the_hostile_benchmark_times_clean_runs_and_accounts_for_every_poisoned_one(
    tmp_path: Path,
) -> None:
    results = tmp_path / "hostile.json"
    ran = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "hostile.py"),
            *("--runs", "100", "--warmup", "10", "--poison", "0.04", "--rate", "50"),
            *("--json", str(results)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "p99 poisoned / clean" in ran.stdout
    [round_] = json.loads(results.read_text())["rounds"]
    clean, poisoned = round_["clean"], round_["poisoned"]
    assert (clean["poisoned"], clean["timed"]) == (0, 100)
    assert (poisoned["poisoned"], poisoned["timed"]) == (4, 96)  # one of each kind
    outcomes = " | ".join(poisoned["poison_outcomes"])
    for kind, fate in [
        ("regex", "scored (the check timed out"),
        ("huge", "dead-lettered (malformed message"),
        ("schema", "dead-lettered (unsupported message: schema_version 999"),
        ("prompt-version", "dead-lettered (unprocessable: prompt version 1000000000"),
    ]:
        assert f"{kind}: {fate}" in outcomes, outcomes

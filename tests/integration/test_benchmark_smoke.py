"""benchmarks/pipeline.py runs end to end: every published run is stored, on both sides.

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

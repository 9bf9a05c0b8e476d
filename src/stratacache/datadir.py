"""The data directory: its layout, its model manifest, and the lock that keeps it to one server.

    DATA_DIR/
      stratacache.json   manifest: format, model name, dimension, weights fingerprint
      LOCK               flock'd by the running server
      warm/              LMDB environment (warm tier)
      cold.sqlite3       SQLite database (cold tier)

Vectors from different models are not comparable, so a directory refuses to open with a model
other than the one that filled it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .embed import ModelIdentity
from .errors import DataDirMismatch

FORMAT_VERSION = 1
MANIFEST = "stratacache.json"


class DataDir:
    """Opens (creating if new) and locks a data directory for ``identity``'s model.

    Raises:
        DataDirMismatch: the directory was filled by another model, is of an unknown format, or
            another server holds it.
    """

    def __init__(self, path: Path, identity: ModelIdentity) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / "LOCK", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataDirMismatch(
                f"data directory {str(path)!r} is in use by another stratacache server: stop "
                "it, or give this one another --data-dir") from None
        try:
            self._check_manifest(identity)
        except BaseException:
            self.close()
            raise

    @property
    def warm_path(self) -> Path:
        return self.path / "warm"

    @property
    def cold_path(self) -> Path:
        return self.path / "cold.sqlite3"

    def _check_manifest(self, identity: ModelIdentity) -> None:
        manifest = self.path / MANIFEST
        if not manifest.exists():
            _write_atomically(manifest, {
                "format": FORMAT_VERSION, "model": identity.name,
                "dimension": identity.dimension, "fingerprint": identity.fingerprint,
                "created_at": time.time()})
            return
        recorded = json.loads(manifest.read_text())
        if recorded.get("format") != FORMAT_VERSION:
            raise DataDirMismatch(
                f"data directory {str(self.path)!r} has format {recorded.get('format')}, this "
                f"server reads format {FORMAT_VERSION}: use a matching stratacache version")
        if (recorded.get("dimension"), recorded.get("fingerprint")) != (
                identity.dimension, identity.fingerprint):
            raise DataDirMismatch(
                f"data directory {str(self.path)!r} was filled by model {recorded.get('model')!r} "
                f"(dimension {recorded.get('dimension')}, weights {recorded.get('fingerprint')}), "
                f"but this server loads {identity.name!r} (dimension {identity.dimension}, "
                f"weights {identity.fingerprint}); vectors of different models cannot be mixed. "
                "Start with the model that filled it, or give another --data-dir.")

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def _write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

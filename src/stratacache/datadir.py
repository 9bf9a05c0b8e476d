"""The data directory: its layout, its model manifest, and the lock that keeps it to one server.

    DATA_DIR/
      stratacache.json   manifest: format, model name, dimension, weights fingerprint
      LOCK               flock'd by the running server (or by ``stratacache reindex``)
      warm/              LMDB environment (warm tier)
      cold.sqlite3       SQLite database (cold tier)
      keys.sqlite3       per-user record keys (DeleteUser destroys the user's key)
      quarantine/        damaged records set aside (only if any were found)
      onnx/              ONNX graphs exported from the models (a cache: safe to delete)
      reindex/           only while ``stratacache reindex`` runs, or after one was interrupted

Vectors from different models are not comparable, so a directory refuses to open with a model
other than the one that filled it; ``stratacache reindex`` re-embeds it for another model.

A reindex builds ``reindex/warm`` and ``reindex/cold.sqlite3`` beside the live files, makes them
durable, and then writes ``reindex/stratacache.json``: that write is its commit point. Before it,
``reindex/`` is scratch and the directory is still the old model's (:func:`finish_reindex`
deletes the scratch); after it, :func:`finish_reindex` moves the new files into place and the
manifest last, each step idempotent, so an interruption anywhere is finished by the next open.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .embed import ModelIdentity
from .errors import DataDirMismatch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "stratacache.json"
WARM = "warm"
COLD = "cold.sqlite3"
KEYS = "keys.sqlite3"
QUARANTINE = "quarantine"
#: Where a reindex builds the new tier files (see the module docstring).
STAGING = "reindex"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
#: The name Encoder gives the bundled model, and the --model value that loads it.
_DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class DataDir:
    """Opens (creating if new) and locks a data directory for ``identity``'s model.

    ``model`` is the ``--model`` value that loaded the model: a mismatch error names it in the
    ``stratacache reindex`` command it suggests (without it, ``identity.name`` stands in).

    Raises:
        DataDirMismatch: the directory was filled by another model, is of an unknown format, or
            another server holds it.
    """

    def __init__(self, path: Path, identity: ModelIdentity, *, model: str | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = lock(path, "stop it, or give this one another --data-dir")
        try:
            finish_reindex(path)
            self._check_manifest(identity, model)
        except BaseException:
            self.close()
            raise

    @property
    def warm_path(self) -> Path:
        return self.path / WARM

    @property
    def cold_path(self) -> Path:
        return self.path / COLD

    def _check_manifest(self, identity: ModelIdentity, model: str | None) -> None:
        recorded = read_manifest(self.path)
        if recorded is None:
            write_manifest(self.path / MANIFEST, identity)
            return
        if recorded.get("format") != FORMAT_VERSION:
            raise DataDirMismatch(
                f"data directory {str(self.path)!r} has format {recorded.get('format')}, this "
                f"server reads format {FORMAT_VERSION}: use a matching stratacache version")
        if (recorded.get("dimension"), recorded.get("fingerprint")) != (
                identity.dimension, identity.fingerprint):
            if model is None:
                model = "default" if identity.name == _DEFAULT_MODEL_NAME else identity.name
            fix = f"stratacache reindex --data-dir {shlex.quote(str(self.path))} " \
                  f"--model {shlex.quote(model)}"
            raise DataDirMismatch(
                f"data directory {str(self.path)!r} was filled by model {recorded.get('model')!r} "
                f"(dimension {recorded.get('dimension')}, weights {recorded.get('fingerprint')}), "
                f"but this server loads {identity.name!r} (dimension {identity.dimension}, "
                f"weights {identity.fingerprint}); vectors of different models cannot be mixed. "
                f"Start with the model that filled it, re-embed its entries for this model with "
                f"`{fix}` (with no server running on it), or give another --data-dir.")

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def lock(path: Path, advice: str) -> IO[str]:
    """Takes ``path``'s LOCK (held until the returned file is closed).

    Raises:
        DataDirMismatch: another process (a server, a reindex) holds it; ``advice`` ends the
            message.
    """
    handle = open(path / "LOCK", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirMismatch(
            f"data directory {str(path)!r} is in use by another stratacache server (or "
            f"reindex): {advice}") from None
    return handle


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None if it has none yet."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text())


def write_manifest(path: Path, identity: ModelIdentity, **extra: Any) -> None:
    """Writes a manifest for ``identity`` at ``path`` atomically and durably."""
    _write_atomically(path, {
        "format": FORMAT_VERSION, "model": identity.name, "dimension": identity.dimension,
        "fingerprint": identity.fingerprint, "created_at": time.time(), **extra})


def finish_reindex(path: Path, *, on_step: Callable[[str], None] | None = None) -> str | None:
    """Brings a directory left by an interrupted reindex to a consistent state; the caller holds
    the lock. Returns what it did: None (no reindex was interrupted), "discarded" (one stopped
    before its commit point: its scratch is deleted and the old model's files are untouched) or
    "completed" (one stopped after it: its new files are moved into place, the manifest last).
    Every step can be interrupted and rerun; ``on_step`` is called after each (for tests)."""
    step = on_step or (lambda _: None)
    staging = path / STAGING
    if not staging.exists():
        return None
    if not (staging / MANIFEST).exists():
        log.warning("removing %s, left by an interrupted reindex; the data directory keeps the "
                    "model its manifest names", staging)
        shutil.rmtree(staging)
        fsync_path(path)
        return "discarded"
    log.info("moving the re-embedded tiers of a committed reindex into place, the manifest last")
    new_warm, live_warm, old_warm = staging / WARM, path / WARM, staging / "warm.old"
    if new_warm.exists():
        # A directory cannot be replaced in one step: move the old one aside, then the new one
        # in. Until the manifest moves, the new warm/ is only ever read by this function.
        if live_warm.exists():
            if old_warm.exists():
                shutil.rmtree(old_warm)
            os.rename(live_warm, old_warm)
        os.rename(new_warm, live_warm)
        fsync_path(staging)
        fsync_path(path)
        step("warm-swapped")
    new_cold = staging / COLD
    if new_cold.exists():
        # The old database's journal files must not be applied to the new one.
        for suffix in _SQLITE_SIDE_FILES:
            (path / (COLD + suffix)).unlink(missing_ok=True)
        os.replace(new_cold, path / COLD)
        fsync_path(staging)
        fsync_path(path)
        step("cold-swapped")
    os.replace(staging / MANIFEST, path / MANIFEST)
    fsync_path(path)
    step("manifest-swapped")
    shutil.rmtree(staging)
    fsync_path(path)
    return "completed"


def fsync_path(path: Path) -> None:
    """fsync of a file, or of a directory (making its entries: files created, renamed or
    deleted in it, durable)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)

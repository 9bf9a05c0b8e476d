"""``stratacache reindex``: re-embed a data directory's entries for another embedding model.

Vectors of different models cannot be compared, so a data directory only opens with the model
that filled it (see ``datadir``). To change model, stop the server and run

    stratacache reindex --data-dir D --model M

It takes the directory's lock, re-embeds every stored entry (warm and cold tiers) with ``M`` and
records ``M`` in the manifest; ``stratacache serve --data-dir D --model M`` then opens it. Entries
keep their ids, tiers, expiry and every other field; entries already expired are dropped. The
hot tier is memory only, and every vector index is rebuilt at start-up, so a new dimension
needs nothing more.

Crash safety: the new tiers are built in ``D/reindex/`` beside the live files, which are only
read. Once the new files are durable (fsync'd, with their directory), ``D/reindex/
stratacache.json`` is written atomically: the commit point. An interruption before it leaves
the directory as it was, for the old model (the scratch is deleted by the next open or
reindex); after it, ``datadir.finish_reindex`` moves the new files into place with renames and
the manifest last, and any interrupted step is redone by the next open or reindex.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import shutil
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from . import config, datadir, keys
from .embed import Encoder, ModelIdentity, resolve_model_path
from .errors import CacheError, DataDirMismatch
from .keyring import KeyRing
from .records import Entry
from .tiers import cold, warm
from .tiers.base import Quarantine

log = logging.getLogger("stratacache.reindex")

DEFAULT_BATCH_SIZE = 64
#: Entries read at a time and sorted by prompt length before they are cut into forward passes
#: (1.5-1.8x faster on QQP questions than passes in storage order) ...
WINDOW_BATCHES = 16
#: ... unless their responses and prompts pass this many bytes first (a bound on memory).
WINDOW_BYTES = 64 << 20


@dataclass(frozen=True)
class Outcome:
    """What a reindex did. ``changed`` is False when the directory already used the model."""

    changed: bool
    entries: int = 0  # re-embedded and kept
    warm: int = 0
    cold: int = 0
    expired: int = 0  # dropped
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the reindex flags to ``parser`` (a ``stratacache reindex`` subparser), with its
    description; every flag's help states its default."""
    parser.formatter_class = argparse.HelpFormatter  # the defaults are in the help texts
    parser.description = (
        "Re-embed every entry of a data directory with another embedding model, then record "
        "that model in the directory's manifest, so that `stratacache serve --data-dir D "
        "--model M` opens it. No server may run on the directory meanwhile. Safe to interrupt: "
        "until it finishes, the directory keeps its old model; run it again to retry.")
    env = os.environ.get
    parser.add_argument(
        "--data-dir", type=Path, default=env("STRATACACHE_DATA_DIR", config.DEFAULT_DATA_DIR),
        help="data directory to re-embed (stop its server first) [env STRATACACHE_DATA_DIR] "
             "(default: %(default)s)")
    parser.add_argument(
        "--model", required=True,
        help="the model to re-embed with: a sentence-transformers model folder, or 'default' for "
             "the bundled all-MiniLM-L6-v2; never downloaded (required, no default)")
    parser.add_argument(
        "--device", default=env("STRATACACHE_DEVICE", config.DEFAULT_DEVICE),
        help="embedding device: auto, cpu, cuda, cuda:N [env STRATACACHE_DEVICE] "
             "(default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
        help="texts per embedding pass (default: %(default)s)")
    parser.add_argument(
        "--force", action="store_true",
        help="re-embed even when the directory already uses --model (default: off)")
    parser.add_argument(
        "--log-level", default=env("STRATACACHE_LOG_LEVEL", "info"),
        help="debug, info, warning or error [env STRATACACHE_LOG_LEVEL] (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """``stratacache reindex``: 0 when done (or nothing to do), 2 on an error (logged), 130
    when interrupted."""
    try:
        reindex(args.data_dir, args.model, device=args.device, batch_size=args.batch_size,
                force=args.force)
    except (CacheError, OSError, sqlite3.Error, lmdb.Error) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return 0


def reindex(data_dir: Path, model: str, *, device: str = "auto",
            batch_size: int = DEFAULT_BATCH_SIZE, force: bool = False,
            encoder: Encoder | None = None,
            on_step: Callable[[str], None] | None = None) -> Outcome:
    """Re-embeds ``data_dir`` with ``model`` (see the module docstring).

    Args:
        encoder: the model already loaded (``model`` then only names it in messages).
        on_step: called with "batch" after each batch is written to the new files, "built"
            when they are durable, "committed" after the commit point, then with each step of
            ``datadir.finish_reindex``. For tests: a process that dies in it is a crash there.

    Raises:
        DataDirMismatch: a server (or another reindex) holds the directory, or it is not a
            stratacache data directory of a format this version reads.
        InvalidArgument: the model or device does not exist.
    """
    step = on_step or (lambda _: None)
    if not (data_dir / datadir.MANIFEST).is_file():
        raise DataDirMismatch(
            f"{str(data_dir)!r} is not a stratacache data directory (it has no "
            f"{datadir.MANIFEST}): nothing to reindex. `stratacache serve --data-dir "
            f"{shlex.quote(str(data_dir))} --model {shlex.quote(model)}` creates one for that "
            "model.")
    if encoder is None:
        resolve_model_path(model)  # a wrong path fails before anything else
    lock = datadir.lock(data_dir, "stop it before reindexing, then run the reindex again")
    try:
        if datadir.finish_reindex(data_dir, on_step=step) == "completed":
            log.info("an earlier reindex had been committed; it is now complete")
        recorded = datadir.read_manifest(data_dir) or {}
        if recorded.get("format") != datadir.FORMAT_VERSION:
            raise DataDirMismatch(
                f"data directory {str(data_dir)!r} has format {recorded.get('format')}, this "
                f"version reads format {datadir.FORMAT_VERSION}: use a matching stratacache version")
        if encoder is None:
            encoder = Encoder(model, device=device)
        new = encoder.identity
        old = (f"{recorded.get('model')!r} (dimension {recorded.get('dimension')}, weights "
               f"{recorded.get('fingerprint')})")
        if (recorded.get("dimension"), recorded.get("fingerprint")) == (
                new.dimension, new.fingerprint) and not force:
            log.info("data directory %s already uses model %s: nothing to do (--force "
                     "re-embeds anyway)", data_dir, old)
            return Outcome(changed=False)
        log.info("reindexing data directory %s: model %s -> %r (dimension %d, weights %s) on %s",
                 data_dir, old, new.name, new.dimension, new.fingerprint, encoder.device)
        outcome = _rebuild(data_dir, encoder, recorded, batch_size, step)
        try:
            datadir.finish_reindex(data_dir, on_step=step)
        except BaseException:
            log.error("the reindex is committed, but moving its files into place was "
                      "interrupted: the next `stratacache reindex` or `stratacache serve --model "
                      "%s` on this directory completes it", model)
            raise
        step("done")
    finally:
        lock.close()
    log.info("reindexed %d entries (warm %d, cold %d; %d expired dropped) in %.1f s: %.0f "
             "entries/s. Serve it with: stratacache serve --data-dir %s --model %s",
             outcome.entries, outcome.warm, outcome.cold, outcome.expired, outcome.seconds,
             outcome.rate, shlex.quote(str(data_dir)), shlex.quote(model))
    return outcome


def _rebuild(data_dir: Path, encoder: Encoder, recorded: dict, batch_size: int,
             step: Callable[[str], None]) -> Outcome:
    """Builds the re-embedded tiers in the staging folder and commits them (manifest written
    there); returns what it did. Before the commit, any failure deletes the staging folder."""
    from tqdm import tqdm

    started = time.perf_counter()
    now = time.time()
    old_warm, old_cold = data_dir / datadir.WARM, data_dir / datadir.COLD
    staging = data_dir / datadir.STAGING
    warm_total, cold_total = warm.count_stored(old_warm), cold.count_stored(old_cold)
    total = warm_total + cold_total
    log.info("%d entries to re-embed (warm %d, cold %d), %d per batch; building the new tiers "
             "in %s", total, warm_total, cold_total, batch_size, staging)
    _check_free_space(data_dir, recorded, encoder.identity)

    staging.mkdir()
    datadir.fsync_path(data_dir)
    writers: list[warm.BulkWriter | cold.BulkWriter] = []
    # The users' keys stay where they are: re-embedded records are encrypted with them again.
    key_ring = KeyRing(data_dir / datadir.KEYS)
    quarantine = Quarantine(data_dir / datadir.QUARANTINE)
    try:
        old_bytes = _size(old_warm / "data.mdb")
        ratio = encoder.dimension / max(1, int(recorded.get("dimension") or 1))
        warm_out = warm.BulkWriter(staging / datadir.WARM,
                                   map_size=int(2 * old_bytes * max(1.0, ratio)) + (64 << 20),
                                   keys=key_ring)
        writers.append(warm_out)
        cold_out = cold.BulkWriter(staging / datadir.COLD, keys=key_ring)
        writers.append(cold_out)
        counts = {"warm": 0, "cold": 0, "expired": 0}
        with tqdm(total=total, unit="entry", desc="re-embedding", dynamic_ncols=True) as bar:

            def batches(group: Iterator[tuple[str, list[Entry], int]]) -> Iterator[list[Entry]]:
                for _, entries, duplicates in group:
                    bar.update(duplicates)
                    yield entries

            stored = stored_entries(data_dir, batch_size, keys=key_ring, quarantine=quarantine)
            for tier, group in itertools.groupby(stored, key=lambda t: t[0]):
                out = warm_out if tier == "warm" else cold_out
                for window in _windows(batches(group), batch_size * WINDOW_BATCHES):
                    for kept, consumed in reembed(encoder, window, now, batch_size):
                        if kept:
                            out.put(kept)
                        counts[tier] += len(kept)
                        counts["expired"] += consumed - len(kept)
                        bar.update(consumed)
                        step("batch")
        while writers:
            writers.pop().close()
        datadir.fsync_path(staging)
        step("built")
    except BaseException:
        for writer in writers:
            try:
                writer.close()
            except Exception:
                pass
        log.warning("reindex failed before its commit point: removing %s; the data directory "
                    "keeps model %r", staging, recorded.get("model"))
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        key_ring.close()
    # The commit point: from here on the directory belongs to the new model.
    datadir.write_manifest(
        staging / datadir.MANIFEST, encoder.identity,
        created_at=recorded.get("created_at", now), reindexed_at=now,
        previous={k: recorded.get(k) for k in ("model", "dimension", "fingerprint")})
    step("committed")
    log.info("re-embedded tiers are durable and committed; moving them into place")
    kept = counts["warm"] + counts["cold"]
    return Outcome(changed=True, entries=kept, warm=counts["warm"], cold=counts["cold"],
                   expired=counts["expired"], seconds=time.perf_counter() - started)


def stored_entries(data_dir: Path, batch: int, *, keys: KeyRing,
                   quarantine: Quarantine) -> Iterator[tuple[str, list[Entry], int]]:
    """Every readable entry of ``data_dir`` (whose lock the caller holds, with no server on
    it), expired ones included: the warm tier's in key (id) order, then the cold tier's in
    insertion order, ``batch`` records at a time.

    Yields:
        (tier: "warm" or "cold", entries, duplicates): ``duplicates`` counts cold records left
        out because the warm tier holds the same entry (an interrupted move leaves both; the
        warm copy wins, as at start-up). Damaged records go to ``quarantine``; records of
        deleted users are dropped (counted there as erased).
    """
    warm_ids: set[str] = set()
    for entries in warm.read_stored(data_dir / datadir.WARM, batch, keys=keys,
                                    quarantine=quarantine):
        warm_ids.update(e.id for e in entries)
        yield "warm", entries, 0
    for entries in cold.read_stored(data_dir / datadir.COLD, batch, keys=keys,
                                    quarantine=quarantine):
        kept = [e for e in entries if e.id not in warm_ids]
        yield "cold", kept, len(entries) - len(kept)


def _windows(batches: Iterator[list[Entry]], size: int) -> Iterator[list[Entry]]:
    """Regroups ``batches`` into windows of about ``size`` entries (fewer when their responses
    pass WINDOW_BYTES), so that a window's prompts can be sorted by length."""
    window: list[Entry] = []
    held = 0
    for batch in batches:
        window += batch
        held += sum(len(e.response) + len(e.prompt) for e in batch)
        if len(window) >= size or held >= WINDOW_BYTES:
            yield window
            window, held = [], 0
    if window:
        yield window


def reembed(encoder: Encoder, entries: Sequence[Entry], now: float,
            batch_size: int) -> Iterator[tuple[list[Entry], int]]:
    """Re-embeds ``entries`` a forward pass at a time, shortest prompts first (less padding in
    a pass); yields (the live entries with their new vectors, entries consumed), expired ones
    dropped. Vectors are computed as a Store computes them: from the normalised prompt, and a
    zero vector (exact matches only) for a prompt longer than the model reads."""
    live = sorted((e for e in entries if not e.expired(now)), key=lambda e: len(e.prompt))
    if len(live) < len(entries):
        yield [], len(entries) - len(live)
    zero = np.zeros(encoder.dimension, dtype=np.float32)
    for start in range(0, len(live), batch_size):
        chunk = live[start:start + batch_size]
        vectors = encoder.encode_whole([keys.normalise_prompt(e.prompt) for e in chunk])
        yield ([dataclasses.replace(e, vector=zero if v is None else v)
                for e, v in zip(chunk, vectors)], len(chunk))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _check_free_space(data_dir: Path, recorded: dict, identity: ModelIdentity) -> None:
    """Warns when the disk may not hold a second copy of the tiers."""
    used = _size(data_dir / datadir.WARM / "data.mdb") + _size(data_dir / datadir.COLD)
    ratio = identity.dimension / max(1, int(recorded.get("dimension") or 1))
    needed = int(used * max(1.0, ratio))
    free = shutil.disk_usage(data_dir).free
    if needed > free:
        log.warning("the new tiers may need about %.0f MiB beside the old ones, and the disk has "
                    "%.0f MiB free; if it fills up the reindex stops and the directory keeps its "
                    "old model", needed / (1 << 20), free / (1 << 20))

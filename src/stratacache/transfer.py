"""``stratacache export`` and ``stratacache import``: a data directory as a JSON Lines dump, and
back, keeping every entry's id, scope, template, user, metadata, times and tier.

    stratacache export --data-dir D > dump.jsonl          (or --output dump.jsonl)
    stratacache import --data-dir E dump.jsonl            (E is created if missing)

Both work on a data directory no server holds (they take its lock; stop the server first).
Exporting or importing through a running server is not offered.

The dump, one JSON object a line (UTF-8):

- line 1, the header: ``{"stratacache_dump": 1, "model": {"name", "dimension",
  "fingerprint"}, "stored": N, "created_at": T}``; ``stored`` counts the records the export
  read (the entries, plus expired, erased and duplicate records it left out), for progress;
- one line per entry: ``id``, ``tier`` ("warm" or "cold"), ``namespace``, ``partition`` (hex:
  the digest of namespace, scope and template that an entry must match exactly; the server
  keeps only this digest, not the scope itself), ``template_id``, ``template_version``,
  ``user_id``, ``created_at`` and ``expires_at`` (Unix seconds; null: never), ``metadata``,
  ``prompt``, ``response`` (base64) and ``vector`` (base64 of little-endian float32, the
  header's model's embedding of the normalised prompt; null or absent: embed on import), and
  ``cost`` when the entry was stored with one (``{"model", "prompt_tokens",
  "completion_tokens", "latency_s"}``, the fields it has; absent otherwise, as in dumps made
  before it existed);
- the last line, the trailer: ``{"end": {"entries": n}}``. A dump without it was cut short.

Export leaves out expired entries, and those of deleted users (their records are unreadable
by design); it logs how many. An export of an import of a dump is the same dump but for the
header's ``created_at``.

Import reads the dump ``--batch-size`` lines at a time. A line's vector is used as it is when
the dump's model is the directory's (same dimension and weights fingerprint); otherwise (or
for a line without one) the prompt is embedded with the directory's model, as a Store would.
Each batch is committed durably, one transaction per tier, into the tier the line names. An
entry whose id is already in the directory is skipped, and so is an entry older than the one
that already holds its exact key (a newer one replaces it, as a Store does); expired entries
are skipped. After each commit, the byte offset reached is written to
``D/import-<dump digest>.progress``: an interrupted import, run again on the same file,
continues from there (entries of a batch committed after the offset was last written are
skipped by id, so nothing is ever imported twice). A dump read from standard input cannot be
resumed that way, but is still skipped by id on a rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import lmdb
import numpy as np

from . import config, datadir, keys, prices, reindex, validation
from .datadir import DataDir
from .embed import Encoder, ModelIdentity
from .errors import CacheError, DataDirMismatch, InvalidArgument
from .keyring import KeyRing
from .messages import StoreRequest
from .records import AnswerCost, Entry
from .tiers.base import Filter, Quarantine
from .tiers.cold import ColdTier, count_stored as cold_count
from .tiers.warm import WarmTier, count_stored as warm_count

log = logging.getLogger("stratacache.transfer")

#: The dump format this version writes and reads.
DUMP_FORMAT = 1
#: Lines read (and entries committed) per batch on import.
DEFAULT_BATCH_SIZE = 1024
#: A dump line longer than the server's largest message cannot hold an entry a server took.
MAX_LINE_BYTES = config.DEFAULT_MAX_MESSAGE_BYTES
#: Bytes the warm tier's map may grow by when the dump's size is unknown (standard input).
STDIN_WARM_BYTES = 64 << 30
#: Bad lines logged one by one with --skip-bad; past this, only counted.
BAD_LINES_LOGGED = 10
#: A stored vector must be unit length (or zero: a prompt too long to embed) within this.
_NORM_TOLERANCE = 1e-3
_TIERS = ("warm", "cold")


class BadDump(InvalidArgument):
    """The dump is malformed: its header, a line (the message names it), or its end."""


@dataclass(frozen=True)
class ExportOutcome:
    entries: int = 0  # written
    expired: int = 0  # left out
    erased: int = 0  # records of deleted users, left out
    damaged: int = 0  # unreadable records, set aside in the quarantine folder
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ImportOutcome:
    """What an import did; counted as it goes."""

    lines: int = 0  # entry lines read by this run
    imported: int = 0  # written
    present: int = 0  # skipped: the id was already in the directory
    superseded: int = 0  # skipped: a newer entry holds the exact key
    expired: int = 0  # skipped
    bad: int = 0  # skipped with --skip-bad
    embedded: int = 0  # of the imported, embedded here (not the dump's vector)
    resumed_at: int = 0  # byte offset this run started from (0: the beginning)
    complete: bool = False  # the dump's trailer was reached (and its count matched)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.lines / self.seconds if self.seconds > 0 else 0.0


# --- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of ``stratacache export`` or ``stratacache import`` (whichever
    ``parser.prog`` ends with) to ``parser``; every flag's help states its default."""
    command = parser.prog.split()[-1]
    if command not in ("export", "import"):
        raise ValueError(f"transfer.add_arguments: parser {parser.prog!r} is neither export nor "
                         "import")
    parser.set_defaults(transfer=command)
    env = os.environ.get
    data_dir = env("STRATACACHE_DATA_DIR", config.DEFAULT_DATA_DIR)
    log_level = env("STRATACACHE_LOG_LEVEL", "info")
    if command == "export":
        parser.add_argument(
            "--data-dir", type=Path, default=data_dir,
            help="data directory to export (stop its server first: export takes its lock) [env "
                 "STRATACACHE_DATA_DIR] (default: %(default)s)")
        parser.add_argument(
            "--output", "-o", type=Path, default=None,
            help="file to write the dump to, replaced if it exists (default: standard output)")
    else:
        parser.add_argument(
            "dump", help="the dump to import (from `stratacache export`), or - for standard "
                         "input (not resumable from a checkpoint: a rerun reads it all again, "
                         "skipping the entries already imported)")
        parser.add_argument(
            "--data-dir", type=Path, default=data_dir,
            help="data directory to import into, created if missing (no server may hold it) "
                 "[env STRATACACHE_DATA_DIR] (default: %(default)s)")
        parser.add_argument(
            "--model", default=env("STRATACACHE_MODEL", config.DEFAULT_MODEL),
            help="the embedding model of a new data directory, and the model that re-embeds "
                 "prompts when the dump's model is not the directory's (it must then be the "
                 "directory's model): a sentence-transformers model folder, or 'default'; not "
                 "loaded when the dump's vectors can be used [env STRATACACHE_MODEL] "
                 "(default: %(default)s)")
        parser.add_argument(
            "--device", default=env("STRATACACHE_DEVICE", config.DEFAULT_DEVICE),
            help="embedding device: auto, cpu, cuda, cuda:N [env STRATACACHE_DEVICE] "
                 "(default: %(default)s)")
        parser.add_argument(
            "--batch-size", type=reindex.positive_int, default=DEFAULT_BATCH_SIZE,
            help="lines read and entries committed per transaction; an interruption loses at "
                 "most one batch of work (default: %(default)s)")
        parser.add_argument(
            "--embed-batch-size", type=reindex.positive_int, default=reindex.DEFAULT_BATCH_SIZE,
            help="prompts per embedding pass, when re-embedding (default: %(default)s)")
        parser.add_argument(
            "--skip-bad", action="store_true",
            help="skip malformed lines (counted; the first few logged with their line "
                 "numbers) instead of stopping at the first one with exit status 2, the "
                 "entries before it committed (default: off)")
    parser.add_argument(
        "--log-level", default=log_level,
        help="debug, info, warning or error [env STRATACACHE_LOG_LEVEL] (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """``stratacache export`` / ``import``: 0 when done, 2 on an error (logged), 130 when
    interrupted."""
    try:
        if args.transfer == "export":
            if args.output is None:
                export(args.data_dir, sys.stdout.buffer)
            else:
                _export_to_file(args.data_dir, args.output)
        else:
            outcome = import_dump(
                args.data_dir, None if args.dump == "-" else Path(args.dump), model=args.model,
                device=args.device, batch_size=args.batch_size,
                embed_batch_size=args.embed_batch_size, skip_bad=args.skip_bad)
            if not outcome.complete:
                return 2
    except (CacheError, OSError, sqlite3.Error, lmdb.Error) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted%s", "" if args.transfer == "export" else
                  ": run the same import again to continue from the last committed batch")
        return 130
    return 0


def _export_to_file(data_dir: Path, output: Path) -> None:
    """Exports into ``output`` through a temporary file beside it: a failed export never leaves
    a dump that looks whole (nor destroys the one there)."""
    partial = output.with_name(output.name + ".partial")
    try:
        with open(partial, "wb") as out:
            export(data_dir, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


# --- export ------------------------------------------------------------------------------------

def export(data_dir: Path, out: IO[bytes], *, batch_size: int = reindex.DEFAULT_BATCH_SIZE,
           progress: bool = True) -> ExportOutcome:
    """Writes the dump of ``data_dir`` to ``out`` (see the module docstring).

    Args:
        data_dir: a data directory no server holds.
        out: a binary stream.
        batch_size: records read at a time.
        progress: a progress bar on standard error.

    Returns:
        What was written and left out.

    Raises:
        DataDirMismatch: a server (or a reindex, or an import) holds the directory, or it is not
            a stratacache data directory of a format this version reads.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    recorded = _existing_manifest(data_dir, "export")
    lock = datadir.lock(data_dir, "stop it before exporting (export reads the tiers' files "
                                  "directly), then run the export again")
    try:
        datadir.finish_reindex(data_dir)  # a committed reindex is finished before it is read
        recorded = datadir.read_manifest(data_dir) or recorded
        _check_format(data_dir, recorded)
        stored = (warm_count(data_dir / datadir.WARM) + cold_count(data_dir / datadir.COLD))
        now = time.time()
        out.write(_line({"stratacache_dump": DUMP_FORMAT, "model": {
            "name": recorded.get("model"), "dimension": recorded.get("dimension"),
            "fingerprint": recorded.get("fingerprint")}, "stored": stored, "created_at": now}))
        written = expired = 0
        quarantine = Quarantine(data_dir / datadir.QUARANTINE)
        with KeyRing(data_dir / datadir.KEYS) as key_ring, tqdm(
                total=stored, unit="entry", desc="exporting", dynamic_ncols=True,
                disable=not progress) as bar:
            for tier, entries, duplicates in reindex.stored_entries(
                    data_dir, batch_size, keys=key_ring, quarantine=quarantine):
                lines = [_dump_line(e, tier) for e in entries if not e.expired(now)]
                out.write(b"".join(lines))
                written += len(lines)
                expired += len(entries) - len(lines)
                bar.update(len(entries) + duplicates)
        out.write(_line({"end": {"entries": written}}))
        out.flush()
    finally:
        lock.close()
    outcome = ExportOutcome(entries=written, expired=expired, erased=quarantine.erased,
                            damaged=quarantine.damaged, seconds=time.perf_counter() - started)
    log.info("exported %d entries in %.1f s (%.0f entries/s); left out: %d expired, %d of "
             "deleted users, %d damaged (set aside in %s)", outcome.entries, outcome.seconds,
             outcome.rate, expired, outcome.erased, outcome.damaged, quarantine.directory)
    return outcome


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dump_line(e: Entry, tier: str) -> bytes:
    line = {
        "id": e.id, "tier": tier, "namespace": e.namespace, "partition": e.partition.hex(),
        "template_id": e.template_id, "template_version": e.template_version,
        "user_id": e.user_id, "created_at": e.created_at, "expires_at": e.expires_at,
        "metadata": dict(sorted(e.metadata.items())), "prompt": e.prompt,
        "response": _b64(e.response),
        "vector": _b64(np.ascontiguousarray(e.vector, dtype="<f4").tobytes())}
    if e.cost is not None:
        line["cost"] = e.cost.to_json()
    return _line(line)


def _existing_manifest(data_dir: Path, what: str) -> dict:
    recorded = datadir.read_manifest(data_dir) if data_dir.is_dir() else None
    if recorded is None:
        raise DataDirMismatch(
            f"{str(data_dir)!r} is not a stratacache data directory (it has no "
            f"{datadir.MANIFEST}): nothing to {what}. Check --data-dir.")
    return recorded


def _check_format(data_dir: Path, recorded: dict) -> None:
    if recorded.get("format") != datadir.FORMAT_VERSION:
        raise DataDirMismatch(
            f"data directory {str(data_dir)!r} has format {recorded.get('format')}, this "
            f"version reads format {datadir.FORMAT_VERSION}: use a matching stratacache version")


# --- import ------------------------------------------------------------------------------------

@dataclass
class _Line:
    number: int  # 1-based, in the file
    end: int  # byte offset just past it
    tier: str
    entry: Entry  # with an empty vector when it must be embedded here


def import_dump(data_dir: Path, dump: Path | None, *, model: str = config.DEFAULT_MODEL,
                device: str = config.DEFAULT_DEVICE, batch_size: int = DEFAULT_BATCH_SIZE,
                embed_batch_size: int = reindex.DEFAULT_BATCH_SIZE, skip_bad: bool = False,
                encoder: Encoder | None = None, progress: bool = True,
                on_commit: Callable[[int], None] | None = None) -> ImportOutcome:
    """Imports ``dump`` into ``data_dir`` (see the module docstring).

    Args:
        data_dir: the data directory, created for ``model`` if missing; no server may hold it.
        dump: the dump file; None reads standard input (no checkpoint).
        model: the model of a new directory, and the one that re-embeds when needed.
        encoder: ``model`` already loaded (``model`` then only names it in messages).
        batch_size: lines per batch (one commit per tier).
        embed_batch_size: prompts per embedding pass.
        skip_bad: count and skip malformed lines instead of stopping at the first.
        progress: a progress bar on standard error.
        on_commit: called with the byte offset reached after each committed batch (for tests:
            an exception raised there interrupts the import just after a commit).

    Returns:
        What this run did; ``complete`` is False when the dump has no trailer (cut short: what
        it holds is imported, and the error logged).

    Raises:
        BadDump: the header is malformed, or a line is and ``skip_bad`` is off (the batches
            before it are committed and checkpointed), or the trailer's count disagrees.
        DataDirMismatch: a server holds the directory, or ``model`` is not its model when the
            dump's vectors must be re-embedded.
        InvalidArgument: the model or device does not exist.
        StorageFull: the disk is full (the batches before are committed).
    """
    started = time.perf_counter()
    stream = sys.stdin.buffer if dump is None else open(dump, "rb")
    try:
        header, header_bytes = _read_header(stream)
        digest = None if dump is None else _digest(dump)
        size = None if dump is None else dump.stat().st_size
        recorded = datadir.read_manifest(data_dir) if data_dir.is_dir() else None
        if recorded is None:
            if encoder is None:
                encoder = Encoder(model, device=device)
            identity = encoder.identity
        else:
            _check_format(data_dir, recorded)
            identity = ModelIdentity(recorded["model"], int(recorded["dimension"]),
                                     recorded["fingerprint"])
        directory = DataDir(data_dir, identity, model=model)
        try:
            return asyncio.run(_Import(
                directory, identity, header, header_bytes, stream, digest, size, model=model,
                device=device, encoder=encoder, batch_size=batch_size,
                embed_batch_size=embed_batch_size, skip_bad=skip_bad, progress=progress,
                on_commit=on_commit, started=started).run())
        finally:
            directory.close()
    finally:
        if dump is not None:
            stream.close()


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_line(stream: IO[bytes]) -> tuple[bytes | None, int]:
    """The next line (without its newline; None at the end of the stream, or when it is longer
    than MAX_LINE_BYTES: the rest of it is then read past) and the bytes consumed."""
    line = stream.readline(MAX_LINE_BYTES + 1)
    consumed = len(line)
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
        while rest := stream.readline(1 << 20):
            consumed += len(rest)
            if rest.endswith(b"\n"):
                break
        return None, consumed
    return line.rstrip(b"\r\n"), consumed


def _read_header(stream: IO[bytes]) -> tuple[dict, int]:
    """The dump's header and its length in bytes.

    Raises:
        BadDump: the first line is not a header this version reads.
    """
    raw, consumed = _read_line(stream)
    try:
        header = json.loads(raw) if raw else None
    except ValueError:
        header = None
    model = header.get("model") if isinstance(header, dict) else None
    if not isinstance(model, dict) or header.get("stratacache_dump") != DUMP_FORMAT or not (
            isinstance(model.get("dimension"), int) and isinstance(model.get("fingerprint"), str)):
        version = header.get("stratacache_dump") if isinstance(header, dict) else None
        raise BadDump(
            "line 1: not the header of a stratacache dump of format "
            f"{DUMP_FORMAT}" + (f" (it says format {version})" if version is not None else "")
            + "; give a file written by `stratacache export` of a matching version")
    return header, consumed


class _Import:
    """One import run: reads batches of lines, resolves them against the directory, commits."""

    def __init__(self, directory: DataDir, identity: ModelIdentity, header: dict,
                 header_bytes: int, stream: IO[bytes], digest: str | None, size: int | None, *,
                 model: str,
                 device: str, encoder: Encoder | None, batch_size: int, embed_batch_size: int,
                 skip_bad: bool, progress: bool, on_commit: Callable[[int], None] | None,
                 started: float) -> None:
        self.dir, self.identity, self.stream = directory, identity, stream
        self.model, self.device, self.encoder = model, device, encoder
        self.batch_size, self.embed_batch_size = batch_size, embed_batch_size
        self.skip_bad, self.progress, self.on_commit = skip_bad, progress, on_commit
        self.started = started
        dumped = header["model"]
        self.dump_model = (f"{dumped.get('name')!r} (dimension {dumped['dimension']}, weights "
                           f"{dumped['fingerprint']})")
        # The dump's vectors are the directory model's own: copy them, embed nothing.
        self.same_model = (dumped["dimension"], dumped["fingerprint"]) == (
            identity.dimension, identity.fingerprint)
        self.dump_dimension = dumped["dimension"]
        self.size, self.header_bytes = size, header_bytes
        self.checkpoint = None if digest is None else directory.path / f"import-{digest}.progress"
        self.counts = ImportOutcome()

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> ImportOutcome:
        from tqdm import tqdm

        offset, number = self._resume()
        if offset is None:
            log.info("this dump was imported into %s already (checkpoint %s): nothing to do; "
                     "delete the checkpoint to import it again", self.dir.path, self.checkpoint)
            return ImportOutcome(complete=True)
        resumed_at = 0 if offset == self.header_bytes else offset
        if resumed_at:  # only a file has a checkpoint: it can seek
            self.stream.seek(offset)
            log.info("resuming the import at line %d (byte %d), after the last committed batch "
                     "(checkpoint %s)", number + 1, offset, self.checkpoint)
        if not self.same_model:
            log.info("the dump's vectors are of model %s, the data directory's model is %r "
                     "(dimension %d, weights %s): every prompt is embedded again",
                     self.dump_model, self.identity.name, self.identity.dimension,
                     self.identity.fingerprint)
            await asyncio.to_thread(self._encoder)  # a wrong --model fails before any work
        path = self.dir.path
        key_ring = KeyRing(path / datadir.KEYS)
        quarantine = Quarantine(path / datadir.QUARANTINE)
        warm_tier = cold_tier = None
        ended = False
        try:
            # The warm map must hold what is there and what comes (vectors may grow with a
            # new model); it is address space, not disk, until written.
            existing = _size(path / datadir.WARM / "data.mdb")
            incoming = self.size if self.size is not None else STDIN_WARM_BYTES
            growth = max(1.0, self.identity.dimension / max(1, self.dump_dimension))
            warm_tier = WarmTier(path / datadir.WARM, self.identity.dimension,
                                 max_bytes=existing + int(incoming * growth), keys=key_ring,
                                 quarantine=quarantine)
            cold_tier = ColdTier(path / datadir.COLD, self.identity.dimension, keys=key_ring,
                                 quarantine=quarantine)
            with tqdm(total=self.size, initial=offset, unit="B", unit_scale=True,
                      desc="importing", dynamic_ncols=True, disable=not self.progress) as bar:
                batches = self._batches(offset, number)
                committing: asyncio.Future[None] | None = None
                while True:
                    try:
                        # The next batch is read and checked on a worker thread while the last
                        # one is committed (the tiers' own threads); commits stay in order.
                        item = await asyncio.to_thread(next, batches, None)
                    finally:
                        if committing is not None:
                            await committing
                            committing = None
                            self._save_checkpoint(offset, number, complete=False)
                            bar.update(offset - bar.n)
                            if self.on_commit is not None:
                                self.on_commit(offset)
                    if item is None:
                        break
                    batch, offset, number, ended = item
                    committing = asyncio.ensure_future(self._commit(batch, warm_tier, cold_tier))
        finally:
            for tier in (warm_tier, cold_tier):
                if tier is not None:
                    tier.close()
            key_ring.close()
        if ended:
            self._save_checkpoint(offset, number, complete=True)
        c = outcome = self.counts
        outcome.resumed_at, outcome.complete = resumed_at, ended
        outcome.seconds = time.perf_counter() - self.started
        log.info("read %d entry lines in %.1f s (%.0f lines/s): imported %d (%d embedded here); "
                 "skipped %d already present, %d older than the entry holding their exact key, "
                 "%d expired, %d bad lines", outcome.lines, outcome.seconds, outcome.rate,
                 outcome.imported, outcome.embedded, outcome.present, outcome.superseded,
                 outcome.expired, outcome.bad)
        if not ended:
            log.error("the dump ends without its trailer line: it was cut short (an export that "
                      "was interrupted, or a partial copy). Its %d entries up to line %d are "
                      "imported; import the whole dump to get the rest", c.lines, number)
        return outcome

    def _resume(self) -> tuple[int | None, int]:
        """(byte offset, lines read) to start from; offset None when already complete."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return self.header_bytes, 1
        saved = json.loads(self.checkpoint.read_text())
        if saved.get("complete"):
            return None, 0
        return int(saved["offset"]), int(saved["line"])

    def _save_checkpoint(self, offset: int, number: int, *, complete: bool) -> None:
        """Records how far the import got. Not fsync'd: a checkpoint lost in a crash only
        makes the rerun start earlier, and the entries it reads again are skipped by id."""
        if self.checkpoint is None:
            return
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offset": offset, "line": number, "complete": complete}))
        os.replace(tmp, self.checkpoint)

    def _batches(self, offset: int, number: int) -> Iterator[tuple[list[_Line], int, int, bool]]:
        """(parsed lines, byte offset after them, line number of the last, trailer reached),
        ``batch_size`` lines at a time. A bad line without skip_bad first yields the lines
        before it (so that they are committed), then raises."""
        batch: list[_Line] = []
        while True:
            raw, consumed = _read_line(self.stream)
            if not consumed:
                yield batch, offset, number, False
                return
            number += 1
            start, offset = offset, offset + consumed
            try:
                if raw is None:
                    raise BadDump(f"it is longer than {MAX_LINE_BYTES} bytes, more than any "
                                  "entry a server takes")
                obj = json.loads(raw)
                if isinstance(obj, dict) and "end" in obj:
                    self._check_end(obj, number)
                    yield batch, offset, number, True
                    return
                self.counts.lines += 1
                batch.append(self._parse(obj, number, offset))
            except (ValueError, BadDump) as exc:  # JSONDecodeError, UnicodeDecodeError
                message = f"line {number} of the dump is malformed: {exc}"
                if not self.skip_bad:
                    yield batch, start, number - 1, False
                    raise BadDump(
                        f"{message}. The entries before it are imported; fix or delete the "
                        "line and import again (entries already imported are skipped), or "
                        "import again with --skip-bad to skip such lines") from None
                self.counts.bad += 1
                if self.counts.bad <= BAD_LINES_LOGGED:
                    log.warning("skipping %s", message)
            if len(batch) >= self.batch_size:
                yield batch, offset, number, False
                batch = []

    def _check_end(self, obj: dict, number: int) -> None:
        end = obj["end"]
        entries = number - 2  # the lines between the header and the trailer
        if not isinstance(end, dict) or end.get("entries") != entries:
            raise BadDump(
                f"the trailer says {end.get('entries') if isinstance(end, dict) else end!r} "
                f"entries, but {entries} lines lie between the header and it: lines were "
                "added to or lost from the dump")
        if self.stream.read(1):
            raise BadDump("there is more after the trailer (the dump's last line)")

    def _parse(self, obj: Any, number: int, end: int) -> _Line:
        """A dump line as an Entry, every field checked as a Store checks it.

        Raises:
            BadDump, InvalidArgument (a ValueError is not: caught by the caller): what is
            wrong, naming the field.
        """
        if not isinstance(obj, dict):
            raise BadDump("it is not a JSON object")
        missing = [k for k in ("id", "namespace", "partition", "prompt", "response",
                               "created_at") if k not in obj]
        if missing:
            raise BadDump(f"it lacks {', '.join(missing)}")
        tier = obj.get("tier", "warm")
        if tier not in _TIERS:
            raise BadDump(f"tier is {tier!r}, not 'warm' or 'cold'")
        for name in ("id", "namespace", "partition", "prompt", "response"):
            if not isinstance(obj[name], str):
                raise BadDump(f"{name} is not a string")
        if not obj["namespace"]:
            raise BadDump("namespace is empty")
        for name in ("template_id", "template_version", "user_id"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise BadDump(f"{name} is neither a string nor null")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) for v in metadata.values()):
            raise BadDump("metadata is not an object of strings")
        try:
            response = binascii.a2b_base64(obj["response"], strict_mode=True)
        except (binascii.Error, ValueError):
            raise BadDump("response is not base64") from None
        try:
            cost = None if obj.get("cost") is None else AnswerCost.from_json(obj["cost"])
        except ValueError as exc:
            raise BadDump(str(exc)) from None
        try:
            validation.entry_id(obj["id"])
            request = validation.store(StoreRequest(
                prompt=obj["prompt"], response=response, namespace=obj["namespace"],
                template_id=obj.get("template_id"),
                template_version=obj.get("template_version"), user_id=obj.get("user_id"),
                metadata=metadata))
            cost = prices.checked_cost(cost)
        except InvalidArgument as exc:
            raise BadDump(str(exc)) from None
        created, expires = obj["created_at"], obj.get("expires_at")
        for name, value in (("created_at", created), ("expires_at", expires)):
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value)):
                raise BadDump(f"{name} is {value!r}, not Unix seconds")
        try:
            partition = bytes.fromhex(obj["partition"])
        except ValueError:
            partition = b""
        if len(partition) != keys.KEY_BYTES:
            raise BadDump(f"partition is not {2 * keys.KEY_BYTES} hex digits")
        vector = self._vector(obj.get("vector"))
        return _Line(number, end, tier, Entry(
            id=obj["id"], namespace=request.namespace, partition=partition,
            exact_key=keys.exact_key(partition, keys.normalise_prompt(request.prompt)),
            prompt=request.prompt, response=response, vector=vector,
            created_at=float(created), expires_at=None if expires is None else float(expires),
            template_id=request.template_id, template_version=request.template_version,
            user_id=request.user_id, metadata=metadata, cost=cost))

    def _vector(self, value: Any) -> np.ndarray:
        """The line's vector when it can be used as it is, else an empty one (embed here)."""
        if value is None or not self.same_model:
            return _NO_VECTOR
        try:
            raw = binascii.a2b_base64(value, strict_mode=True)
        except (binascii.Error, ValueError, TypeError):
            raise BadDump("vector is not base64") from None
        if len(raw) != 4 * self.identity.dimension:
            raise BadDump(f"vector has {len(raw) // 4} values; the dump's model has "
                          f"{self.identity.dimension}")
        vector = np.frombuffer(raw, dtype="<f4")
        norm = float(np.dot(vector, vector))
        if not math.isfinite(norm) or (norm and abs(norm - 1) > _NORM_TOLERANCE):
            raise BadDump("vector is not of unit length (nor zero)")
        return vector

    # --- a batch ------------------------------------------------------------------------------

    async def _commit(self, batch: list[_Line], warm_tier: WarmTier, cold_tier: ColdTier) -> None:
        """Writes the batch's new, live, newest entries: one transaction per tier."""
        if not batch:
            return
        now = time.time()
        c = self.counts
        live = [line for line in batch if not line.entry.expired(now)]
        c.expired += len(batch) - len(live)
        ids = [line.entry.id for line in live]
        present = {i for i in ids if i in warm_tier} | {
            info.id for info in await cold_tier.infos(Filter(ids=ids))}
        fresh: dict[bytes, _Line] = {}  # by exact key: the newest line of the batch
        for line in live:
            if line.entry.id in present:
                c.present += 1
                continue
            present.add(line.entry.id)  # the same id twice in a dump: the first wins
            other = fresh.get(line.entry.exact_key)
            if other is not None:
                c.superseded += 1
                if other.entry.created_at > line.entry.created_at:
                    continue
            fresh[line.entry.exact_key] = line
        # Entries already in the directory under the same exact keys: the newer one stays.
        holders = {key: ("warm", entry_id) for key in fresh
                   if (entry_id := warm_tier.exact_id(key)) is not None}
        for info in await cold_tier.infos(Filter(exact_keys=list(fresh))):
            holders.setdefault(info.exact_key, ("cold", info.id))
        tiers: dict[str, WarmTier | ColdTier] = {"warm": warm_tier, "cold": cold_tier}
        # An older holder in the tier its replacement goes to is deleted in the same
        # transaction; one in the other tier just after (a crash between leaves both, and
        # start-up keeps the newer, as after an interrupted Store).
        replaced_with: dict[str, list[str]] = {"warm": [], "cold": []}
        replaced_after: dict[str, list[str]] = {"warm": [], "cold": []}
        for key, (tier, entry_id) in holders.items():
            held = warm_tier.read(entry_id) if tier == "warm" else await cold_tier.get(entry_id)
            if held is None:
                continue
            if held.created_at >= fresh[key].entry.created_at:
                c.superseded += 1
                del fresh[key]
            else:
                (replaced_with if fresh[key].tier == tier else replaced_after)[tier].append(
                    entry_id)
        lines = list(fresh.values())
        await self._embed(lines, now)
        for tier, store in tiers.items():
            entries = [line.entry for line in lines if line.tier == tier]
            if entries:
                await store.put(entries, replacing=replaced_with[tier])
                c.imported += len(entries)
        for tier, store in tiers.items():
            if replaced_after[tier]:
                await store.remove(replaced_after[tier])

    async def _embed(self, lines: list[_Line], now: float) -> None:
        """Gives the lines without a usable vector the directory model's embedding."""
        todo = [line for line in lines if not line.entry.vector.size]
        if not todo:
            return
        encoder = await asyncio.to_thread(self._encoder)
        vectors: dict[str, np.ndarray] = {}
        for kept, _ in await asyncio.to_thread(lambda: list(reindex.reembed(
                encoder, [line.entry for line in todo], now, self.embed_batch_size))):
            vectors.update((e.id, e.vector) for e in kept)
        for line in todo:
            line.entry = dataclasses.replace(line.entry, vector=vectors[line.entry.id])
        self.counts.embedded += len(todo)

    def _encoder(self) -> Encoder:
        """The directory's model, loaded on first use and checked against the directory."""
        if self.encoder is None:
            self.encoder = Encoder(self.model, device=self.device)
        got = self.encoder.identity
        if (got.dimension, got.fingerprint) != (self.identity.dimension,
                                                self.identity.fingerprint):
            raise DataDirMismatch(
                f"the dump's vectors are of model {self.dump_model}, so its prompts must be "
                f"embedded again with the data directory's model {self.identity.name!r} "
                f"(dimension {self.identity.dimension}, weights {self.identity.fingerprint}); "
                f"--model {self.model!r} is {got.name!r} (dimension {got.dimension}, weights "
                f"{got.fingerprint}): give --model the folder of the directory's model")
        return self.encoder


_NO_VECTOR = np.zeros(0, dtype=np.float32)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0

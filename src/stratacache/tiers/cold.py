"""Cold tier: entries demoted from the warm tier, in an embedded SQLite database.

The schema keeps what queries filter on in columns (partition, exact key, namespace, template,
user, expiry) and the rest as the shared record encoding, so a shared SQL engine could back the
same table later. Vectors have their own column. A small partition (under CODES_MIN_ROWS) is
searched by reading its vectors and scanning them with the native kernel; a larger one through
compact codes (``tiers.codes``) built at start (or, for a partition that grows large later, on
its first search) and kept in step with every committed insert and delete: candidates from the
codes, the best few re-scored against their vectors read by rowid. Memory per indexed entry:
its codes (436 bytes at 384 dimensions) and its rowid (8).

One thread owns the connection: every call runs there, in order, so a search never sees a
half-applied change, and the event loop never waits on disk. WAL with synchronous=FULL: a
committed move is durable before the warm copy is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from .. import _core
from ..errors import StorageFailed, StorageFull
from ..keyring import KeyRing
from ..records import CorruptRecord, Entry, EntryInfo, Tier as TierKind, decode, encode
from . import codes
from .base import Candidate, Filter, Quarantine, return_free_memory
from .codes import CodeMatrix

T = TypeVar("T")

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    partition BLOB NOT NULL,
    exact_key BLOB NOT NULL,
    template_id TEXT,
    template_version TEXT,
    user_id TEXT,
    created_at REAL NOT NULL,
    expires_at REAL,
    size INTEGER NOT NULL,
    vector BLOB NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_partition ON entries(partition);
CREATE INDEX IF NOT EXISTS entries_exact ON entries(exact_key);
CREATE INDEX IF NOT EXISTS entries_template ON entries(namespace, template_id, template_version);
CREATE INDEX IF NOT EXISTS entries_user ON entries(user_id);
CREATE INDEX IF NOT EXISTS entries_expires ON entries(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS entries_created ON entries(created_at);
"""

_NOT_EXPIRED = "(expires_at IS NULL OR expires_at > ?)"
_INSERT = "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
#: Rows read at a time while building a partition's codes.
_BUILD_CHUNK = 8192
#: Eviction starts when the footprint passes HIGH_WATERMARK of the budget and ends at
#: LOW_WATERMARK; the WAL is checkpointed and cut back at WAL_SHARE of it.
HIGH_WATERMARK = 0.9
LOW_WATERMARK = 0.8
WAL_SHARE = 1 / 16
#: Partitions with at least this many entries are searched through codes kept in memory; a
#: smaller one is read whole from SQLite on each search (256 vectors: about 1 ms).
CODES_MIN_ROWS = 256


class ColdTier:
    """SQLite-backed entries; every method is a coroutine run on the tier's own thread.

    Args:
        path: the database file.
        dimension: vector length.
        max_bytes: budget for the database and its WAL, bytes; past HIGH_WATERMARK of it the
            oldest entries are evicted (0 = none).

    SQLite errors surface as :class:`~stratacache.errors.StorageFull` (disk full) or
    :class:`~stratacache.errors.StorageFailed`; a failed write changes nothing.
    """

    kind = TierKind.COLD

    def __init__(self, path: Path, dimension: int, *, max_bytes: int = 0,
                 keys: KeyRing | None = None, quarantine: Quarantine | None = None) -> None:
        self.dimension = dimension
        self.max_bytes = max_bytes
        self._keys = keys
        self._quarantine = quarantine or Quarantine(None)
        # Rows the tier's thread deleted on its own (damaged records), for the event loop to
        # take out of its counts.
        self._deleted_by_thread: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self._path = path
        self._wal_peak = 0  # bytes; read and written on the tier's thread only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cold")
        # Codes of the large partitions searched so far, keyed by rowid; only the tier's thread
        # reads or changes them.
        self._codes: dict[bytes, CodeMatrix] = {}
        self._coding: list[tuple[bytes, int, bytes | None]] = []  # see _transaction
        self._db = self._executor.submit(self._connect, path, max_bytes).result()
        # Per-partition entry counts, kept on the event loop, so lookups skip empty partitions
        # without a query.
        self._counts: Counter[bytes] = Counter(dict(self._sync_query(
            "SELECT partition, COUNT(*) FROM entries GROUP BY partition")))
        # Their sum, kept beside them: len() is asked on every lookup, and summing a million
        # one-entry partitions took tens of milliseconds of the event loop.
        self._entries = sum(self._counts.values())
        self.bytes = int(self._sync_query("SELECT COALESCE(SUM(size), 0) FROM entries")[0][0])
        # Codes of the large partitions now, before the server is ready: built on a first
        # search instead, a million entries' build (seconds) held every lookup of the tier past
        # its deadline. A partition that grows large later is built on its first search
        # (from CODES_MIN_ROWS entries: about a millisecond).
        self._executor.submit(self._build_large).result()

    @staticmethod
    def _connect(path: Path, max_bytes: int) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if max_bytes:
            # The WAL counts against the budget: checkpoint it, and cut the file back, once it
            # holds a small share of the budget (by default it grows to 4 MiB and stays).
            wal_bytes = max(256 << 10, int(max_bytes * WAL_SHARE))
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_bytes // page)}")
            db.execute(f"PRAGMA journal_size_limit={wal_bytes}")
        # Deleted rows are overwritten, not left in free pages: DeleteUser must erase them
        # (``scrub`` then empties the WAL, which still holds the old pages).
        db.execute("PRAGMA secure_delete=ON")
        db.executescript(_SCHEMA)
        return db

    def _sync_query(self, sql: str, *args: object) -> list[tuple]:
        return self._executor.submit(lambda: self._db.execute(sql, args).fetchall()).result()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, _storage_errors, fn, *args)
        finally:
            while not self._deleted_by_thread.empty():
                self._uncount([self._deleted_by_thread.get_nowait()])

    def __len__(self) -> int:
        return self._entries

    def count(self, partition: bytes) -> int:
        return self._counts.get(partition, 0)

    # --- reads --------------------------------------------------------------------------------

    async def get(self, entry_id: str) -> Entry | None:
        rows = await self._run(self._select, "id = ?", (entry_id,))
        return rows[0] if rows else None

    async def get_exact(self, key: bytes, now: float) -> Entry | None:
        rows = await self._run(self._select, f"exact_key = ? AND {_NOT_EXPIRED}", (key, now))
        return rows[0] if rows else None

    def _select(self, where: str, args: tuple) -> list[Entry]:
        """Matching entries; damaged records are set aside, deleted and left out."""
        entries, damaged = [], []
        for entry_id, vector, record in self._db.execute(
                f"SELECT id, vector, record FROM entries WHERE {where}", args).fetchall():
            try:
                entries.append(decode(record, vector, keys=self._keys, entry_id=entry_id))
            except CorruptRecord as exc:
                damaged.append((entry_id, bytes(record), exc))
        if damaged:
            self._quarantine.keep("cold", damaged)
            for row in self._delete([i for i, _, _ in damaged]):
                self._deleted_by_thread.put(row)
        return entries

    async def search(self, partition: bytes, query: np.ndarray, k: int,
                     now: float) -> list[Candidate]:
        count = self._counts.get(partition, 0)
        if not count:
            return []
        return await self._run(self._search, partition, count, query, k, now)

    def _search(self, partition: bytes, count: int, query: np.ndarray, k: int,
                now: float) -> list[Candidate]:
        matrix = self._codes.get(partition)
        if matrix is None and count >= CODES_MIN_ROWS:
            matrix = self._build_codes(partition, count)
        if matrix is not None:
            found = matrix.search(query, codes.rescored(k) + 8)  # room for a few expired
            return codes.exact_top_k(found, k, lambda rowids: self._vectors(rowids, now), query)
        rows = self._db.execute(
            f"SELECT id, vector FROM entries WHERE partition = ? AND {_NOT_EXPIRED}",
            (partition, now)).fetchall()
        # A damaged vector column (a wrong length) is left out here; reading the entry back
        # finds it damaged and sets it aside.
        rows = [r for r in rows if len(r[1]) == 4 * self.dimension]
        if not rows:
            return []
        matrix = np.frombuffer(b"".join(v for _, v in rows), dtype="<f4").reshape(len(rows), -1)
        idx, scores = _core.topk_ip(query, matrix, k)
        return [Candidate(rows[i][0], float(s)) for i, s in zip(idx[0], scores[0])]

    def _vectors(self, rowids: Sequence[object], now: float) -> list[tuple[str, np.ndarray]]:
        """(id, vector) of the unexpired rows among ``rowids`` with a well-formed vector."""
        rows = self._db.execute(
            f"SELECT id, vector FROM entries WHERE rowid IN ({','.join('?' * len(rowids))}) "
            f"AND {_NOT_EXPIRED}", (*rowids, now)).fetchall()
        return [(i, np.frombuffer(v, dtype="<f4")) for i, v in rows
                if len(v) == 4 * self.dimension]

    def _build_large(self) -> None:
        started = time.perf_counter()
        large = [p for p, n in self._counts.items() if n >= CODES_MIN_ROWS]
        for partition in large:
            self._build_codes(partition, self._counts[partition])
        if large:
            entries = sum(len(self._codes[p]) for p in large)
            log.info("cold tier: built the codes of %d entries in %d partitions in %.1f s "
                     "(%.0f MiB)", entries, len(large), time.perf_counter() - started,
                     sum(self._codes[p].nbytes() for p in large) / (1 << 20))

    def _build_codes(self, partition: bytes, count: int) -> CodeMatrix:
        """The partition's codes, built from its vectors (kept up to date from now on);
        ``count``: about how many it has (room is made for them at once)."""
        matrix = CodeMatrix(self.dimension, int_keys=True)
        matrix.reserve(count)
        rows = self._db.execute("SELECT rowid, vector FROM entries WHERE partition = ?",
                                (partition,))
        while chunk := rows.fetchmany(_BUILD_CHUNK):
            chunk = [r for r in chunk if len(r[1]) == 4 * self.dimension]
            if chunk:
                matrix.add([r[0] for r in chunk], np.frombuffer(
                    b"".join(r[1] for r in chunk), dtype="<f4").reshape(len(chunk), -1))
        matrix.compact()
        self._codes[partition] = matrix
        if len(matrix) > _BUILD_CHUNK:
            return_free_memory()
        return matrix

    async def infos(self, where: Filter) -> list[EntryInfo]:
        def select() -> list[EntryInfo]:
            rows = []
            for chunk in _chunks(where):
                sql, args = _where(chunk)
                rows += self._db.execute(
                    "SELECT id, namespace, partition, exact_key, expires_at, template_id, "
                    f"template_version, user_id, size FROM entries WHERE {sql}", args).fetchall()
            return [EntryInfo(*row) for row in rows]

        return await self._run(select)

    def touch(self, entry_id: str) -> None:
        """Nothing: the cold tier evicts by age, not by use (served entries move to warm)."""

    # --- writes -------------------------------------------------------------------------------

    async def put(self, entries: Sequence[Entry], *, replacing: Collection[str] = ()) -> list[str]:
        """Writes ``entries`` durably, deleting ``replacing`` in the same transaction; returns
        ids evicted to stay under ``max_bytes``. Shielded, like ``remove``: the counts kept in
        memory follow the database even when the caller is cancelled."""
        return await asyncio.shield(self._put(entries, list(replacing)))

    async def _put(self, entries: Sequence[Entry], replacing: list[str]) -> list[str]:
        rows, replaced, footprint = await self._run(self._insert, entries, replacing)
        self._uncount(replaced)
        for e, row in zip(entries, rows):
            self._counts[e.partition] += 1
            self._entries += 1
            self.bytes += row[9]
        if self.max_bytes and footprint > self.max_bytes * HIGH_WATERMARK:
            return await self._evict(footprint)
        return []

    def _footprint(self) -> int:
        """What the tier takes on disk, bytes: the database's pages in use (free pages are
        reused, so they do not grow the file) plus the largest WAL seen (a transaction, such
        as a demotion batch, grows it past its checkpoint size before it is cut back)."""
        used = self._db.execute(
            "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count(), "
            "pragma_freelist_count(), pragma_page_size()").fetchone()[0]
        wal = self._path.with_name(self._path.name + "-wal")
        self._wal_peak = max(self._wal_peak, wal.stat().st_size if wal.exists() else 0)
        return int(used) + self._wal_peak

    def _insert(self, entries: Sequence[Entry], replacing: list[str]
                ) -> tuple[list[tuple], list[tuple[str, bytes, int]], int]:
        """Inserts entries in one transaction (replacing rows with their ids, and deleting
        ``replacing``); returns the rows, (id, partition, size) of the rows deleted, and the
        footprint after (0 without a budget). Encodes here, on the tier's thread: a user's
        first record creates its key (an fsync)."""
        rows = [_row(e, self._keys) for e in entries]
        with self._transaction():
            replaced = self._delete_rows([row[0] for row in rows] + replacing)
            for row in rows:
                rowid = self._db.execute(_INSERT, row).lastrowid
                if row[2] in self._codes:
                    self._coding.append((row[2], rowid, row[10]))
        return rows, replaced, self._footprint() if self.max_bytes else 0

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction; the codes follow its inserts and deletes (queued in
        ``_coding`` as (partition, rowid, vector bytes, or None for a delete)) once it commits,
        and never if it rolls back."""
        self._coding = []
        try:
            with self._db:
                self._db.execute("BEGIN")
                yield
            changes = self._coding
        finally:
            self._coding = []
        added: dict[bytes, list[tuple[int, bytes]]] = {}
        gone: dict[bytes, list[int]] = {}
        for partition, rowid, vector in changes:
            if partition in self._codes:
                if vector is None:
                    gone.setdefault(partition, []).append(rowid)
                else:
                    added.setdefault(partition, []).append((rowid, vector))
        for partition, rowids in gone.items():
            self._codes[partition].remove(rowids)
        for partition, group in added.items():
            self._codes[partition].add([r for r, _ in group], np.frombuffer(
                b"".join(v for _, v in group), dtype="<f4").reshape(len(group), -1))
        for partition in gone.keys() - added.keys():
            if len(self._codes[partition]) < CODES_MIN_ROWS // 2:
                del self._codes[partition]  # small again: read whole on each search

    async def remove(self, ids: Collection[str]) -> list[str]:
        """Removes entries; returns the ids that were here."""
        ids = list(ids)
        if not ids:
            return []
        return await asyncio.shield(self._remove(ids))

    async def _remove(self, ids: list[str]) -> list[str]:
        removed = await self._run(self._delete, ids)
        self._uncount(removed)
        return [entry_id for entry_id, _, _ in removed]

    def _delete(self, ids: list[str]) -> list[tuple[str, bytes, int]]:
        with self._transaction():
            return self._delete_rows(ids)

    def _delete_rows(self, ids: list[str]) -> list[tuple[str, bytes, int]]:
        """Deletes rows inside the caller's transaction; returns (id, partition, size) of each
        row that existed."""
        removed = []
        for entry_id in ids:
            row = self._db.execute("DELETE FROM entries WHERE id = ? "
                                   "RETURNING partition, size, rowid", (entry_id,)).fetchone()
            if row:
                removed.append((entry_id, row[0], row[1]))
                if row[0] in self._codes:
                    self._coding.append((row[0], row[2], None))
        return removed

    def _uncount(self, removed: list[tuple[str, bytes, int]]) -> None:
        for _, partition, size in removed:
            self._counts[partition] -= 1
            self._entries -= 1
            if not self._counts[partition]:
                del self._counts[partition]
            self.bytes -= size

    async def _evict(self, footprint: int) -> list[str]:
        """Evicts the oldest entries until the footprint falls to LOW_WATERMARK of the budget."""
        # In units of the rows' sizes, which is what deleting one frees.
        over = (footprint - self.max_bytes * LOW_WATERMARK) * self.bytes / max(1, footprint)
        rows = await self._run(lambda: self._db.execute(
            "SELECT id, size FROM entries ORDER BY created_at").fetchmany(100_000))
        chosen, freed = [], 0
        for entry_id, size in rows:
            if freed >= over:
                break
            chosen.append(entry_id)
            freed += size
        return await self.remove(chosen)

    async def scrub(self) -> None:
        """Empties the WAL into the database (which overwrote deleted rows: secure_delete) and
        truncates it, so no copy of a deleted row stays in either file."""
        await self._run(lambda: self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    def file_bytes(self) -> int:
        return int(self._sync_query(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")[0][0])

    def close(self) -> None:
        self._executor.submit(self._db.close).result()
        self._executor.shutdown(wait=True)



def _storage_errors(fn: Callable[..., T], *args: object) -> T:
    """Runs ``fn`` on the tier's thread, turning SQLite's errors into the engine's."""
    try:
        return fn(*args)
    except sqlite3.Error as exc:
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise StorageFull("disk full: the cold tier (SQLite) could not write; nothing of "
                              "this call was written. Free disk space or lower "
                              "--cold-max-mib") from None
        raise StorageFailed(f"cold tier (SQLite) failed: {exc}") from exc


#: Values per ``IN (...)`` list (SQLite binds at most 32766 parameters a statement).
_IN_CHUNK = 512


def _chunks(f: Filter) -> Iterator[Filter]:
    """``f`` split so that each part's id or exact-key list fits one statement."""
    for name in ("ids", "exact_keys"):
        values = getattr(f, name)
        if values is not None and len(values) > _IN_CHUNK:
            values = list(values)
            for start in range(0, len(values), _IN_CHUNK):
                yield replace(f, **{name: values[start:start + _IN_CHUNK]})
            return
    yield f


def _where(f: Filter) -> tuple[str, tuple]:
    """``f`` as an SQL condition over ``entries`` (indexed columns) and its arguments."""
    terms, args = ["1"], []
    for column, value in (("namespace", f.namespace), ("template_id", f.template_id),
                          ("template_version", f.template_version), ("user_id", f.user_id)):
        if value is not None:
            terms.append(f"{column} = ?")
            args.append(value)
    if f.expired_by is not None:
        terms.append("expires_at IS NOT NULL AND expires_at <= ?")
        args.append(f.expired_by)
    for column, values in (("id", f.ids), ("exact_key", f.exact_keys)):
        if values is not None:
            terms.append(f"{column} IN ({','.join('?' * len(values))})")
            args.extend(values)
    return " AND ".join(terms), tuple(args)


def _row(e: Entry, keys: KeyRing | None = None) -> tuple:
    """The entry as a row of ``entries`` (column order of the schema)."""
    vector = np.ascontiguousarray(e.vector, dtype="<f4").tobytes()
    record = encode(e, with_vector=False, keys=keys)
    return (e.id, e.namespace, e.partition, e.exact_key, e.template_id, e.template_version,
            e.user_id, e.created_at, e.expires_at, len(vector) + len(record), vector, record)


# --- offline access (``stratacache reindex``): no server runs, the caller holds the lock -------

def count_stored(path: Path) -> int:
    """Entries in the cold tier's database at ``path`` (0 if there is none)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone():
            return 0
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    finally:
        db.close()


def read_stored(path: Path, batch: int, *, keys: KeyRing | None = None,
                quarantine: Quarantine | None = None) -> Iterator[list[Entry]]:
    """Every readable entry of the cold tier at ``path``, ``batch`` at a time, in insertion
    order; unreadable records go to ``quarantine`` (damaged) or are dropped (deleted users)."""
    quarantine = quarantine or Quarantine(None)
    if not path.exists():
        return
    db = sqlite3.connect(path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries'").fetchone():
            return
        rows = db.execute("SELECT id, vector, record FROM entries ORDER BY rowid")
        while chunk := rows.fetchmany(batch):
            entries, damaged = [], []
            for entry_id, vector, record in chunk:
                try:
                    entries.append(decode(record, vector, keys=keys, entry_id=entry_id))
                except CorruptRecord as exc:
                    damaged.append((entry_id, bytes(record), exc))
            quarantine.keep("cold", damaged)
            yield entries
    finally:
        db.close()  # the last connection: SQLite checkpoints the WAL and removes it


class BulkWriter:
    """Writes entries into a new cold-tier database at ``path`` (which must not exist), with
    no journal and no fsync until :meth:`close`, which makes the file durable. A database left
    half-written by a crash is garbage: only the finished, closed file may be used."""

    def __init__(self, path: Path, *, keys: KeyRing | None = None) -> None:
        if path.exists():
            raise FileExistsError(f"{path} exists")
        self.path = path
        self._keys = keys
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)

    def put(self, entries: Sequence[Entry]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(_INSERT, [_row(e, self._keys) for e in entries])
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Closes the database and flushes it to disk (ColdTier turns WAL on when it opens)."""
        self._db.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

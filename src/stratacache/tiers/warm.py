"""Warm tier: entries in LMDB on local disk, searched through compact codes kept in memory.

Writes run on one dedicated thread (LMDB allows one writer; the event loop never waits on an
fsync) and commit synchronously, so an entry written here is durable. Reads of single entries
are memory-mapped and fast enough to run on the event loop. What the tier must know about an
entry without reading it (partition, expiry, template, user, size) is kept in memory and rebuilt
from the file at start-up. So are the entries' compact codes (``tiers.codes``: 440 bytes an
entry at 384 dimensions, no float32 vector): a search finds candidates with them and re-scores
the best few against the exact vectors read back from LMDB.

The tier is bounded by ``max_bytes``, a budget for its file. What counts is the larger of an
estimate from the entries' sizes (LMDB stores values over about half a page in whole overflow
pages) and the pages the file really has in use (B-tree pages and their fill, measured after
each commit). The engine demotes the least recently used entries to the cold tier when
``over_budget()``: past HIGH_WATERMARK of the budget, down to LOW_WATERMARK, leaving the rest
for the free pages copy-on-write needs, so the file stays within the budget.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
import time
from collections.abc import Collection, Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np

from ..datadir import fsync_path
from ..errors import StorageFailed, StorageFull
from ..keyring import KeyRing
from ..records import CorruptRecord, Entry, EntryInfo, Tier as TierKind, decode, encode
from .base import Candidate, Filter, Quarantine, return_free_memory
from . import codes
from .codes import CodeMatrix

log = logging.getLogger(__name__)

_PAGE = 4096
_DB = b"entries"  # the named LMDB database holding the entries
_MIN_MAP_BYTES = 64 << 20
#: After a demotion the tier holds at most this share of its budget (hysteresis).
LOW_WATERMARK = 0.75
#: Demotion starts when the file's pages in use pass this share of the budget: the rest is room
#: for the free pages LMDB's copy-on-write keeps, so the file itself stays within the budget.
HIGH_WATERMARK = 0.85
#: Partitions with at least this many entries are searched on a worker thread (about 0.3 ms of
#: code scan), smaller ones inline: a thread hop costs more than a small scan.
OFF_LOOP_ROWS = 65536
#: Vectors stacked at a time when codes are added in bulk (at start: every entry).
_STACK_ROWS = 4096


def _stored_size(key_len: int, value_len: int) -> int:
    """Bytes LMDB spends on a record: inline on a page, or whole overflow pages."""
    if value_len > _PAGE // 2 - 64:
        return -(-(value_len + 16) // _PAGE) * _PAGE + key_len + 16
    return key_len + value_len + 16


class WarmTier:
    """LMDB-backed entries. Mutating methods are coroutines; they finish writing to disk before
    they change what lookups see (adds) or change it before writing (removes)."""

    kind = TierKind.WARM

    def __init__(self, path: Path, dimension: int, *, max_bytes: int, keys: KeyRing | None = None,
                 quarantine: Quarantine | None = None) -> None:
        self.dimension = dimension
        self.max_bytes = max_bytes
        self._keys = keys
        self._quarantine = quarantine or Quarantine(None)
        path.mkdir(parents=True, exist_ok=True)
        existing = (path / "data.mdb").stat().st_size if (path / "data.mdb").exists() else 0
        # The map must hold the budget with room for LMDB's free pages; it is virtual memory,
        # not disk, until written.
        self._map_size = max(_MIN_MAP_BYTES, 2 * max_bytes, 2 * existing)
        self._env = lmdb.open(str(path), map_size=self._map_size, max_dbs=2, sync=True,
                              metasync=True, readahead=False)
        self._db = self._env.open_db(_DB)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warm-writer")
        self._pending: list[tuple[list[tuple[bytes, bytes]], list[bytes], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed (concurrent writes share them)
        self._infos: dict[str, EntryInfo] = {}
        # Least recently used first: a dict keeps insertion order, and a touch re-inserts (an
        # OrderedDict's links cost about 50 bytes more an entry).
        self._recency: dict[str, None] = {}
        self._exact: dict[bytes, str] = {}
        self._partitions: dict[bytes, CodeMatrix] = {}
        self._partition_keys: dict[bytes, bytes] = {}  # each partition's one key object
        self.bytes = 0
        self._load()

    def _load(self) -> None:
        """Indexes every record; sets aside the damaged ones and drops those of deleted users,
        so one bad record never keeps the server from starting."""
        started = time.perf_counter()
        loaded: list[tuple[float, Entry, int]] = []
        unreadable: list[tuple[bytes, bytes, CorruptRecord]] = []
        with self._env.begin(db=self._db, buffers=True) as txn:
            for key, value in txn.cursor():
                try:  # start-up memory: no responses
                    entry = self._decode(key, value, with_response=False)
                except CorruptRecord as exc:
                    unreadable.append((bytes(key), bytes(value), exc))
                    continue
                loaded.append((entry.created_at, entry, _stored_size(len(key), len(value))))
        if unreadable:
            self._quarantine.keep("warm", [(k.decode(errors="replace"), v, e)
                                           for k, v, e in unreadable])
            self._write([([], [k for k, _, _ in unreadable], None)])
        loaded.sort(key=lambda t: t[0])
        self._index_many([(entry, size) for _, entry, size in loaded])
        if loaded:
            log.info("warm tier: loaded %d entries (%.1f MiB) in %.2f s", len(loaded),
                     self.bytes / (1 << 20), time.perf_counter() - started)
        del loaded
        return_free_memory()

    def _decode(self, key: bytes | memoryview, value: bytes | memoryview, *,
                with_response: bool = True) -> Entry:
        return decode(value, with_response=with_response, keys=self._keys,
                      entry_id=bytes(key).decode(errors="replace"))

    # --- reads (event loop) -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._infos

    def count(self, partition: bytes) -> int:
        matrix = self._partitions.get(partition)
        return len(matrix) if matrix is not None else 0

    def all_infos(self) -> Iterable[EntryInfo]:
        return self._infos.values()

    async def infos(self, where: Filter) -> list[EntryInfo]:
        return [i for i in self._infos.values() if where.matches(i)]

    def exact_id(self, key: bytes) -> str | None:
        return self._exact.get(key)

    def read(self, entry_id: str) -> Entry | None:
        """The entry read from disk (memory-mapped: cheap enough for the event loop); None if
        it is not here.

        Raises:
            StorageFailed: LMDB could not read it.
        """
        if entry_id not in self._infos:
            return None
        key = entry_id.encode()
        try:
            with self._env.begin(db=self._db, buffers=True) as txn:
                value = txn.get(key)
                if value is None:
                    return None
                try:
                    return self._decode(key, value)
                except CorruptRecord as exc:
                    damaged, error = bytes(value), exc
        except lmdb.Error as exc:
            raise StorageFailed(f"warm tier (LMDB) read failed: {exc}") from exc
        # Served as a miss from now on; the record is set aside and deleted on the writer
        # thread, in order with every other write.
        self._unindex(entry_id)
        self._quarantine.keep("warm", [(entry_id, damaged, error)])
        self._writer.submit(self._write, [([], [key], None)]).add_done_callback(_log_failure)
        return None

    async def get(self, entry_id: str) -> Entry | None:
        return self.read(entry_id)

    async def get_exact(self, key: bytes, now: float) -> Entry | None:
        entry_id = self._exact.get(key)
        entry = self.read(entry_id) if entry_id is not None else None
        return entry if entry is not None and not entry.expired(now) else None

    async def search(self, partition: bytes, query: np.ndarray, k: int,
                     now: float) -> list[Candidate]:
        """Top-``k`` of the partition by exact similarity, expired entries left out: candidates
        from the codes (large partitions searched off the event loop), the best few re-scored
        against their vectors read from LMDB.

        Raises:
            StorageFailed: LMDB could not read them.
        """
        matrix = self._partitions.get(partition)
        if matrix is None:
            return []
        want = codes.rescored(k) + 8  # room for a few expired entries
        if len(matrix) < OFF_LOOP_ROWS:
            found = matrix.search(query, want)
        else:
            # Changes meanwhile can make a key stale; what is read back below is current.
            found = await asyncio.to_thread(matrix.search, query, want)
        return codes.exact_top_k(found, k, lambda ids: self._vectors(ids, now), query)

    def _vectors(self, ids: Sequence[str], now: float) -> list[tuple[str, np.ndarray]]:
        """(id, vector) of the unexpired entries among ``ids`` that are here and readable
        (damaged ones are left to :meth:`read`, which sets them aside when one is served)."""
        live = [i for i in ids if i in self._infos and not _expired(self._infos[i], now)]
        out = []
        try:
            with self._env.begin(db=self._db, buffers=True) as txn:
                for entry_id in live:
                    value = txn.get(entry_id.encode())
                    if value is None:
                        continue
                    try:
                        out.append((entry_id, self._decode(entry_id.encode(), value,
                                                           with_response=False).vector))
                    except CorruptRecord:
                        continue
        except lmdb.Error as exc:
            raise StorageFailed(f"warm tier (LMDB) read failed: {exc}") from exc
        return out

    def touch(self, entry_id: str) -> None:
        """Marks an entry as just used (it was served from the hot tier)."""
        if self._recency.pop(entry_id, 0) is None:  # it was there (its value is None)
            self._recency[entry_id] = None  # re-inserted: now the most recently used

    def used_bytes(self) -> int:
        """Bytes of the file's pages in use (every database's B-tree and overflow pages, and
        the two meta pages): what the entries really take, without the free pages."""
        with self._env.begin() as txn:
            pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                        for s in (txn.stat(), txn.stat(self._db)))
        return (pages + 2) * self._env.stat()["psize"]

    def footprint(self) -> int:
        """What the entries take, bytes: the larger of the estimate and the pages in use."""
        return max(self.bytes, self.used_bytes())

    def over_budget(self, incoming: int = 0) -> bool:
        """Whether the entries, and ``incoming`` bytes about to be written, pass the high
        watermark."""
        return self.footprint() + incoming > self.max_bytes * HIGH_WATERMARK

    def coldest(self, limit: int, skip: Container[str] = (), incoming: int = 0) -> list[str]:
        """Up to ``limit`` least recently used ids (not in ``skip``) to move out so the tier,
        with ``incoming`` bytes about to be written, falls to its low watermark; walks no
        further than it returns."""
        footprint = self.footprint() + incoming
        # In units of the entries' estimated sizes, which is what moving one frees.
        target = (footprint - self.max_bytes * LOW_WATERMARK) * self.bytes / max(1, footprint)
        chosen, freed = [], 0
        for entry_id in self._recency:
            if freed >= target or len(chosen) >= limit:
                break
            if entry_id in skip:
                continue
            chosen.append(entry_id)
            freed += self._infos[entry_id].size
        return chosen

    # --- writes (disk on the writer thread, then memory) ---------------------------------------

    async def put(self, entries: Sequence[Entry], *, replacing: Collection[str] = ()) -> list[str]:
        """Writes ``entries`` durably (and deletes ``replacing`` in the same transaction), then
        lets lookups see them. Shielded: a cancelled caller cannot leave memory behind disk.
        Drops nothing itself: the engine demotes when ``over_budget()``.

        Raises:
            StorageFull: LMDB's map or the disk is full (nothing of this call was written).
            StorageFailed: another LMDB error (nothing of this call was written).
        """
        await asyncio.shield(self._put(entries, list(replacing)))
        return []

    async def _put(self, entries: Sequence[Entry], replacing: list[str]) -> None:
        gone = [i for i in replacing if i in self._infos]
        encoded = [(e.id.encode(), encode(e, keys=self._keys)) for e in entries] if not any(
            e.user_id for e in entries) or self._keys is None else await asyncio.to_thread(
            # A user's first record creates its key durably (an fsync): off the event loop.
            lambda: [(e.id.encode(), encode(e, keys=self._keys)) for e in entries])
        # Replaced entries stay visible until the new ones are durable: a failed write loses
        # nothing.
        await self._commit(encoded, [g.encode() for g in gone])
        self._unindex_many([i for i in gone if i in self._infos])
        self._index_many([(entry, _stored_size(len(key), len(value)))
                          for entry, (key, value) in zip(entries, encoded)])

    async def _commit(self, puts: list[tuple[bytes, bytes]], deletes: list[bytes]) -> None:
        """Applies deletes then puts durably. Group commit: writes that arrive while a
        transaction is being committed share the next one, so concurrent Stores share an fsync
        (about 7 ms each on this project's machines) instead of queueing for one each."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((puts, deletes, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._writer, self._write, batch)
                outcomes: list[BaseException | None] = [None] * len(batch)
            except Exception as exc:
                # The whole transaction rolled back: give each caller its own, so one that
                # cannot be written (a full map) does not undo the others.
                outcomes = [exc] if len(batch) == 1 else [
                    await self._write_alone(item) for item in batch]
            for (_, _, done), outcome in zip(batch, outcomes):
                if done.done():
                    continue
                if outcome is None:
                    done.set_result(None)
                else:
                    done.set_exception(outcome)

    async def _write_alone(self, item: tuple[list[tuple[bytes, bytes]], list[bytes],
                                               asyncio.Future[None]]) -> BaseException | None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, [item])
        except Exception as exc:
            return exc
        return None

    def _write(self, batch: list[tuple[list[tuple[bytes, bytes]], list[bytes], object]]) -> None:
        try:
            with self._env.begin(db=self._db, write=True) as txn:
                for puts, deletes, _ in batch:
                    for key in deletes:
                        txn.delete(key)
                    for key, value in puts:
                        txn.put(key, value)
            self.commits += 1  # only this thread writes it
        except lmdb.MapFullError:
            raise StorageFull(
                f"the warm tier's LMDB map ({self._map_size >> 20} MiB) is full; nothing of this "
                "call was written. Retry after the warm tier demotes entries to cold, or "
                "restart with a larger --warm-max-mib") from None
        except lmdb.Error as exc:
            if _disk_full(exc):
                raise StorageFull(
                    "disk full: the warm tier (LMDB) could not write; nothing of this call was "
                    "written. Free disk space or lower --warm-max-mib/--cold-max-mib") from None
            raise StorageFailed(f"warm tier (LMDB) write failed, nothing of this call was "
                                f"written: {exc}") from exc

    async def remove(self, ids: Collection[str]) -> list[str]:
        """Removes entries; returns the ids that were here.

        Raises:
            StorageFull, StorageFailed: as ``put``; the entries stay (and stay visible).
        """
        gone = [i for i in ids if i in self._infos]
        if not gone:
            return []
        sizes = {i: self._infos[i].size for i in gone}
        self._unindex_many(gone)
        try:
            await self._commit([], [g.encode() for g in gone])
        except Exception:
            # Not deleted after all: let lookups see them again, as the file still has them.
            self._index_many([(entry, sizes[entry.id]) for entry in
                              self.read_many([g for g in gone if g not in self._infos])])
            raise
        return gone

    def read_many(self, ids: Sequence[str]) -> list[Entry]:
        """The entries with these ids that are here and readable (damaged ones are set aside,
        as by :meth:`read`)."""
        return [e for e in map(self.read, ids) if e is not None]

    def _index_many(self, entries: Sequence[tuple[Entry, int]]) -> None:
        """Lets lookups see ``(entry, stored size)``s (replacing any with the same id); codes
        are added a partition at a time."""
        entries = list({e.id: (e, size) for e, size in entries}.values())  # one row an id
        self._unindex_many([e.id for e, _ in entries if e.id in self._infos])
        by_partition: dict[bytes, list[Entry]] = {}
        for entry, size in entries:
            # One namespace string and one partition key object for all the entries that have
            # them, not one each.
            partition = self._partition_keys.setdefault(entry.partition, entry.partition)
            self._infos[entry.id] = EntryInfo(
                entry.id, sys.intern(entry.namespace), partition, entry.exact_key,
                entry.expires_at, entry.template_id, entry.template_version, entry.user_id, size)
            self._recency[entry.id] = None
            self._exact[entry.exact_key] = entry.id
            self.bytes += size
            by_partition.setdefault(entry.partition, []).append(entry)
        for partition, group in by_partition.items():
            matrix = self._partitions.get(partition)
            if matrix is None:
                matrix = self._partitions[partition] = CodeMatrix(self.dimension)
            matrix.reserve(len(matrix) + len(group))
            for start in range(0, len(group), _STACK_ROWS):  # bounded temporaries
                chunk = group[start:start + _STACK_ROWS]
                matrix.add([e.id for e in chunk], np.stack([e.vector for e in chunk]))

    def _unindex(self, entry_id: str) -> None:
        self._unindex_many([entry_id])

    def _unindex_many(self, ids: Sequence[str]) -> None:
        by_partition: dict[bytes, list[str]] = {}
        for entry_id in ids:
            info = self._infos.pop(entry_id)
            del self._recency[entry_id]
            if self._exact.get(info.exact_key) == entry_id:
                del self._exact[info.exact_key]
            self.bytes -= info.size
            by_partition.setdefault(info.partition, []).append(entry_id)
        for partition, gone in by_partition.items():
            matrix = self._partitions[partition]
            matrix.remove(gone)
            if not len(matrix):
                del self._partitions[partition], self._partition_keys[partition]

    def file_bytes(self) -> int:
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._env.sync(True)
        self._env.close()


def _expired(info: EntryInfo, now: float) -> bool:
    return info.expires_at is not None and info.expires_at <= now


def _log_failure(done: "Future[None]") -> None:
    if done.exception() is not None:
        log.warning("warm tier: deleting a damaged record failed (it is set aside and no longer "
                    "served; the next start retries): %s", done.exception())


def _disk_full(exc: lmdb.Error) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)


# --- offline access (``stratacache reindex``): no server runs, the caller holds the lock -------

def _open_readonly(path: Path) -> lmdb.Environment | None:
    if not (path / "data.mdb").exists():
        return None
    return lmdb.open(str(path), readonly=True, lock=False, max_dbs=2, readahead=False,
                     map_size=max(_MIN_MAP_BYTES, (path / "data.mdb").stat().st_size))


def count_stored(path: Path) -> int:
    """Entries in the warm tier's LMDB environment at ``path`` (0 if there is none)."""
    env = _open_readonly(path)
    if env is None:
        return 0
    try:
        try:
            db = env.open_db(_DB, create=False)
        except lmdb.NotFoundError:
            return 0
        with env.begin(db=db) as txn:
            return int(txn.stat(db)["entries"])
    finally:
        env.close()


def read_stored(path: Path, batch: int, *, keys: KeyRing | None = None,
                quarantine: Quarantine | None = None) -> Iterator[list[Entry]]:
    """Every readable entry of the warm tier at ``path``, responses included, ``batch`` at a
    time, in key order, from one read transaction; unreadable records go to ``quarantine``
    (damaged) or are dropped (deleted users)."""
    quarantine = quarantine or Quarantine(None)
    env = _open_readonly(path)
    if env is None:
        return
    try:
        try:
            db = env.open_db(_DB, create=False)
        except lmdb.NotFoundError:
            return
        with env.begin(db=db) as txn:
            chunk: list[Entry] = []
            for key, value in txn.cursor():
                entry_id = bytes(key).decode(errors="replace")
                try:
                    chunk.append(decode(value, keys=keys, entry_id=entry_id))
                except CorruptRecord as exc:
                    quarantine.keep("warm", [(entry_id, bytes(value), exc)])
                if len(chunk) >= batch:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
    finally:
        env.close()


class BulkWriter:
    """Writes entries into a new warm-tier environment at ``path``, one transaction a call and
    no fsync until :meth:`close`, which makes everything durable (file and directory)."""

    def __init__(self, path: Path, map_size: int, *, keys: KeyRing | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._keys = keys
        self._map_size = max(_MIN_MAP_BYTES, map_size)
        self._env = lmdb.open(str(path), map_size=self._map_size, max_dbs=2, sync=False,
                              metasync=False, readahead=False)
        self._db = self._env.open_db(_DB)

    def put(self, entries: Sequence[Entry]) -> None:
        encoded = [(e.id.encode(), encode(e, keys=self._keys)) for e in entries]
        while True:
            try:
                with self._env.begin(db=self._db, write=True) as txn:
                    for key, value in encoded:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:  # rolled back: grow the map and write it again
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def close(self) -> None:
        """Flushes the environment to disk and closes it."""
        self._env.sync(True)
        self._env.close()
        for file in (self.path / "data.mdb", self.path / "lock.mdb", self.path):
            if file.exists():
                fsync_path(file)


"""Warm tier: entries in LMDB on local disk, searched through compact codes kept in memory.

Writes run on one dedicated thread (LMDB allows one writer; the event loop never waits on an
fsync) and commit synchronously, so an entry written here is durable. Reads of single entries
are memory-mapped and fast enough to run on the event loop. What the tier must know about an
entry without reading it is kept in memory and rebuilt from the file at start-up:

- its compact codes (``tiers.codes``: 436 bytes at 384 dimensions, no float32 vector): a search
  finds candidates with them and re-scores the best few against the exact vectors read back
  from LMDB;
- its row in a column store (numpy arrays, one row an entry, no Python object per entry): its id
  and exact key packed into 16 bytes each and found through sorted copies (:class:`_KeyIndex`),
  its scope (namespace, partition, template, user: a small int into a table of the distinct
  ones), expiry, stored size and a recency tick. Bulk calls (invalidation, expiry) scan these
  columns; demotion ranks rows by their ticks.

Memory per entry, its response excluded (that stays on disk): 516 bytes (436 of codes, 8 of the
codes' row key, 72 of columns and key indexes), plus the columns' spare capacity after growth.
``benchmarks/tier_scale.py --sizes 100000 --warm-share 1`` measures 540 to 555 bytes of the
server's memory per warm entry (1,641 when each entry had Python objects: ids, dicts, an
EntryInfo), fixed costs included.

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
import math
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import lmdb
import numpy as np

from ..datadir import fsync_path
from ..errors import StorageFailed, StorageFull
from ..keyring import KeyRing
from ..records import CorruptRecord, Entry, EntryInfo, Tier as TierKind, decode, encode
from .base import EVERYTHING, Candidate, Filter, Quarantine, return_free_memory
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
#: Records decoded at a time at start (and vectors stacked at a time when codes are added).
#: Small, so that the objects a decode makes, freed after each chunk, fill few of Python's
#: allocator arenas; a few long-lived objects among them keep whole arenas (1 MiB each)
#: resident: 4,096 at a time kept 3 arenas more, 35 bytes an entry at 100k entries.
_STACK_ROWS = 512
#: Column capacity: the least, and the growth factor (1.25x keeps the spare capacity at 12 % on
#: average).
_MIN_ROWS = 64
_GROWTH = 1.25
#: A key index sorts its recent keys in once they pass this share of its sorted ones (or
#: _MERGE_MIN): a merge is a pass over the sorted arrays (about 10 ms of the event loop at a
#: million rows), and each recent key costs about 120 bytes in a dict until then.
_MERGE_SHARE = 1 / 16
_MERGE_MIN = 1024
#: Columns of more rows than this shrink once less than a quarter of their rows is in use.
_COMPACT_ROWS = 4096
#: Rows ranked by recency at once for demotion (see WarmTier._least_recent).
_LRU_ROWS = 8192
_FREE = -1  # the scope of a free row
_FREE_TICK = np.iinfo(np.int64).max  # the tick of a free row: never among the least recent

K = TypeVar("K", bound=Hashable)


def _stored_size(key_len: int, value_len: int) -> int:
    """Bytes LMDB spends on a record: inline on a page, or whole overflow pages."""
    if value_len > _PAGE // 2 - 64:
        return -(-(value_len + 16) // _PAGE) * _PAGE + key_len + 16
    return key_len + value_len + 16


def _pack_id(entry_id: str) -> bytes | None:
    """An id the server made (32 lowercase hex digits, ``uuid4().hex``) as its 16 bytes; None
    for any other string."""
    if len(entry_id) != 32:
        return None
    try:
        packed = bytes.fromhex(entry_id)
    except ValueError:
        return None
    return packed if packed.hex() == entry_id else None  # not upper case, no spaces


def _pack_exact(key: bytes) -> bytes | None:
    return key if len(key) == 16 else None  # keys.KEY_BYTES


class _Scope(NamedTuple):
    """What entries of one kind share: every field an invalidation filters on but expiry. Its
    fields are named as EntryInfo's, so a :class:`Filter`'s scope terms evaluate on it."""

    namespace: str
    partition: bytes
    template_id: str | None
    template_version: str | None
    user_id: str | None


class _Interned(Generic[K]):
    """Small ints for values many rows share, each counted by its rows, so that a value no row
    uses any more is forgotten (memory follows the distinct values held, not those ever seen)."""

    def __init__(self) -> None:
        self.values: list[K | None] = []  # by code; None: a free code
        self._codes: dict[K, int] = {}
        self._uses: list[int] = []
        self._free: list[int] = []

    def code(self, value: K) -> int:
        """The value's code, counting one more row that uses it."""
        code = self._codes.get(value)
        if code is None:
            code = self._free.pop() if self._free else len(self.values)
            if code == len(self.values):
                self.values.append(value)
                self._uses.append(0)
            else:
                self.values[code] = value
            self._codes[value] = code
        self._uses[code] += 1
        return code

    def release(self, codes: np.ndarray) -> None:
        """Counts one row fewer for each of ``codes``."""
        for code, rows in zip(*(a.tolist() for a in np.unique(codes, return_counts=True))):
            self._uses[code] -= rows
            if not self._uses[code]:
                del self._codes[self.values[code]]  # type: ignore[arg-type]
                self.values[code] = None
                self._free.append(code)


class _KeyIndex(Generic[K]):
    """The row holding a key, for one key of each row (an entry's id, or its exact key), with
    no Python object per row.

    A key that packs into 16 bytes (every id the server makes, every exact key) is kept in a
    column, ``keys``, as two little-endian uint64. The first 4 bytes ("tags") of the rows keyed
    so far, sorted with their rows, are searched with ``np.searchsorted`` (8 bytes a row; keys
    are uniform hashes or random ids, so an equal tag of another key is rare, and checked);
    rows keyed since wait in a dict (whose rows always hold their key: :meth:`release` takes
    them out) until they are _MERGE_SHARE of the sorted ones, then are merged in. Other keys
    (ids not made by the server: tests, hand-written dumps) are kept in two plain dicts.

    Several rows may hold one key (an interrupted replacing Store, until start-up resolves it):
    :meth:`find` returns the one keyed last that still holds it. A sorted row that no longer
    holds its key (freed by the owner, ``live`` says, or now holding another key) is skipped by
    :meth:`find` and dropped at a merge once they are an eighth of the sorted rows.
    """

    def __init__(self, live: Callable[[np.ndarray | int], np.ndarray | bool],
                 pack: Callable[[K], bytes | None], unpack: Callable[[bytes], K]) -> None:
        self.keys = np.zeros((0, 2), dtype="<u8")
        self._tags = np.empty(0, dtype="<u4")
        self._rows = np.empty(0, dtype=np.int32)
        self._recent: dict[bytes, int] = {}
        self._stale = 0  # sorted rows freed since they were last dropped
        self._odd: dict[K, int] = {}
        self._odd_keys: dict[int, K] = {}
        self._live, self._pack, self._unpack = live, pack, unpack

    def find(self, key: K) -> int | None:
        """The live row holding ``key`` (the one keyed last), or None."""
        packed = self._pack(key)
        if packed is None:
            return self._odd.get(key)
        row = self._recent.get(packed)
        if row is not None:
            return row
        tag = np.frombuffer(packed, dtype="<u4", count=1)[0]
        i = int(np.searchsorted(self._tags, tag))
        while i < len(self._tags) and self._tags[i] == tag:
            row = int(self._rows[i])
            if self._live(row) and row not in self._odd_keys and self.keys[row].tobytes() == packed:
                return row
            i += 1
        return None

    def key(self, row: int) -> K:
        """The key of a live row."""
        odd = self._odd_keys.get(row)
        return odd if odd is not None else self._unpack(self.keys[row].tobytes())

    def keys_of(self, rows: np.ndarray) -> list[K]:
        """The keys of live ``rows``, in their order."""
        packed = self.keys[rows].tobytes()
        keys = [self._unpack(packed[i:i + 16]) for i in range(0, len(packed), 16)]
        if self._odd_keys:
            for i, row in enumerate(rows.tolist()):
                if row in self._odd_keys:
                    keys[i] = self._odd_keys[row]
        return keys

    def holding(self, keys: Collection[K], rows: int) -> np.ndarray:
        """Which of rows 0..``rows``-1 hold one of ``keys`` (the caller masks out free rows)."""
        mask = np.zeros(rows, dtype=bool)
        packed = set()
        for key in keys:
            p = self._pack(key)
            if p is not None:
                packed.add(p)
            elif (row := self._odd.get(key)) is not None:
                mask[row] = True
        if packed:
            tags = np.frombuffer(b"".join(packed), dtype="<u4")[::4]
            for row in np.flatnonzero(np.isin(self._tag(slice(0, rows)), tags)).tolist():
                if row not in self._odd_keys and self.keys[row].tobytes() in packed:
                    mask[row] = True
        return mask

    def add(self, rows: np.ndarray, keys: Sequence[K], *, sort_later: bool = False) -> None:
        """Keys newly allocated ``rows``; ``sort_later``: only their column is written, and
        :meth:`sort` must follow before the next :meth:`find` (a bulk load)."""
        packed = [self._pack(k) for k in keys]
        held = [(row, p) for row, p in zip(rows.tolist(), packed) if p is not None]
        if held:
            self.keys[[row for row, _ in held]] = np.frombuffer(
                b"".join(p for _, p in held), dtype="<u8").reshape(-1, 2)
        for row, key, p in zip(rows.tolist(), keys, packed):
            if p is None:
                self._odd[key], self._odd_keys[row] = row, key
            elif not sort_later:
                if p in self._recent:
                    # A second live row with this key: the first goes to the sorted part, so
                    # that whichever leaves first, the other is still found.
                    self._merge()
                self._recent[p] = row
        if len(self._recent) > max(_MERGE_MIN, len(self._tags) * _MERGE_SHARE):
            self._merge()

    def release(self, rows: np.ndarray) -> None:
        """Forgets ``rows`` (the owner is freeing them)."""
        for row in rows.tolist():
            odd = self._odd_keys.pop(row, None)
            if odd is not None:
                if self._odd.get(odd) == row:
                    del self._odd[odd]
                continue
            packed = self.keys[row].tobytes()
            if self._recent.get(packed) == row:
                del self._recent[packed]
            else:
                self._stale += 1  # a sorted row, dropped at a merge once there are enough

    def sort(self, rows: np.ndarray) -> None:
        """Indexes exactly ``rows`` (their keys written by :meth:`add`), the last keyed first."""
        if self._odd_keys:
            rows = rows[~np.isin(rows, list(self._odd_keys))]
        tags = self._tag(rows)
        order = np.argsort(tags, kind="stable")
        self._tags, self._rows = tags[order], rows[order].astype(np.int32)
        self._recent, self._stale = {}, 0

    def _merge(self) -> None:
        # About 10 ms at a million sorted rows (a pass over them, and an insert), so rarely:
        # every _MERGE_SHARE of them keyed anew.
        recent = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        again = np.zeros(len(self.keys), dtype=bool)
        again[recent] = True
        keep = ~again[self._rows]  # a row keyed again is listed once, from the recent ones
        if self._stale > len(self._rows) // 8:  # drop rows that no longer hold their key
            keep &= self._live(self._rows) & (self._tag(self._rows) == self._tags)
            self._stale = 0
        tags, rows = self._tags[keep], self._rows[keep]
        recent = recent[::-1]  # the last keyed first among equal tags, as in sort()
        new_tags = self._tag(recent)
        order = np.argsort(new_tags, kind="stable")
        at = np.searchsorted(tags, new_tags[order])  # before the older rows of an equal tag
        self._tags = np.insert(tags, at, new_tags[order])
        self._rows = np.insert(rows, at, recent[order].astype(np.int32))
        self._recent = {}

    def _tag(self, rows: slice | np.ndarray) -> np.ndarray:
        return self.keys.view("<u4")[rows, 0]

    def reshape(self, capacity: int, kept: slice | np.ndarray,
                renumbered: np.ndarray | None = None) -> None:
        """Gives the column ``capacity`` rows holding the ``kept`` ones; ``renumbered``
        (old row -> new row, -1: gone) when the owner renumbers its rows."""
        keys = np.zeros((capacity, 2), dtype="<u8")
        old = self.keys[kept]
        keys[:len(old)] = old
        self.keys = keys
        if renumbered is None:
            return
        rows = renumbered[self._rows]
        self._tags, self._rows = self._tags[rows >= 0], rows[rows >= 0].astype(np.int32)
        self._recent = {k: int(renumbered[r]) for k, r in self._recent.items()}
        self._odd = {k: int(renumbered[r]) for k, r in self._odd.items()}
        self._odd_keys = {int(renumbered[r]): k for r, k in self._odd_keys.items()}


class WarmTier:
    """LMDB-backed entries. Mutating methods are coroutines; they finish writing to disk before
    they change what lookups see (adds) or change it before writing (removes). Everything in
    memory is read and changed on the event loop, except the codes of a large partition, which
    a search reads from a worker thread (what it returns is checked on the loop)."""

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
        # The column store: rows 0.._high-1 have been handed out; a free one (its scope _FREE)
        # is on the _free stack. Ticks grow with each add and touch: the least recently used
        # row has the smallest.
        self._high = 0
        self._renumberings = 0  # compactions so far: each gives rows new numbers
        self._count = 0
        self._clock = 0
        self._scope = np.full(0, _FREE, dtype=np.int32)
        self._expires = np.empty(0, dtype=np.float64)  # Unix seconds; NaN: never
        # LMDB values are under 4 GiB, and gRPC messages far smaller.
        self._size = np.zeros(0, dtype=np.uint32)
        self._tick = np.empty(0, dtype=np.int64)
        self._free = np.empty(0, dtype=np.int32)
        self._nfree = 0
        self._scopes: _Interned[_Scope] = _Interned()
        self._ids: _KeyIndex[str] = _KeyIndex(self._live, _pack_id, bytes.hex)
        self._exact: _KeyIndex[bytes] = _KeyIndex(self._live, _pack_exact, bytes)
        self._lru: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64))
        self._partitions: dict[bytes, CodeMatrix] = {}  # codes keyed by row
        self.bytes = 0
        self._load()

    def _load(self) -> None:
        started = time.perf_counter()
        self._index_file()
        if self._count:
            log.info("warm tier: loaded %d entries (%.1f MiB) in %.2f s", self._count,
                     self.bytes / (1 << 20), time.perf_counter() - started)
        return_free_memory()  # after _index_file's temporaries are gone

    def _index_file(self) -> None:
        """Indexes every record; sets aside the damaged ones and drops those of deleted users,
        so one bad record never keeps the server from starting. Decodes a chunk at a time and
        keeps only what the tier holds of it: no per-entry object outlives the load (they would
        pin the heap pages around them)."""
        unreadable: list[tuple[bytes, bytes, CorruptRecord]] = []
        staged: dict[bytes, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        with self._env.begin(db=self._db, buffers=True) as txn:
            total = txn.stat(self._db)["entries"]
            self._reshape(max(_MIN_ROWS, total))
            created = np.empty(total, dtype=np.float64)
            chunk: list[tuple[Entry, int]] = []
            for key, value in txn.cursor():
                try:  # start-up memory: no responses
                    chunk.append((self._decode(key, value, with_response=False),
                                  _stored_size(len(key), len(value))))
                except CorruptRecord as exc:
                    unreadable.append((bytes(key), bytes(value), exc))
                if len(chunk) == _STACK_ROWS:
                    self._load_chunk(chunk, created, staged)
                    chunk = []
            self._load_chunk(chunk, created, staged)
            # Freed now, not at return: what is allocated below would pin the pages they use.
            del chunk
        if unreadable:
            self._quarantine.keep("warm", [(k.decode(errors="replace"), v, e)
                                           for k, v, e in unreadable])
            self._write([([], [k for k, _, _ in unreadable], None)])
        while staged:
            # Each matrix allocated once at its size: grown step by step, the copies it left
            # behind stayed resident as heap holes.
            partition, parts = staged.popitem()
            matrix = self._partitions[partition] = CodeMatrix(self.dimension, int_keys=True)
            matrix.reserve(sum(len(rows) for rows, _, _ in parts))
            for rows, bits, values in parts:
                matrix.add_codes(rows, bits, values)
        # Recency from creation: uses are not kept across a restart.
        order = np.argsort(created[:self._high], kind="stable")
        self._tick[order] = np.arange(self._high)
        self._clock = self._high
        for index in (self._ids, self._exact):
            index.sort(order[::-1])  # of entries with one exact key, the newest is found

    def _load_chunk(self, chunk: list[tuple[Entry, int]], created: np.ndarray,
                    staged: dict[bytes, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> None:
        """Indexes decoded ``(entry, stored size)``s at start-up: their creation times go to
        ``created`` (by row), their codes to ``staged`` (by partition)."""
        rows = self._index_many(chunk, loading=True)
        created[rows] = [e.created_at for e, _ in chunk]
        for partition, at, group in _by_partition(rows, [e for e, _ in chunk]):
            staged.setdefault(partition, []).append(
                (at, *codes.encode(np.stack([e.vector for e in group]))))

    def _decode(self, key: bytes | memoryview, value: bytes | memoryview, *,
                with_response: bool = True) -> Entry:
        return decode(value, with_response=with_response, keys=self._keys,
                      entry_id=bytes(key).decode(errors="replace"))

    # --- reads (event loop) -------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, entry_id: str) -> bool:
        return self._ids.find(entry_id) is not None

    def count(self, partition: bytes) -> int:
        matrix = self._partitions.get(partition)
        return len(matrix) if matrix is not None else 0

    def all_infos(self) -> Iterator[EntryInfo]:
        """What the tier knows of each entry, built _STACK_ROWS at a time (about 1 us an entry:
        prefer :meth:`infos` with a filter, or :meth:`expiring`)."""
        rows = np.flatnonzero(self._scope[:self._high] != _FREE)
        for start in range(0, len(rows), _STACK_ROWS):
            yield from self._infos(rows[start:start + _STACK_ROWS])

    async def infos(self, where: Filter) -> list[EntryInfo]:
        return self._infos(np.flatnonzero(self._matching(where)))

    def _infos(self, rows: np.ndarray) -> list[EntryInfo]:
        """EntryInfo of the ``rows`` that still hold an entry (a caller iterating
        :meth:`all_infos` may have changed the tier meanwhile)."""
        rows = rows[rows < self._high]
        rows = rows[self._scope[rows] != _FREE]
        scopes = [self._scopes.values[c] for c in self._scope[rows].tolist()]
        return [EntryInfo(i, s.namespace, s.partition, x, None if math.isnan(t) else t,
                          s.template_id, s.template_version, s.user_id, size)
                for i, x, s, t, size in zip(self._ids.keys_of(rows), self._exact.keys_of(rows),
                                            scopes, self._expires[rows].tolist(),
                                            self._size[rows].tolist())]

    def _matching(self, where: Filter) -> np.ndarray:
        """Which rows ``where`` matches (a mask over rows 0.._high-1): one vectorised pass over
        the columns; its scope terms are evaluated once per distinct scope."""
        high = self._high
        scopes = self._scope[:high]
        terms = replace(where, expired_by=None, ids=None, exact_keys=None)  # the scope's
        if terms == EVERYTHING:
            mask = scopes != _FREE
        else:
            wanted = [c for c, s in enumerate(self._scopes.values)
                      if s is not None and terms.matches(s)]  # type: ignore[arg-type]
            mask = np.isin(scopes, wanted)
        if where.expired_by is not None:
            mask &= self._expires[:high] <= where.expired_by  # NaN (never): False
        if where.ids is not None:
            mask &= self._ids.holding(where.ids, high)
        if where.exact_keys is not None:
            mask &= self._exact.holding(where.exact_keys, high)
        return mask

    def expiring(self) -> list[tuple[float, str]]:
        """(expiry, id) of every entry with a TTL (one pass over the columns)."""
        rows = np.flatnonzero(~np.isnan(self._expires[:self._high])
                              & (self._scope[:self._high] != _FREE))
        return list(zip(self._expires[rows].tolist(), self._ids.keys_of(rows)))

    def recency(self) -> list[str]:
        """Every id, the least recently used first (a full sort: for tests and tools)."""
        rows = np.flatnonzero(self._scope[:self._high] != _FREE)
        return self._ids.keys_of(rows[np.argsort(self._tick[rows])])

    def _live(self, rows: np.ndarray | int) -> np.ndarray | bool:
        return self._scope[rows] != _FREE

    def exact_id(self, key: bytes) -> str | None:
        row = self._exact.find(key)
        return self._ids.key(row) if row is not None else None

    def read(self, entry_id: str) -> Entry | None:
        """The entry read from disk (memory-mapped: cheap enough for the event loop); None if
        it is not here.

        Raises:
            StorageFailed: LMDB could not read it.
        """
        if entry_id not in self:
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
        self._unindex_many([entry_id])
        self._quarantine.keep("warm", [(entry_id, damaged, error)])
        self._writer.submit(self._write, [([], [key], None)]).add_done_callback(_log_failure)
        return None

    async def get(self, entry_id: str) -> Entry | None:
        return self.read(entry_id)

    async def get_exact(self, key: bytes, now: float) -> Entry | None:
        entry_id = self.exact_id(key)
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
            # Rows may change meanwhile: _vectors keeps those that still hold an entry of the
            # partition, and what it reads back is current. A compaction meanwhile renumbers
            # every row, so the rows found may now be other entries' (never served wrongly,
            # but the best could be missed): search again, here, on the new numbers.
            renumberings = self._renumberings
            found = await asyncio.to_thread(matrix.search, query, want)
            if self._renumberings != renumberings:
                matrix = self._partitions.get(partition)
                if matrix is None:
                    return []
                found = matrix.search(query, want)
        return codes.exact_top_k(found, k, lambda rows: self._vectors(rows, partition, now),
                                 query)

    def _vectors(self, rows: Sequence[int], partition: bytes,
                 now: float) -> list[tuple[str, np.ndarray]]:
        """(id, vector) of the unexpired entries of ``partition`` in ``rows`` that are readable
        (damaged ones are left to :meth:`read`, which sets them aside when one is served)."""
        held = [self._ids.key(r) for r in rows if self._holds(r, partition, now)]
        return [(entry_id, entry.vector) for entry_id, entry in self._read_records(held)]

    def _read_records(self, ids: Iterable[str]) -> list[tuple[str, Entry]]:
        """(id, entry without its response) of the ``ids`` the file has and can read (damaged
        ones are left to :meth:`read`, which sets them aside when one is served).

        Raises:
            StorageFailed: LMDB could not read them.
        """
        out = []
        try:
            with self._env.begin(db=self._db, buffers=True) as txn:
                for entry_id in ids:
                    key = entry_id.encode()
                    value = txn.get(key)
                    if value is None:
                        continue
                    try:
                        out.append((entry_id, self._decode(key, value, with_response=False)))
                    except CorruptRecord:
                        continue
        except lmdb.Error as exc:
            raise StorageFailed(f"warm tier (LMDB) read failed: {exc}") from exc
        return out

    def _holds(self, row: int, partition: bytes, now: float) -> bool:
        """Whether ``row`` holds an unexpired entry of ``partition``."""
        if row >= self._high or self._scope[row] == _FREE:
            return False
        scope = self._scopes.values[self._scope[row]]
        return scope is not None and scope.partition == partition and not self._expires[row] <= now

    def touch(self, entry_id: str) -> None:
        """Marks an entry as just used (it was served from the hot tier)."""
        row = self._ids.find(entry_id)
        if row is not None:
            self._tick[row] = self._clock
            self._clock += 1

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

    def coldest(self, limit: int, skip: Collection[str] = (), incoming: int = 0) -> list[str]:
        """Up to ``limit`` least recently used ids (not in ``skip``) to move out so the tier,
        with ``incoming`` bytes about to be written, falls to its low watermark."""
        footprint = self.footprint() + incoming
        # In units of the entries' estimated sizes, which is what moving one frees.
        target = (footprint - self.max_bytes * LOW_WATERMARK) * self.bytes / max(1, footprint)
        chosen, freed = [], 0
        if target <= 0 or limit <= 0:
            return chosen
        for row in self._least_recent(limit + len(skip)).tolist():
            if freed >= target or len(chosen) >= limit:
                break
            entry_id = self._ids.key(row)
            if entry_id in skip:
                continue
            chosen.append(entry_id)
            freed += int(self._size[row])
        return chosen

    def _least_recent(self, want: int) -> np.ndarray:
        """At least ``want`` live rows (all, if fewer), the least recently used first.

        Ranking every row for each demotion batch would hold the event loop about 11 ms at a
        million entries (``np.argpartition``). So the oldest _LRU_ROWS are ranked once and
        later calls take what is left of them: a row whose tick changed since (touched, freed,
        reused) is dropped, and every row outside the list is younger than every row in it, so
        what remains is still the least recently used, in order.
        """
        rows, ticks = self._lru
        fresh = self._tick[rows] == ticks
        rows, ticks = rows[fresh], ticks[fresh]
        if len(rows) < min(want, self._count):
            k = min(self._count, max(want, _LRU_ROWS))
            all_ticks = self._tick[:self._high]  # free rows tick last
            rows = np.argpartition(all_ticks, k - 1)[:k] if k < self._high else np.arange(
                self._high)
            rows = rows[np.argsort(all_ticks[rows])][:k]
            ticks = all_ticks[rows]
        self._lru = (rows, ticks)
        return rows

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
        gone = [i for i in replacing if i in self]
        encoded = [(e.id.encode(), encode(e, keys=self._keys)) for e in entries] if not any(
            e.user_id for e in entries) or self._keys is None else await asyncio.to_thread(
            # A user's first record creates its key durably (an fsync): off the event loop.
            lambda: [(e.id.encode(), encode(e, keys=self._keys)) for e in entries])
        # Replaced entries stay visible until the new ones are durable: a failed write loses
        # nothing.
        await self._commit(encoded, [g.encode() for g in gone])
        self._unindex_many([i for i in gone if i in self])
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
        gone = list(dict.fromkeys(i for i in ids if i in self))
        if not gone:
            return []
        sizes = {i: int(self._size[self._ids.find(i)]) for i in gone}
        self._unindex_many(gone)
        try:
            await self._commit([], [g.encode() for g in gone])
        except Exception:
            # Not deleted after all: let lookups see them again, as the file still has them
            # (read from the file: read() would find them not here). They count as just used.
            self._index_many([(entry, sizes[i]) for i, entry in
                              self._read_records([g for g in gone if g not in self])])
            raise
        return gone

    def read_many(self, ids: Sequence[str]) -> list[Entry]:
        """The entries with these ids that are here and readable (damaged ones are set aside,
        as by :meth:`read`)."""
        return [e for e in map(self.read, ids) if e is not None]

    def _index_many(self, entries: Sequence[tuple[Entry, int]], *,
                    loading: bool = False) -> np.ndarray:
        """Lets lookups see ``(entry, stored size)``s (replacing any with the same id); returns
        their rows. ``loading`` (start-up): the caller adds their codes and sorts the key
        indexes."""
        entries = list({e.id: (e, size) for e, size in entries}.values())  # one row an id
        if not loading:
            self._unindex_many([e.id for e, _ in entries if e.id in self])
        rows = self._allocate(len(entries))
        self._scope[rows] = [self._scopes.code(_Scope(
            e.namespace, e.partition, e.template_id, e.template_version, e.user_id))
            for e, _ in entries]
        self._expires[rows] = [math.nan if e.expires_at is None else e.expires_at
                               for e, _ in entries]
        self._size[rows] = [size for _, size in entries]
        self._tick[rows] = np.arange(self._clock, self._clock + len(rows))
        self._clock += len(rows)
        self._ids.add(rows, [e.id for e, _ in entries], sort_later=loading)
        self._exact.add(rows, [e.exact_key for e, _ in entries], sort_later=loading)
        self._count += len(rows)
        self.bytes += sum(size for _, size in entries)
        if not loading:
            for partition, at, group in _by_partition(rows, [e for e, _ in entries]):
                matrix = self._partitions.get(partition)
                if matrix is None:
                    matrix = self._partitions[partition] = CodeMatrix(self.dimension,
                                                                      int_keys=True)
                for start in range(0, len(group), _STACK_ROWS):  # bounded temporaries
                    stop = start + _STACK_ROWS
                    matrix.add(at[start:stop], np.stack([e.vector for e in group[start:stop]]))
        return rows

    def _unindex_many(self, ids: Iterable[str]) -> None:
        """Hides entries held here from lookups and frees their rows."""
        rows = np.array([self._ids.find(i) for i in dict.fromkeys(ids)], dtype=np.int64)
        if not len(rows):
            return
        self._ids.release(rows)
        self._exact.release(rows)
        scopes = self._scope[rows]
        by_partition: dict[bytes, list[np.ndarray]] = {}
        for code in np.unique(scopes).tolist():
            scope = self._scopes.values[code]
            assert scope is not None
            by_partition.setdefault(scope.partition, []).append(rows[scopes == code])
        for partition, parts in by_partition.items():
            matrix = self._partitions[partition]
            matrix.remove(np.concatenate(parts))
            if not len(matrix):
                del self._partitions[partition]
        self._scopes.release(scopes)
        self.bytes -= int(self._size[rows].sum())
        self._count -= len(rows)
        self._scope[rows] = _FREE
        self._tick[rows] = _FREE_TICK
        if self._nfree + len(rows) > len(self._free):  # grows as rows are freed
            free = np.empty(max(self._nfree + len(rows), 2 * len(self._free)), dtype=np.int32)
            free[:self._nfree] = self._free[:self._nfree]
            self._free = free
        self._free[self._nfree:self._nfree + len(rows)] = rows
        self._nfree += len(rows)
        if len(self._scope) > _COMPACT_ROWS and self._count < len(self._scope) // 4:
            self._compact()

    def _allocate(self, n: int) -> np.ndarray:
        """``n`` free rows: freed ones first, then new ones (the columns grow if need be)."""
        reuse = min(n, self._nfree)
        self._nfree -= reuse
        rows = self._free[self._nfree:self._nfree + reuse].astype(np.int64)
        fresh = n - reuse
        if self._high + fresh > len(self._scope):
            self._reshape(max(_MIN_ROWS, self._high + fresh, int(len(self._scope) * _GROWTH)))
        rows = np.concatenate([rows, np.arange(self._high, self._high + fresh)])
        self._high += fresh
        return rows

    def _compact(self) -> None:
        """Renumbers the live rows from 0 and shrinks the columns to them (most rows are
        free: entries left); the codes' keys follow."""
        kept = np.flatnonzero(self._scope[:self._high] != _FREE)
        renumbered = np.full(self._high, -1, dtype=np.int64)
        renumbered[kept] = np.arange(len(kept))
        self._reshape(max(_MIN_ROWS, int(len(kept) * _GROWTH)), kept, renumbered)
        for matrix in self._partitions.values():
            matrix.rekey(renumbered)
        self._high = len(kept)
        self._renumberings += 1
        self._lru = (np.empty(0, np.int64), np.empty(0, np.int64))

    def _reshape(self, capacity: int, kept: np.ndarray | None = None,
                 renumbered: np.ndarray | None = None) -> None:
        """Gives every column ``capacity`` rows: rows 0.._high-1 as they are, or only the
        ``kept`` ones, numbered from 0 (``renumbered``: old row -> new row, -1: freed)."""
        used = slice(0, self._high) if kept is None else kept
        for name, fill in (("_scope", _FREE), ("_expires", np.nan), ("_size", 0),
                           ("_tick", _FREE_TICK)):
            old = getattr(self, name)[used]
            new = np.full(capacity, fill, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        if kept is not None:  # the kept rows are 0..len(kept)-1: none is free
            self._free, self._nfree = np.empty(0, dtype=np.int32), 0
        for index in (self._ids, self._exact):
            index.reshape(capacity, used, renumbered)

    def file_bytes(self) -> int:
        info = self._env.info()
        return (info["last_pgno"] + 1) * self._env.stat()["psize"]

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._env.sync(True)
        self._env.close()


def _by_partition(rows: np.ndarray, entries: Sequence[Entry]
                  ) -> Iterator[tuple[bytes, np.ndarray, list[Entry]]]:
    """(partition, rows, entries) for each partition among ``entries`` (row i is entry i's)."""
    groups: dict[bytes, list[int]] = {}
    for i, entry in enumerate(entries):
        groups.setdefault(entry.partition, []).append(i)
    for partition, at in groups.items():
        yield partition, rows[at], [entries[i] for i in at]


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


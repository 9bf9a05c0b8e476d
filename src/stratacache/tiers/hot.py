"""Hot tier: recently used entries in memory, one vector index per partition.

A partition's index starts as an exact scan (:class:`VectorMatrix`): for a few hundred vectors it
is faster than a graph and costs no graph memory, which matters when every conversation digest
makes its own partition. Past ``hnsw_min_entries`` the partition moves to an hnswlib HNSW graph
(inner-product space; hnswlib's "distance" is ``1 - dot``, converted back to similarity here).

The graph is built off the event loop (tens of milliseconds to seconds, by size), on a worker
thread; hnswlib releases the GIL while it inserts. Until it is swapped in, the partition keeps
its exact scan, which every add and removal still updates, so a lookup meanwhile finds exactly
what is stored; the changes made during the build are replayed onto the graph before the swap.
Without a running event loop (scripts, tests of the tier alone) the graph is built at once.

The hot tier is a cache of the warm and cold tiers: every entry in it is also on disk, so
dropping the least recently used entries beyond ``capacity`` demotes them without loss.

Each entry's vector is held once, in its partition's index (the exact scan's matrix or the
graph, both exact float32): the entries themselves are kept without it, and the tier hands
out copies with their vector read back from the index.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import replace

import hnswlib
import numpy as np

from ..records import Entry, EntryInfo, Tier as TierKind
from .base import Candidate, Filter
from .vectors import VectorMatrix

log = logging.getLogger(__name__)

#: Partitions with fewer entries are searched exactly; at this size they get an HNSW graph.
DEFAULT_HNSW_MIN_ENTRIES = 512
_ENTRY_OVERHEAD_BYTES = 256  # Python objects and dict slots per entry, roughly


class _GraphIndex:
    """An hnswlib index with string ids, reusing deleted slots and growing by doubling."""

    def __init__(self, dimension: int, *, m: int, ef_construction: int, ef_search: int,
                 initial: int) -> None:
        self._index = hnswlib.Index(space="ip", dim=dimension)
        self._index.init_index(max_elements=initial, M=m, ef_construction=ef_construction,
                               allow_replace_deleted=True)
        self._index.set_num_threads(1)
        self._ef_search = ef_search
        self._index.set_ef(ef_search)
        self._labels = itertools.count()
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}

    @classmethod
    def build(cls, dimension: int, ids: Sequence[str], vectors: np.ndarray, *, m: int,
              ef_construction: int, ef_search: int) -> "_GraphIndex":
        """A graph of ``ids`` with their ``vectors``, inserted in one call (which releases the
        GIL: run it on a worker thread)."""
        graph = cls(dimension, m=m, ef_construction=ef_construction, ef_search=ef_search,
                    initial=2 * len(ids))
        labels = np.fromiter(itertools.islice(graph._labels, len(ids)), np.int64, len(ids))
        graph._index.add_items(vectors, labels)
        graph._label_of = dict(zip(ids, labels.tolist()))
        graph._id_of = dict(zip(labels.tolist(), ids))
        return graph

    def __len__(self) -> int:
        return len(self._label_of)

    def add(self, entry_id: str, vector: np.ndarray) -> None:
        if entry_id in self._label_of:
            self.remove(entry_id)
        capacity = self._index.get_max_elements()
        if self._index.get_current_count() >= capacity and len(self._label_of) >= capacity:
            self._index.resize_index(2 * capacity)
        label = next(self._labels)
        self._index.add_items(vector.reshape(1, -1), np.array([label]), replace_deleted=True)
        self._label_of[entry_id] = label
        self._id_of[label] = entry_id

    def vector(self, entry_id: str) -> np.ndarray:
        """A copy of the vector stored for ``entry_id`` (exact: hnswlib keeps float32)."""
        return self._index.get_items([self._label_of[entry_id]], return_type="numpy")[0]

    def remove(self, entry_id: str) -> bool:
        label = self._label_of.pop(entry_id, None)
        if label is None:
            return False
        del self._id_of[label]
        self._index.mark_deleted(label)
        return True

    def search(self, query: np.ndarray, k: int) -> list[Candidate]:
        k = min(k, len(self._label_of))
        while k > 0:
            try:
                labels, distances = self._index.knn_query(query.reshape(1, -1), k=k)
                break
            except RuntimeError:  # fewer than k reachable past deleted nodes: ask for fewer
                k -= 1
        else:
            return []
        return [Candidate(self._id_of[int(label)], 1.0 - float(d))
                for label, d in zip(labels[0], distances[0])]


class _Partition:
    def __init__(self, dimension: int) -> None:
        self.flat: VectorMatrix | None = VectorMatrix(dimension)
        self.graph: _GraphIndex | None = None
        #: The graph being built off the loop, and the (id, vector or None for a removal)
        #: changes made since its snapshot, replayed onto it before the swap.
        self.building: asyncio.Future[_GraphIndex] | None = None
        self.changes: list[tuple[str, np.ndarray | None]] = []
        #: The build failed (logged): the partition keeps its exact scan.
        self.exact_only = False

    @property
    def index(self) -> VectorMatrix | _GraphIndex:
        return self.flat if self.flat is not None else self.graph  # type: ignore[return-value]


class HotTier:
    """In-memory entries with per-partition vector search, bounded by ``capacity`` entries and
    an estimate of ``max_bytes`` (0 = no byte bound).

    The :class:`~stratacache.tiers.base.Tier` protocol's coroutines never suspend; the
    synchronous ``peek``, ``hold`` and ``drop`` let the engine check and change the tier in one
    step of its event loop.
    """

    kind = TierKind.HOT

    def __init__(self, dimension: int, *, capacity: int, m: int, ef_construction: int,
                 ef_search: int, max_bytes: int = 0,
                 hnsw_min_entries: int = DEFAULT_HNSW_MIN_ENTRIES,
                 build_executor: Executor | None = None) -> None:
        self.dimension = dimension
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._graph_params = dict(m=m, ef_construction=ef_construction, ef_search=ef_search)
        self._hnsw_min_entries = hnsw_min_entries
        self._build_executor = build_executor  # None: the loop's default executor
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._exact: dict[bytes, str] = {}
        self._partitions: dict[bytes, _Partition] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def count(self, partition: bytes) -> int:
        p = self._partitions.get(partition)
        return len(p.index) if p is not None else 0

    def peek(self, entry_id: str) -> Entry | None:
        entry = self._entries.get(entry_id)
        return self._with_vector(entry) if entry is not None else None

    def _with_vector(self, entry: Entry) -> Entry:
        return replace(entry, vector=self._partitions[entry.partition].index.vector(entry.id))

    def exact_id(self, key: bytes) -> str | None:
        return self._exact.get(key)

    async def get(self, entry_id: str) -> Entry | None:
        return self.peek(entry_id)

    async def get_exact(self, key: bytes, now: float) -> Entry | None:
        entry_id = self._exact.get(key)
        entry = self._entries.get(entry_id) if entry_id is not None else None
        return self._with_vector(entry) if entry is not None and not entry.expired(now) else None

    async def search(self, partition: bytes, query: np.ndarray, k: int,
                     now: float) -> list[Candidate]:
        """Top-``k`` of the partition, best first, expired entries left out."""
        p = self._partitions.get(partition)
        if p is None:
            return []
        found = p.index.search(query, k + 8)  # room for a few expired entries
        return [c for c in found if not self._entries[c.entry_id].expired(now)][:k]

    def touch(self, entry_id: str) -> None:
        if entry_id in self._entries:
            self._entries.move_to_end(entry_id)

    async def put(self, entries: Sequence[Entry], *, replacing: Collection[str] = ()) -> list[str]:
        for entry_id in replacing:
            self.drop(entry_id)
        return [i for e in entries for i in self.hold(e)]

    async def remove(self, ids: Collection[str]) -> list[str]:
        return [i for i in ids if self.drop(i)]

    async def infos(self, where: Filter) -> list[EntryInfo]:
        return [i for i in self.all_infos() if where.matches(i)]

    def hold(self, entry: Entry) -> list[str]:
        """Holds ``entry`` (already durable elsewhere) as the most recently used; returns the
        ids dropped for capacity."""
        self.drop(entry.id)
        p = self._partitions.get(entry.partition)
        if p is None:
            p = self._partitions[entry.partition] = _Partition(self.dimension)
        p.index.add(entry.id, entry.vector)
        if p.building is not None:
            p.changes.append((entry.id, entry.vector))
        elif (p.flat is not None and not p.exact_only
              and len(p.flat) >= self._hnsw_min_entries):
            self._promote_to_graph(entry.partition, p)
        self._entries[entry.id] = replace(entry, vector=_HELD_IN_INDEX)
        self._exact[entry.exact_key] = entry.id
        self.bytes += self._size(entry)
        dropped = []
        while len(self._entries) > self.capacity or (
                self.max_bytes and self.bytes > self.max_bytes and len(self._entries) > 1):
            oldest = next(iter(self._entries))
            self.drop(oldest)
            dropped.append(oldest)
        return dropped

    def _promote_to_graph(self, key: bytes, p: _Partition) -> None:
        """Builds the partition's graph from a snapshot of its rows: on a worker thread when
        an event loop runs (the partition keeps its exact scan meanwhile), else at once."""
        assert p.flat is not None
        ids, vectors = p.flat.rows()
        build = functools.partial(_GraphIndex.build, self.dimension, list(ids), vectors.copy(),
                                  **self._graph_params)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            p.graph, p.flat = build(), None
            return
        p.building = loop.run_in_executor(self._build_executor, build)
        p.building.add_done_callback(functools.partial(self._graph_built, key, p))

    def _graph_built(self, key: bytes, p: _Partition, done: asyncio.Future[_GraphIndex]) -> None:
        """On the loop: replays the changes made during the build and swaps the graph in,
        unless the partition emptied (and went) meanwhile."""
        p.building, changes, p.changes = None, p.changes, []
        if done.cancelled() or self._partitions.get(key) is not p:
            return
        if done.exception() is not None:
            log.error("building the HNSW graph of a hot partition of %d entries failed; it "
                      "keeps the exact scan (correct, slower): %s", len(p.index), done.exception())
            p.exact_only = True
            return
        graph = done.result()
        for entry_id, vector in changes:
            if vector is None:
                graph.remove(entry_id)
            else:
                graph.add(entry_id, vector)
        p.graph, p.flat = graph, None

    async def settled(self) -> None:
        """Waits until no graph is being built (tests, benchmarks, shutdown)."""
        while building := [p.building for p in self._partitions.values()
                           if p.building is not None]:
            await asyncio.gather(*building, return_exceptions=True)

    def drop(self, entry_id: str) -> bool:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        p = self._partitions[entry.partition]
        p.index.remove(entry_id)
        if p.building is not None:
            p.changes.append((entry_id, None))
        if len(p.index) == 0:
            del self._partitions[entry.partition]
        if self._exact.get(entry.exact_key) == entry_id:
            del self._exact[entry.exact_key]
        self.bytes -= self._size(entry)
        return True

    def all_infos(self) -> Iterable[EntryInfo]:
        """What the tier knows of every entry it holds (no vectors read back)."""
        return [EntryInfo.of(e, self._size(e)) for e in self._entries.values()]

    def _size(self, entry: Entry) -> int:
        return 4 * self.dimension + len(entry.prompt) + len(entry.response) + _ENTRY_OVERHEAD_BYTES


#: What a held entry's ``vector`` is: the vector lives in the partition's index only.
_HELD_IN_INDEX = np.empty(0, dtype=np.float32)
_HELD_IN_INDEX.flags.writeable = False

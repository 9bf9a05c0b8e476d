"""What every tier shares: the :class:`Tier` protocol, search candidates and :class:`Filter`.

The engine sees the hot (memory), warm (LMDB) and cold (SQLite) tiers through one async
protocol, so it walks them as a list instead of choosing by kind. A tier that keeps its index in
memory answers most calls without awaiting anything; a disk tier awaits its own thread. Filters
are values: each tier evaluates them its own way (the cold tier in SQL, the others in Python),
so SQL never leaves the cold tier.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ..records import CorruptRecord, Entry, EntryInfo, KeyDestroyed, Tier as TierKind

log = logging.getLogger(__name__)

#: Damaged records logged one by one; past this, one summary line per batch.
QUARANTINE_LOG_LINES = 10


class Candidate(NamedTuple):
    """A search result: an entry id and its cosine similarity to the query, in [-1, 1]."""

    entry_id: str
    similarity: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    """Which entries a bulk call means; every field given must match (None: any).

    ``expired_by`` selects entries whose expiry is at or before that Unix time; ``ids`` and
    ``exact_keys`` select entries among the given values.
    """

    namespace: str | None = None
    template_id: str | None = None
    template_version: str | None = None
    user_id: str | None = None
    expired_by: float | None = None
    ids: Collection[str] | None = None
    exact_keys: Collection[bytes] | None = None

    def matches(self, e: Entry | EntryInfo) -> bool:
        return ((self.namespace is None or e.namespace == self.namespace)
                and (self.template_id is None or e.template_id == self.template_id)
                and (self.template_version is None or e.template_version == self.template_version)
                and (self.user_id is None or e.user_id == self.user_id)
                and (self.expired_by is None
                     or (e.expires_at is not None and e.expires_at <= self.expired_by))
                and (self.ids is None or e.id in self.ids)
                and (self.exact_keys is None or e.exact_key in self.exact_keys))


#: Every entry.
EVERYTHING = Filter()


class Tier(Protocol):
    """One tier of entries. Ids are unique across tiers; an entry moving between two tiers may
    briefly be in both (the engine's placement owns moves).

    ``get`` and ``search`` do not count as use: a tier's recency changes only by ``touch``, when
    an entry is actually served.
    """

    kind: TierKind

    def __len__(self) -> int: ...

    def count(self, partition: bytes) -> int:
        """Entries of a partition (cheap; lookups skip empty partitions with it)."""

    async def get(self, entry_id: str) -> Entry | None:
        """The entry, expired or not; None if the tier does not hold it."""

    async def get_exact(self, key: bytes, now: float) -> Entry | None:
        """The unexpired entry with this exact key, if the tier holds one."""

    async def search(self, partition: bytes, query: np.ndarray, k: int,
                     now: float) -> list[Candidate]:
        """Up to ``k`` unexpired entries of the partition most similar to ``query``, best
        first. Similarities may be stale by the time they are read: callers re-score what they
        serve against the entry itself."""

    async def put(self, entries: Sequence[Entry], *, replacing: Collection[str] = ()) -> list[str]:
        """Holds ``entries`` (durably, for a disk tier) and drops ``replacing`` in the same
        step. Returns the ids the tier dropped to stay within its budget."""

    async def remove(self, ids: Collection[str]) -> list[str]:
        """Removes entries; returns the ids that were here."""

    async def infos(self, where: Filter) -> list[EntryInfo]:
        """What the tier knows of every entry ``where`` matches (no responses read)."""

    def touch(self, entry_id: str) -> None:
        """Marks an entry as just served (least recently used entries leave first)."""



def return_free_memory() -> None:
    """Asks glibc to hand freed heap pages back to the kernel (nothing elsewhere). After a
    start-up load or a code build, the buffers they freed otherwise stay resident: measured
    at 100k entries, about 1.5 KB an entry of nothing (benchmarks/tier_scale.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | bool | None = None


class Quarantine:
    """Where a tier sets aside records it cannot read, so a damaged record costs its entry,
    never the server: each is written to ``directory`` (``DATA_DIR/quarantine/``; None keeps
    nothing) for an operator to inspect, logged, counted, and then deleted by its tier. Records
    of deleted users (:class:`~stratacache.records.KeyDestroyed`) are erased by design: counted
    and dropped, not kept. Thread-safe: tiers call it from their own threads."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.damaged = 0
        self.erased = 0
        self._lock = threading.Lock()

    def keep(self, tier: str, records: Sequence[tuple[str, bytes, CorruptRecord]]) -> None:
        """Sets aside ``(entry id, raw record, why)`` read from ``tier``."""
        damaged = [(i, raw, exc) for i, raw, exc in records if not isinstance(exc, KeyDestroyed)]
        with self._lock:
            self.erased += len(records) - len(damaged)
            logged = max(0, QUARANTINE_LOG_LINES - self.damaged)
            self.damaged += len(damaged)
        if damaged and self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for entry_id, raw, _ in damaged:
                name = re.sub(r"[^0-9A-Za-z_-]", "_", entry_id)[:64]
                with open(self.directory / f"{tier}-{name}.record", "wb") as f:
                    f.write(raw)
                    f.flush()
                    os.fsync(f.fileno())
        for _, _, exc in damaged[:logged]:
            log.error("%s tier: %s", tier, exc)
        if len(damaged) > logged:
            log.error("%s tier: %d more damaged records set aside in %s", tier,
                      len(damaged) - logged, self.directory)

"""Placement: which tier holds each entry, and every move between tiers.

Every entry is durable in exactly one of the warm (LMDB) and cold (SQLite) tiers; the hot tier
(memory) caches recently used ones. Stores write to warm, then hot. A warm hit is copied into
hot; a cold hit moves to warm and hot. When warm exceeds its budget its least recently used
entries move to cold; when hot exceeds its capacity its least recently used entries are dropped
from memory (they stay on disk). Expired entries are swept.

The rules that keep removals final and lookups complete, whatever runs concurrently:

- A move registers itself before it reads or copies anything, and stays registered until the
  source copy is deleted; lookups look at registered moves too, so an entry moving between
  tiers is never missing from all of them.
- A move copies first and deletes second, and checks that its source still holds the entry
  before it copies (on the source tier's own thread, after any removal queued before it).
- A removal removes from every tier, then waits for every move of those entries that began
  before it finished, then removes again. So once a removal returns, no copy written by a move
  survives, in memory or on disk, even if the process is killed right after.
- Stores of one exact key run one at a time and replace what holds that key, in every tier.

Everything that changes in-memory state runs on the event loop thread; disk work runs on each
tier's own thread, awaited.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import StorageFailed, StorageFull
from .records import Entry, Tier as TierKind
from .tiers.base import Filter, Tier
from .tiers.cold import ColdTier
from .tiers.hot import HotTier
from .tiers.warm import WarmTier

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Entries moved from warm to cold per transaction when warm is over budget.
DEMOTION_BATCH = 512
#: Seconds between log lines about moves failing for a full or failing disk.
MOVE_WARNING_INTERVAL_S = 10.0


@dataclass
class Move:
    """An entry being copied from ``source`` to another tier. Removing it while it moves
    cancels the move; the remover then waits for ``done``."""

    entry: Entry
    source: TierKind
    cancelled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[object, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: object) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Placement:
    """The tiers of one data directory and the moves between them.

    Args:
        hot, warm, cold: the tiers, opened.
        on_removed: called with the ids of entries gone for good (removed, replaced, evicted,
            expired), so state keyed by entry id elsewhere (feedback vetoes) follows.
    """

    def __init__(self, hot: HotTier, warm: WarmTier, cold: ColdTier, *,
                 on_removed: Callable[[Collection[str]], None] = lambda ids: None) -> None:
        self.hot, self.warm, self.cold = hot, warm, cold
        #: In search order: hot caches the others; warm holds what was used recently.
        self.tiers: tuple[Tier, ...] = (hot, warm, cold)
        self._on_removed = on_removed
        self._moving: dict[str, Move] = {}
        self._moving_exact: dict[bytes, str] = {}
        #: Moves completed; a lookup that missed while it changed searches again (see
        #: ``Pipeline``): an entry moving against the search order could have been skipped.
        self.epoch = 0
        self._key_locks = KeyedLocks()
        self._writing = 0  # bytes of Stores being written to warm now (see _make_room)
        self._expiry: list[tuple[float, str]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._demotion: asyncio.Task[None] | None = None
        self.demotions: dict[TierKind, int] = {t: 0 for t in TierKind}
        self.promotions: dict[TierKind, int] = {t: 0 for t in TierKind}
        self.expired = 0
        self.move_failures = 0
        self._last_move_warning = -MOVE_WARNING_INTERVAL_S

    # --- start-up -----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Resolves what an interrupted move or store can leave behind: an entry in both warm
        and cold keeps its warm copy; two entries with one exact key keep the newer."""
        warm_ids = {i.id for i in self.warm.all_infos()}
        if len(self.cold) and warm_ids:
            both = [i.id for i in await self.cold.infos(Filter(ids=warm_ids))]
            if both:
                log.info("removing %d cold copies of entries also in the warm tier", len(both))
                await self.cold.remove(both)
        holders: dict[bytes, list[str]] = {}
        for info in self.warm.all_infos():
            holders.setdefault(info.exact_key, []).append(info.id)
        if len(self.cold) and holders:
            for info in await self.cold.infos(Filter(exact_keys=set(holders))):
                holders[info.exact_key].append(info.id)
        stale = []
        for ids in holders.values():
            if len(ids) > 1:
                entries = [e for e in [await self._read(i) for i in ids] if e is not None]
                entries.sort(key=lambda e: e.created_at)
                stale += [e.id for e in entries[:-1]]
        if stale:
            log.warning("removing %d entries replaced by a newer entry with the same exact key "
                        "(a replacing Store was interrupted)", len(stale))
            await self.warm.remove(stale)
            await self.cold.remove(stale)
        self._expiry = self.warm.expiring()
        heapq.heapify(self._expiry)

    async def _read(self, entry_id: str) -> Entry | None:
        return self.warm.read(entry_id) or await self.cold.get(entry_id)

    # --- finding entries ----------------------------------------------------------------------

    async def find(self, entry_id: str) -> Entry | None:
        """The entry with this id wherever it is (expired ones included), or None. Moving
        entries are looked at first: a move copies before it deletes, so an entry is always in
        its move or in a tier looked at after it."""
        move = self._moving.get(entry_id)
        if move is not None:
            return None if move.cancelled else move.entry
        return self.hot.peek(entry_id) or self.warm.read(entry_id) or (
            await self.cold.get(entry_id) if len(self.cold) else None)

    async def exact(self, key: bytes, now: float) -> tuple[Entry, TierKind] | None:
        """The live entry with this exact key, and the tier that holds it; no embedding. Moves
        first, for the reason ``find`` gives."""
        move = self._moving.get(self._moving_exact.get(key, ""))
        if move is not None and not move.cancelled and not move.entry.expired(now):
            return move.entry, move.source
        for tier in self.tiers:
            if tier is self.cold and not len(self.cold):
                break
            entry = await tier.get_exact(key, now)
            if entry is not None:
                return entry, tier.kind
        return None

    def worth_searching(self, tier: Tier, partition: bytes) -> bool:
        if tier is self.hot:
            return self.hot.count(partition) > 0
        # Every hot entry is also in warm or cold: when hot holds the whole partition, the
        # lower tiers have nothing it has not already searched.
        if self.hot.count(partition) >= self.warm.count(partition) + self.cold.count(partition):
            return False
        return tier.count(partition) > 0

    def moving_in(self, partition: bytes) -> list[Entry]:
        """Entries of the partition now moving between tiers."""
        return [m.entry for m in self._moving.values()
                if not m.cancelled and m.entry.partition == partition]

    # --- serving ------------------------------------------------------------------------------

    def served(self, entry: Entry, tier: TierKind) -> None:
        """Counts a hit as use: refreshes recency and moves the entry up."""
        if tier is TierKind.HOT:
            self.hot.touch(entry.id)
            self.warm.touch(entry.id)  # keep warm's recency honest, or it demotes popular entries
        elif tier is TierKind.WARM:
            # Only while warm still holds it: a removal may have run since the lookup read it.
            if entry.id in self.warm:
                self.warm.touch(entry.id)
                self.promotions[TierKind.WARM] += 1
                self._hold_hot(entry)
        elif tier is TierKind.COLD and entry.id not in self._moving and entry.id not in self.warm:
            self._spawn(self._promote_from_cold(entry))

    def _hold_hot(self, entry: Entry) -> None:
        self.demotions[TierKind.HOT] += len(self.hot.hold(entry))

    # --- storing ------------------------------------------------------------------------------

    async def store(self, entry: Entry) -> bool:
        """Writes ``entry`` durably, replacing whatever had its exact key; returns whether
        something was replaced. Stores of one exact key run one at a time, so concurrent
        Stores of one prompt leave exactly one entry.

        Raises:
            StorageFull, StorageFailed: the warm tier could not write it (nothing changed).
        """
        async with self._key_locks.hold(entry.exact_key):
            replaced = {i for i in (self.hot.exact_id(entry.exact_key),
                                    self.warm.exact_id(entry.exact_key),
                                    self._moving_exact.get(entry.exact_key)) if i}
            if len(self.cold):
                replaced.update(i.id for i in await self.cold.infos(
                    Filter(exact_keys=(entry.exact_key,))))
            size = await self._make_room(entry)
            try:
                await self.warm.put([entry], replacing=replaced)
            finally:
                self._writing -= size
            if replaced:
                await self.remove(replaced)  # whatever was not in warm, and moves of it
            self._hold_hot(entry)
            self._track_expiry(entry)
            self.maybe_demote()
            return bool(replaced)

    async def _make_room(self, entry: Entry) -> int:
        """Waits while writing ``entry`` (with the Stores already writing) would take the warm
        tier past its budget, until demotion has moved older entries out: a burst of Stores
        must not outrun demotion and grow the file past ``--warm-max-mib`` (LMDB's file never
        shrinks). Returns the bytes reserved for the entry; the caller releases them.

        Raises:
            StorageFull, StorageFailed: demotion failed (the disk is full or failing).
        """
        size = len(entry.response) + len(entry.prompt.encode()) + entry.vector.nbytes + 1024
        self._writing += size
        try:
            while self.warm.footprint() + self._writing > self.warm.max_bytes:
                self.maybe_demote()
                if self._demotion is None or self._demotion.done():
                    break  # nothing left to move out: the budget is smaller than this entry
                await asyncio.shield(self._demotion)  # a cancelled Store must not cancel it
        except BaseException:
            self._writing -= size
            raise
        return size

    # --- removing -----------------------------------------------------------------------------

    async def remove(self, ids: Collection[str]) -> int:
        """Removes entries from every tier and waits out their moves (see the module doc);
        returns how many existed. Memory first, so lookups stop serving them at once."""
        ids = set(ids)
        if not ids:
            return 0
        gone = {i for i in ids if i in self._moving and not self._moving[i].cancelled}
        gone.update(await self._remove_everywhere(ids))
        moves = [m for i in ids if (m := self._moving.get(i)) is not None]
        if moves:
            for move in moves:
                move.cancelled = True
            for move in moves:
                await move.done.wait()
            await self._remove_everywhere({m.entry.id for m in moves})
        self._on_removed(ids)
        return len(gone)

    async def _remove_everywhere(self, ids: set[str]) -> set[str]:
        for move in (self._moving.get(i) for i in ids):
            if move is not None:
                move.cancelled = True
        gone = set(await self.hot.remove(ids))
        gone.update(await self.warm.remove(ids))
        if len(self.cold):
            gone.update(await self.cold.remove(ids))
        return gone

    async def remove_matching(self, where: Filter) -> int:
        """Removes every entry ``where`` matches, in every tier and in flight between tiers."""
        ids = {i.id for tier in self.tiers for i in await tier.infos(where)
               if tier is not self.cold or len(self.cold)}
        ids.update(i for i, m in self._moving.items() if where.matches(m.entry))
        return await self.remove(ids)

    # --- moves --------------------------------------------------------------------------------

    def _register(self, entry: Entry, source: TierKind) -> Move:
        move = self._moving[entry.id] = Move(entry, source)
        self._moving_exact[entry.exact_key] = entry.id
        return move

    def _unregister(self, move: Move) -> None:
        del self._moving[move.entry.id]
        if self._moving_exact.get(move.entry.exact_key) == move.entry.id:
            del self._moving_exact[move.entry.exact_key]
        move.done.set()

    async def _promote_from_cold(self, entry: Entry) -> None:
        if entry.id in self._moving or entry.id in self.warm:
            return  # another lookup is already moving it
        move = self._register(entry, TierKind.COLD)
        try:
            # A removal that finished before we registered is seen here: the cold thread runs
            # calls in order. One that starts later waits for this move to finish.
            if move.cancelled or await self.cold.get(entry.id) is None:
                return
            await self.warm.put([entry])
            if not move.cancelled:
                await self.cold.remove([entry.id])
            if move.cancelled:  # removed while we copied it: so must our copy be
                await self.warm.remove([entry.id])
                return
            self.promotions[TierKind.COLD] += 1
            self.epoch += 1
            self._hold_hot(entry)
            self._track_expiry(entry)
            self.maybe_demote()
        finally:
            self._unregister(move)

    def maybe_demote(self) -> None:
        if (self.warm.over_budget(self._writing)
                and (self._demotion is None or self._demotion.done())):
            self._demotion = self._spawn(self._demote_warm())

    async def _demote_warm(self) -> None:
        """Moves warm's least recently used entries to cold until warm, with the Stores being
        written, is under its low watermark."""
        while self.warm.over_budget(self._writing):
            ids = self.warm.coldest(DEMOTION_BATCH, skip=self._moving, incoming=self._writing)
            if not ids:
                return
            moves = [self._register(e, TierKind.WARM) for e in self.warm.read_many(ids)]
            try:
                evicted = await self.cold.put([m.entry for m in moves])
                if evicted:
                    await self._evicted(evicted)
                await self.cold.remove([m.entry.id for m in moves if m.cancelled])
                moved = await self.warm.remove([m.entry.id for m in moves if not m.cancelled])
                self.epoch += 1
                self.demotions[TierKind.WARM] += len(moved)
                log.debug("demoted %d entries from warm to cold", len(moved))
            finally:
                for move in moves:
                    self._unregister(move)

    async def _evicted(self, ids: list[str]) -> None:
        """Entries the cold tier dropped for its budget: gone for good."""
        self.demotions[TierKind.COLD] += len(ids)
        await self.hot.remove(ids)
        for move in (self._moving.get(i) for i in ids):
            if move is not None and move.source is TierKind.COLD:
                move.cancelled = True
        self._on_removed(ids)

    # --- expiry -------------------------------------------------------------------------------

    def _track_expiry(self, entry: Entry) -> None:
        if entry.expires_at is None:
            return
        heapq.heappush(self._expiry, (entry.expires_at, entry.id))
        if len(self._expiry) > 2 * (len(self.warm) + len(self.hot)) + 1024:
            # Replaced and deleted entries leave stale items: rebuild from what is held.
            live = {i: t for t, i in self.warm.expiring()}
            live.update((i.id, i.expires_at) for i in self.hot.all_infos()
                        if i.expires_at is not None)
            self._expiry = [(t, i) for i, t in live.items()]
            heapq.heapify(self._expiry)

    async def sweep_expired(self, now: float) -> int:
        """Removes entries whose TTL has passed; returns how many. Lookups never serve them
        anyway: sweeping only frees their space."""
        due = set()
        while self._expiry and self._expiry[0][0] <= now:
            due.add(heapq.heappop(self._expiry)[1])
        if len(self.cold):
            due.update(i.id for i in await self.cold.infos(Filter(expired_by=now)))
        removed = await self.remove(due)
        self.expired += removed
        return removed

    # --- background work ----------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, T], *, awaited: bool = False) -> asyncio.Task[T]:
        """Runs ``coroutine`` as a task that ``settled`` and ``close`` wait for. Failures of
        tasks nobody awaits are logged in one line (a full or failing disk must not flood the
        log with tracebacks)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if not awaited:
            task.add_done_callback(self._finished)
        return task

    async def shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs ``coroutine`` to its end even if the caller is cancelled (a client deadline):
        once an entry is being written, disk and memory must not be left disagreeing."""
        return await asyncio.shield(self._spawn(coroutine, awaited=True))

    def _finished(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.move_failures += 1
        if isinstance(exc, (StorageFull, StorageFailed)):
            # A full disk fails every move until space is freed: one line per interval.
            now = time.monotonic()
            if now - self._last_move_warning >= MOVE_WARNING_INTERVAL_S:
                log.warning("moving entries between tiers failed (%d times so far), they stay "
                            "where they were: %s", self.move_failures, exc)
                self._last_move_warning = now
        else:
            log.error("moving entries between tiers failed: %r", exc, exc_info=exc)

    async def settled(self) -> None:
        """Waits until no move is running (tests, benchmarks, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        await self.settled()
        self.warm.close()
        self.cold.close()


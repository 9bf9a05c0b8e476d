"""The cache engine: the Lookup and Store paths, written once, and where entries live.

Lookup:  validate -> exact key -> embed -> search tiers (hot, warm, cold) -> decide -> respond
Store:   validate -> exact key -> embed -> durable write (warm) -> hot -> respond

Placement: every entry is durable in exactly one of the warm (LMDB) and cold (SQLite) tiers; the
hot tier (memory) caches recently used ones. Stores write to warm, then hot. A warm hit is copied
into hot; a cold hit moves to warm and hot. When warm exceeds its byte budget its least recently
used entries move to cold; when hot exceeds its capacity its least recently used entries are
dropped from memory (they stay on disk). A move copies first and deletes second, then undoes the
copy if the source vanished meanwhile (an invalidation ran), so no move loses or resurrects an
entry.

Everything that changes in-memory state runs on the event loop thread; disk work runs on each
tier's own thread, awaited.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from . import _core, keys, validation
from .config import Settings
from .datadir import DataDir
from .embed import BatchingEmbedder, Encoder
from .errors import NotFound, Unavailable
from .messages import (LookupRequest, LookupResult, StageStats, Stats, StoreRequest, StoreResult,
                       TierStats)
from .metrics import Metrics
from .records import Entry, Tier
from .tiers.base import Candidate
from .tiers.cold import ColdTier
from .tiers.hot import DEFAULT_HNSW_MIN_ENTRIES, HotTier
from .tiers.warm import WarmTier

log = logging.getLogger(__name__)

#: Candidates each tier returns; the decision takes the most similar that is still valid.
SEARCH_K = 4
#: Entries moved from warm to cold per transaction when warm is over budget.
DEMOTION_BATCH = 512


@dataclass(frozen=True, slots=True)
class _Keys:
    prompt: str  # normalised
    partition: bytes
    exact: bytes


class Engine:
    """Owns the tiers and the embedder of one data directory.

    Use ``await Engine.open(settings, encoder)`` and ``await engine.close()``; all other methods
    are coroutines that must run on the loop that opened it.
    """

    def __init__(self, settings: Settings, encoder: Encoder, *,
                 hnsw_min_entries: int = DEFAULT_HNSW_MIN_ENTRIES) -> None:
        self.settings = settings
        self.encoder = encoder
        dim = encoder.dimension
        self._dir = DataDir(settings.data_dir, encoder.identity)
        try:
            self.hot = HotTier(dim, capacity=settings.hot_capacity, m=settings.hnsw_m,
                               ef_construction=settings.hnsw_ef_construction,
                               ef_search=settings.hnsw_ef_search,
                               hnsw_min_entries=hnsw_min_entries)
            self.warm = WarmTier(self._dir.warm_path, dim, max_bytes=settings.warm_max_bytes)
            self.cold = ColdTier(self._dir.cold_path, dim, max_bytes=settings.cold_max_bytes)
        except BaseException:
            self._dir.close()
            raise
        self.metrics = Metrics()
        self._embedder = BatchingEmbedder(
            encoder, max_batch=settings.embed_max_batch,
            max_wait_s=settings.embed_max_wait_ms / 1000, max_queue=settings.embed_max_queue)
        self._expiry: list[tuple[float, str]] = [
            (info.expires_at, info.id) for info in self.warm.infos() if info.expires_at is not None]
        heapq.heapify(self._expiry)
        self._background: set[asyncio.Task[None]] = set()
        self._demotion: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._closed = False

    @classmethod
    async def open(cls, settings: Settings, encoder: Encoder, **kwargs: int) -> "Engine":
        engine = cls(settings, encoder, **kwargs)
        await engine._reconcile()
        engine._embedder.start()
        engine._sweeper = asyncio.get_running_loop().create_task(engine._sweep_forever())
        engine._maybe_demote()
        return engine

    async def _reconcile(self) -> None:
        """An interrupted move can leave an entry in both warm and cold: keep the warm copy."""
        if len(self.cold) and len(self.warm):
            cold_ids = await self.cold.ids_where("1", ())
            both = [i for i in cold_ids if i in self.warm]
            if both:
                log.info("removing %d entries found in both warm and cold tiers", len(both))
                await self.cold.remove(both)

    # --- Lookup -------------------------------------------------------------------------------

    async def lookup(self, request: LookupRequest) -> LookupResult:
        """The stored answer for a prompt with the same meaning in the same context, or a miss.

        Raises:
            InvalidArgument: the request breaks a limit (see ``validation``).
            Overloaded: the embedding queue is full.
        """
        started = time.perf_counter()
        self._check_open()
        with self.metrics.stage("validate"):
            request = validation.lookup(request)
            k = self._keys(request)
        threshold = (self.settings.min_similarity if request.min_similarity is None
                     else request.min_similarity)
        now = time.time()
        self.metrics.lookups += 1

        with self.metrics.stage("exact"):
            exact = await self._exact(k.exact, now)
        if exact is not None:
            entry, tier = exact
            self._promote(entry, tier)
            return self._respond_hit(entry, Tier.EXACT, 1.0, now, started)

        with self.metrics.stage("embed"):
            vector = await self._embedder.embed(k.prompt)

        best_miss = 0.0
        for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
            if not self._worth_searching(tier, k.partition):
                continue
            with self.metrics.stage(f"search_{tier.name.lower()}"):
                candidates = await self._search(tier, k.partition, vector, now)
            found = decide(candidates, threshold)
            if found is None:
                best_miss = max(best_miss, candidates[0].similarity if candidates else 0.0)
                continue
            entry = await self._fetch(found.entry_id, tier)
            if entry is None or entry.expired(now):  # removed or expired since the search
                continue
            # Re-score against the entry itself: what is served provably meets the threshold,
            # whatever an index did concurrently.
            similarity = float(np.dot(entry.vector, vector))
            if similarity < threshold:
                continue
            self._promote(entry, tier)
            return self._respond_hit(entry, tier, similarity, now, started)

        self.metrics.misses += 1
        elapsed = time.perf_counter() - started
        self.metrics.record("lookup", elapsed)
        return LookupResult(hit=False, best_similarity=best_miss,
                            server_time_us=int(elapsed * 1e6))

    def _keys(self, request: LookupRequest | StoreRequest) -> _Keys:
        prompt = keys.normalise_prompt(request.prompt)
        partition = keys.partition_key(request.namespace, request.scope, request.template_id,
                                       request.template_version)
        return _Keys(prompt, partition, keys.exact_key(partition, prompt))

    async def _exact(self, key: bytes, now: float) -> tuple[Entry, Tier] | None:
        """The live entry with this exact key, and the tier that holds it; no embedding."""
        entry = self.hot.get_exact(key)
        if entry is not None and not entry.expired(now):
            return entry, Tier.HOT
        entry_id = self.warm.exact_id(key)
        if entry_id is not None:
            entry = self.warm.get(entry_id)
            if entry is not None and not entry.expired(now):
                return entry, Tier.WARM
        if len(self.cold):
            entry = await self.cold.get_exact(key, now)
            if entry is not None:
                return entry, Tier.COLD
        return None

    def _worth_searching(self, tier: Tier, partition: bytes) -> bool:
        if tier is Tier.HOT:
            return self.hot.count(partition) > 0
        # Every hot entry is also in warm or cold: when hot holds the whole partition, the
        # lower tiers have nothing it has not already searched.
        if self.hot.count(partition) >= self.warm.count(partition) + self.cold.count(partition):
            return False
        return (self.warm if tier is Tier.WARM else self.cold).count(partition) > 0

    async def _search(self, tier: Tier, partition: bytes, vector: np.ndarray,
                      now: float) -> list[Candidate]:
        if tier is Tier.HOT:
            return self.hot.search(partition, vector, SEARCH_K, now)
        if tier is Tier.WARM:
            return await self.warm.search(partition, vector, SEARCH_K, now)
        return await self.cold.search(partition, vector, SEARCH_K, now)

    async def _fetch(self, entry_id: str, tier: Tier) -> Entry | None:
        if tier is Tier.HOT:
            return self.hot.get(entry_id)
        if tier is Tier.WARM:
            return self.warm.get(entry_id)
        return await self.cold.get(entry_id)

    def _promote(self, entry: Entry, tier: Tier) -> None:
        if tier is Tier.HOT:
            self.warm.touch(entry.id)  # keep warm's recency honest, or it demotes popular entries
        elif tier is Tier.WARM:
            self.metrics.promotions[Tier.WARM] += 1
            self._hold_hot(entry)
        elif tier is Tier.COLD:
            self._spawn(self._promote_from_cold(entry))

    def _hold_hot(self, entry: Entry) -> None:
        self.metrics.demotions[Tier.HOT] += len(self.hot.add(entry))

    async def _promote_from_cold(self, entry: Entry) -> None:
        if entry.id in self.warm:
            return
        await self.warm.put([entry])
        if await self.cold.remove([entry.id]):
            self.metrics.promotions[Tier.COLD] += 1
            self._hold_hot(entry)
            self._maybe_demote()
        else:  # removed from cold while we copied it: the copy must not outlive it
            await self.warm.remove([entry.id])

    def _respond_hit(self, entry: Entry, tier: Tier, similarity: float, now: float,
                     started: float) -> LookupResult:
        self.metrics.hits[tier] += 1
        elapsed = time.perf_counter() - started
        self.metrics.record("lookup", elapsed)
        return LookupResult(hit=True, response=entry.response, similarity=similarity,
                            matched_prompt=entry.prompt, entry_id=entry.id, tier=tier,
                            age_s=max(0.0, now - entry.created_at),
                            server_time_us=int(elapsed * 1e6))

    # --- Store --------------------------------------------------------------------------------

    async def store(self, request: StoreRequest) -> StoreResult:
        """Stores an answer durably and returns its id; replaces an entry with the same exact key.

        Raises:
            InvalidArgument: the request breaks a limit.
            Overloaded: the embedding queue is full.
            StorageFull: the warm tier cannot take the entry.
        """
        started = time.perf_counter()
        self._check_open()
        with self.metrics.stage("validate"):
            request = validation.store(request)
            k = self._keys(request)
        with self.metrics.stage("embed"):
            vector = await self._embedder.embed(k.prompt)
        now = time.time()
        entry = Entry(
            id=uuid.uuid4().hex, namespace=request.namespace, partition=k.partition,
            exact_key=k.exact, prompt=request.prompt, response=bytes(request.response),
            vector=vector, created_at=now,
            expires_at=None if request.ttl_s is None else now + request.ttl_s,
            template_id=request.template_id, template_version=request.template_version,
            user_id=request.user_id, metadata=dict(request.metadata))
        replaced = await self._ids_with_exact_key(k.exact)
        with self.metrics.stage("store_durable"):
            await self.warm.put([entry], replacing=replaced)
            if replaced:
                self.hot.remove_many(replaced)
                await self.cold.remove(replaced)
        self._hold_hot(entry)
        if entry.expires_at is not None:
            heapq.heappush(self._expiry, (entry.expires_at, entry.id))
        self._maybe_demote()
        self.metrics.stores += 1
        self.metrics.record("store", time.perf_counter() - started)
        return StoreResult(entry.id, bool(replaced))

    async def _ids_with_exact_key(self, key: bytes) -> list[str]:
        """Ids of entries a Store with this exact key replaces (an interrupted move can leave
        one in two tiers)."""
        hot_entry = self.hot.get_exact(key)
        found = {i for i in (hot_entry and hot_entry.id, self.warm.exact_id(key)) if i}
        if len(self.cold):
            found.update(await self.cold.ids_where("exact_key = ?", (key,)))
        return sorted(found)

    # --- placement ----------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background move failed: %r", task.exception(), exc_info=task.exception())

    def _maybe_demote(self) -> None:
        if self.warm.over_budget() and (self._demotion is None or self._demotion.done()):
            self._demotion = asyncio.get_running_loop().create_task(self._demote_warm())
            self._background.add(self._demotion)
            self._demotion.add_done_callback(self._background_done)

    async def _demote_warm(self) -> None:
        """Moves warm's least recently used entries to cold until warm is under its watermark."""
        while self.warm.over_budget():
            ids = self.warm.coldest()[:DEMOTION_BATCH]
            if not ids:
                return
            entries = self.warm.read_many(ids)
            evicted = await self.cold.put(entries)
            self.hot.remove_many(evicted)
            self.metrics.demotions[Tier.COLD] += len(evicted)
            # Entries removed from warm while we copied them must not survive in cold.
            vanished = [e.id for e in entries if e.id not in self.warm]
            await self.cold.remove(vanished)
            moved = await self.warm.remove(ids)
            self.metrics.demotions[Tier.WARM] += len(moved)
            log.debug("demoted %d entries from warm to cold", len(moved))

    # --- admin --------------------------------------------------------------------------------

    async def invalidate_template(self, namespace: str, template_id: str,
                                  version: str | None) -> int:
        namespace = validation.namespace(namespace)
        template_id = validation.required_label("template_id", template_id)
        if version is not None:
            version = validation.required_label("version", version)

        def match(e: object) -> bool:
            return (e.namespace == namespace and e.template_id == template_id  # type: ignore[attr-defined]
                    and (version is None or e.template_version == version))  # type: ignore[attr-defined]

        where, args = "namespace = ? AND template_id = ?", (namespace, template_id)
        if version is not None:
            where, args = where + " AND template_version = ?", args + (version,)
        return await self._remove_where(match, where, args)

    async def invalidate_namespace(self, namespace: str) -> int:
        namespace = validation.namespace(namespace)
        return await self._remove_where(lambda e: e.namespace == namespace,  # type: ignore[attr-defined]
                                        "namespace = ?", (namespace,))

    async def delete_user(self, user_id: str, namespace: str | None) -> int:
        user_id = validation.required_label("user_id", user_id)
        if namespace is None:
            return await self._remove_where(lambda e: e.user_id == user_id,  # type: ignore[attr-defined]
                                            "user_id = ?", (user_id,))
        namespace = validation.namespace(namespace)
        return await self._remove_where(
            lambda e: e.user_id == user_id and e.namespace == namespace,  # type: ignore[attr-defined]
            "user_id = ? AND namespace = ?", (user_id, namespace))

    async def delete_entry(self, entry_id: str) -> int:
        """Raises NotFound when no tier holds the id."""
        entry_id = validation.entry_id(entry_id)
        removed = await self._remove_ids([entry_id])
        if not removed:
            raise NotFound(f"no entry with id {entry_id!r}: it was never stored, or has been "
                           "removed, evicted or expired")
        return removed

    async def _remove_where(self, match: Callable[[object], bool], cold_where: str,
                            cold_args: tuple) -> int:
        self._check_open()
        ids = set(self.hot.ids_where(match)) | set(self.warm.ids_where(match))
        if len(self.cold):
            ids.update(await self.cold.ids_where(cold_where, cold_args))
        removed = await self._remove_ids(ids)
        self.metrics.invalidated += removed
        return removed

    async def _remove_ids(self, ids: Iterable[str]) -> int:
        """Removes entries from every tier: memory first, so lookups stop serving them at once."""
        ids = list(ids)
        self.hot.remove_many(ids)
        gone = set(await self.warm.remove(ids))
        if len(self.cold):
            gone.update(await self.cold.remove(ids))
        return len(gone)

    # --- expiry -------------------------------------------------------------------------------

    async def sweep_expired(self) -> int:
        """Removes entries whose TTL has passed; returns how many. Lookups never serve them
        anyway: sweeping only frees their space."""
        now = time.time()
        due = []
        while self._expiry and self._expiry[0][0] <= now:
            due.append(heapq.heappop(self._expiry)[1])
        if len(self.cold):
            due += await self.cold.ids_where("expires_at IS NOT NULL AND expires_at <= ?", (now,))
        removed = await self._remove_ids(due) if due else 0
        self.metrics.expired += removed
        return removed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep_expired()
            except Exception:
                log.exception("expiry sweep failed; retrying at the next interval")

    # --- stats and lifecycle ------------------------------------------------------------------

    async def stats(self) -> Stats:
        m, s = self.metrics, self.settings
        cold_file = await asyncio.to_thread(self.cold.file_bytes)

        def tier(t: Tier, entries: int, size: int, capacity: int) -> TierStats:
            return TierStats(entries, size, capacity, m.hits[t], m.demotions[t], m.promotions[t])

        return Stats(
            model=self.encoder.identity.name, dimension=self.encoder.dimension,
            device=self.encoder.device, default_min_similarity=s.min_similarity,
            lookups=m.lookups, hits=sum(m.hits.values()), misses=m.misses, stores=m.stores,
            expired=m.expired, invalidated=m.invalidated,
            exact=tier(Tier.EXACT, 0, 0, 0),
            hot=tier(Tier.HOT, len(self.hot), self.hot.bytes, s.hot_capacity),
            warm=tier(Tier.WARM, len(self.warm), self.warm.file_bytes(), s.warm_max_bytes),
            cold=tier(Tier.COLD, len(self.cold), cold_file, s.cold_max_bytes),
            embed_batches=self._embedder.stats.batches, embed_texts=self._embedder.stats.texts,
            rejected_overload=self._embedder.stats.rejected,
            stages={name: StageStats(v.count, v.p50_ms, v.p99_ms)
                    for name, v in m.stages().items()},
            uptime_s=time.monotonic() - self._started, simd_isa=_core.simd_isa())

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down: retry on another instance")

    async def close(self) -> None:
        """Finishes background moves, stops the embedder and closes the tiers (flushing them)."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._embedder.close()
        self.warm.close()
        self.cold.close()
        self._dir.close()


def decide(candidates: list[Candidate], min_similarity: float) -> Candidate | None:
    """The decision, in one place: the most similar candidate if its cosine similarity reaches
    ``min_similarity``, else None. Candidates arrive best first, expired ones already left out."""
    if candidates and candidates[0].similarity >= min_similarity:
        return candidates[0]
    return None

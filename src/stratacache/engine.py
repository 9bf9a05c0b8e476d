"""The cache engine: the Lookup and Store paths, written once, and where entries live.

Lookup:  validate -> exact key -> embed -> search tiers (hot, warm, cold) -> decide -> respond
Store:   validate -> exact key -> embed -> durable write (warm) -> hot -> respond

Decide: a tier's candidates above the namespace's cosine gate are re-scored against the entries
themselves, those vetoed by feedback are dropped, and then either the best cosine must reach the
threshold, or (with a verifier) the verifier scores the best few and the best score must reach
it. The namespace's :class:`~stratacache.policy.Rule` says which, and where the lines are.

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
import hashlib
import heapq
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import _core, keys, validation
from .batching import Batcher, model_executor
from .config import Settings
from .datadir import DataDir
from .embed import Encoder
from .errors import InvalidArgument, NotFound, Unavailable
from .messages import (LookupRequest, LookupResult, MissReason, NamespaceStats, StageStats, Stats,
                       StoreRequest, StoreResult, TierStats)
from .metrics import Metrics
from .policy import Defaults, Observation, Policy, PolicyBook, PolicyStatus
from .records import Entry, Tier
from .tiers.base import Candidate
from .tiers.cold import ColdTier
from .tiers.hot import DEFAULT_HNSW_MIN_ENTRIES, HotTier
from .tiers.warm import WarmTier
from .verify import Verifier

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Candidates each tier returns; the decision takes the most similar that is still valid.
SEARCH_K = 4
#: Entries moved from warm to cold per transaction when warm is over budget.
DEMOTION_BATCH = 512
#: Labelled pairs scored per model pass when evidence is imported or re-scored.
EVIDENCE_CHUNK = 64
#: The policy, evidence and feedback file inside the data directory.
EVIDENCE_FILE = "evidence.sqlite3"
#: (namespace, prompt) keys remembered to tell a miss that the prompt is stored in another scope.
SCOPE_HINTS = 100_000


@dataclass(frozen=True, slots=True)
class _Keys:
    prompt: str  # normalised
    partition: bytes
    exact: bytes
    hint: bytes  # namespace and prompt, without the rest of the partition


@dataclass
class _Move:
    """An entry being copied between the disk tiers. Removing it while it moves cancels the
    move, and the mover deletes its copy: no move resurrects a removed entry."""

    entry: Entry
    cancelled: bool = False


class _KeyedLocks:
    """One asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
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


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed: %r", task.exception(), exc_info=task.exception())


class Engine:
    """Owns the tiers and the embedder of one data directory.

    Use ``await Engine.open(settings, encoder)`` and ``await engine.close()``; all other methods
    are coroutines that must run on the loop that opened it.
    """

    def __init__(self, settings: Settings, encoder: Encoder, *, verifier: Verifier | None = None,
                 hnsw_min_entries: int = DEFAULT_HNSW_MIN_ENTRIES) -> None:
        self.settings = settings
        self.encoder = encoder
        self.verifier = verifier
        dim = encoder.dimension
        self._dir = DataDir(settings.data_dir, encoder.identity, model=settings.model)
        try:
            self.hot = HotTier(dim, capacity=settings.hot_capacity,
                               max_bytes=settings.hot_max_bytes, m=settings.hnsw_m,
                               ef_construction=settings.hnsw_ef_construction,
                               ef_search=settings.hnsw_ef_search,
                               hnsw_min_entries=hnsw_min_entries)
            self.warm = WarmTier(self._dir.warm_path, dim, max_bytes=settings.warm_max_bytes)
            self.cold = ColdTier(self._dir.cold_path, dim, max_bytes=settings.cold_max_bytes)
            self.policies = PolicyBook(
                self._dir.path / EVIDENCE_FILE,
                Defaults(min_similarity=settings.min_similarity, verify_gate=settings.verify_gate,
                         verify_threshold=settings.verify_threshold,
                         max_wrong_rate=settings.max_wrong_rate, has_verifier=verifier is not None),
                embedder_id=encoder.identity.fingerprint,
                verifier_id=None if verifier is None else verifier.identity.scorer)
        except BaseException:
            self._dir.close()
            raise
        self.metrics = Metrics()
        self._model_thread = model_executor()
        self._embedder: Batcher[str, np.ndarray | None] = Batcher(
            encoder.encode_whole, name="embedding", flag="--embed-max-queue",
            max_batch=settings.embed_max_batch, max_wait_s=settings.embed_max_wait_ms / 1000,
            max_queue=settings.embed_max_queue, executor=self._model_thread)
        self._verifier: Batcher[tuple[str, str, float], float] | None = None if verifier is None else Batcher(
            lambda pairs: verifier.score(pairs).tolist(), name="verification",
            flag="--embed-max-queue", max_batch=settings.verify_max_batch, max_wait_s=0.0,
            max_queue=settings.embed_max_queue, executor=self._model_thread)
        self._scope_hints: OrderedDict[bytes, set[bytes]] = OrderedDict()
        self._expiry: list[tuple[float, str]] = [
            (info.expires_at, info.id) for info in self.warm.infos() if info.expires_at is not None]
        heapq.heapify(self._expiry)
        self._background: set[asyncio.Task[Any]] = set()
        self._demotion: asyncio.Task[None] | None = None
        self._moving: dict[str, _Move] = {}
        self._key_locks = _KeyedLocks()
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._closed = False

    @classmethod
    async def open(cls, settings: Settings, encoder: Encoder, *, verifier: Verifier | None = None,
                   **kwargs: int) -> "Engine":
        engine = cls(settings, encoder, verifier=verifier, **kwargs)
        await engine._reconcile()
        await engine._load_evidence()
        engine._embedder.start()
        if engine._verifier is not None:
            engine._verifier.start()
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

    async def _load_evidence(self) -> None:
        """Re-scores evidence scored by other models, loads it, and rebuilds feedback vetoes."""
        loop = asyncio.get_running_loop()
        stale = await asyncio.to_thread(self.policies.stale_rows)
        if stale:
            log.info("re-scoring %d labelled observations made with another embedder or "
                     "verifier", len(stale))
            for start in range(0, len(stale), EVIDENCE_CHUNK):
                chunk = stale[start:start + EVIDENCE_CHUNK]
                scores = await loop.run_in_executor(
                    self._model_thread, self._score_pairs, [(q, m) for _, q, m in chunk])
                await asyncio.to_thread(self.policies.rescore, [
                    (row[0], *(score or (0.0, None))) for row, score in zip(chunk, scores)])
        wrong = self.policies.load()
        for start in range(0, len(wrong), EVIDENCE_CHUNK):
            chunk = wrong[start:start + EVIDENCE_CHUNK]
            vectors = await loop.run_in_executor(
                self._model_thread, self.encoder.encode, [q for _, _, q in chunk])
            for (namespace, entry_id, _), vector in zip(chunk, vectors):
                self.policies.add_veto(namespace, entry_id, vector)

    def _score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, float | None] | None]:
        """(cosine, verifier score) of each (query, matched) pair, None where a text is longer
        than the embedder reads. Blocking: runs on the model thread."""
        vectors = self.encoder.encode_whole([t for p in pairs for t in p])
        cosines = {i: float(np.dot(vectors[2 * i], vectors[2 * i + 1]))  # type: ignore[arg-type]
                   for i in range(len(pairs))
                   if vectors[2 * i] is not None and vectors[2 * i + 1] is not None}
        readable = list(cosines)
        verified = (self.verifier.score([(*pairs[i], cosines[i]) for i in readable]).tolist()
                    if self.verifier is not None and readable else [None] * len(readable))
        by_index = dict(zip(readable, verified))
        return [(cosines[i], by_index[i]) if i in cosines else None for i in range(len(pairs))]

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
        rule = self.policies.rule(request.namespace)
        gate, threshold = rule.gate, rule.threshold
        if request.min_similarity is not None:
            if rule.verify or rule.calibration is not None:
                gate = max(gate, request.min_similarity)  # may only make a promise stricter
            else:
                gate = threshold = request.min_similarity
        now = time.time()
        self.metrics.lookups += 1

        with self.metrics.stage("exact"):
            exact = await self._exact(k.exact, now)
        if exact is not None:
            entry, tier = exact
            self._promote(entry, tier)
            return self._respond_hit(entry, Tier.EXACT, 1.0, None, now, started)
        if threshold is None:  # a bound is set that the evidence cannot support yet
            return self._respond_miss(0.0, MissReason.UNCALIBRATED, started)

        with self.metrics.stage("embed"):
            vector = await self._embedder.submit(k.prompt)
        if vector is None:  # too long for the model: exact matches only
            return self._respond_miss(0.0, MissReason.TOO_LONG, started)

        best_miss, reason = 0.0, MissReason.NO_CANDIDATE
        for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
            if not self._worth_searching(tier, k.partition):
                continue
            with self.metrics.stage(f"search_{tier.name.lower()}"):
                candidates = await self._search(tier, k.partition, vector, now)
            if candidates:
                best_miss = max(best_miss, candidates[0].similarity)
            with self.metrics.stage("decide"):
                found = await self._decide(tier, candidates, k.prompt, vector, rule.verify, gate,
                                           threshold, now)
            if isinstance(found, MissReason):
                reason = max(reason, found)
                continue
            entry, similarity, score = found
            self._promote(entry, tier)
            return self._respond_hit(entry, tier, similarity, score, now, started)

        if reason <= MissReason.BELOW_SIMILARITY and await self._stored_elsewhere(k, now):
            reason = MissReason.OTHER_SCOPE
        return self._respond_miss(best_miss, reason, started)

    async def _decide(self, tier: Tier, candidates: list[Candidate], prompt: str,
                      vector: np.ndarray, verify: bool, gate: float, threshold: float,
                      now: float) -> tuple[Entry, float, float | None] | MissReason:
        """The entry to serve from one tier's candidates (best first), with its cosine and
        verifier score, or why none is served."""
        wanted = self.settings.verify_candidates if verify else 1
        passed: list[tuple[Entry, float]] = []
        vetoed = False
        for candidate in candidates:
            if not passes_gate(candidate.similarity, gate):
                break
            entry = await self._fetch(candidate.entry_id, tier)
            if entry is None or entry.expired(now):  # removed or expired since the search
                continue
            # Re-score against the entry itself: what is served provably meets the gate,
            # whatever an index did concurrently.
            similarity = float(np.dot(entry.vector, vector))
            if not passes_gate(similarity, gate):
                continue
            if self.policies.vetoed(entry.id, vector):
                vetoed = True
                continue
            passed.append((entry, similarity))
            if len(passed) == wanted:
                break
        if not passed:
            if vetoed:
                return MissReason.VETOED
            return MissReason.BELOW_SIMILARITY if candidates else MissReason.NO_CANDIDATE
        if not verify:
            entry, similarity = passed[0]
            return (entry, similarity, None) if similarity >= threshold else \
                MissReason.BELOW_SIMILARITY
        assert self._verifier is not None
        with self.metrics.stage("verify"):
            scores = await self._verifier.submit_many([(prompt, e.prompt, s) for e, s in passed])
        best = int(np.argmax(scores))
        if scores[best] >= threshold:
            entry, similarity = passed[best]
            return entry, similarity, float(scores[best])
        return MissReason.REJECTED_BY_VERIFIER

    async def _stored_elsewhere(self, k: _Keys, now: float) -> bool:
        """Whether this exact prompt is stored in the namespace under another partition (scope,
        template or version), among the prompts stored since this server started."""
        for partition in list(self._scope_hints.get(k.hint, ())):
            if partition != k.partition and await self._exact(
                    keys.exact_key(partition, k.prompt), now) is not None:
                return True
        return False

    def _remember_scope(self, k: _Keys) -> None:
        self._scope_hints.setdefault(k.hint, set()).add(k.partition)
        self._scope_hints.move_to_end(k.hint)
        while len(self._scope_hints) > SCOPE_HINTS:
            self._scope_hints.popitem(last=False)

    def _respond_miss(self, best_similarity: float, reason: MissReason,
                      started: float) -> LookupResult:
        self.metrics.misses += 1
        elapsed = time.perf_counter() - started
        self.metrics.record("lookup", elapsed)
        return LookupResult(hit=False, best_similarity=best_similarity, miss_reason=reason,
                            server_time_us=int(elapsed * 1e6))

    def _keys(self, request: LookupRequest | StoreRequest) -> _Keys:
        prompt = keys.normalise_prompt(request.prompt)
        partition = keys.partition_key(request.namespace, request.scope, request.template_id,
                                       request.template_version)
        hint = hashlib.blake2b(f"{request.namespace}\0{prompt}".encode(), digest_size=16).digest()
        return _Keys(prompt, partition, keys.exact_key(partition, prompt), hint)

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
        if entry.id in self._moving or entry.id in self.warm:
            return  # another lookup is already moving it
        move = self._moving[entry.id] = _Move(entry)
        try:
            await self.warm.put([entry])
            if not move.cancelled and await self.cold.remove([entry.id]) and not move.cancelled:
                self.metrics.promotions[Tier.COLD] += 1
                self._hold_hot(entry)
                self._track_expiry(entry)
                self._maybe_demote()
                return
            # Removed (invalidated, deleted, replaced) while we copied it: so must our copy be.
            self.hot.remove(entry.id)
            await self.warm.remove([entry.id])
            await self.cold.remove([entry.id])
        finally:
            del self._moving[entry.id]

    def _respond_hit(self, entry: Entry, tier: Tier, similarity: float,
                     verifier_score: float | None, now: float, started: float) -> LookupResult:
        self.metrics.hits[tier] += 1
        elapsed = time.perf_counter() - started
        self.metrics.record("lookup", elapsed)
        return LookupResult(hit=True, response=entry.response, similarity=similarity,
                            matched_prompt=entry.prompt, entry_id=entry.id, tier=tier,
                            age_s=max(0.0, now - entry.created_at), verifier_score=verifier_score,
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
            vector = await self._embedder.submit(k.prompt)
        if vector is None:
            # Longer than the model reads: served to exact matches only. A zero vector has
            # similarity 0 to everything, and decide never serves similarity 0.
            vector = np.zeros(self.encoder.dimension, dtype=np.float32)
        now = time.time()
        entry = Entry(
            id=uuid.uuid4().hex, namespace=request.namespace, partition=k.partition,
            exact_key=k.exact, prompt=request.prompt, response=bytes(request.response),
            vector=vector, created_at=now,
            expires_at=None if request.ttl_s is None else now + request.ttl_s,
            template_id=request.template_id, template_version=request.template_version,
            user_id=request.user_id, metadata=dict(request.metadata))
        with self.metrics.stage("store_durable"):
            # Shielded: once the entry is being written, a cancelled call (a client deadline)
            # must not leave disk and memory disagreeing.
            replaced = await asyncio.shield(self._spawn(self._store_entry(entry), awaited=True))
        self._remember_scope(k)
        self.metrics.stores += 1
        self.metrics.record("store", time.perf_counter() - started)
        return StoreResult(entry.id, replaced)

    async def _store_entry(self, entry: Entry) -> bool:
        """Writes ``entry`` durably and replaces what had its exact key; Stores of one exact key
        run one at a time, so concurrent Stores of one prompt leave exactly one entry."""
        async with self._key_locks.hold(entry.exact_key):
            replaced = self._ids_with_exact_key(entry.exact_key)
            if len(self.cold):
                replaced.update(await self.cold.ids_where("exact_key = ?", (entry.exact_key,)))
            self._cancel_moves(replaced)
            await self.warm.put([entry], replacing=replaced)
            if replaced:
                await self._remove_ids(replaced)  # whatever was not in warm
            self._hold_hot(entry)
            self._track_expiry(entry)
            self._maybe_demote()
            return bool(replaced)

    def _ids_with_exact_key(self, key: bytes) -> set[str]:
        """Ids in memory (hot, warm, moving) with this exact key; an interrupted move can leave
        one in two tiers."""
        hot_entry = self.hot.get_exact(key)
        found = {i for i in (hot_entry and hot_entry.id, self.warm.exact_id(key)) if i}
        found.update(i for i, m in self._moving.items() if m.entry.exact_key == key)
        return found

    def _track_expiry(self, entry: Entry) -> None:
        if entry.expires_at is None:
            return
        heapq.heappush(self._expiry, (entry.expires_at, entry.id))
        if len(self._expiry) > 2 * (len(self.warm) + len(self.hot)) + 1024:
            # Replaced and deleted entries leave stale items: rebuild from what is held.
            live = {i.id: i.expires_at for i in self.warm.infos() if i.expires_at is not None}
            live.update((e.id, e.expires_at) for e in self.hot.entries()
                        if e.expires_at is not None)
            self._expiry = [(t, i) for i, t in live.items()]
            heapq.heapify(self._expiry)

    # --- placement ----------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, T], *, awaited: bool = False) -> asyncio.Task[T]:
        """Runs ``coroutine`` as a task that ``close`` waits for. Failures of tasks nobody
        awaits (``awaited=False``) are logged."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if not awaited:
            task.add_done_callback(_log_failure)
        return task

    def _maybe_demote(self) -> None:
        if self.warm.over_budget() and (self._demotion is None or self._demotion.done()):
            self._demotion = self._spawn(self._demote_warm())

    async def _demote_warm(self) -> None:
        """Moves warm's least recently used entries to cold until warm is under its watermark."""
        while self.warm.over_budget():
            ids = self.warm.coldest(DEMOTION_BATCH, skip=self._moving)
            if not ids:
                return
            moves = {e.id: _Move(e) for e in self.warm.read_many(ids)}
            self._moving.update(moves)
            try:
                evicted = await self.cold.put([m.entry for m in moves.values()])
                self.hot.remove_many(evicted)
                self.metrics.demotions[Tier.COLD] += len(evicted)
                # Entries removed while we copied them must not survive in cold; entries removed
                # from here on are removed from both tiers by their remover.
                await self.cold.remove([i for i, m in moves.items() if m.cancelled])
                moved = await self.warm.remove([i for i, m in moves.items() if not m.cancelled])
                self.metrics.demotions[Tier.WARM] += len(moved)
                log.debug("demoted %d entries from warm to cold", len(moved))
            finally:
                for entry_id in moves:
                    del self._moving[entry_id]

    def _cancel_moves(self, ids: Iterable[str]) -> set[str]:
        """Marks moves of these entries as cancelled (the mover then undoes its copy); returns
        the ids that were moving."""
        moving = set()
        for entry_id in ids:
            move = self._moving.get(entry_id)
            if move is not None:
                move.cancelled = True
                moving.add(entry_id)
        return moving

    # --- policy, evidence and feedback ---------------------------------------------------------

    async def set_policy(self, namespace: str, policy: Policy, *,
                         clear_evidence: bool = False) -> PolicyStatus:
        """Sets a namespace's policy (replacing the old one whole); returns its status.

        Raises:
            InvalidArgument: a value out of range, or verify=True on a server without verifier.
        """
        self._check_open()
        namespace = validation.namespace(namespace)
        await self.policies.set_policy(namespace, policy)
        if clear_evidence:
            await self.policies.clear_evidence(namespace)
        return self.policies.status(namespace)

    async def policy_status(self, namespace: str) -> PolicyStatus:
        self._check_open()
        return self.policies.status(validation.namespace(namespace))

    async def add_evidence(self, namespace: str,
                           pairs: Sequence[tuple[str, str, bool]]) -> tuple[int, int, PolicyStatus]:
        """Scores labelled pairs (a = stored prompt, b = lookup prompt, whether serving a's
        answer for b is right) with this server's embedder and verifier and adds them to the
        namespace's evidence. Returns (added, skipped as too long to embed, status).

        Raises:
            InvalidArgument: no pairs, too many, or an empty/oversized text.
            StorageFull: the namespace's evidence is full.
        """
        self._check_open()
        namespace = validation.namespace(namespace)
        validation.labelled_pairs(pairs)
        loop = asyncio.get_running_loop()
        observations = []
        for start in range(0, len(pairs), EVIDENCE_CHUNK):
            # Chunks run on the model thread between lookups' passes, not through the bounded
            # queues: an import must not crowd out live traffic.
            chunk = pairs[start:start + EVIDENCE_CHUNK]
            normalised = [(keys.normalise_prompt(b), keys.normalise_prompt(a)) for a, b, _ in chunk]
            scores = await loop.run_in_executor(self._model_thread, self._score_pairs, normalised)
            observations += [Observation(q, m, bool(label), *score)
                             for (q, m), (_, _, label), score in zip(normalised, chunk, scores)
                             if score is not None]
        await self.policies.add(namespace, observations)
        return len(observations), len(pairs) - len(observations), self.policies.status(namespace)

    async def feedback(self, namespace: str, entry_id: str, prompt: str,
                       correct: bool) -> tuple[bool, PolicyStatus]:
        """Records whether serving ``entry_id`` for ``prompt`` was right. A wrong report vetoes
        the entry for prompts near ``prompt`` and, after ``feedback_evict_after`` reports (or at
        once when ``prompt`` is the entry's own prompt: its answer is wrong), deletes it. Every
        semantic report becomes evidence for the namespace's calibration. Returns (entry
        deleted, status).

        Raises:
            InvalidArgument: malformed namespace, id or prompt.
            NotFound: no such entry in this namespace (never stored, or removed since).
        """
        self._check_open()
        namespace = validation.namespace(namespace)
        entry_id = validation.entry_id(entry_id)
        prompt = keys.normalise_prompt(validation.prompt(prompt))
        entry = await self._find(entry_id)
        if entry is None or entry.namespace != namespace:
            raise NotFound(
                f"no entry {entry_id!r} in namespace {namespace!r}: it was never stored there, or "
                "has been removed, evicted or expired since it was served; feedback not recorded")
        if prompt == keys.normalise_prompt(entry.prompt):  # an exact hit: the answer itself
            if not correct:
                await self._remove_ids([entry_id])
                self.metrics.invalidated += 1
            return not correct, self.policies.status(namespace)
        vector = await self._embedder.submit(prompt)
        if vector is None:
            raise InvalidArgument("prompt is longer than the embedding model reads: it can only "
                                  "have been served as an exact hit, to its own prompt")
        similarity = float(np.dot(entry.vector, vector))
        score = None
        if self._verifier is not None:
            score = await self._verifier.submit((prompt, entry.prompt, similarity))
        await self.policies.add(namespace, [Observation(
            prompt, entry.prompt, correct, similarity, score, "feedback", entry_id)])
        deleted = False
        if not correct:
            reports = self.policies.add_veto(namespace, entry_id, vector)
            limit = self.settings.feedback_evict_after
            if limit and reports >= limit:
                deleted = bool(await self._remove_ids([entry_id]))
                self.metrics.invalidated += int(deleted)
                log.info("entry %s deleted after %d wrong reports", entry_id, reports)
        return deleted, self.policies.status(namespace)

    async def _find(self, entry_id: str) -> Entry | None:
        """The entry with this id, wherever it is (expired ones included)."""
        entry = self.hot.get(entry_id) or self.warm.get(entry_id)
        if entry is None and entry_id in self._moving:
            entry = self._moving[entry_id].entry
        if entry is None and len(self.cold):
            entry = await self.cold.get(entry_id)
        return entry

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

    async def _remove_where(self, match: Callable[[Any], bool], cold_where: str,
                            cold_args: tuple) -> int:
        """Removes every entry ``match`` accepts (it is given Entry or EntryInfo objects, which
        share the field names it reads), in every tier and in flight between tiers."""
        self._check_open()
        ids = set(self.hot.ids_where(match)) | set(self.warm.ids_where(match))
        ids.update(i for i, m in self._moving.items() if match(m.entry))
        if len(self.cold):
            ids.update(await self.cold.ids_where(cold_where, cold_args))
        removed = await self._remove_ids(ids)
        self.metrics.invalidated += removed
        return removed

    async def _remove_ids(self, ids: Iterable[str]) -> int:
        """Removes entries from every tier: memory first, so lookups stop serving them at once,
        and cancels their moves. Returns how many existed."""
        ids = set(ids)
        gone = self._cancel_moves(ids)
        gone.update(i for i in ids if self.hot.remove(i))
        gone.update(await self.warm.remove(ids))
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
            embed_batches=self._embedder.stats.batches, embed_texts=self._embedder.stats.items,
            rejected_overload=self._embedder.stats.rejected,
            stages={name: StageStats(v.count, v.p50_ms, v.p99_ms)
                    for name, v in m.stages().items()},
            uptime_s=time.monotonic() - self._started, simd_isa=_core.simd_isa(),
            verifier="" if self.verifier is None else self.verifier.identity.name,
            verify_batches=0 if self._verifier is None else self._verifier.stats.batches,
            verify_pairs=0 if self._verifier is None else self._verifier.stats.items,
            namespaces={ns: NamespaceStats(st.evidence, st.feedback_correct, st.feedback_wrong,
                                           st.vetoed_entries)
                        for ns in self.policies.namespaces()
                        for st in (self.policies.status(ns),)})

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
        if self._verifier is not None:
            await self._verifier.close()
        self._model_thread.shutdown(wait=True)
        self.policies.close()
        self.warm.close()
        self.cold.close()
        self._dir.close()


def passes_gate(similarity: float, gate: float) -> bool:
    """Whether a cosine similarity may be served at all: at least ``gate`` and positive (an
    entry whose prompt was too long to embed has a zero vector: similarity 0, never served)."""
    return similarity >= gate and similarity > 0

"""The Lookup and Store paths, written once, one small function per step.

Lookup:  validate -> exact key -> embed -> search tiers -> resolve -> verify -> decide -> respond
Store:   validate -> exact key -> embed -> durable write (placement) -> respond

``decide`` is pure: the resolved candidates of one tier, the verifier's scores and the rule in,
a hit or the reason for a miss out. Everything that waits (tiers, models) happens in the steps
around it.

A lookup never fails because a durable tier does: a tier that raises ``StorageFailed`` is
skipped (logged, counted), so the lookup degrades to what the other tiers hold, or a miss.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from . import keys, prices, validation
from .batching import Batcher
from .config import Settings
from .errors import StorageFailed, StorageFull
from .messages import LookupRequest, LookupResult, MissReason, StoreRequest, StoreResult
from .metrics import Metrics
from .placement import KeyedLocks, Placement
from .policy import PolicyBook, Rule
from .records import Entry, Tier as TierKind
from .tiers.base import Candidate, Tier

if TYPE_CHECKING:
    from .shared import SharedStore

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Candidates each tier returns; the decision takes the most similar that is still valid.
SEARCH_K = 4
#: Partitions this large in a tier are searched in every such tier at once (see _search).
PARALLEL_SEARCH_ROWS = 65536
#: Times a missed lookup searches again because entries moved between tiers while it searched.
SEARCH_RETRIES = 2
#: (namespace, prompt) pairs remembered to tell a miss that the prompt is stored in another
#: scope, and the partitions remembered (and probed on a miss) per pair, most recent first.
SCOPE_HINTS = 100_000
SCOPE_HINT_PARTITIONS = 4
#: Vectors of the prompts most recently embedded by lookups, kept so that the Store which
#: follows a miss (a gateway's usual next call) does not embed the same prompt again: on a CPU
#: embedder that halves the model's work for miss-then-store traffic. 2,048 vectors of MiniLM
#: are 3 MiB.
RECENT_VECTORS = 2048
#: Local copies of shared-store entries being written at once, at most.
MAX_FILLS = 256


@dataclass(frozen=True, slots=True)
class Keys:
    prompt: str  # normalised
    partition: bytes
    exact: bytes
    hint: bytes  # namespace and prompt, without the rest of the partition


@dataclass(frozen=True, slots=True)
class Fetched:
    """Entries a tier's search returned whole (the shared store's), and the change the node
    had applied when it read them (for :meth:`Pipeline._cache_locally`); None: read them back
    from the local tiers."""

    entries: dict[str, Entry] | None
    seen: int = 0


_LOCAL = Fetched(None)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A candidate read back from its tier and re-scored against the entry itself."""

    entry: Entry
    similarity: float
    vetoed: bool


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    similarity: float
    verifier_score: float | None


def passes_gate(similarity: float, gate: float) -> bool:
    """Whether a cosine similarity may be served at all: at least ``gate`` and positive (an
    entry whose prompt was too long to embed has a zero vector: similarity 0, never served)."""
    return similarity >= gate and similarity > 0


def tightened(rule: Rule, min_similarity: float | None) -> tuple[float, float | None]:
    """The (cosine gate, threshold) a lookup applies: the namespace's rule, made stricter by
    the request's ``min_similarity``, never looser (a namespace's policy is a floor)."""
    if min_similarity is None:
        return rule.gate, rule.threshold
    gate = max(rule.gate, min_similarity)
    if rule.verify or rule.threshold is None:  # the threshold is a verifier score, or none
        return gate, rule.threshold
    return gate, max(rule.threshold, min_similarity)


def decide(found: bool, resolved: list[Resolved], scores: list[float] | None, *, gate: float,
           threshold: float) -> Hit | MissReason:
    """The entry to serve from one tier, or why none is served.

    Args:
        found: whether the tier's search returned any candidate.
        resolved: the candidates that still exist, best cosine first.
        scores: the verifier's score of each resolved candidate that is not vetoed and passes
            the gate, in order; None when the rule does not verify.
        gate: cosine a candidate needs at all; threshold: what the best must reach (cosine, or
            the verifier's score when ``scores`` is given).
    """
    passing = [r for r in resolved if not r.vetoed and passes_gate(r.similarity, gate)]
    if not passing:
        if any(r.vetoed and passes_gate(r.similarity, gate) for r in resolved):
            return MissReason.VETOED
        return MissReason.BELOW_SIMILARITY if found else MissReason.NO_CANDIDATE
    if scores is None:
        best = passing[0]
        return Hit(best.entry, best.similarity, None) if best.similarity >= threshold else \
            MissReason.BELOW_SIMILARITY
    i = int(np.argmax(scores))
    if scores[i] >= threshold:
        return Hit(passing[i].entry, passing[i].similarity, float(scores[i]))
    return MissReason.REJECTED_BY_VERIFIER


class Pipeline:
    """Runs Lookups and Stores against one data directory's placement and models."""

    def __init__(self, settings: Settings, placement: Placement, policies: PolicyBook,
                 embedder: Batcher[str, np.ndarray | None],
                 verifier: Batcher[tuple[str, str, float], float] | None, dimension: int,
                 metrics: Metrics, shared: SharedStore | None = None) -> None:
        self._settings = settings
        self._placement = placement
        self._policies = policies
        self._embedder = embedder
        self._verifier = verifier
        self._dimension = dimension
        self._metrics = metrics
        #: The fleet's shared store (``--shared-store``): searched after the local tiers, and
        #: written before them.
        self._shared = shared
        self._fills: set[asyncio.Task[None]] = set()
        self._scope_hints: OrderedDict[bytes, deque[bytes]] = OrderedDict()
        self._recent_vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.user_locks = KeyedLocks()
        self._last_tier_error: dict[TierKind, float] = {}

    # --- Lookup -------------------------------------------------------------------------------

    async def lookup(self, request: LookupRequest) -> LookupResult:
        """The stored answer for a prompt with the same meaning in the same context, or a miss.

        Raises:
            InvalidArgument: the request breaks a limit (see ``validation``).
            Overloaded: the embedding queue is full, or would not reach the call in time.
        """
        started = time.perf_counter()
        m = self._metrics
        with m.stage("validate"):
            request = validation.lookup(request)
            k = self._keys(request)
        rule = self._policies.rule(request.namespace)
        gate, threshold = tightened(rule, request.min_similarity)
        verify = rule.verify
        now = time.time()
        m.lookups += 1

        with m.stage("exact"):
            exact = await self._guarded(self._placement.exact(k.exact, now), TierKind.EXACT)
            if exact is None and self._shared is not None:
                seen = self._shared.applied
                entry = await self._guarded(self._shared.exact(k.exact, now), TierKind.SHARED)
                if entry is not None:
                    self._fill(entry, seen)
                    exact = entry, TierKind.SHARED
        if exact is not None:
            entry, tier = exact
            self._placement.served(entry, tier)
            return self._hit(request.namespace, Hit(entry, 1.0, None), TierKind.EXACT, now,
                             started)
        if threshold is None:  # a bound is set that the evidence cannot support yet
            return self._miss(request.namespace, 0.0, MissReason.UNCALIBRATED, started)

        with m.stage("embed"):
            vector = await self._embedder.submit(k.prompt, deadline=request.deadline)
        self._remember_vector(k, vector)
        if vector is None:  # too long for the model: exact matches only
            return self._miss(request.namespace, 0.0, MissReason.TOO_LONG, started)

        best, reason, best_score = 0.0, MissReason.NO_CANDIDATE, None
        for _ in range(1 + SEARCH_RETRIES):
            epoch = self._placement.epoch
            async for tier, candidates, fetched in self._search(k.partition, vector, now):
                if candidates:
                    best = max(best, candidates[0].similarity)
                # Stage "decide": reading the candidates back, and the decision; the
                # verifier between them is stage "verify".
                resolving = time.perf_counter()
                resolved = await self._resolve(candidates, vector, gate, verify, now, fetched)
                resolving = time.perf_counter() - resolving
                scores = (await self._verify(k.prompt, resolved, gate, request.deadline)
                          if verify else None)
                deciding = time.perf_counter()
                found = decide(bool(candidates), resolved, scores, gate=gate, threshold=threshold)
                m.record("decide", resolving + time.perf_counter() - deciding)
                if isinstance(found, Hit):
                    if tier is TierKind.SHARED:
                        self._fill(found.entry, fetched.seen)
                    else:
                        self._placement.served(found.entry, tier)
                    return self._hit(request.namespace, found, tier, now, started)
                reason = max(reason, found)
                if scores:
                    best_score = max(scores) if best_score is None else max(best_score, *scores)
            if self._placement.epoch == epoch:  # nothing moved while we searched
                break

        if reason <= MissReason.BELOW_SIMILARITY and await self._stored_elsewhere(k, now):
            reason = MissReason.OTHER_SCOPE
        return self._miss(request.namespace, best, reason, started, best_score)

    def _keys(self, request: LookupRequest | StoreRequest) -> Keys:
        prompt = keys.normalise_prompt(request.prompt)
        partition = keys.partition_key(request.namespace, request.scope, request.template_id,
                                       request.template_version)
        hint = hashlib.blake2b(f"{request.namespace}\0{prompt}".encode(), digest_size=16).digest()
        return Keys(prompt, partition, keys.exact_key(partition, prompt), hint)

    async def _search(self, partition: bytes, vector: np.ndarray, now: float
                      ) -> AsyncIterator[tuple[TierKind, list[Candidate], Fetched]]:
        """Candidates per tier, in search order, one tier at a time (the caller stops at the
        first that serves): entries moving between tiers first (exactly), then each tier that
        may hold something the ones before it did not.

        The searches of the tiers holding PARALLEL_SEARCH_ROWS entries of the partition or more
        start at once, each on its own thread, and are taken in order: a miss in a large
        partition pays the slowest search, not their sum (a million entries over warm and cold:
        warm 2.0 ms and cold 4.1 ms at p50); one that is not needed is cancelled."""
        moving = [e for e in self._placement.moving_in(partition) if not e.expired(now)]
        if moving:
            sims = np.stack([e.vector for e in moving]) @ vector
            order = np.argsort(-sims)[:SEARCH_K]
            yield TierKind.WARM, [Candidate(moving[i].id, float(sims[i])) for i in order], _LOCAL
        tiers = [t for t in self._placement.tiers
                 if self._placement.worth_searching(t, partition)]
        started = {t.kind: asyncio.ensure_future(self._tier_search(t, partition, vector, now))
                   for t in tiers if t.count(partition) >= PARALLEL_SEARCH_ROWS}
        try:
            for tier in tiers:
                search = started.get(tier.kind)
                candidates = await (search if search is not None
                                    else self._tier_search(tier, partition, vector, now))
                yield tier.kind, candidates, _LOCAL
        finally:
            for search in started.values():
                search.cancel()
        if self._shared is not None:
            seen = self._shared.applied
            with self._metrics.stage("search_shared"):
                found = await self._guarded(
                    self._shared.search(partition, vector, SEARCH_K, now), TierKind.SHARED)
            entries = {entry.id: entry for entry, _ in found or ()}
            yield (TierKind.SHARED, [Candidate(e.id, sim) for e, sim in found or ()],
                   Fetched(entries, seen))

    async def _tier_search(self, tier: Tier, partition: bytes, vector: np.ndarray,
                           now: float) -> list[Candidate]:
        with self._metrics.stage(f"search_{tier.kind.name.lower()}"):
            candidates = await self._guarded(tier.search(partition, vector, SEARCH_K, now),
                                             tier.kind)
        return candidates or []

    async def _resolve(self, candidates: list[Candidate], vector: np.ndarray, gate: float,
                       verify: bool, now: float, fetched: Fetched | None = None) -> list[Resolved]:
        """Reads candidates back from wherever they are now (an entry may have moved since the
        search), drops removed and expired ones, and re-scores the rest against the entry
        itself, so what is served provably meets the gate whatever an index did concurrently."""
        wanted = self._settings.verify_candidates if verify else 1
        resolved: list[Resolved] = []
        passing = 0
        for candidate in candidates:
            if not passes_gate(candidate.similarity, gate) or passing == wanted:
                break
            entry = (fetched.entries.get(candidate.entry_id) if fetched and fetched.entries is not None else
                     await self._guarded(self._placement.find(candidate.entry_id), TierKind.COLD))
            if entry is None or entry.expired(now):
                continue
            similarity = float(np.dot(entry.vector, vector))
            vetoed = self._policies.vetoed(entry.id, vector)
            resolved.append(Resolved(entry, similarity, vetoed))
            passing += not vetoed and passes_gate(similarity, gate)
        return resolved

    async def _verify(self, prompt: str, resolved: list[Resolved], gate: float,
                      deadline: float | None) -> list[float]:
        passing = [r for r in resolved if not r.vetoed and passes_gate(r.similarity, gate)]
        if not passing:
            return []
        assert self._verifier is not None
        with self._metrics.stage("verify"):
            return await self._verifier.submit_many(
                [(prompt, r.entry.prompt, r.similarity) for r in passing], deadline=deadline)

    async def _guarded(self, step: Awaitable[T], tier: TierKind) -> T | None:
        """``step``'s result, or None when a durable tier fails: a lookup degrades to a miss."""
        try:
            return await step
        except StorageFailed as exc:
            self._metrics.tier_errors[tier] += 1
            last = self._last_tier_error.get(tier, 0.0)
            if time.monotonic() - last >= 1.0:  # one line a second, not one per lookup
                self._last_tier_error[tier] = time.monotonic()
                log.error("lookup served as a miss: %s (%d such failures so far)", exc,
                          self._metrics.tier_errors[tier])
            return None

    async def _stored_elsewhere(self, k: Keys, now: float) -> bool:
        """Whether this exact prompt is stored in the namespace under another partition (scope,
        template or version), among the last few partitions it was stored under since this
        server started. Bounded: at most SCOPE_HINT_PARTITIONS exact probes a miss."""
        for partition in list(self._scope_hints.get(k.hint, ())):
            if partition != k.partition and await self._guarded(self._placement.exact(
                    keys.exact_key(partition, k.prompt), now), TierKind.EXACT) is not None:
                return True
        return False

    def _remember_vector(self, k: Keys, vector: np.ndarray | None) -> None:
        """Keeps a looked-up prompt's vector for the Store that may follow (RECENT_VECTORS).
        Keyed by namespace and normalised prompt (``k.hint``): the vector depends on the prompt
        alone, and this server's model never changes while it runs."""
        if vector is None:
            return
        self._recent_vectors[k.hint] = vector
        self._recent_vectors.move_to_end(k.hint)
        if len(self._recent_vectors) > RECENT_VECTORS:
            self._recent_vectors.popitem(last=False)

    def _remember_scope(self, k: Keys) -> None:
        partitions = self._scope_hints.get(k.hint)
        if partitions is None:
            partitions = self._scope_hints[k.hint] = deque(maxlen=SCOPE_HINT_PARTITIONS)
        if k.partition in partitions:
            partitions.remove(k.partition)
        partitions.appendleft(k.partition)
        self._scope_hints.move_to_end(k.hint)
        while len(self._scope_hints) > SCOPE_HINTS:
            self._scope_hints.popitem(last=False)

    def _hit(self, namespace: str, hit: Hit, tier: TierKind, now: float,
             started: float) -> LookupResult:
        self._metrics.hit(namespace, tier, hit.entry.cost)
        elapsed = time.perf_counter() - started
        self._metrics.record("lookup", elapsed)
        e = hit.entry
        return LookupResult(hit=True, response=e.response, similarity=hit.similarity,
                            matched_prompt=e.prompt, entry_id=e.id, tier=tier,
                            age_s=max(0.0, now - e.created_at),
                            verifier_score=hit.verifier_score, metadata=dict(e.metadata),
                            server_time_us=int(elapsed * 1e6))

    def _miss(self, namespace: str, best_similarity: float, reason: MissReason, started: float,
              verifier_score: float | None = None) -> LookupResult:
        self._metrics.miss(namespace, reason)
        elapsed = time.perf_counter() - started
        self._metrics.record("lookup", elapsed)
        return LookupResult(hit=False, best_similarity=best_similarity, miss_reason=reason,
                            verifier_score=verifier_score, server_time_us=int(elapsed * 1e6))

    # --- Store --------------------------------------------------------------------------------

    async def store(self, request: StoreRequest) -> StoreResult:
        """Stores an answer durably and returns its id; replaces an entry with the same exact key.

        Raises:
            InvalidArgument: the request breaks a limit.
            Overloaded: the embedding queue is full, or would not reach the call in time.
            StorageFull: the disk budget or the disk is full.
            StorageFailed: the warm tier failed to write (nothing was stored).
        """
        started = time.perf_counter()
        m = self._metrics
        with m.stage("validate"):
            request = validation.store(request)
            cost = prices.checked_cost(request.cost)
            k = self._keys(request)
        with m.stage("embed"):
            vector = self._recent_vectors.pop(k.hint, None)
            if vector is None:
                vector = await self._embedder.submit(k.prompt, deadline=request.deadline)
        if vector is None:
            # Longer than the model reads: served to exact matches only. A zero vector has
            # similarity 0 to everything, and decide never serves similarity 0.
            vector = np.zeros(self._dimension, dtype=np.float32)
        now = time.time()
        entry = Entry(
            id=uuid.uuid4().hex, namespace=request.namespace, partition=k.partition,
            exact_key=k.exact, prompt=request.prompt, response=bytes(request.response),
            vector=vector, created_at=now,
            expires_at=None if request.ttl_s is None else now + request.ttl_s,
            template_id=request.template_id, template_version=request.template_version,
            user_id=request.user_id, metadata=dict(request.metadata), cost=cost)
        with m.stage("store_durable"):
            replaced = await self._placement.shielded(self._store_entry(entry))
        self._remember_scope(k)
        m.stored(request.namespace)
        m.record("store", time.perf_counter() - started)
        return StoreResult(entry.id, replaced)

    async def _store_entry(self, entry: Entry) -> bool:
        if entry.user_id is None:
            return await self._store_everywhere(entry)
        # A DeleteUser running now finishes first: it must not miss this entry, nor destroy
        # the user's key under it.
        async with self.user_locks.hold(entry.user_id):
            return await self._store_everywhere(entry)

    async def _store_everywhere(self, entry: Entry) -> bool:
        """The local tiers alone; or, with a shared store, the shared store first (the Store
        is acknowledged once it is committed there) and the local tiers as its cache."""
        if self._shared is None:
            return await self._placement.store(entry)
        seen = self._shared.applied
        replaced = bool(await self._shared.store(entry))
        await self._cache_locally(entry, seen)
        return replaced

    def _fill(self, entry: Entry, seen: int) -> None:
        """Caches an entry read from the shared store in the local tiers, in the background
        (at most MAX_FILLS at once: past that the next lookup reads it again instead)."""
        if len(self._fills) >= MAX_FILLS:
            return
        task = asyncio.get_running_loop().create_task(self._cache_locally(entry, seen))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _cache_locally(self, entry: Entry, seen: int) -> None:
        """Writes a copy of a shared entry to the local tiers, unless a change applied since
        change ``seen`` (when it was read or written) may have removed it: the feed that
        applied that change could not remove a copy that was not there yet."""
        assert self._shared is not None
        try:
            await self._placement.store(entry)
        except (StorageFull, StorageFailed) as exc:  # a cache: the shared store has it
            log.warning("entry %s not cached locally: %s", entry.id, exc)
            return
        if self._shared.changed_since(seen, entry):
            await self._placement.remove([entry.id])

    async def settled(self) -> None:
        """Waits until local copies of shared entries are written (tests, benchmarks)."""
        while self._fills:
            await asyncio.gather(*list(self._fills), return_exceptions=True)

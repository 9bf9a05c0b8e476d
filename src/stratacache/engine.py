"""The cache engine: a short facade over the pieces of one data directory.

- ``pipeline``: the Lookup and Store paths (validate, exact key, embed, search, decide, respond);
- ``placement``: the tiers and every move between them, removals and expiry;
- ``feedback``: labelled evidence and reports on hits;
- ``policy``: each namespace's decision rule.

``Engine.open`` builds them, ``close`` stops them; every other method validates what only it
knows about and hands the call on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _core, datadir, operating_point, prices, validation
from .batching import Batcher, model_executor
from .config import Settings
from .datadir import DataDir
from .embed import Encoder
from .errors import NotFound, Unavailable
from .feedback import Feedback
from .keyring import KeyRing
from .messages import (LookupRequest, LookupResult, NamespaceCounts, NamespaceStats, StageStats,
                       Stats, StoreRequest, StoreResult, TierStats)
from .metrics import LoopLagProbe, Metrics
from .pipeline import Pipeline
from .placement import Placement
from .policy import Defaults, Observation, Policy, PolicyBook, PolicyStatus
from .records import Entry, Tier
from .tiers.base import Filter, Quarantine, return_free_memory
from .tiers.cold import ColdTier
from .tiers.hot import DEFAULT_HNSW_MIN_ENTRIES, HotTier
from .tiers.warm import WarmTier
from .verify import Verifier

if TYPE_CHECKING:
    from .shared import EvidenceRow, SharedStore

log = logging.getLogger(__name__)

#: The policy, evidence and feedback file inside the data directory.
EVIDENCE_FILE = "evidence.sqlite3"
_NO_COUNTS = NamespaceCounts()


class Engine:
    """Owns the tiers and the models' batchers of one data directory.

    Use ``await Engine.open(settings, encoder)`` and ``await engine.close()``; all other methods
    are coroutines that must run on the loop that opened it.
    """

    def __init__(self, settings: Settings, encoder: Encoder, *, verifier: Verifier | None = None,
                 hnsw_min_entries: int = DEFAULT_HNSW_MIN_ENTRIES) -> None:
        self.settings = settings
        self.encoder = encoder
        self.verifier = verifier
        dim = encoder.dimension
        # First: a bad price table is a configuration error, found before anything is opened.
        self.metrics = Metrics(max_namespaces=settings.metrics_max_namespaces,
                               prices=prices.load(settings.prices))
        self._dir = DataDir(settings.data_dir, encoder.identity, model=settings.model)
        opened = ExitStack()  # what to close if a later step fails
        opened.callback(self._dir.close)
        try:
            self.keys = KeyRing(self._dir.path / datadir.KEYS)
            opened.callback(self.keys.close)
            self.quarantine = Quarantine(self._dir.path / datadir.QUARANTINE)
            hot = HotTier(dim, capacity=settings.hot_capacity, max_bytes=settings.hot_max_bytes,
                          m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction,
                          ef_search=settings.hnsw_ef_search, hnsw_min_entries=hnsw_min_entries)
            warm = WarmTier(self._dir.warm_path, dim, max_bytes=settings.warm_max_bytes,
                            keys=self.keys, quarantine=self.quarantine)
            opened.callback(warm.close)
            cold = ColdTier(self._dir.cold_path, dim, max_bytes=settings.cold_max_bytes,
                            keys=self.keys, quarantine=self.quarantine)
            opened.callback(cold.close)
            self.policies = PolicyBook(
                self._dir.path / EVIDENCE_FILE, _defaults(settings, verifier),
                embedder_id=encoder.identity.fingerprint,
                verifier_id=None if verifier is None else verifier.identity.scorer)
        except BaseException:
            opened.close()
            raise
        self.placement = Placement(hot, warm, cold, on_removed=self.policies.forget_entries)
        #: With --shared-store: the fleet's cache, which the local tiers cache in turn.
        self.shared: SharedStore | None = None
        if settings.shared_store:
            from .shared import SharedStore

            identity = encoder.identity
            self.shared = SharedStore(
                settings.shared_store, dimension=dim, state_dir=self._dir.path,
                model={"name": identity.name, "fingerprint": identity.fingerprint},
                m=settings.hnsw_m, ef_construction=settings.hnsw_ef_construction,
                ef_search=settings.hnsw_ef_search)
        self._model_thread = model_executor()
        self._embedder: Batcher[str, np.ndarray | None] = Batcher(
            encoder.encode_whole, name="embedding", flag="--embed-max-queue",
            max_batch=settings.embed_max_batch or encoder.max_batch,
            max_wait_s=settings.embed_max_wait_ms / 1000,
            max_queue=settings.embed_max_queue, executor=self._model_thread,
            on_batch=self.metrics.batch_observer("embed"))
        self._verifier: Batcher[tuple[str, str, float], float] | None = None if verifier is None else Batcher(
            lambda pairs: verifier.score(pairs).tolist(), name="verification",
            flag="--embed-max-queue", max_batch=settings.verify_max_batch, max_wait_s=0.0,
            max_queue=settings.embed_max_queue, executor=self._model_thread,
            on_batch=self.metrics.batch_observer("verify"))
        self.pipeline = Pipeline(settings, self.placement, self.policies, self._embedder,
                                 self._verifier, dim, self.metrics, shared=self.shared)
        self.feedback_desk = Feedback(self.policies, self.placement, encoder, verifier,
                                      self._model_thread, self._embedder, self._verifier,
                                      self.metrics, evict_after=settings.feedback_evict_after,
                                      remove=self._remove_ids, find=self._find,
                                      publish=None if self.shared is None
                                      else self._publish_evidence)
        self._sweeper: asyncio.Task[None] | None = None
        self.loop_lag = LoopLagProbe(observe=self.metrics.observe_loop_lag)
        self.metrics.describe(model=encoder.identity.name, device=encoder.device,
                              backend=encoder.backend)
        self.metrics.watch(
            tiers={"hot": hot, "warm": warm, "cold": cold},
            queues={name: (lambda b=b: b.queued) for name, b in
                    (("embed", self._embedder), ("verify", self._verifier)) if b is not None},
            demotions=self.placement.demotions)
        self._started = time.monotonic()
        self._closed = False

    @classmethod
    async def open(cls, settings: Settings, encoder: Encoder, *, verifier: Verifier | None = None,
                   **kwargs: int) -> "Engine":
        engine = cls(settings, encoder, verifier=verifier, **kwargs)
        try:
            await engine.placement.reconcile()
            if engine.shared is None:
                await engine.feedback_desk.load()
            else:  # the node's evidence is replaced by the fleet's, then loaded
                from .shared import Replica

                await engine.shared.open(Replica(
                    apply=engine._apply_change, reset=engine._forget_local_copies,
                    take_book=engine._take_book, own_book=engine.policies.everything))
            # What they built of every warm entry is gone now; the heap pages it held stay
            # resident unless handed back (about 190 bytes a warm entry at 100k entries).
            return_free_memory()
        except BaseException:
            await engine.close()
            raise
        engine._embedder.start()
        if engine._verifier is not None:
            engine._verifier.start()
        engine._sweeper = asyncio.get_running_loop().create_task(engine._sweep_forever())
        engine.loop_lag.start()
        engine.placement.maybe_demote()
        return engine

    @property
    def hot(self) -> HotTier:
        return self.placement.hot

    @property
    def warm(self) -> WarmTier:
        return self.placement.warm

    @property
    def cold(self) -> ColdTier:
        return self.placement.cold

    # --- the gateway's calls ------------------------------------------------------------------

    async def lookup(self, request: LookupRequest) -> LookupResult:
        """See :meth:`Pipeline.lookup`."""
        self._check_open()
        return await self.pipeline.lookup(request)

    async def store(self, request: StoreRequest) -> StoreResult:
        """See :meth:`Pipeline.store`."""
        self._check_open()
        return await self.pipeline.store(request)

    async def feedback(self, namespace: str, entry_id: str, prompt: str,
                       correct: bool) -> tuple[bool, PolicyStatus]:
        """See :meth:`Feedback.report`."""
        self._check_open()
        reported = await self.feedback_desk.report(namespace, entry_id, prompt, correct)
        self.metrics.feedback(validation.namespace(namespace), correct)
        return reported

    # --- policy and evidence ------------------------------------------------------------------

    async def set_policy(self, namespace: str, policy: Policy, *,
                         clear_evidence: bool = False) -> PolicyStatus:
        """Sets a namespace's policy (replacing the old one whole); returns its status.

        Raises:
            InvalidArgument: a value out of range, or verify=True on a server without verifier.
        """
        self._check_open()
        namespace = validation.namespace(namespace)
        policy = self.policies.checked(policy)
        applied = False
        if self.shared is not None:  # every node applies it from its change feed, this one too
            change = await self.shared.set_policy(namespace, policy,
                                                  clear_evidence=clear_evidence)
            applied = await self.shared.applied_through(change)
        if not applied:  # no shared store, or this node's feed is reconnecting (idempotent)
            await self._apply_policy(namespace, policy, clear_evidence)
        return await self._settled_status(namespace)

    async def _apply_policy(self, namespace: str, policy: Policy, clear_evidence: bool) -> None:
        await self.policies.set_policy(namespace, policy)
        if clear_evidence:
            await self.policies.clear_evidence(namespace)

    async def _publish_evidence(self, namespace: str, observations: list[Observation]) -> None:
        """Adds observations to the shared store's evidence; returns once this node's change
        feed has recorded them (or APPLY_WAIT_S has passed: it records them when back).

        Raises:
            StorageFull: the namespace holds as much evidence as a node keeps.
            Unavailable: the shared store is unreachable (nothing added).
        """
        assert self.shared is not None
        self.policies.check_room(namespace, len(observations))
        await self.shared.applied_through(await self.shared.add_evidence(
            namespace, observations, self.policies.verifier_id))

    async def _take_book(self, policies: dict[str, Policy],
                         evidence: list[EvidenceRow]) -> None:
        """Replaces this node's policies and evidence with the shared store's, and loads them
        (re-scoring rows another verifier scored, rebuilding the vetoes)."""
        await self.policies.replace_all(policies, evidence)
        await self.feedback_desk.load()

    async def policy_status(self, namespace: str) -> PolicyStatus:
        self._check_open()
        return await self._settled_status(validation.namespace(namespace))

    async def add_evidence(self, namespace: str,
                           pairs: Sequence[tuple[str, str, bool]]) -> tuple[int, int, PolicyStatus]:
        """See :meth:`Feedback.add_evidence`."""
        self._check_open()
        added, skipped, _ = await self.feedback_desk.add_evidence(namespace, pairs)
        return added, skipped, await self._settled_status(validation.namespace(namespace))

    async def _settled_status(self, namespace: str) -> PolicyStatus:
        """The status once the namespace's calibration (off the loop) has caught up."""
        await self.policies.settled(namespace)
        return self.policies.status(namespace)

    # --- admin --------------------------------------------------------------------------------

    async def invalidate_template(self, namespace: str, template_id: str,
                                  version: str | None) -> int:
        """Removes the template's entries (one version, or all); returns how many."""
        namespace = validation.explicit_namespace(namespace, "InvalidateTemplate")
        template_id = validation.required_label("template_id", template_id)
        if version is not None:
            version = validation.required_label("version", version)
        return await self._remove(Filter(namespace=namespace, template_id=template_id,
                                         template_version=version))

    async def invalidate_namespace(self, namespace: str) -> int:
        return await self._remove(Filter(namespace=validation.explicit_namespace(namespace)))

    async def delete_user(self, user_id: str, namespace: str | None) -> int:
        """Removes every entry and every evidence row of a user (in one namespace, or all)."""
        user_id = validation.required_label("user_id", user_id)
        if namespace is not None:
            namespace = validation.explicit_namespace(namespace, "DeleteUser")
        async with self.pipeline.user_locks.hold(user_id):
            removed = await self._remove(Filter(user_id=user_id, namespace=namespace),
                                         kind="user")
            await self._forget_user(user_id, namespace)
        return removed

    async def _forget_user(self, user_id: str, namespace: str | None) -> None:
        """A user's evidence and keys on this node (their entries are removed already)."""
        await self.policies.delete_user(user_id, namespace)
        # The copies LMDB keeps in free pages are encrypted with the user's keys: destroying
        # them erases those copies. Entries are removed first, so no move re-encrypts one
        # under a new key; a Store of this user waits for the lock.
        await asyncio.to_thread(self.keys.destroy, user_id, namespace)
        await self.cold.scrub()

    async def delete_entry(self, entry_id: str, *,
                           within: Callable[[str], bool] | None = None) -> int:
        """Removes one entry; returns 1.

        Args:
            entry_id: the entry's id.
            within: only remove an entry whose namespace this accepts (a scoped key's); one
                elsewhere is answered exactly as a missing one, so the caller cannot tell that
                it exists.

        Raises:
            NotFound: no tier holds the id (or ``within`` refuses its namespace).
        """
        self._check_open()
        entry_id = validation.entry_id(entry_id)
        missing = NotFound(f"no entry with id {entry_id!r}: it was never stored, or has been "
                           "removed, evicted or expired")
        if within is not None:
            entry = await self._find(entry_id)
            if entry is None or not within(entry.namespace):
                raise missing
        removed = await self._remove_ids([entry_id])
        if not removed:
            raise missing
        return removed

    async def _find(self, entry_id: str) -> Entry | None:
        """An entry by id: in the local tiers, else in the shared store."""
        entry = await self.placement.find(entry_id)
        if entry is None and self.shared is not None:
            entry = await self.shared.get(entry_id)
        return entry

    async def _remove_ids(self, ids: list[str]) -> int:
        """Removes entries by id (DeleteEntry, feedback): from the shared store first, then
        from the local tiers; returns how many were found."""
        self._check_open()
        shared = 0 if self.shared is None else await self.shared.remove(
            Filter(ids=frozenset(ids)))
        removed = max(shared, await self.placement.remove(ids))
        self.metrics.invalidated += removed
        return removed

    async def _remove(self, where: Filter, *, kind: str = "remove") -> int:
        """Removes what ``where`` selects: from the shared store first (announced to every
        node), then from the local tiers."""
        self._check_open()
        shared = 0 if self.shared is None else await self.shared.remove(where, kind=kind)
        removed = max(shared, await self.placement.remove_matching(where))
        self.metrics.invalidated += removed
        return removed

    # --- changes made through other nodes (--shared-store) ----------------------------------

    async def _apply_change(self, kind: str, body: dict[str, Any]) -> None:
        """Applies a change announced through the shared store (made by any node, this one
        included: every change is idempotent) to this node's local state."""
        from .shared import filter_from

        if kind == "remove":
            await self.placement.remove_matching(filter_from(body))
        elif kind == "user":
            where = filter_from(body)
            assert where.user_id is not None
            async with self.pipeline.user_locks.hold(where.user_id):
                await self.placement.remove_matching(where)
                await self._forget_user(where.user_id, where.namespace)
        elif kind == "policy":
            await self._apply_policy(body["namespace"], Policy(**body["policy"]),
                                     bool(body.get("clear_evidence")))
        elif kind == "evidence":
            await self.feedback_desk.apply(body["namespace"], body["observations"])
        else:
            log.warning("ignoring a shared-store change of unknown kind %r (a newer server "
                        "wrote it): upgrade this node", kind)

    async def _forget_local_copies(self) -> None:
        """Empties the local tiers (a node that cannot tell what changed while it was away)."""
        removed = await self.placement.remove_matching(Filter())
        log.info("removed %d local copies of shared entries", removed)

    # --- expiry -------------------------------------------------------------------------------

    async def sweep_expired(self) -> int:
        """Removes entries whose TTL has passed (and, with a shared store, its expired rows and
        old change log); returns how many local entries."""
        now = time.time()
        if self.shared is not None:
            await self.shared.sweep(now)
        return await self.placement.sweep_expired(now)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep_expired()
            except Exception as exc:
                log.warning("expiry sweep failed, retrying at the next interval: %s", exc)

    async def settled(self) -> None:
        """Waits until no background move or hot-tier graph build runs (tests, benchmarks)."""
        await self.placement.settled()
        await self.hot.settled()
        await self.pipeline.settled()

    # --- stats and lifecycle ------------------------------------------------------------------

    async def stats(self) -> Stats:
        m, s, p = self.metrics, self.settings, self.placement
        cold_file = await asyncio.to_thread(self.cold.file_bytes)

        def tier(t: Tier, entries: int, size: int, capacity: int) -> TierStats:
            return TierStats(entries, size, capacity, m.hits[t], p.demotions[t], p.promotions[t])

        def batches(b: Batcher[Any, Any] | None) -> tuple[int, int]:
            return (0, 0) if b is None else (b.stats.batches, b.stats.items)

        verify_batches, verify_pairs = batches(self._verifier)
        lag = self.loop_lag.summary()
        # Namespaces with a policy or evidence, and those counted since start (past the
        # --metrics-max-namespaces cap, pooled under metrics.OTHER).
        policies, counted = self.policies.counts(), self.metrics.namespaces()
        namespaces = {}
        for ns in policies.keys() | counted.keys():
            evidence, right, wrong, vetoed = policies.get(ns, (0, 0, 0, 0))
            namespaces[ns] = NamespaceStats(
                evidence=evidence, feedback_correct=right, feedback_wrong=wrong,
                vetoed_entries=vetoed, **dataclasses.asdict(counted.get(ns, _NO_COUNTS)))
        return Stats(
            model=self.encoder.identity.name, dimension=self.encoder.dimension,
            device=self.encoder.device, default_min_similarity=s.min_similarity,
            lookups=m.lookups, hits=sum(m.hits.values()), misses=m.misses, stores=m.stores,
            expired=p.expired, invalidated=m.invalidated,
            exact=tier(Tier.EXACT, 0, 0, 0),
            hot=tier(Tier.HOT, len(self.hot), self.hot.bytes, s.hot_capacity),
            warm=tier(Tier.WARM, len(self.warm), self.warm.file_bytes(), s.warm_max_bytes),
            cold=tier(Tier.COLD, len(self.cold), cold_file, s.cold_max_bytes),
            embed_batches=self._embedder.stats.batches, embed_texts=self._embedder.stats.items,
            rejected_overload=self._embedder.stats.rejected,
            stages={name: StageStats(v.count, v.p50_ms, v.p99_ms, v.max_ms)
                    for name, v in m.stages().items()},
            loop_lag=StageStats(lag.count, lag.p50_ms, lag.p99_ms, lag.max_ms),
            uptime_s=time.monotonic() - self._started, simd_isa=_core.simd_isa(),
            verifier="" if self.verifier is None else self.verifier.identity.name,
            verify_batches=verify_batches, verify_pairs=verify_pairs,
            shed_deadline=sum(b.stats.shed for b in self._batchers()),
            model_restarts=sum(b.stats.restarts for b in self._batchers()),
            storage_errors=sum(m.tier_errors.values()), damaged_records=self.quarantine.damaged,
            erased_records=self.quarantine.erased, namespaces=namespaces,
            saved_dollars=sum(n.saved_dollars for n in counted.values()),
            saved_prompt_tokens=sum(n.saved_prompt_tokens for n in counted.values()),
            saved_completion_tokens=sum(n.saved_completion_tokens for n in counted.values()),
            saved_model_seconds=sum(n.saved_model_seconds for n in counted.values()))

    def _batchers(self) -> list[Batcher[Any, Any]]:
        return [b for b in (self._embedder, self._verifier) if b is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down: retry on another instance")

    async def close(self) -> None:
        """Finishes background moves, stops the models' batchers and closes the tiers."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.loop_lag.close()
        await self.pipeline.settled()
        if self.shared is not None:
            await self.shared.close()
        await self.placement.settled()
        await self.hot.settled()
        await self._embedder.close()
        if self._verifier is not None:
            await self._verifier.close()
        self._model_thread.shutdown(wait=True)
        self.policies.close()
        await self.placement.close()
        self.keys.close()
        self._dir.close()


def _defaults(settings: Settings, verifier: Verifier | None) -> Defaults:
    """The policy defaults: the flags, and the verifier's gate and threshold where the flags
    leave them to its card (logged once at start)."""
    if verifier is None:
        return Defaults(min_similarity=settings.min_similarity,
                        verify_gate=operating_point.BUILT_IN_GATE,
                        verify_threshold=operating_point.BUILT_IN_THRESHOLD,
                        max_wrong_rate=settings.max_wrong_rate, has_verifier=False)
    point = operating_point.choose(verifier.held_back(), min_similarity=settings.min_similarity,
                                   gate=settings.verify_gate, threshold=settings.verify_threshold)
    log.info("verifier defaults for namespaces without a bound: gate %.2f, decision score >= "
             "%.4f (%s); %s", point.gate, point.threshold, verifier.decision_score,
             point.explanation)
    return Defaults(min_similarity=settings.min_similarity, verify_gate=point.gate,
                    verify_threshold=point.threshold, max_wrong_rate=settings.max_wrong_rate,
                    has_verifier=True, verify_source=point.source,
                    verify_explanation=point.explanation)

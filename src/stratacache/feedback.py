"""Evidence and feedback: labelled pairs scored by this server's models, and reports on hits.

Evidence feeds each namespace's calibration (``policy``); a wrong report on a hit also vetoes
the entry for prompts like the reported one and, after enough reports, deletes it. Scoring runs
on the model thread between lookups' passes, not through the lookups' bounded queues, so an
import never crowds out live traffic.

With a shared store, scored observations are published there (``publish``) instead of being
recorded here: every node, this one included, records them when its change feed applies them
(:meth:`Feedback.apply`), so each node's calibration and vetoes rest on the fleet's evidence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from . import keys, validation
from .batching import Batcher
from .embed import Encoder
from .errors import InvalidArgument, NotFound
from .metrics import Metrics
from .placement import Placement
from .policy import Observation, PolicyBook, PolicyStatus
from .records import Entry
from .verify import Verifier

log = logging.getLogger(__name__)

#: Labelled pairs scored per model pass when evidence is imported or re-scored.
EVIDENCE_CHUNK = 64


class Feedback:
    """Scores evidence and records feedback for one engine."""

    def __init__(self, policies: PolicyBook, placement: Placement, encoder: Encoder,
                 verifier: Verifier | None, model_thread: Executor,
                 embedder: Batcher[str, np.ndarray | None],
                 verifier_batcher: Batcher[tuple[str, str, float], float] | None,
                 metrics: Metrics, *, evict_after: int,
                 remove: Callable[[list[str]], Awaitable[int]] | None = None,
                 find: Callable[[str], Awaitable[Entry | None]] | None = None,
                 publish: Callable[[str, list[Observation]], Awaitable[None]] | None = None,
                 ) -> None:
        self._policies = policies
        self._placement = placement
        self._encoder = encoder
        self._verifier = verifier
        self._model_thread = model_thread
        self._embedder = embedder
        self._verifier_batcher = verifier_batcher
        self._metrics = metrics
        self._evict_after = evict_after
        #: How an entry reported wrong is deleted: from the local tiers, or (with a shared
        #: store) from the shared store and every node.
        self._remove = remove or placement.remove
        #: How a reported entry is found: in the local tiers, or also in the shared store.
        self._find = find or placement.find
        #: With a shared store: publishes observations there, to be applied by every node.
        self._publish = publish
        self._verifier_id = None if verifier is None else verifier.identity.scorer

    async def _in_chunks(self, items: Sequence[object],
                         score: Callable[[list], list]) -> list:
        """``score`` over ``items`` on the model thread, EVIDENCE_CHUNK at a time."""
        loop = asyncio.get_running_loop()
        out: list = []
        for start in range(0, len(items), EVIDENCE_CHUNK):
            out.extend(await loop.run_in_executor(self._model_thread, score,
                                                  list(items[start:start + EVIDENCE_CHUNK])))
        return out

    async def load(self) -> None:
        """At start: re-scores evidence scored by other models, loads it, and rebuilds the
        feedback vetoes."""
        stale = await asyncio.to_thread(self._policies.stale_rows)
        if stale:
            log.info("re-scoring %d labelled observations made with another embedder or "
                     "verifier", len(stale))
            scores = await self._in_chunks([(q, m) for _, q, m in stale], self._score_pairs)
            await asyncio.to_thread(self._policies.rescore, [
                (row[0], *(score or (0.0, None))) for row, score in zip(stale, scores)])
        await self._veto(self._policies.load())

    async def _veto(self, wrong: Sequence[tuple[str, str, str]]) -> None:
        """Vetoes each (namespace, entry id, query) of wrong feedback for queries like it."""
        vectors = await self._in_chunks([q for _, _, q in wrong], self._encoder.encode)
        for (namespace, entry_id, _), vector in zip(wrong, vectors):
            self._policies.add_veto(namespace, entry_id, vector)

    def _score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, float | None] | None]:
        """(cosine, verifier score) of each (query, matched) pair, None where a text is longer
        than the embedder reads. Blocking: runs on the model thread."""
        vectors = self._encoder.encode_whole([t for p in pairs for t in p])
        cosines = {i: float(np.dot(vectors[2 * i], vectors[2 * i + 1]))  # type: ignore[arg-type]
                   for i in range(len(pairs))
                   if vectors[2 * i] is not None and vectors[2 * i + 1] is not None}
        readable = list(cosines)
        verified = (self._verifier.score([(*pairs[i], cosines[i]) for i in readable]).tolist()
                    if self._verifier is not None and readable else [None] * len(readable))
        by_index = dict(zip(readable, verified))
        return [(cosines[i], by_index[i]) if i in cosines else None for i in range(len(pairs))]

    async def add_evidence(self, namespace: str,
                           pairs: Sequence[tuple[str, str, bool]]) -> tuple[int, int, PolicyStatus]:
        """Scores labelled pairs (a = stored prompt, b = lookup prompt, whether serving a's
        answer for b is right) with this server's embedder and verifier and adds them to the
        namespace's evidence. Returns (added, skipped as too long to embed, status).

        Raises:
            InvalidArgument: no pairs, too many, or an empty/oversized text.
            StorageFull: the namespace's evidence is full.
        """
        namespace = validation.namespace(namespace)
        validation.labelled_pairs(pairs)
        normalised = [(keys.normalise_prompt(b), keys.normalise_prompt(a)) for a, b, _ in pairs]
        scores = await self._in_chunks(normalised, self._score_pairs)
        observations = [Observation(q, m, bool(label), *score)
                        for (q, m), (_, _, label), score in zip(normalised, pairs, scores)
                        if score is not None]
        await (self._publish or self._policies.add)(namespace, observations)
        return len(observations), len(pairs) - len(observations), self._policies.status(namespace)

    async def apply(self, namespace: str,
                    rows: Sequence[tuple[str, Observation, str | None]]) -> None:
        """Records observations published to the shared store (by any node): re-scored first
        where another verifier scored them, and vetoes added for wrong feedback."""
        stale = [i for i, (_, o, verifier) in enumerate(rows)
                 if self._verifier_id is not None and verifier != self._verifier_id]
        observations = [o for _, o, _ in rows]
        if stale:
            scores = await self._in_chunks([(observations[i].query, observations[i].matched)
                                            for i in stale], self._score_pairs)
            for i, score in zip(stale, scores):
                cosine, verified = score or (observations[i].similarity, None)
                observations[i] = dataclasses.replace(observations[i], similarity=cosine,
                                                      verifier_score=verified)
        await self._policies.add(namespace, observations, capped=False)
        await self._veto([(namespace, o.entry_id, o.query) for o in observations
                          if o.source == "feedback" and not o.correct and o.entry_id])

    async def report(self, namespace: str, entry_id: str, prompt: str,
                     correct: bool) -> tuple[bool, PolicyStatus]:
        """Records whether serving ``entry_id`` for ``prompt`` was right. A wrong report vetoes
        the entry for prompts near ``prompt`` and, after ``evict_after`` reports (or at once
        when ``prompt`` is the entry's own prompt: its answer is wrong), deletes it. Every
        semantic report becomes evidence for the namespace's calibration. Returns (entry
        deleted, status).

        Raises:
            InvalidArgument: malformed namespace, id or prompt.
            NotFound: no such entry in this namespace (never stored, or removed since).
        """
        namespace = validation.namespace(namespace)
        entry_id = validation.entry_id(entry_id)
        prompt = keys.normalise_prompt(validation.prompt(prompt))
        entry = await self._find(entry_id)
        if entry is None or entry.namespace != namespace:
            raise NotFound(
                f"no entry {entry_id!r} in namespace {namespace!r}: it was never stored there, or "
                "has been removed, evicted or expired since it was served; feedback not recorded")
        if prompt == keys.normalise_prompt(entry.prompt):  # an exact hit: the answer itself
            deleted = not correct and await self._delete(entry_id)
            return deleted, self._policies.status(namespace)
        vector = await self._embedder.submit(prompt)
        if vector is None:
            raise InvalidArgument("prompt is longer than the embedding model reads: it can only "
                                  "have been served as an exact hit, to its own prompt")
        similarity = float(np.dot(entry.vector, vector))
        score = None
        if self._verifier_batcher is not None:
            score = await self._verifier_batcher.submit((prompt, entry.prompt, similarity))
        observation = Observation(prompt, entry.prompt, correct, similarity, score, "feedback",
                                  entry_id, user_id=entry.user_id)
        if self._publish is not None:  # the change feed records it, and the veto
            await self._publish(namespace, [observation])
        else:
            await self._policies.add(namespace, [observation])
            if not correct:
                self._policies.add_veto(namespace, entry_id, vector)
        deleted = False
        if not correct:
            reports = self._policies.veto_count(entry_id)
            if self._evict_after and reports >= self._evict_after:
                deleted = await self._delete(entry_id)
                log.info("entry %s deleted after %d wrong reports", entry_id, reports)
        return deleted, self._policies.status(namespace)

    async def _delete(self, entry_id: str) -> bool:
        deleted = bool(await self._remove([entry_id]))
        self._metrics.invalidated += int(deleted)
        return deleted

"""Compact-code search (tiers.codes, _core.search_codes): how the warm and cold tiers search a
partition without float32 vectors in memory, and what they return: the exact best entries."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from stratacache import _core, keys
from stratacache.records import Entry
from stratacache.tiers import codes
from stratacache.tiers.cold import CODES_MIN_ROWS, ColdTier
from stratacache.tiers.warm import WarmTier

from .data import qqp_texts

DIM = 384
PARTITION = keys.partition_key("codes", {}, None, None)


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _neighbours(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` unit vectors near ``base`` rows: clusters of near-duplicates."""
    rng = np.random.default_rng(seed)
    v = base[np.arange(n) % len(base)] + rng.normal(0, noise, (n, base.shape[1])).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _mixtures(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors between two ``base`` rows (weights 0.5-1 and the rest) plus a little
    noise: distinct synthetic prompts around real ones (benchmarks/tier_scale.synthesize)."""
    from benchmarks.tier_scale import synthesize

    return synthesize(base, n, 0.01, seed)


def test_estimates_are_within_a_hundredth_and_ranked_best_first() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 3000, 97)  # a dimension that is no multiple of 8 or 64
    bits, values = codes.encode(vectors)
    query = vectors[7].copy()
    idx, scores = _core.search_codes(query, codes.query_bits(query), bits, values, 50, 3000)
    exact = vectors[idx] @ query
    assert idx[0] == 7 and abs(scores[0] - 1.0) < 0.01
    assert np.all(np.abs(exact - scores) < 0.01)
    assert np.all(np.diff(scores) <= 0)


def test_bad_input_is_refused_with_what_to_fix() -> None:
    vectors = _unit(np.random.default_rng(2), 10)
    bits, values = codes.encode(vectors)
    q = vectors[0].copy()
    with pytest.raises(ValueError, match="query must be a numpy float32 array"):
        _core.search_codes(q.astype(np.float64), codes.query_bits(q), bits, values, 1, 1)
    with pytest.raises(ValueError, match="must have 48 bytes"):
        _core.search_codes(q, codes.query_bits(q)[:40], bits, values, 1, 1)
    with pytest.raises(ValueError, match="bits has 10 rows but values has 9"):
        _core.search_codes(q, codes.query_bits(q), bits, values[:9], 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.search_codes(q, codes.query_bits(q), bits[::2], values[::2], 1, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        _core.search_codes(q, codes.query_bits(q), bits, values, 0, 1)


def test_removed_keys_are_never_returned_and_the_rest_still_find_themselves() -> None:
    rng = np.random.default_rng(3)
    vectors = _unit(rng, 600)
    matrix = codes.CodeMatrix(DIM)
    matrix.add([f"e{i}" for i in range(300)], vectors[:300])
    matrix.add([f"e{i}" for i in range(300, 600)], vectors[300:])
    assert matrix.remove(["e5"]) == 1 and matrix.remove(["e5"]) == 0
    assert matrix.remove([f"e{i}" for i in range(0, 600, 3)] + ["nobody"]) == 200
    assert len(matrix) == 600 - 201
    for i in range(600):
        found = dict(matrix.search(vectors[i], 5))
        if i % 3 == 0 or i == 5:
            assert f"e{i}" not in found
        else:
            assert next(iter(found)) == f"e{i}"
    assert matrix.nbytes() / len(matrix) < 2 * codes.row_bytes(DIM)


def test_recall_at_1_against_exact_search_on_real_embeddings(encoder) -> None:  # type: ignore[no-untyped-def]
    """The search the tiers run (codes, then the best few re-scored exactly) returns the exact
    best entry for at least 99 % of queries, in a partition of synthetic prompts around real
    question embeddings (benchmarks/tier_scale.py's, at a test's size)."""
    texts = qqp_texts(700)
    real = encoder.encode(texts)
    stored, queries = _mixtures(real[200:], 40_000, seed=4), real[:200]
    matrix = codes.CodeMatrix(DIM)
    matrix.add(list(range(len(stored))), stored)
    _, exact = _core.topk_ip(queries, stored, 1)

    def read(rows: list) -> list[tuple[str, np.ndarray]]:
        return [(str(r), stored[r]) for r in rows]

    found = [codes.exact_top_k(matrix.search(q, codes.rescored(4)), 1, read, q)[0] for q in queries]
    best = np.array([c.similarity for c in found])
    recall = float(np.mean(best >= exact[:, 0] - 1e-6))
    assert recall >= 0.99, f"recall@1 {recall:.3f} against exact search"


def _entries(vectors: np.ndarray, *, expires_at: float | None = None) -> list[Entry]:
    now = time.time()
    return [Entry(id=uuid.uuid4().hex, namespace="codes", partition=PARTITION,
                  exact_key=keys.exact_key(PARTITION, f"p{i}-{uuid.uuid4().hex}"), prompt=f"p{i}",
                  response=b"r", vector=v, created_at=now, expires_at=expires_at)
            for i, v in enumerate(vectors)]


def _exact(entries: list[Entry], query: np.ndarray, k: int) -> list[tuple[str, float]]:
    sims = np.stack([e.vector for e in entries]) @ query
    return [(entries[i].id, float(sims[i])) for i in np.argsort(-sims)[:k]]


@pytest.mark.parametrize("tier_kind", ["warm", "cold"])
def test_a_large_partition_returns_the_exact_best_through_every_change(tmp_path: Path,
                                                                        tier_kind: str) -> None:
    """Search through codes gives the exact top-k with exact similarities, and follows inserts,
    deletes and expiry (the cold tier's codes are built on the first search, then kept)."""
    rng = np.random.default_rng(5)
    base = _unit(rng, 50)
    vectors = _neighbours(base, CODES_MIN_ROWS + 300, 0.05, seed=6)
    queries = _neighbours(base, 20, 0.05, seed=7)

    async def scenario() -> None:
        tier = (WarmTier(tmp_path / "warm", DIM, max_bytes=1 << 30) if tier_kind == "warm"
                else ColdTier(tmp_path / "cold.sqlite3", DIM))
        try:
            live = _entries(vectors[:-100])
            await tier.put(live)
            now = time.time()

            async def check() -> None:
                for q in queries:
                    got = [(c.entry_id, round(c.similarity, 5))
                           for c in await tier.search(PARTITION, q, 4, now)]
                    assert got == [(i, round(s, 5)) for i, s in _exact(live, q, 4)]

            await check()
            later = _entries(vectors[-100:])  # after the codes exist
            await tier.put(later)
            live += later
            await check()
            gone = {e.id for e in live[::2]}
            assert len(await tier.remove(gone)) == len(gone)
            live = [e for e in live if e.id not in gone]
            await check()
            # Expired entries are never returned, however similar.
            expired = _entries(queries, expires_at=now - 1)
            await tier.put(expired)
            await check()
        finally:
            tier.close()

    asyncio.run(scenario())

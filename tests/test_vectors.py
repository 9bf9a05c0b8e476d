"""VectorMatrix: the exact search used by small hot partitions."""

from __future__ import annotations

import numpy as np

from stratacache.tiers.vectors import VectorMatrix


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_add_remove_search_match_numpy() -> None:
    rng = np.random.default_rng(7)
    vectors = _unit(rng, 300, 97)
    matrix = VectorMatrix(97)
    for i, v in enumerate(vectors):
        matrix.add(f"id{i}", v)
    removed = set(range(0, 300, 3))
    for i in removed:
        assert matrix.remove(f"id{i}")
    assert not matrix.remove("id0") and len(matrix) == 200
    kept = [i for i in range(300) if i not in removed]
    query = _unit(rng, 1, 97)[0]
    expected = sorted(kept, key=lambda i: -float(vectors[i] @ query))[:5]
    found = matrix.search(query, 5)
    assert [c.entry_id for c in found] == [f"id{i}" for i in expected]
    np.testing.assert_allclose([c.similarity for c in found],
                               [vectors[i] @ query for i in expected], rtol=1e-5)
    assert VectorMatrix(97).search(query, 5) == []


def test_hot_tier_bounds_bytes_as_well_as_entries() -> None:
    from stratacache.records import Entry
    from stratacache.tiers.hot import HotTier

    hot = HotTier(4, capacity=1000, max_bytes=3 * 70_000, m=16, ef_construction=100,
                  ef_search=32)
    vector = np.array([1, 0, 0, 0], dtype=np.float32)
    for i in range(10):
        dropped = hot.hold(Entry(id=f"{i:032x}", namespace="n", partition=b"p",
                                exact_key=bytes([i]) * 16, prompt="q", response=b"r" * 65_536,
                                vector=vector, created_at=0.0))
        assert len(hot) <= 3 and hot.bytes <= 3 * 70_000
    assert dropped == [f"{6:032x}"] and f"{9:032x}" in hot  # least recently used go first

"""VectorMatrix: the exact search used by small hot partitions and the warm tier."""

from __future__ import annotations

import asyncio

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
    np.testing.assert_array_equal(matrix.vector("id1"), vectors[1])
    assert asyncio.run(matrix.search_off_loop(query, 5)) == found
    assert VectorMatrix(97).search(query, 5) == []

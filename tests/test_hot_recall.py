"""The hot tier's HNSW graph finds what the exact kernel finds."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from stratacache import _core
from stratacache.records import Entry
from stratacache.tiers.hot import HotTier

from .data import qqp_texts


def test_hnsw_recall_at_1_against_exact_search(encoder) -> None:  # type: ignore[no-untyped-def]
    texts = qqp_texts(2500)
    vectors = encoder.encode(texts)
    stored, queries = vectors[:2000], vectors[2000:]
    hot = HotTier(384, capacity=10_000, m=16, ef_construction=200, ef_search=64,
                  hnsw_min_entries=64)
    for i, v in enumerate(stored):
        hot.hold(Entry(id=f"{i:032x}", namespace="n", partition=b"p", exact_key=bytes([i % 256]) * 16,
                      prompt=texts[i], response=b"", vector=v, created_at=0.0))
    exact, _ = _core.topk_ip(queries, stored, 1)
    now = time.time()

    async def search_all() -> list[int]:
        return [int((await hot.search(b"p", q, 1, now))[0].entry_id, 16) for q in queries]

    found = asyncio.run(search_all())
    recall = float(np.mean(np.array(found) == exact[:, 0]))
    assert recall >= 0.97, recall

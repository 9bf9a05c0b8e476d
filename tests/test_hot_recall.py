"""The hot tier's HNSW graph finds what the exact kernel finds, and is built off the event loop
without a lookup missing an entry meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


def test_the_graph_is_built_off_the_loop_and_no_entry_is_missed_meanwhile() -> None:
    """The partition that crosses hnsw_min_entries keeps its exact scan while its graph is built
    on a worker (held here by the test); entries added and removed meanwhile are found, and not
    found, before and after the graph is swapped in."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((80, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def entry(i: int) -> Entry:
        return Entry(id=f"{i:032x}", namespace="n", partition=b"p", exact_key=bytes([i]) * 16,
                     prompt=str(i), response=b"", vector=vectors[i], created_at=0.0)

    async def nearest(hot: HotTier, i: int) -> str:
        return (await hot.search(b"p", vectors[i], 1, 0.0))[0].entry_id

    release = threading.Event()
    with ThreadPoolExecutor(1) as builder:
        builder.submit(release.wait)  # the builder's only thread, held

        async def scenario() -> None:
            hot = HotTier(8, capacity=1000, m=8, ef_construction=50, ef_search=50,
                          hnsw_min_entries=64, build_executor=builder)
            for i in range(70):  # the 64th starts the build, which waits for the thread
                hot.hold(entry(i))
            hot.drop(entry(5).id)
            hot.drop(entry(66).id)
            assert hot._partitions[b"p"].graph is None  # still the exact scan
            for i in (0, 63, 64, 69):
                assert await nearest(hot, i) == entry(i).id
            assert await nearest(hot, 5) != entry(5).id
            assert hot.count(b"p") == 68

            release.set()
            await hot.settled()
            assert hot._partitions[b"p"].graph is not None
            hot.hold(entry(70))
            for i in (0, 63, 64, 69, 70):
                assert await nearest(hot, i) == entry(i).id
            assert entry(5).id not in {c.entry_id for c in await hot.search(b"p", vectors[5], 70, 0.0)}
            assert hot.count(b"p") == 69

        asyncio.run(scenario())


def test_an_entry_vector_is_held_once_and_handed_out_exactly() -> None:
    """The hot tier keeps each vector only in its partition's index (exact scan or graph); the
    entries it hands out carry an exact copy of it, before and after the graph replaces the
    exact scan."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((40, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hot = HotTier(384, capacity=100, m=16, ef_construction=100, ef_search=32, hnsw_min_entries=20)

    def entry(i: int) -> Entry:
        return Entry(id=f"e{i}", namespace="n", partition=b"p", exact_key=bytes([i]) * 16,
                     prompt=f"p{i}", response=b"r", vector=vectors[i], created_at=0.0)

    for i in range(10):
        hot.hold(entry(i))
    assert all(e.vector.size == 0 for e in hot._entries.values())  # not a second copy
    assert np.array_equal(hot.peek("e3").vector, vectors[3])
    for i in range(10, 40):  # past hnsw_min_entries: the graph holds them now (no loop runs)
        hot.hold(entry(i))
    assert all(e.vector.size == 0 for e in hot._entries.values())
    got = asyncio.run(hot.get_exact(bytes([33]) * 16, time.time()))
    assert got is not None and np.array_equal(got.vector, vectors[33])
    assert all(np.array_equal(hot.peek(f"e{i}").vector, vectors[i]) for i in range(40))

"""Placement: demotion keeps entries findable, restarts lose nothing, TTLs expire, the data
directory refuses a model it was not filled by. The warm tier's column store: what it must
still get right without a Python object per entry (filters, expiry, recency, exact keys,
restarts, memory)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from stratacache import AsyncClient, keys, pipeline
from stratacache.errors import DataDirMismatch, StorageFull
from stratacache.records import Entry, EntryInfo
from stratacache.tiers import codes, warm
from stratacache.tiers.base import EVERYTHING, Filter
from stratacache.tiers.warm import WarmTier

# Twenty questions on unrelated topics, so each is its own nearest neighbour.
TOPICS = [
    "How do I bake sourdough bread at home?", "What causes the northern lights?",
    "How do I change a flat bicycle tyre?", "Which programming language should I learn first?",
    "How do vaccines train the immune system?", "What is the best way to store fresh basil?",
    "How does compound interest work?", "Why is the sky blue during the day?",
    "How can I improve my chess openings?", "What should I pack for a week of hiking?",
    "How do solar panels generate electricity?", "What are the rules of cricket?",
    "How do I train a puppy to sit?", "Why do cats purr?",
    "How do I write a good cover letter?", "What is the tallest mountain in Africa?",
    "How does a refrigerator keep food cold?", "How do I remove a red wine stain?",
    "What were the causes of the French Revolution?", "How do noise cancelling headphones work?",
]
PARAPHRASE_0 = "What is the way to make sourdough bread in my own kitchen?"
BIG = b"x" * (64 * 1024)  # 64 KiB responses: 20 of them overflow a 1 MiB warm budget


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _fill_to_cold(start_server):  # type: ignore[no-untyped-def]
    server = start_server(hot_capacity=4, warm_max_bytes=1 << 20, min_similarity=0.7)
    with server.client() as c:
        ids = [c.store(t, BIG + t.encode()) for t in TOPICS]
        _wait_for(lambda: c.stats()["cold"]["entries"] > 0)
    return server, ids


@pytest.mark.parametrize("parallel", [False, True], ids=["tiers-in-turn", "tiers-at-once"])
def test_entries_demoted_hot_to_warm_to_cold_are_still_found(start_server, monkeypatch,  # type: ignore[no-untyped-def]
                                                             parallel: bool) -> None:
    """Also with every tier's search started at once (as for partitions of
    PARALLEL_SEARCH_ROWS entries), taken in order: the same hits, and a miss still sees the
    best candidate of every tier."""
    if parallel:
        monkeypatch.setattr(pipeline, "PARALLEL_SEARCH_ROWS", 1)
    server, ids = _fill_to_cold(start_server)
    with server.client() as c:
        stats = c.stats()
        assert stats["hot"]["entries"] == 4
        assert stats["warm"]["entries"] + stats["cold"]["entries"] == len(TOPICS)
        assert stats["warm"]["demotions"] == stats["cold"]["entries"]
        miss = c.lookup(PARAPHRASE_0, min_similarity=0.99)  # its entry is cold
        assert not miss.hit and miss.best_similarity > 0.75
        # The oldest entries went to cold; a paraphrase finds one by semantic search there.
        semantic = c.lookup(PARAPHRASE_0, min_similarity=0.75)
        assert semantic.hit and semantic.tier == "cold" and semantic.entry_id == ids[0]
        assert semantic.response == BIG + TOPICS[0].encode()
        # ... and the hit promoted it: it is in memory now.
        _wait_for(lambda: c.lookup(PARAPHRASE_0, min_similarity=0.75).tier == "hot")
        # Every entry answers its own prompt exactly, wherever it lives.
        for topic, entry_id in zip(TOPICS, ids):
            result = c.lookup(topic)
            assert result.hit and result.tier == "exact" and result.entry_id == entry_id
        # An entry out of hot but still in warm is served from warm by semantic search.
        async def warm_only() -> list[int]:
            engine = server.engine
            return [i for i, e in enumerate(ids) if e in engine.warm and e not in engine.hot]

        server.run(server.engine.settled())
        index = server.run(warm_only())[0]
        result = c.lookup(TOPICS[index] + " Please explain.", min_similarity=0.7)
        assert result.hit and result.tier == "warm" and result.entry_id == ids[index]
        assert c.lookup(TOPICS[index] + " Please explain.", min_similarity=0.7).tier == "hot"


def test_restart_keeps_every_entry(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server, ids = _fill_to_cold(start_server)
    with server.client() as c:
        ttl_id = c.store("How long do eggs keep in the fridge?", "3 weeks", ttl_s=3600,
                         namespace="other", user_id="u1", template_id="t", template_version="1")
        before = c.stats()
    server.stop()
    again = start_server(hot_capacity=4, warm_max_bytes=1 << 20, min_similarity=0.7)
    with again.client() as c:
        after = c.stats()
        assert (after["warm"]["entries"] + after["cold"]["entries"]
                == before["warm"]["entries"] + before["cold"]["entries"] == len(TOPICS) + 1)
        for topic, entry_id in zip(TOPICS, ids):
            result = c.lookup(topic)
            assert result.hit and result.entry_id == entry_id
            assert result.response == BIG + topic.encode()
        kept = c.lookup("How long do eggs keep in the fridge?", namespace="other",
                        template_id="t", template_version="1")
        assert kept.entry_id == ttl_id and kept.text == "3 weeks"
        assert c.lookup(PARAPHRASE_0, min_similarity=0.75).entry_id == ids[0]
        assert c.delete_user("u1") == 1  # metadata survived the restart too


def test_ttl_expiry(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        c.store("What is the weather in Paris today?", "sunny", ttl_s=0.5)
        stored_by = time.time()  # the entry's clock started before this
        c.store("What is the population of Paris?", "2.1 million")
        c.store("What is the area of Paris?", "105 km2", ttl_s=3600)
        assert c.lookup("What is the area of Paris?").hit  # not yet expired: served
        _wait_for(lambda: time.time() > stored_by + 0.5)  # the first TTL has passed
        assert not c.lookup("What is the weather in Paris today?").hit
        c.set_policy("default", min_similarity=0.0)  # any candidate would now be served
        assert c.lookup("How is the weather in Paris today?").text != "sunny"
        assert server.run(server.engine.sweep_expired()) == 1
        stats = c.stats()
        assert stats["expired"] == 1 and stats["warm"]["entries"] == 2
        assert c.lookup("What is the population of Paris?").hit


def test_data_dir_refuses_another_model(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with server.client() as c:
        c.store("How do I learn Python quickly?", "practice")
    server.stop()
    manifest = tmp_path / "data" / "stratacache.json"
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**recorded, "model": "bge-small", "fingerprint": "0" * 32}))
    with pytest.raises(DataDirMismatch, match="filled by model 'bge-small'"):
        start_server()
    manifest.write_text(json.dumps(recorded))
    with start_server().client() as c:
        assert c.lookup("How do I learn Python quickly?").text == "practice"


def test_data_dir_is_locked_to_one_server(server, start_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataDirMismatch, match="in use by another stratacache server"):
        start_server()


def test_concurrent_stores_share_durable_commits(server) -> None:  # type: ignore[no-untyped-def]
    async def burst() -> list[str]:
        async with AsyncClient(server.target) as c:
            return await asyncio.gather(*(c.store(t, t) for t in TOPICS))

    ids = asyncio.run(burst())
    assert len(set(ids)) == len(TOPICS)
    assert server.engine.warm.commits < len(TOPICS)  # group commit: fewer fsyncs than stores
    server.stop()
    assert len(WarmTier(server.settings.data_dir / "warm", 384, max_bytes=1 << 30)) == len(TOPICS)


# --- the warm tier's column store ------------------------------------------------------------

DIM = 384
_rng = np.random.default_rng(11)


def _entry(namespace: str = "ns", *, template: tuple[str, str] | None = None,
           user: str | None = None, expires_at: float | None = None, exact: bytes | None = None,
           entry_id: str | None = None, created_at: float | None = None,
           response: bytes = b"r") -> Entry:
    vector = _rng.standard_normal(DIM).astype(np.float32)
    tid, tver = template or (None, None)
    partition = keys.partition_key(namespace, {}, tid, tver)
    return Entry(id=entry_id or uuid.uuid4().hex, namespace=namespace, partition=partition,
                 exact_key=exact or keys.exact_key(partition, uuid.uuid4().hex), prompt="p",
                 response=response, vector=vector / np.linalg.norm(vector),
                 created_at=time.time() if created_at is None else created_at,
                 expires_at=expires_at, template_id=tid, template_version=tver, user_id=user)


def _with_warm(path: Path, scenario: Callable[[WarmTier], Awaitable[None]], *,
               max_bytes: int = 1 << 30) -> None:
    async def run() -> None:
        tier = WarmTier(path, DIM, max_bytes=max_bytes)
        try:
            await scenario(tier)
        finally:
            tier.close()

    asyncio.run(run())


def _known(info: EntryInfo) -> tuple:
    """What the tier knows of an entry, but its stored size."""
    return (info.id, info.namespace, info.partition, info.exact_key, info.expires_at,
            info.template_id, info.template_version, info.user_id)


def test_warm_filters_select_what_filter_matches_says_across_restarts(tmp_path: Path) -> None:
    """Invalidation by namespace, template and user, expiry, ids and exact keys: each filter
    selects exactly the entries ``Filter.matches`` accepts, with what the tier knows of them,
    and the same after a restart. Ids the server did not make and short exact keys too."""
    now = time.time()
    entries = [_entry(ns, template=t, user=u, expires_at=x)
               for ns in ("a", "b") for t in (None, ("t", "1"), ("t", "2"))
               for u in (None, "u1", "u2") for x in (None, now - 60, now + 3600)]
    entries += [_entry("a", entry_id="not-a-server-id", user="u1"),
                _entry("b", exact=b"short key", template=("t", "2"))]
    filters = [EVERYTHING, Filter(namespace="a"), Filter(template_id="t"),
               Filter(template_id="t", template_version="2"), Filter(user_id="u1"),
               Filter(namespace="b", user_id="u1"), Filter(user_id="nobody"),
               Filter(namespace="a", template_id="t", template_version="1", user_id="u2"),
               Filter(expired_by=now), Filter(namespace="a", expired_by=now + 7200),
               Filter(ids={entries[3].id, "not-a-server-id", "absent"}),
               Filter(exact_keys={entries[5].exact_key, b"short key", b"absent"})]

    async def check(tier: WarmTier, held: list[Entry]) -> None:
        for where in filters:
            got = sorted(_known(i) for i in await tier.infos(where))
            want = sorted(_known(EntryInfo.of(e, 0)) for e in held if where.matches(e))
            assert got == want, where
        assert sorted(_known(i) for i in tier.all_infos()) == sorted(
            _known(EntryInfo.of(e, 0)) for e in held)
        assert len(tier) == len(held) and tier.bytes == sum(i.size for i in tier.all_infos())

    async def fill(tier: WarmTier) -> None:
        await tier.put(entries[:30])
        await tier.put(entries[30:])
        await check(tier, entries)
        gone = {i.id for i in await tier.infos(Filter(user_id="u1"))}  # DeleteUser
        assert sorted(await tier.remove(gone)) == sorted(gone)
        await check(tier, [e for e in entries if e.id not in gone])

    async def reopened(tier: WarmTier) -> None:
        await check(tier, [e for e in entries if e.user_id != "u1"])

    _with_warm(tmp_path / "warm", fill)
    _with_warm(tmp_path / "warm", reopened)


def test_warm_never_serves_expired_entries_and_lists_them_for_the_sweep(tmp_path: Path) -> None:
    now = time.time()
    stale, later, forever = (_entry(expires_at=now - 1), _entry(expires_at=now + 3600),
                             _entry())

    async def scenario(tier: WarmTier) -> None:
        await tier.put([stale, later, forever])
        assert await tier.get_exact(stale.exact_key, now) is None
        served = await tier.get_exact(later.exact_key, now)
        assert served is not None and served.id == later.id
        found = await tier.search(stale.partition, stale.vector, 3, now)
        assert stale.id not in {c.entry_id for c in found} and len(found) == 2
        assert (await tier.get(stale.id)).id == stale.id  # type: ignore[union-attr]  # by id: yes
        assert sorted(tier.expiring()) == sorted([(stale.expires_at, stale.id),
                                                  (later.expires_at, later.id)])
        assert [i.id for i in await tier.infos(Filter(expired_by=now))] == [stale.id]

    _with_warm(tmp_path / "warm", scenario)


def test_warm_demotes_least_recently_used_first_through_touches_and_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``coldest`` walks the least recently used first, touched entries last, with the ranking
    reused between calls (a few rows at a time here, so it is redone often); a restart ranks
    by creation time."""
    monkeypatch.setattr(warm, "_LRU_ROWS", 3)
    base = time.time() - 1000
    entries = [_entry(created_at=base + i) for i in range(12)]
    late_but_old = _entry(created_at=base - 1)  # stored last, created first

    async def scenario(tier: WarmTier) -> None:
        for e in entries:
            await tier.put([e])
        order = [e.id for e in entries]

        def touch(entry_id: str) -> None:
            tier.touch(entry_id)
            order.remove(entry_id)
            order.append(entry_id)

        assert tier.recency() == order
        assert tier.coldest(4) == order[:4]
        touch(order[1])
        touch(order[0])
        assert tier.coldest(4) == order[:4] and tier.recency() == order
        assert tier.coldest(3, skip={order[0], order[2]}) == [order[1], order[3], order[4]]
        tier.touch("absent")  # a hot entry held in cold: nothing changes
        assert await tier.remove(order[:2]) == order[:2]
        del order[:2]
        await tier.put([late_but_old])
        order.append(late_but_old.id)
        touch(order[3])
        assert tier.coldest(20) == order and tier.recency() == order

    async def reopened(tier: WarmTier) -> None:
        held = [late_but_old] + [e for e in entries if e.id in tier]
        assert tier.recency() == [e.id for e in held] == tier.coldest(20)

    _with_warm(tmp_path / "warm", scenario, max_bytes=1)  # over budget: every id is a choice
    _with_warm(tmp_path / "warm", reopened, max_bytes=1)


def test_warm_exact_key_finds_its_newest_holder(tmp_path: Path) -> None:
    """A replacing Store leaves only the new entry; two entries with one key (an interrupted
    replacing Store, until start-up resolves it) find the newest, and the other once the
    newest leaves, whichever of them was sorted in; after a restart, the newest by creation."""
    first = _entry(created_at=1.0)
    key = first.exact_key
    second, third = (_entry(exact=key, created_at=2.0), _entry(exact=key, created_at=3.0))

    async def scenario(tier: WarmTier) -> None:
        await tier.put([first])
        await tier.put([second], replacing=[first.id])
        assert tier.exact_id(key) == second.id and first.id not in tier
        await tier.put([third])  # not replacing: both hold the key
        assert tier.exact_id(key) == third.id
        assert await tier.remove([third.id]) == [third.id]
        assert tier.exact_id(key) == second.id
        await tier.put([third])
        assert await tier.remove([second.id]) == [second.id]
        assert tier.exact_id(key) == third.id
        await tier.put([second])
        assert tier.exact_id(key) == second.id  # the last stored
        assert sorted(i.id for i in await tier.infos(Filter(exact_keys={key}))) == sorted(
            [second.id, third.id])

    async def reopened(tier: WarmTier) -> None:
        assert tier.exact_id(key) == third.id  # created last
        assert (await tier.get_exact(key, time.time())).id == third.id  # type: ignore[union-attr]

    _with_warm(tmp_path / "warm", scenario)
    _with_warm(tmp_path / "warm", reopened)


def test_warm_index_follows_merges_renumbering_and_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through many small writes (the key indexes sort recent keys in often here), removals of
    most entries (the columns shrink and renumber their rows) and re-added ids, every held
    entry is found by id, by exact key and by its own vector, and nothing else is; the same
    after a restart."""
    monkeypatch.setattr(warm, "_MERGE_MIN", 4)
    monkeypatch.setattr(warm, "_COMPACT_ROWS", 32)
    entries = [_entry(user="u" if i % 3 else None) for i in range(150)]
    entries += [_entry(entry_id=f"odd-{i}") for i in range(6)]  # ids the server did not make

    async def check(tier: WarmTier, held: list[Entry], gone: list[Entry]) -> None:
        now = time.time()
        assert len(tier) == len(held)
        for e in held:
            assert e.id in tier and tier.exact_id(e.exact_key) == e.id
            assert tier.read(e.id).response == e.response  # type: ignore[union-attr]
            best = (await tier.search(e.partition, e.vector, 1, now))[0]
            assert best.entry_id == e.id and best.similarity == pytest.approx(1.0, abs=1e-5)
        for e in gone:
            assert e.id not in tier and tier.exact_id(e.exact_key) is None
        assert sorted(i.id for i in await tier.infos(EVERYTHING)) == sorted(e.id for e in held)

    async def scenario(tier: WarmTier) -> None:
        for start in range(0, len(entries), 5):
            await tier.put(entries[start:start + 5])
        await check(tier, entries, [])
        gone = entries[:140]
        for start in range(0, len(gone), 20):
            await tier.remove([e.id for e in gone[start:start + 20]])
        assert len(tier._scope) < len(entries)  # shrunk
        await check(tier, entries[140:], gone)
        await tier.put(gone[:10])  # the same ids again
        await check(tier, entries[140:] + gone[:10], gone[10:])

    async def reopened(tier: WarmTier) -> None:
        await check(tier, entries[140:] + entries[:10], entries[10:140])

    _with_warm(tmp_path / "warm", scenario)
    _with_warm(tmp_path / "warm", reopened)


def test_a_failed_warm_removal_leaves_the_entries_visible(tmp_path: Path) -> None:
    """The file still holds entries whose removal failed (here LMDB's map is full, so even a
    delete cannot be written): lookups must still see them. They used to vanish from memory
    until the next start."""
    async def scenario(tier: WarmTier) -> None:
        held: list[Entry] = []
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):  # fill every page of the map
            with pytest.raises(StorageFull):
                while True:
                    entry = _entry(response=b"x" * size)
                    await tier.put([entry])
                    held.append(entry)
        victim = held[0]
        with pytest.raises(StorageFull):
            await tier.remove([victim.id])
        assert victim.id in tier and len(tier) == len(held)
        assert tier.exact_id(victim.exact_key) == victim.id
        assert tier.read(victim.id).response == victim.response  # type: ignore[union-attr]
        found = await tier.search(victim.partition, victim.vector, 1, time.time())
        assert found[0].entry_id == victim.id

    _with_warm(tmp_path / "warm", scenario, max_bytes=1 << 20)  # the smallest map: 64 MiB


def test_warm_memory_per_entry_is_its_codes_and_a_few_columns(tmp_path: Path) -> None:
    """What the tier holds per entry at start-up, responses excluded (they stay on disk):
    codes.row_bytes (436 at 384 dimensions) and about 80 bytes of columns and indexes; no
    Python object per entry (those took 830 bytes an entry here, 1,641 of the server's memory
    in benchmarks/tier_scale.py)."""
    n = 3000

    async def fill(tier: WarmTier) -> None:
        await tier.put([_entry() for _ in range(n)])

    _with_warm(tmp_path / "warm", fill)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tier = WarmTier(tmp_path / "warm", DIM, max_bytes=1 << 30)
        gc.collect()  # the interpreter's free lists (up to 2,000 small tuples) are not the tier's
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tier.close()
    assert len(tier) == n
    per_entry = held / n
    assert per_entry <= codes.row_bytes(DIM) + 100, f"{per_entry:.0f} bytes an entry"

"""Placement: demotion keeps entries findable, restarts lose nothing, TTLs expire, the data
directory refuses a model it was not filled by."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from stratacache import AsyncClient, pipeline
from stratacache.errors import DataDirMismatch
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

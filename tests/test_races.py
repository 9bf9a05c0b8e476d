"""Regression tests for races between Store, Lookup's background moves, demotion and removal.

They drive the engine directly (real model, real LMDB and SQLite under tmp_path) so that the
interleavings are deterministic: each one waits for the exact moment a race used to bite.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from stratacache.config import Settings
from stratacache.embed import Encoder
from stratacache.engine import Engine
from stratacache.messages import LookupRequest, StoreRequest
from stratacache.records import Tier
from stratacache.tiers.base import Filter

from .test_tiers import BIG, TOPICS


def _settings(path: Path, **overrides: object) -> Settings:
    values = {"data_dir": path, "port": 0, "sweep_interval_s": 3600.0,
              "hot_capacity": 4, "warm_max_bytes": 1 << 20, "min_similarity": 0.7}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def _settled(engine: Engine) -> None:
    await engine.settled()


async def _filled(encoder: Encoder, path: Path) -> tuple[Engine, list[str]]:
    """An engine whose oldest TOPICS entries sit only in the cold tier."""
    engine = await Engine.open(_settings(path), encoder)
    ids = [(await engine.store(StoreRequest(prompt=t, response=BIG + t.encode()))).entry_id
           for t in TOPICS]
    await _settled(engine)
    return engine, ids


def _cold_only(engine: Engine, ids: list[str]) -> tuple[str, str]:
    return next((t, i) for t, i in zip(TOPICS, ids) if i not in engine.warm and i not in engine.hot)


async def _gone(engine: Engine, prompt: str, entry_id: str) -> bool:
    await _settled(engine)
    in_cold = await engine.cold.infos(Filter(ids={entry_id}))
    results = [await engine.lookup(LookupRequest(prompt=q, min_similarity=0.7))
               for q in (prompt, prompt + " Please explain.")]
    return (entry_id not in engine.hot and entry_id not in engine.warm and not in_cold
            and not any(r.entry_id == entry_id for r in results))


def test_delete_during_cold_promotion_removes_the_entry(encoder: Encoder, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, ids = await _filled(encoder, tmp_path / "d")
        prompt, entry_id = _cold_only(engine, ids)
        assert (await engine.lookup(LookupRequest(prompt=prompt))).tier is Tier.EXACT
        while entry_id not in engine.warm:  # the move's warm copy is committed
            await asyncio.sleep(0)
        assert await engine.delete_entry(entry_id) == 1
        assert await _gone(engine, prompt, entry_id)
        await engine.close()

    asyncio.run(scenario())


def test_invalidation_during_cold_promotion_removes_the_entry(encoder: Encoder,
                                                              tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, ids = await _filled(encoder, tmp_path / "d")
        prompt, entry_id = _cold_only(engine, ids)
        await engine.lookup(LookupRequest(prompt=prompt))  # starts the cold->warm move
        assert await engine.invalidate_namespace("default") == len(TOPICS)
        assert await _gone(engine, prompt, entry_id)
        await engine.close()
        again = await Engine.open(_settings(tmp_path / "d"), encoder)
        assert len(again.warm) + len(again.cold) == 0
        assert not (await again.lookup(LookupRequest(prompt=prompt))).hit
        await again.close()

    asyncio.run(scenario())


def test_two_lookups_promoting_one_entry_keep_it(encoder: Encoder, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, ids = await _filled(encoder, tmp_path / "d")
        prompt, entry_id = _cold_only(engine, ids)
        first, second = await asyncio.gather(engine.lookup(LookupRequest(prompt=prompt)),
                                             engine.lookup(LookupRequest(prompt=prompt)))
        assert first.entry_id == second.entry_id == entry_id
        await _settled(engine)
        assert entry_id in engine.warm and entry_id in engine.hot
        await engine.close()
        again = await Engine.open(_settings(tmp_path / "d"), encoder)
        assert (await again.lookup(LookupRequest(prompt=prompt))).entry_id == entry_id
        assert len(again.warm) + len(again.cold) == len(TOPICS)
        await again.close()

    asyncio.run(scenario())


def test_store_replacing_an_entry_being_promoted(encoder: Encoder, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, ids = await _filled(encoder, tmp_path / "d")
        prompt, old_id = _cold_only(engine, ids)
        await engine.lookup(LookupRequest(prompt=prompt))  # starts the cold->warm move
        stored = await engine.store(StoreRequest(prompt=prompt, response=b"new answer"))
        assert stored.replaced
        assert await _gone(engine, prompt + " (unused)", old_id)
        result = await engine.lookup(LookupRequest(prompt=prompt))
        assert result.entry_id == stored.entry_id and result.response == b"new answer"
        await engine.close()

    asyncio.run(scenario())


def test_concurrent_stores_of_one_prompt_leave_one_entry(encoder: Encoder,
                                                         tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", hot_capacity=100), encoder)
        prompt = "How do I reset my password?"
        results = await asyncio.gather(*(
            engine.store(StoreRequest(prompt=prompt, response=f"answer {i}".encode()))
            for i in range(8)))
        assert len(engine.warm) == len(engine.hot) == 1
        assert sum(not r.replaced for r in results) == 1  # every later one replaced it
        served = await engine.lookup(LookupRequest(prompt="How can I reset my password?",
                                                   min_similarity=0.8))
        assert served.entry_id in {r.entry_id for r in results}
        assert await engine.delete_entry(served.entry_id) == 1
        assert not (await engine.lookup(LookupRequest(prompt=prompt))).hit
        await engine.close()

    asyncio.run(scenario())


def test_prompts_longer_than_the_model_reads_match_exactly_only(encoder: Encoder,
                                                                tmp_path: Path) -> None:
    document = ("Refund policy. Customers may return unused items within the window stated on "
                "the receipt, in original packaging with all accessories. Opened software, gift "
                "cards and perishable goods are not returnable. ") * 8
    first = document + "\nQuestion: Can I return an opened video game?"
    other = document + "\nQuestion: How many days do I have to return a jacket?"

    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", min_similarity=0.0), encoder)
        await engine.store(StoreRequest(prompt=first, response=b"No."))
        assert not (await engine.lookup(LookupRequest(prompt=other, min_similarity=0.0))).hit
        assert (await engine.lookup(LookupRequest(prompt=first))).tier is Tier.EXACT
        await engine.close()

    assert len(encoder._model.tokenizer(first)["input_ids"]) > encoder.max_tokens
    asyncio.run(scenario())


def test_served_vectors_do_not_pin_their_embedding_batch(encoder: Encoder,
                                                         tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", hot_capacity=100), encoder)
        await asyncio.gather(*(engine.store(StoreRequest(prompt=t, response=b"a"))
                               for t in TOPICS))
        # The hot tier keeps vectors in its index only; what it hands out is a copy of one row.
        served = [engine.hot.peek(i.id) for i in engine.hot.all_infos()]
        assert len(served) == len(TOPICS)
        assert all(e.vector.base is None and e.vector.nbytes == 4 * 384 for e in served)
        await engine.close()

    asyncio.run(scenario())

"""Defects of issue 9, each pinned by a test: isolation of what a call may touch, floors a request
may only tighten, lookups that find entries wherever they moved, bounded per-miss work, failing
or damaged storage that degrades to misses, and DeleteUser leaving no byte of the user on disk.

Real model, real LMDB and SQLite files under tmp_path, real servers on loopback."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import lmdb
import pytest

from stratacache import Client, NotFoundError
from stratacache.config import Settings
from stratacache.embed import Encoder
from stratacache.engine import Engine
from stratacache.messages import LookupRequest, MissReason, StoreRequest
from stratacache.pipeline import SCOPE_HINT_PARTITIONS, SEARCH_K
from stratacache.records import Tier

from .test_tiers import BIG, TOPICS

QUESTION = "How do I learn Python quickly?"
PARAPHRASE = "What is the fastest way to learn Python?"


def _settings(path: Path, **overrides: object) -> Settings:
    values = {"data_dir": path, "port": 0, "sweep_interval_s": 3600.0, "hot_capacity": 4,
              "warm_max_bytes": 1 << 20, "min_similarity": 0.7}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# --- a namespace's policy is a floor ---------------------------------------------------------

def test_a_request_may_tighten_the_namespace_floor_never_loosen_it(client: Client,
                                                                    namespace: str) -> None:
    client.set_policy(namespace, min_similarity=0.95)
    client.store(QUESTION, "practice", namespace=namespace)
    loose = client.lookup(PARAPHRASE, namespace=namespace, min_similarity=0.5)
    assert not loose.hit and loose.miss_reason == "below_similarity"
    client.set_policy(namespace, min_similarity=0.5)
    assert client.lookup(PARAPHRASE, namespace=namespace).hit
    assert not client.lookup(PARAPHRASE, namespace=namespace, min_similarity=0.99).hit


def test_the_server_default_is_a_floor_too(client: Client, namespace: str) -> None:
    client.store(QUESTION, "practice", namespace=namespace)  # server default 0.95
    assert not client.lookup(PARAPHRASE, namespace=namespace, min_similarity=0.0).hit


# --- every call that names a namespace touches only that namespace --------------------------

def test_feedback_naming_another_namespace_touches_nothing(client: Client) -> None:
    client.set_policy("team-b", min_similarity=0.7)
    entry_id = client.store(QUESTION, "b's answer", namespace="team-b")
    for prompt in (QUESTION, PARAPHRASE):  # exact (would delete) and semantic (would veto)
        with pytest.raises(NotFoundError):
            client.feedback(entry_id, prompt, correct=False, namespace="team-a")
    assert client.lookup(PARAPHRASE, namespace="team-b").entry_id == entry_id
    assert client.lookup(QUESTION, namespace="team-b").entry_id == entry_id
    assert client.get_policy("team-b")["vetoed_entries"] == 0


# --- lookups see entries wherever they moved -------------------------------------------------

async def _with_cold_entries(encoder: Encoder, path: Path) -> tuple[Engine, list[str], int]:
    """An engine holding TOPICS (64 KiB answers, 1 MiB warm budget: the oldest are in cold
    only), their ids, and the index of one in cold."""
    engine = await Engine.open(_settings(path), encoder)
    ids = [(await engine.store(StoreRequest(prompt=t, response=BIG))).entry_id for t in TOPICS]
    await engine.settled()
    return engine, ids, next(i for i, e in enumerate(ids) if e not in engine.warm)


def test_a_candidate_that_moved_tier_after_the_search_is_still_served(
        encoder: Encoder, tmp_path: Path) -> None:
    """The search ran on warm; the entry moved to cold before the decision read it back. The
    decision must read it from where it is now (the old engine read it from warm: a miss)."""
    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", hot_capacity=1,
                                             warm_max_bytes=64 << 20), encoder)
        ids = [(await engine.store(StoreRequest(prompt=t, response=b"a"))).entry_id
               for t in TOPICS[:3]]
        assert ids[0] in engine.warm and ids[0] not in engine.hot
        request = LookupRequest(prompt=TOPICS[0] + " Please explain.")
        vector = await engine._embedder.submit(request.prompt)
        found = await engine.warm.search(engine.warm.read(ids[0]).partition, vector, SEARCH_K,
                                         time.time())
        assert found[0].entry_id == ids[0]
        engine.warm.max_bytes = 0  # everything moves to cold now
        engine.placement.maybe_demote()
        await engine.settled()
        assert ids[0] not in engine.warm and len(engine.cold) == 3
        resolved = await engine.pipeline._resolve(found, vector, 0.7, False, time.time())
        assert resolved and resolved[0].entry.id == ids[0]
        result = await engine.lookup(request)
        assert result.hit and result.entry_id == ids[0] and result.tier is Tier.COLD
        await engine.close()

    asyncio.run(scenario())


def test_an_entry_moving_between_tiers_is_found_by_exact_and_semantic_lookups(
        encoder: Encoder, tmp_path: Path) -> None:
    """While a move holds an entry (the warm writer is busy, so the move cannot finish), the
    entry is in no tier's index but its move's: lookups must still find it."""
    async def scenario() -> None:
        engine, ids, cold_one = await _with_cold_entries(encoder, tmp_path / "d")
        writer_free = threading.Event()
        engine.warm._writer.submit(writer_free.wait)  # the move's copy waits behind this
        first = await engine.lookup(LookupRequest(prompt=TOPICS[cold_one]))
        assert first.entry_id == ids[cold_one]  # an exact hit from cold: the move starts
        while ids[cold_one] not in engine.placement._moving:
            await asyncio.sleep(0)
        again = await engine.lookup(LookupRequest(prompt=TOPICS[cold_one]))
        semantic = await engine.lookup(LookupRequest(prompt=TOPICS[cold_one] + " Please explain."))
        writer_free.set()
        await engine.settled()
        assert again.entry_id == ids[cold_one]
        assert semantic.hit and semantic.entry_id == ids[cold_one]
        await engine.close()

    asyncio.run(scenario())


def test_a_hit_in_one_tier_searches_no_tier_below_it(encoder: Encoder, tmp_path: Path) -> None:
    """Search stops at the first tier that serves: a hot hit pays no warm or cold scan."""
    async def scenario() -> None:
        engine, ids, _ = await _with_cold_entries(encoder, tmp_path / "d")
        hot_one = next(i for i, e in enumerate(ids) if e in engine.hot)
        counts = lambda: {n: s.count for n, s in engine.metrics.stages().items()}  # noqa: E731
        searched = counts()
        hit = await engine.lookup(LookupRequest(prompt=TOPICS[hot_one] + " Please explain."))
        assert hit.hit and hit.tier is Tier.HOT
        for stage in ("search_warm", "search_cold"):
            assert counts().get(stage, 0) == searched.get(stage, 0), stage
        await engine.close()

    asyncio.run(scenario())


# --- per-miss work is bounded ----------------------------------------------------------------

def test_a_miss_probes_a_bounded_number_of_other_scopes(encoder: Encoder, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", hot_capacity=1000), encoder)
        for conversation in range(50):
            await engine.store(StoreRequest(prompt=QUESTION, response=b"a",
                                            scope={"conversation": str(conversation)}))
        assert all(len(p) <= SCOPE_HINT_PARTITIONS
                   for p in engine.pipeline._scope_hints.values())
        miss = await engine.lookup(LookupRequest(prompt=QUESTION, scope={"conversation": "new"}))
        assert not miss.hit and miss.miss_reason is MissReason.OTHER_SCOPE
        await engine.close()

    asyncio.run(scenario())


# --- storage that fails or is damaged --------------------------------------------------------

def test_a_failing_cold_tier_degrades_lookups_to_misses(encoder: Encoder, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, ids, cold_one = await _with_cold_entries(encoder, tmp_path / "d")
        engine.cold._executor.submit(engine.cold._db.close).result()  # the database fails
        for prompt in (TOPICS[cold_one], TOPICS[cold_one] + " Please explain."):
            result = await engine.lookup(LookupRequest(prompt=prompt))
            assert not result.hit
        assert engine.metrics.tier_errors[Tier.EXACT] + engine.metrics.tier_errors[Tier.COLD] > 0
        assert (await engine.lookup(LookupRequest(prompt=TOPICS[-1]))).hit  # warm still serves
        await engine.close()

    asyncio.run(scenario())


def _flip(value: bytes, position: int) -> bytes:
    return value[:position] + bytes([value[position] ^ 0x40]) + value[position + 1:]


def test_damaged_records_are_misses_set_aside_and_never_stop_a_start(encoder: Encoder,
                                                                      tmp_path: Path) -> None:
    """A flipped byte in a stored response is never served; a damaged header does not keep the
    server from starting; both records are set aside in quarantine/ and counted."""
    data = tmp_path / "d"

    async def fill() -> list[str]:
        engine = await Engine.open(_settings(data, hot_capacity=1, warm_max_bytes=64 << 20),
                                   encoder)
        ids = [(await engine.store(StoreRequest(prompt=t, response=t.encode() * 50))).entry_id
               for t in TOPICS[:4]]
        await engine.close()
        return ids

    ids = asyncio.run(fill())
    env = lmdb.open(str(data / "warm"), max_dbs=2)
    db = env.open_db(b"entries")
    with env.begin(db=db, write=True) as txn:
        response_damaged = txn.get(ids[0].encode())
        txn.put(ids[0].encode(), _flip(response_damaged, len(response_damaged) - 10))
        header_damaged = txn.get(ids[1].encode())
        txn.put(ids[1].encode(), _flip(header_damaged, 30))
    env.close()

    async def check() -> None:
        engine = await Engine.open(_settings(data, hot_capacity=1), encoder)  # starts
        assert engine.quarantine.damaged == 1  # the header: found at start
        for i in (0, 1):
            result = await engine.lookup(LookupRequest(prompt=TOPICS[i]))
            assert not result.hit, "a damaged record was served"
        assert engine.quarantine.damaged == 2  # the response: found when it was read
        assert (await engine.lookup(LookupRequest(prompt=TOPICS[2]))).response == \
            TOPICS[2].encode() * 50
        await engine.close()
        kept = sorted(p.name for p in (data / "quarantine").iterdir())
        assert kept == sorted(f"warm-{i}.record" for i in ids[:2])
        again = await Engine.open(_settings(data, hot_capacity=1), encoder)
        assert len(again.warm) == 2 and again.quarantine.damaged == 0  # deleted, not re-found
        await again.close()

    asyncio.run(check())


def test_a_damaged_cold_record_is_a_miss(encoder: Encoder, tmp_path: Path) -> None:
    data = tmp_path / "d"

    async def fill() -> str:
        engine, ids, cold_one = await _with_cold_entries(encoder, data)
        await engine.close()
        return ids[cold_one]

    cold_id = asyncio.run(fill())
    db = sqlite3.connect(data / "cold.sqlite3")
    (record,), = db.execute("SELECT record FROM entries WHERE id = ?", (cold_id,))
    db.execute("UPDATE entries SET record = ? WHERE id = ?", (_flip(record, len(record) - 5),
                                                              cold_id))
    db.commit()
    db.close()

    async def check() -> None:
        engine = await Engine.open(_settings(data), encoder)
        served = [(await engine.lookup(LookupRequest(prompt=t))).entry_id for t in TOPICS]
        assert cold_id not in served and served.count("") == 1  # its own prompt: a miss
        assert engine.quarantine.damaged == 1
        assert (data / "quarantine" / f"cold-{cold_id}.record").exists()
        await engine.close()

    asyncio.run(check())


def test_delete_user_leaves_no_byte_of_the_user_in_the_data_directory(start_server,  # type: ignore[no-untyped-def]
                                                                      tmp_path: Path) -> None:
    """The user's prompts, responses, metadata and id are searched for in every file of the
    data directory (LMDB free pages, SQLite WAL files, evidence, keys) right after DeleteUser
    returns."""
    server = start_server(hot_capacity=2, warm_max_bytes=1 << 20, min_similarity=0.7,
                          feedback_evict_after=0)
    user = "user-zq7x"
    markers = [user.encode()]
    with server.client() as c:
        ids = []
        for i, topic in enumerate(TOPICS):
            prompt = f"{topic} [zq7x-prompt-{i}]"
            response = BIG + f"zq7x-response-{i}".encode()
            markers += [f"zq7x-prompt-{i}".encode(), f"zq7x-response-{i}".encode()]
            ids.append(c.store(prompt, response, user_id=user,
                               metadata={"tag": f"zq7x-meta-{i}"}))
            markers.append(f"zq7x-meta-{i}".encode())
        control = c.store("What is the capital of Peru?", b"control-lima-8f2")  # no user
        deadline = time.monotonic() + 60
        while c.stats()["cold"]["entries"] == 0:  # some of the user's entries reach cold
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hit = c.lookup(TOPICS[-1] + " Please explain.")
        assert hit.hit and hit.entry_id == ids[-1]
        c.feedback(hit.entry_id, TOPICS[-1] + " Please explain.", correct=False)  # evidence
        assert c.delete_user(user) == len(TOPICS)
        files = [p for p in server.settings.data_dir.rglob("*") if p.is_file()]
        content = b"".join(p.read_bytes() for p in files)
        assert b"control-lima-8f2" in content  # the scan sees what is there
        left = [m for m in markers if m in content]
        assert not left, f"DeleteUser left {left[:3]} in {[p.name for p in files]}"
        assert c.lookup("What is the capital of Peru?").entry_id == control


def test_a_rejected_candidate_is_not_counted_as_used(encoder: Encoder, tmp_path: Path) -> None:
    """Only served entries count as used: a candidate the decision turns down keeps its place
    in the least-recently-used order (it used to move to the front and push others out)."""
    async def scenario() -> None:
        engine = await Engine.open(_settings(tmp_path / "d", hot_capacity=1,
                                             warm_max_bytes=64 << 20, min_similarity=0.99),
                                   encoder)
        ids = [(await engine.store(StoreRequest(prompt=t, response=b"a"))).entry_id
               for t in TOPICS[:3]]
        order = engine.warm.recency()
        miss = await engine.lookup(LookupRequest(prompt=TOPICS[0] + " Please explain."))
        assert not miss.hit and miss.best_similarity > 0.7  # a candidate, turned down
        assert engine.warm.recency() == order and order[0] == ids[0]
        await engine.close()

    asyncio.run(scenario())


def test_disk_budgets_count_what_the_files_really_take(encoder: Encoder,
                                                       tmp_path: Path) -> None:
    """--warm-max-mib and --cold-max-mib bound what the files really take (LMDB's pages in use,
    SQLite's pages in use plus its WAL), not an estimate of the entries' sizes, and a burst of
    Stores waits for demotion instead of outrunning it. The old estimate let the pages in use
    pass the budgets (and the warm file grew 63 % past it here; the file's free-page slack on
    top is measured by ``benchmarks/disk_budget.py``, not asserted: it depends on timing)."""
    data = tmp_path / "d"
    sizes = [16000, 32000, 48000, 64000]
    warm_budget, cold_budget = 4 << 20, 6 << 20

    async def scenario() -> None:
        engine = await Engine.open(_settings(data, hot_capacity=10, warm_max_bytes=warm_budget,
                                             cold_max_bytes=cold_budget), encoder)
        try:
            for start in range(0, 288, 32):  # concurrent Stores share passes and commits
                await asyncio.gather(*(engine.store(StoreRequest(
                    prompt=f"question {i} about topic {i * 7}",
                    response=bytes([i % 251]) * sizes[i % 4])) for i in range(start, start + 32)))
            await engine.settled()
            assert engine.placement.demotions[Tier.COLD]  # cold evicted to stay in budget
            # Measured by the stores themselves, not by the tiers' accounting.
            env = engine.warm._env
            with env.begin() as txn:
                pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                            for s in (txn.stat(), txn.stat(engine.warm._db)))
            assert (pages + 2) * env.stat()["psize"] <= warm_budget
            db = sqlite3.connect(data / "cold.sqlite3")
            (in_use,), = db.execute("SELECT (page_count - freelist_count) * page_size FROM "
                                    "pragma_page_count(), pragma_freelist_count(), "
                                    "pragma_page_size()")
            db.close()
            wal = data / "cold.sqlite3-wal"
            assert in_use + (wal.stat().st_size if wal.exists() else 0) <= cold_budget
        finally:
            await engine.close()

    asyncio.run(scenario())

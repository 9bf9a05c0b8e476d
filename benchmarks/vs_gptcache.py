"""stratacache against GPTCache on the same labelled QQP pairs, the same embedding model and the
same hit-quality protocols (``shared/data/README.md``), in one run.

**GPTCache** (the ``gptcache`` package, used as a library in this process) is configured as its
users run it: sqlite scalar store + faiss vector store from
``get_data_manager(CacheBase("sqlite", sql_url=<tmp file>), VectorBase("faiss", dimension=384),
max_size=...)`` (``max_size`` raised above the number of entries, so its LRU eviction never
fires; checked after the run), ``SearchDistanceEvaluation()``, ``get_prompt`` as the
pre-embedding function, the default ``Config()`` (so its default ``similarity_threshold``), and
``cache.init(...)`` + ``gptcache.adapter.api.put`` / ``get``. Its embedding function is the very
model stratacache serves with: ``stratacache.embed.Encoder("default", device="cpu")``, one text
per call (``enc.encode([text])[0]``); GPTCache's ``init_similar_cache()`` (which would download
a model) is never called. Files live in a fresh temporary directory.

What GPTCache's threshold ``s`` means as a cosine (checked against gptcache 0.1.44's code):

* ``manager/vector_data/faiss.py``: ``faiss.index_factory(dim, "IDMap,Flat", METRIC_L2)``, an
  exact index returning *squared* L2 distances ``d2``; top_k defaults to 1
  (``manager/vector_data/manager.py``: ``TOP_K = 1``).
* ``manager/data_manager.py``: ``SSDataManager.import_data`` and ``.search`` ``normalize()`` every
  vector, so ``d2 = 2 - 2 cos``.
* ``similarity_evaluation/distance.py``: ``SearchDistanceEvaluation(max_distance=4.0,
  positive=False)`` scores ``4 - clip(d2, 0, 4)`` on the range ``(0, 4)``.
* ``adapter/adapter.py`` (``adapt``): ``rank_threshold = (max - min) * similarity_threshold *
  cache_factor`` = ``4 s``; a candidate is served when ``rank_threshold <= rank``.

So a hit needs ``4 - (2 - 2 cos) >= 4 s``, i.e. **cos >= 2 s - 1**: the default ``s = 0.8``
(``config.py``: ``Config(similarity_threshold=0.8)``) serves anything at cosine >= 0.6. The run
also checks it numerically: on every GPTCache hit, ``2 * score - 1`` (the score reported to
``adapt``'s ``hit_callback``, ``rank / 4``) is compared with the cosine of the two vectors the
embedding function returned.

**stratacache** runs as a real server (``_common.serve()``, temporary data directory, every
flag at its default, so its default ``--min-similarity``; lookups pass no ``min_similarity``),
reached through ``stratacache.AsyncClient`` (stores, ``--concurrency`` in flight) and
``stratacache.Client`` (timed lookups, sequential). A store it fails stops the run: both caches
must hold every entry. Lookup errors count as misses (as a gateway would treat them) and, like
GPTCache errors, evictions or stray entries, are reported as warnings.

Protocols, identical for both systems:

* **crowded**: every distinct ``a`` is stored with the answer ``"answer to: " + a``; every pair's
  ``b`` is looked up (one lookup per pair). The served entry is identified by its answer text
  (GPTCache) or by ``matched_prompt`` (stratacache), and judged with ``_quality.judge``
  over the duplicate clusters of the pairs used: correct / wrong / unlabelled. Reported: labelled
  precision correct / (correct + wrong), strict precision correct / hits, recall (correct hits on
  duplicate pairs / duplicate pairs), hit rate and wrong-hit rate (wrong hits / lookups), each
  with a 95 % Wilson interval; lookup latency p50/p90/p99 (client side: stratacache's includes
  the loopback gRPC hop, GPTCache's is an in-process call) with each system's own breakdown of
  the same calls (stratacache's server stages, GPTCache's ``Report`` counters); store
  throughput.
* **pair**: for each pair, a cache holding only ``a`` is asked for ``b``. stratacache: one server,
  each pair in its own partition (``scope={"pair": str(i)}``, namespace ``pair``). GPTCache has
  no scope, so each pair gets a fresh GPTCache data manager (same configuration, its own sqlite
  file and faiss index) re-initialised on one ``Cache`` object: a put and a get per pair plus
  ~25-100 ms of setup. ``--no-pair`` skips it.

Run from the repository root::

    python -m benchmarks.vs_gptcache                 # 5000 pairs, writes benchmarks/results/
    python -m benchmarks.vs_gptcache --limit 200
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.metadata
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stratacache.pairs import LabelledPair

from ._common import (DEFAULT_DATA, RESULTS, machine, percentiles_ms, serve, table,
                      write_json)
from ._quality import duplicate_clusters, judge, pair_counts, wilson
from ._quality import load_pairs as load_labelled_pairs

DEFAULT_OUT = RESULTS / "vs_gptcache.json"
ANSWER_PREFIX = "answer to: "
CROWDED_NS = "crowded"
PAIR_NS = "pair"
WARMUP_NS = "warmup"
WARMUP_LOOKUPS = 10
STORE_RETRIES = 8
LOOKUP_TIMEOUT_S = 30.0
STORE_TIMEOUT_S = 60.0

GPTCACHE_THRESHOLD_DERIVATION = (
    "gptcache 0.1.44: manager/vector_data/faiss.py builds faiss.index_factory(dim, 'IDMap,Flat', "
    "faiss.METRIC_L2) (exact search, squared L2 distance d2, top_k 1 by default: "
    "manager/vector_data/manager.py TOP_K = 1); manager/data_manager.py SSDataManager normalises "
    "every stored and query vector, so d2 = 2 - 2cos; similarity_evaluation/distance.py "
    "SearchDistanceEvaluation(max_distance=4.0, positive=False) scores 4 - clip(d2, 0, 4) on the "
    "range (0, 4); adapter/adapter.py adapt() serves a candidate when (4 - 0) * "
    "similarity_threshold * cache_factor(1.0) <= score. Hence a hit iff 4 - (2 - 2cos) >= 4s, "
    "i.e. cos >= 2s - 1.")


def answer_for(prompt: str) -> str:
    return ANSWER_PREFIX + prompt


def prompt_of(answer: str) -> str | None:
    return answer[len(ANSWER_PREFIX):] if answer.startswith(ANSWER_PREFIX) else None


# ---------------------------------------------------------------------------------------------
# inputs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vs_gptcache",
        description="Hit quality (crowded and pair protocols of shared/data/README.md), lookup "
                    "latency and store throughput of stratacache (server default threshold) "
                    "against GPTCache (sqlite + faiss, SearchDistanceEvaluation, its default "
                    "threshold) on the same QQP pairs with the same embedding model.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="gzipped JSONL of {a, b, duplicate} pairs (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=5000,
                        help="use the first N pairs after a seeded shuffle; 0 = all "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file; its folder is created (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="stratacache stores in flight at once (default: %(default)s)")
    parser.add_argument("--no-pair", action="store_true",
                        help="skip the pair protocol (crowded only)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    return args


def select_pairs(path: Path, limit: int, seed: int) -> tuple[list[LabelledPair], int]:
    """The first ``limit`` pairs after a shuffle seeded by ``seed`` (the same selection as
    ``threshold_sweep`` and ``hit_quality`` with ``--limit N --seed S``), and how many the file
    holds."""
    return load_labelled_pairs(path, limit or None, seed)


# ---------------------------------------------------------------------------------------------
# judging


class Labels:
    def __init__(self, pairs: list[LabelledPair]) -> None:
        self.cluster = duplicate_clusters(pairs)
        self.non_duplicates = {frozenset((p.a, p.b)) for p in pairs if not p.duplicate}
        self.stored = {p.a for p in pairs}


def crowded_metrics(pairs: list[LabelledPair], served: list[str | None],
                    labels: Labels) -> dict[str, object]:
    """``served[i]`` is the stored ``a`` text served for ``pairs[i].b`` (None on a miss)."""
    n, n_dup = len(pairs), sum(p.duplicate for p in pairs)
    counts = {"hits": 0, "correct": 0, "wrong": 0, "unlabelled": 0}
    plain = {"hits": 0, "correct": 0, "wrong": 0}
    recall_k = exact_lookups = exact_other = 0
    for p, s in zip(pairs, served, strict=True):
        exact = p.b in labels.stored
        exact_lookups += exact
        if s is None:
            continue
        verdict = judge(s, p.b, labels.cluster, labels.non_duplicates)
        counts["hits"] += 1
        counts[verdict] += 1
        recall_k += verdict == "correct" and p.duplicate
        exact_other += exact and s != p.b
        if not exact:
            plain["hits"] += 1
            if verdict in plain:
                plain[verdict] += 1
    c, w, h = counts["correct"], counts["wrong"], counts["hits"]
    return {
        **counts, "lookups": n, "duplicate_pairs": n_dup,
        "labelled_precision": wilson(c, c + w), "strict_precision": wilson(c, h),
        "recall": wilson(recall_k, n_dup), "hit_rate": wilson(h, n),
        "wrong_hit_rate": wilson(w, n),
        "exact_text_lookups": exact_lookups,
        "exact_text_lookups_served_another_text": exact_other,
        "without_exact_text_lookups": {
            "hits": plain["hits"],
            "labelled_precision": wilson(plain["correct"], plain["correct"] + plain["wrong"]),
            "strict_precision": wilson(plain["correct"], plain["hits"])},
    }


def pair_metrics(pairs: list[LabelledPair], served: list[bool],
                 served_other: int) -> dict[str, object]:
    duplicate = [p.duplicate for p in pairs]
    return {"pairs": len(pairs), "duplicate_pairs": sum(duplicate),
            **pair_counts(np.asarray(served, dtype=bool), duplicate),
            "served_an_entry_other_than_a": served_other}


def latency_summary(seconds: list[float], exact: list[bool]) -> dict[str, object]:
    return {"all": percentiles_ms(seconds),
            "b_text_is_a_stored_prompt": percentiles_ms(
                [s for s, e in zip(seconds, exact, strict=True) if e]),
            "other_lookups": percentiles_ms(
                [s for s, e in zip(seconds, exact, strict=True) if not e])}


# ---------------------------------------------------------------------------------------------
# stratacache


async def _store_all(target: str, items: list[tuple[str, str, str, dict[str, str] | None]],
                     concurrency: int, desc: str) -> dict[str, object]:
    """Stores ``(prompt, answer, namespace, scope)`` items, ``concurrency`` in flight; retries
    RESOURCE_EXHAUSTED with backoff. Returns wall time and error counts."""
    from stratacache import AsyncClient, OverloadedError, StratacacheError

    retries, failures = 0, []
    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, timeout=STORE_TIMEOUT_S) as client:
        with tqdm(total=len(items), desc=desc, unit="store", file=sys.stderr) as bar:
            async def one(prompt: str, answer: str, namespace: str,
                          scope: dict[str, str] | None) -> None:
                nonlocal retries
                async with semaphore:
                    for attempt in range(STORE_RETRIES + 1):
                        if failures:  # stop early: the run is void without every entry
                            break
                        try:
                            await client.store(prompt, answer, namespace=namespace, scope=scope)
                            break
                        except OverloadedError as exc:
                            if attempt == STORE_RETRIES:
                                failures.append(repr(exc))
                                break
                            retries += 1
                            await asyncio.sleep(0.05 * 2 ** attempt)
                        except StratacacheError as exc:
                            failures.append(repr(exc))
                            break
                bar.update()

            started = time.perf_counter()
            await asyncio.gather(*(one(*item) for item in items))
            wall = time.perf_counter() - started
    if failures:
        # Stop rather than go on: besides voiding the comparison, a failing server logs a
        # traceback per call, and serve() does not read the server's stderr after its ready
        # line, so once the pipe fills the server blocks on its next log write.
        raise RuntimeError(
            f"{desc}: stratacache failed a store ({failures[0]}); both caches must hold every "
            "entry for the comparison to mean anything, so the run stops here")
    return {"stores": len(items), "wall_s": wall, "per_s": len(items) / wall if wall else None,
            "concurrency": concurrency, "overload_retries": retries, "failed": 0}


async def _lookup_all(target: str, items: list[tuple[str, str, dict[str, str] | None]],
                      concurrency: int, desc: str) -> tuple[list[object], list[str]]:
    """Looks up ``(prompt, namespace, scope)`` items concurrently; results in order (None for a
    call that failed) and the errors."""
    from stratacache import AsyncClient, StratacacheError

    errors: list[str] = []
    results: list[object] = [None] * len(items)
    semaphore = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, timeout=LOOKUP_TIMEOUT_S) as client:
        with tqdm(total=len(items), desc=desc, unit="lookup", file=sys.stderr) as bar:
            async def one(i: int, prompt: str, namespace: str,
                          scope: dict[str, str] | None) -> None:
                async with semaphore:
                    try:
                        results[i] = await client.lookup(prompt, namespace=namespace,
                                                         scope=scope)
                    except StratacacheError as exc:
                        errors.append(repr(exc))
                bar.update()

            await asyncio.gather(*(one(i, *item) for i, item in enumerate(items)))
    return results, errors


def _entries(stats: dict[str, object]) -> dict[str, int]:
    return {tier: int(stats[tier]["entries"]) for tier in ("exact", "hot", "warm", "cold")}


def run_stratacache(pairs: list[LabelledPair], stored: list[str], labels: Labels, concurrency: int,
                    with_pair: bool) -> dict[str, object]:
    from stratacache import Client, StratacacheError

    timings: dict[str, float] = {}
    with serve() as server:
        # crowded: store every distinct a
        store = asyncio.run(_store_all(
            server.target, [(a, answer_for(a), CROWDED_NS, None) for a in stored],
            concurrency, "stratacache store (crowded)"))
        timings["crowded_store"] = store["wall_s"]

        served: list[str | None] = []
        seconds: list[float] = []
        similarities: list[float] = []
        best_miss = 0.0
        tiers: dict[str, int] = {}
        errors: list[str] = []
        answer_mismatch = 0
        t0 = time.perf_counter()
        with Client(server.target, timeout=LOOKUP_TIMEOUT_S) as client:
            after_store = client.stats()
            threshold = float(after_store["default_min_similarity"])
            for k in range(WARMUP_LOOKUPS):
                client.lookup(f"warm-up question {k}: what should I cook for dinner tonight?",
                              namespace=WARMUP_NS)
            for p in tqdm(pairs, desc="stratacache lookup (crowded)", unit="lookup",
                          file=sys.stderr):
                started = time.perf_counter()
                try:
                    result = client.lookup(p.b, namespace=CROWDED_NS)
                except StratacacheError as exc:  # a gateway treats it as a miss
                    seconds.append(time.perf_counter() - started)
                    errors.append(repr(exc))
                    served.append(None)
                    continue
                seconds.append(time.perf_counter() - started)
                tiers[result.tier or "miss"] = tiers.get(result.tier or "miss", 0) + 1
                if result.hit:
                    served.append(result.matched_prompt)
                    answer_mismatch += prompt_of(result.text) != result.matched_prompt
                    if result.tier != "exact":
                        similarities.append(result.similarity)
                else:
                    served.append(None)
                    best_miss = max(best_miss, result.best_similarity)
            after_lookups = client.stats()
        timings["crowded_lookup"] = time.perf_counter() - t0

        crowded = crowded_metrics(pairs, served, labels)
        exact = [p.b in labels.stored for p in pairs]
        out: dict[str, object] = {
            "threshold_cosine": threshold,
            "threshold_source": "the server's default --min-similarity (lookups pass no "
                                "min_similarity), as reported by Stats.default_min_similarity",
            "server_start_s": server.start_s,
            "crowded": {
                "store": store, "metrics": crowded,
                "lookup_latency": latency_summary(seconds, exact),
                "server_stages_after_lookups": after_lookups["stages"],
                "lookup_errors": len(errors), "lookup_errors_first": errors[:5],
                "tiers_of_lookups": tiers,
                "semantic_hit_similarity_min": min(similarities) if similarities else None,
                "miss_best_similarity_max": best_miss,
                "hits_whose_answer_text_disagrees_with_matched_prompt": answer_mismatch,
                "served_text_not_a_stored_prompt": sum(
                    1 for s in served if s is not None and s not in labels.stored),
                "entries_after_store": _entries(after_store),
                "entries_after_lookups": _entries(after_lookups),
                "distinct_prompts_stored": len(stored),
            },
        }

        if with_pair:
            t0 = time.perf_counter()
            pair_store = asyncio.run(_store_all(
                server.target,
                [(p.a, answer_for(p.a), PAIR_NS, {"pair": str(i)}) for i, p in enumerate(pairs)],
                concurrency, "stratacache store (pair)"))
            results, pair_errors = asyncio.run(_lookup_all(
                server.target, [(p.b, PAIR_NS, {"pair": str(i)}) for i, p in enumerate(pairs)],
                concurrency, "stratacache lookup (pair)"))
            timings["pair_protocol"] = time.perf_counter() - t0
            hit = [r is not None and r.hit for r in results]
            other = sum(1 for p, r in zip(pairs, results, strict=True)
                        if r is not None and r.hit and r.matched_prompt != p.a)
            out["pair"] = {
                "run": True,
                "how": "one server; each pair stored and looked up in its own partition "
                       "(namespace 'pair', scope {'pair': str(i)}), so each lookup sees only "
                       "its pair's a; stores and lookups --concurrency in flight",
                "store": pair_store, "lookup_errors": len(pair_errors),
                "lookup_errors_first": pair_errors[:5],
                "metrics": pair_metrics(pairs, hit, other)}
        else:
            out["pair"] = {"run": False, "why": "--no-pair"}
    out["elapsed_s"] = timings
    return out


# ---------------------------------------------------------------------------------------------
# GPTCache


class _LogCounter(logging.Handler):
    """Collects GPTCache's warnings and errors: ``put`` swallows a failed save as a warning."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


_REPORT_OPS = ("pre", "embedding", "search", "data", "evaluation", "post", "save")


def _report_snapshot(report: object) -> dict[str, tuple[int, float]]:
    return {op: (getattr(report, f"op_{op}").count, getattr(report, f"op_{op}").total_time)
            for op in _REPORT_OPS}


def _report_delta(before: dict[str, tuple[int, float]],
                  report: object) -> dict[str, dict[str, float]]:
    """Calls and mean ms per GPTCache stage (its own ``Report`` timers) since ``before``."""
    out = {}
    for op, (count, total) in _report_snapshot(report).items():
        n = count - before[op][0]
        if n:
            out[op] = {"count": n, "mean_ms": round((total - before[op][1]) / n * 1000, 3)}
    return out


def run_gptcache(pairs: list[LabelledPair], stored: list[str], labels: Labels, enc: object,
                 with_pair: bool) -> dict[str, object]:
    from gptcache import Cache, Config
    from gptcache.adapter.api import get, put
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation import SearchDistanceEvaluation
    from gptcache.utils.log import gptcache_log

    timings: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="vs-gptcache-"))
    # Cache.init registers an atexit handler that closes (flushes) its data manager into these
    # files; atexit runs last-registered first, so this removal, registered before any init,
    # runs after GPTCache's own handlers.
    atexit.register(shutil.rmtree, root, True)
    log_counter = _LogCounter()
    gptcache_log.addHandler(log_counter)

    vectors: dict[str, np.ndarray] = {}  # what the embedding function returned, per text

    def embedding_func(data: str, **_: object) -> np.ndarray:
        vector = enc.encode([data])[0]
        vectors[data] = vector
        return vector

    default_s = inspect.signature(Config.__init__).parameters["similarity_threshold"].default
    threshold_cosine = 2 * default_s - 1

    def init(cache_obj: Cache, directory: Path, entries: int) -> tuple[object, int]:
        directory.mkdir(parents=True, exist_ok=True)
        max_size = max(1000, 2 * entries)  # GPTCache's default is 1000; keep eviction off
        data_manager = get_data_manager(
            CacheBase("sqlite", sql_url=f"sqlite:///{directory / 'sqlite.db'}"),
            VectorBase("faiss", dimension=enc.dimension,
                       index_path=str(directory / "faiss.index")),
            max_size=max_size)
        cache_obj.init(pre_embedding_func=get_prompt, embedding_func=embedding_func,
                       data_manager=data_manager,
                       similarity_evaluation=SearchDistanceEvaluation(), config=Config())
        return data_manager, max_size

    def lookup(cache_obj: Cache, prompt: str) -> tuple[str | None, float | None]:
        """(answer, score) where score is adapt()'s rank / (max - min) of the served entry."""
        scores: list[list[tuple[str, float]]] = []
        answer = get(prompt, cache_obj=cache_obj, hit_callback=scores.append)
        return answer, (scores[0][0][1] if scores and scores[0] else None)

    # crowded
    crowded_cache = Cache()
    data_manager, max_size = init(crowded_cache, root / "crowded", len(stored))
    put_errors: list[str] = []
    t0 = time.perf_counter()
    for a in tqdm(stored, desc="GPTCache put (crowded)", unit="put", file=sys.stderr):
        try:
            put(a, answer_for(a), cache_obj=crowded_cache)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            put_errors.append(repr(exc))
    store_wall = time.perf_counter() - t0
    timings["crowded_store"] = store_wall
    count_after_store = {"sqlite_rows": data_manager.s.count(),
                         "sqlite_rows_all_states": data_manager.s.count(is_all=True),
                         "faiss_vectors": data_manager.v.count()}

    for k in range(WARMUP_LOOKUPS):
        get(f"warm-up question {k}: what should I cook for dinner tonight?",
            cache_obj=crowded_cache)
    served: list[str | None] = []
    seconds: list[float] = []
    get_errors: list[str] = []
    foreign_answers = 0
    deviation = 0.0
    scored_hits = 0
    hit_cosines: list[float] = []
    report_before = _report_snapshot(crowded_cache.report)
    t0 = time.perf_counter()
    for p in tqdm(pairs, desc="GPTCache get (crowded)", unit="get", file=sys.stderr):
        started = time.perf_counter()
        try:
            answer, score = lookup(crowded_cache, p.b)
        except Exception as exc:  # noqa: BLE001 - counted, treated as a miss
            seconds.append(time.perf_counter() - started)
            get_errors.append(repr(exc))
            served.append(None)
            continue
        seconds.append(time.perf_counter() - started)
        if answer is None:
            served.append(None)
            continue
        text = prompt_of(str(answer))
        if text is None or text not in vectors:
            foreign_answers += 1
            served.append(text)
            continue
        served.append(text)
        cosine = float(np.dot(vectors[text], vectors[p.b]))
        hit_cosines.append(cosine)
        if score is not None:
            scored_hits += 1
            deviation = max(deviation, abs((2 * score - 1) - cosine))
    timings["crowded_lookup"] = time.perf_counter() - t0
    count_after_lookups = {"sqlite_rows": data_manager.s.count(),
                           "sqlite_rows_all_states": data_manager.s.count(is_all=True),
                           "faiss_vectors": data_manager.v.count()}

    crowded = crowded_metrics(pairs, served, labels)
    exact = [p.b in labels.stored for p in pairs]
    import torch

    out: dict[str, object] = {
        "version": importlib.metadata.version("gptcache"),
        "similarity_threshold": default_s,
        "threshold_cosine": threshold_cosine,
        "threshold_source": "gptcache.Config's default similarity_threshold (read from its "
                            "signature at run time)",
        "threshold_derivation": GPTCACHE_THRESHOLD_DERIVATION,
        "threshold_check": {
            "hits_checked": scored_hits,
            "max_abs_difference_between_2score_minus_1_and_cosine": deviation,
            "min_cosine_of_a_hit": min(hit_cosines) if hit_cosines else None,
            "how": "on each hit, the score passed to adapt()'s hit_callback (rank / 4) mapped "
                   "by 2*score - 1, against the inner product of the unit vectors the embedding "
                   "function returned for b and for the served a"},
        "configuration": {
            "data_manager": "get_data_manager(CacheBase('sqlite', sql_url=<tmp>/sqlite.db), "
                            f"VectorBase('faiss', dimension={enc.dimension}, "
                            f"index_path=<tmp>/faiss.index), max_size={max_size})",
            "eviction": f"default in-memory LRU with max_size {max_size} (GPTCache's default "
                        "is 1000; raised to max(1000, 2 x entries) so nothing is evicted)",
            "similarity_evaluation": "SearchDistanceEvaluation() (max_distance 4.0, "
                                     "positive False)",
            "pre_embedding_func": "gptcache.processor.pre.get_prompt",
            "config": "Config() defaults (similarity_threshold "
                      f"{default_s}, auto_flush 20, disable_report False, data_check False)",
            "embedding_func": "stratacache.embed.Encoder('default', device='cpu')"
                              ".encode([text])[0] (all-MiniLM-L6-v2, unit-normalised)",
            "api": "Cache().init(...), gptcache.adapter.api.put(prompt, answer, cache_obj=...) "
                   "and get(prompt, cache_obj=..., hit_callback=...) (hit_callback only "
                   "records the score)",
            "torch_threads": torch.get_num_threads(),
            "process": "in the benchmark process (a library, no network hop); sequential",
        },
        "crowded": {
            "store": {"stores": len(stored), "wall_s": store_wall,
                      "per_s": len(stored) / store_wall if store_wall else None,
                      "concurrency": 1, "errors": len(put_errors),
                      "errors_first": put_errors[:5]},
            "metrics": crowded,
            "lookup_latency": latency_summary(seconds, exact),
            "gptcache_report_during_lookups_mean_ms": _report_delta(report_before,
                                                                    crowded_cache.report),
            "lookup_errors": len(get_errors), "lookup_errors_first": get_errors[:5],
            "answers_not_from_this_run": foreign_answers,
            "entries_after_store": count_after_store,
            "entries_after_lookups": count_after_lookups,
            "distinct_prompts_stored": len(stored),
        },
    }

    if with_pair:
        t0 = time.perf_counter()
        pair_cache = Cache()  # one object re-initialised per pair (atexit closes only its last)
        hit: list[bool] = []
        other = 0
        pair_errors: list[str] = []
        previous: Path | None = None
        for i, p in enumerate(tqdm(pairs, desc="GPTCache put+get (pair)", unit="pair",
                                   file=sys.stderr)):
            directory = root / "pair" / str(i)
            try:
                init(pair_cache, directory, 1)
                put(p.a, answer_for(p.a), cache_obj=pair_cache)
                answer, _ = lookup(pair_cache, p.b)
            except Exception as exc:  # noqa: BLE001 - counted, treated as a miss
                pair_errors.append(repr(exc))
                answer = None
            hit.append(answer is not None)
            other += answer is not None and prompt_of(str(answer)) != p.a
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            previous = directory
        timings["pair_protocol"] = time.perf_counter() - t0
        out["pair"] = {
            "run": True,
            "how": "GPTCache has no scope/partition: each pair gets a fresh data manager (same "
                   "configuration, its own sqlite file and faiss index) initialised on one "
                   "Cache object, then put(a) and get(b); sequential",
            "errors": len(pair_errors), "errors_first": pair_errors[:5],
            "metrics": pair_metrics(pairs, hit, other)}
    else:
        out["pair"] = {"run": False, "why": "--no-pair"}

    gptcache_log.removeHandler(log_counter)
    out["log_warnings_and_errors"] = {"count": len(log_counter.messages),
                                      "first": log_counter.messages[:10]}
    out["elapsed_s"] = timings
    return out


# ---------------------------------------------------------------------------------------------
# report


def _p(w: dict[str, object]) -> str:
    return "-" if w["value"] is None else f"{w['value']:.3f}"


def _ci(w: dict[str, object]) -> str:
    return "-" if w["value"] is None else f"{w['value']:.3f} [{w['low']:.3f},{w['high']:.3f}]"


def _anomalies(strata: dict[str, object], gpt: dict[str, object], stored: int) -> list[str]:
    """What would make the figures mean less than they seem: errors, evictions, strays."""
    out = []
    sc, gc = strata["crowded"], gpt["crowded"]
    if sc["lookup_errors"]:
        out.append(f"stratacache: {sc['lookup_errors']} crowded lookups failed (counted as "
                   f"misses), first: {sc['lookup_errors_first'][0]}")
    held = sc["entries_after_lookups"]["warm"] + sc["entries_after_lookups"]["cold"]
    if held != stored:
        out.append(f"stratacache holds {held} crowded entries on disk, not {stored}")
    if sc["hits_whose_answer_text_disagrees_with_matched_prompt"]:
        out.append("stratacache: some hits' answer text disagrees with matched_prompt")
    if gc["lookup_errors"] or gc["store"]["errors"]:
        out.append(f"GPTCache: {gc['store']['errors']} puts and {gc['lookup_errors']} gets "
                   "raised")
    for when in ("entries_after_store", "entries_after_lookups"):
        counts = gc[when]
        if counts["sqlite_rows"] != stored or counts["faiss_vectors"] != stored:
            out.append(f"GPTCache {when.replace('_', ' ')}: {counts} for {stored} puts "
                       "(eviction, lost or duplicate entries)")
    if gc["answers_not_from_this_run"]:
        out.append(f"GPTCache served {gc['answers_not_from_this_run']} answers not stored here")
    if gpt["log_warnings_and_errors"]["count"]:
        out.append(f"GPTCache logged {gpt['log_warnings_and_errors']['count']} warnings/errors, "
                   f"first: {gpt['log_warnings_and_errors']['first'][0]}")
    for name, result in (("stratacache", strata), ("GPTCache", gpt)):
        pair = result["pair"]
        if pair.get("run"):
            errors = pair.get("lookup_errors", pair.get("errors", 0))
            if errors:
                out.append(f"{name} pair protocol: {errors} failed calls (counted as misses)")
            if pair["metrics"]["served_an_entry_other_than_a"]:
                out.append(f"{name} pair protocol served an entry other than the pair's a")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    pairs, total_in_file = select_pairs(args.data, args.limit, args.seed)
    stored = list(dict.fromkeys(p.a for p in pairs))
    labels = Labels(pairs)
    contradictions = sum(1 for p in pairs if not p.duplicate and
                         labels.cluster.get(p.a, p.a) == labels.cluster.get(p.b, p.b))
    with_pair = not args.no_pair

    # one system at a time: the stratacache server is stopped before GPTCache's model loads
    strata = run_stratacache(pairs, stored, labels, args.concurrency, with_pair)
    from stratacache.embed import Encoder

    t0 = time.perf_counter()
    enc = Encoder("default", device="cpu")  # GPTCache's embedding function
    load_model_s = time.perf_counter() - t0
    gpt = run_gptcache(pairs, stored, labels, enc, with_pair)
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()

    host = machine()
    n_dup = sum(p.duplicate for p in pairs)
    anomalies = _anomalies(strata, gpt, len(stored))
    rows, pair_rows = [], []
    for name, result, label in (
            ("stratacache", strata, f"{strata['threshold_cosine']:.2f} (server default)"),
            (f"GPTCache {gpt['version']}", gpt,
             f"{gpt['threshold_cosine']:.2f} (s={gpt['similarity_threshold']} default)")):
        c = result["crowded"]
        m, lat, st = c["metrics"], c["lookup_latency"]["all"], c["store"]
        rows.append([name, label, _ci(m["labelled_precision"]), _ci(m["strict_precision"]),
                     _ci(m["recall"]), _p(m["wrong_hit_rate"]), _p(m["hit_rate"]),
                     lat.get("p50_ms", "-"), lat.get("p99_ms", "-"),
                     f"{st['per_s']:.1f} (x{st['concurrency']})"])
        if result["pair"]["run"]:
            pm = result["pair"]["metrics"]
            pair_rows.append([name, label, _ci(pm["precision"]), _ci(pm["recall"]),
                              _p(pm["hit_rate"]), _p(pm["wrong_hit_rate"])])

    report = {
        "measures": "stratacache (server default threshold) against GPTCache (sqlite + faiss, "
                    "SearchDistanceEvaluation, its default threshold) on the same QQP pairs and "
                    "embedding model: crowded and pair protocols of shared/data/README.md, "
                    "lookup latency and store throughput",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.vs_gptcache",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": host,
        "load_average_1_5_15min": {"start": load_start, "end": load_end},
        "model": "all-MiniLM-L6-v2 (stratacache's 'default' model folder) for both systems",
        "data": {"path": str(args.data.resolve()), "pairs_in_file": total_in_file,
                 "pairs_used": len(pairs), "limit": args.limit, "seed": args.seed,
                 "duplicate_pairs": n_dup, "non_duplicate_pairs": len(pairs) - n_dup,
                 "distinct_a_stored": len(stored),
                 "distinct_b_looked_up": len({p.b for p in pairs}),
                 "clustered_texts": len(labels.cluster),
                 "non_duplicate_pairs_inside_one_cluster": contradictions},
        "method": {
            "crowded": "store every distinct a (answer 'answer to: ' + a); look up every "
                       "pair's b once; served entry identified by matched_prompt (stratacache) "
                       "or answer text (GPTCache); judged with _quality.judge on the "
                       "duplicate clusters and non-duplicate labels of the pairs used",
            "pair": "for each pair, a cache holding only a is asked for b",
            "confidence_intervals": "95% Wilson score intervals (_quality.wilson)",
            "lookup_latency": "client side, sequential, after 10 warm-up lookups; stratacache "
                              "through stratacache.Client over loopback gRPC to a server "
                              "process (embedding in the server), GPTCache an in-process "
                              "get() (embedding in this process)",
            "store_throughput": "stratacache: AsyncClient, --concurrency stores in flight "
                                "(the server batches their embeddings); GPTCache: sequential "
                                "put() (one embedding per put; faiss index written every 20 "
                                "puts by its default auto_flush)",
            "exact_text_lookups": "a b whose exact text is a stored a: stratacache's exact tier "
                                  "serves it, GPTCache finds it at cosine 1; both count as "
                                  "correct (b's own text is in b's cluster)",
        },
        "systems": {"stratacache": strata, "gptcache": gpt},
        "gptcache_model_load_s": round(load_model_s, 2),
        "warnings": anomalies,
        "elapsed_s": round(elapsed, 1),
    }
    path = write_json("vs_gptcache", report, args.out)

    print(f"machine : {host['platform']}; {host['cpu']}; {host['cores']} cores; "
          f"kernel {host['simd_isa']}; load avg {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"data    : {len(pairs)} of {total_in_file} pairs ({n_dup} duplicates), seed "
          f"{args.seed}; crowded: {len(stored)} distinct a stored, {len(pairs)} lookups "
          f"({strata['crowded']['metrics']['exact_text_lookups']} with b's exact text stored)")
    print()
    print("crowded protocol")
    print(table(rows, ["system", "threshold (cosine)", "P labelled [95% CI]",
                       "P strict [95% CI]", "recall [95% CI]", "wrong-hit", "hit rate",
                       "p50 ms", "p99 ms", "stores/s (in flight)"]))
    print()
    if pair_rows:
        print("pair protocol")
        print(table(pair_rows, ["system", "threshold (cosine)", "precision [95% CI]",
                                "recall [95% CI]", "hit rate", "wrong-hit"]))
    else:
        print("pair protocol: not run (--no-pair)")
    print()
    print(f"GPTCache threshold: s = {gpt['similarity_threshold']} means cosine >= 2s - 1 = "
          f"{gpt['threshold_cosine']:.2f} (faiss squared L2 on unit vectors + "
          "SearchDistanceEvaluation); max |2*score-1 - cosine| over "
          f"{gpt['threshold_check']['hits_checked']} hits: "
          f"{gpt['threshold_check']['max_abs_difference_between_2score_minus_1_and_cosine']:.2e}")
    print("lookup latency: client side, sequential; stratacache over loopback gRPC, GPTCache "
          "in-process")
    for line in anomalies:
        print(f"WARNING : {line}")
    print(f"elapsed : {elapsed:.1f} s")
    print(f"written : {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

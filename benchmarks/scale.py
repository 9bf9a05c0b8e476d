"""How the cache behaves as one partition grows: 10k, 100k, 1M entries.

Fills a real server (``stratacache serve`` in a subprocess) with real embeddings of real text: the
distinct QQP questions of ``--data`` (normalised, deduplicated), repeated with a deterministic
prefix ``"(variant k) "`` once they run out. Every entry goes to ONE namespace and scope, so all
of them share one partition and one vector index: that is what stresses the index. Stores go
through ``stratacache.AsyncClient``, at most ``--concurrency`` in flight (a semaphore), so the
server's embedding batcher forms batches as it would under load.

The fill server runs with ``--hot-capacity`` = the largest size (the hot HNSW graph holds every
entry) and a warm budget large enough that nothing goes cold. At each size:

- fill     entries/s of that fill step: first Store sent until the last one acknowledged (each
           acknowledged Store is durable in LMDB and in the hot graph).
- hot      sequential lookups through the blocking ``Client`` of held-out questions (the
           reworded side of QQP duplicate pairs; never stored, nor any variant of them) with
           ``min_similarity=0.0``, so every lookup returns the hot tier's best candidate.
           Reported: client round trip and ``server_time_us`` of the ``--queries`` timed
           lookups, and the server's own ``search_hot`` stage p50/p99 from ``stats()``. The
           server keeps the last 4096 durations per stage, so before the timed lookups the
           benchmark sends enough others (more held-out questions) that the window holds only
           lookups made at this size. recall@1 over all of them: the entry the server returned
           (``matched_prompt``) against the exact top-1 over every stored vector, computed here
           with ``stratacache._core.topk_ip`` on vectors this process embeds with the same
           ``Encoder`` (same model, same normalised text as the server embeds; or, with
           ``--reference stored``, the vectors the server stored, read from a copy of its
           LMDB: same figures, half the embedding work); a returned entry
           whose similarity ties the exact best within 1e-5 counts as found (near-identical
           texts embed alike), and the strict figure (same entry) is reported beside it.
- warm     a consistent copy of the data directory (LMDB's own copy) opened by a second server
           with the same flags: after a restart the hot tier is empty, so lookups search the
           warm tier (all entries, exact scan of the in-memory vectors). Lookups use
           ``min_similarity=1.0`` so every one is a miss: nothing is promoted to hot and every
           lookup scans the whole partition. Reported: ``search_warm`` p50/p99 from ``stats()``
           and the server's start time (it loads every warm entry). The misses' best similarity
           is checked against the exact top-1 computed here (warm search is exact).
- cold     the same copy restarted with ``--warm-max-mib 1``: at start the warm tier demotes all
           but a few hundred entries to SQLite; once that settles, ``--cold-queries`` lookups
           with ``min_similarity=1.0`` search hot (empty), warm (the few left) and cold (the
           rest), all misses, nothing moves. Reported: ``search_cold`` p50/p99 and the time the
           demotion took. Sizes above ``--cold-max`` skip it: each cold search reads every vector
           of the partition out of SQLite.
- memory   VmRSS (and VmHWM, RssAnon, RssFile) of each server process, found in /proc as this
           process's child whose command line names the data directory; for the fill server
           also its growth per entry added since the previous size (or since it was empty, after
           a warm-up burst of lookups in another namespace has run the model).
- disk     the data directory's files (apparent size) per entry.

Prints a table per size and a summary, writes JSON (after every size, so a long run that stops
keeps what it measured) and a PNG (search latency against size). Also prints the seconds of each
step and per 1,000 entries stored, so a longer run can be predicted.

The embedding model runs on the CPU here. torch uses one thread per core by default; on a
machine shared with other work that makes single-text embeddings stall (hundreds of ms while a
thread waits for a core), which swamps lookup and store timings but not the search stages.
``--torch-threads 1`` gives steadier figures there.

    python -m benchmarks.scale [--sizes 10000,100000,1000000] [--max 10000]
    python -m benchmarks.scale --sizes 2000,5000 --max 5000     # a few minutes
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stratacache import (AsyncClient, Client, DeadlineExceededError, LookupResult,
                         OverloadedError, Timeout, UnavailableError, _core)
from stratacache.keys import normalise_prompt
from stratacache.metrics import WINDOW

from ._common import (DEFAULT_DATA, RESULTS, distinct_texts, load_pairs, machine, percentiles_ms,
                      serve, table, time_calls, write_json)

NAMESPACE = "scale"
SCOPE = {"benchmark": "scale", "model": "none"}
#: A returned entry within this similarity of the exact best counts as the best (ties).
TIE = 1e-5
#: Lookups time_calls makes before it times (they count in the server's stage windows).
WARMUP = 10
EMBED_CHUNK = 64
TIMEOUT = Timeout(lookup=600.0, store=120.0, admin=600.0)


# --- data ---------------------------------------------------------------------------------------

def build_corpus(pairs: list[dict], n_queries: int) -> tuple[list[str], list[str]]:
    """(pool, queries): the distinct normalised questions to store, and held-out questions.

    Queries are the ``b`` side of duplicate pairs in file order (so the first ones have their
    paraphrase ``a`` early in the pool, stored at every size); neither they nor any variant of
    them is ever stored."""
    queries: list[str] = []
    held: set[str] = set()
    needed: set[str] = set()  # paraphrases of chosen queries: never hold them out
    for p in pairs:
        if len(queries) == n_queries:
            break
        a, b = normalise_prompt(p["a"]), normalise_prompt(p["b"])
        if not p["duplicate"] or not a or not b or a == b or b in held or b in needed or a in held:
            continue
        queries.append(b)
        held.add(b)
        needed.add(a)
    if len(queries) < n_queries:
        raise SystemExit(f"only {len(queries)} held-out questions in the data; ask for fewer")
    pool: dict[str, None] = {}
    for text in distinct_texts(pairs):
        t = normalise_prompt(text)
        if t and t not in held:
            pool.setdefault(t, None)
    return list(pool), queries


def stored_text(pool: list[str], i: int) -> str:
    """The i-th stored prompt: the pool, then the pool again with "(variant k) " in front."""
    k, j = divmod(i, len(pool))
    return pool[j] if k == 0 else f"(variant {k}) {pool[j]}"


def embed_all(encoder: Any, texts: list[str], desc: str) -> np.ndarray:
    """Unit vectors of ``texts`` in order (embedded in length-sorted chunks: less padding)."""
    out = np.empty((len(texts), encoder.dimension), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in tqdm(range(0, len(order), EMBED_CHUNK), desc=desc, unit="batch", leave=False):
        idx = order[start:start + EMBED_CHUNK]
        out[idx] = encoder.encode([texts[i] for i in idx])
    return out


# --- the server process ---------------------------------------------------------------------------

def server_pid(data_dir: Path) -> int | None:
    """The server started by this process for ``data_dir`` (serve() does not expose its pid)."""
    want = str(data_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"serve" in args and want in args:
            return int(proc.name)
    return None


def memory(data_dir: Path) -> dict[str, int]:
    """Bytes from /proc/<pid>/status of the server on ``data_dir``."""
    pid = server_pid(data_dir)
    if pid is None:
        return {}
    out = {"pid": pid}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) * 1024
    return out


def disk(data_dir: Path) -> dict[str, int]:
    """Apparent and allocated bytes of the data directory's files, and per part."""
    out = {"total": 0, "allocated": 0, "warm": 0, "cold": 0, "cold_wal": 0}
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        st = path.stat()
        out["total"] += st.st_size
        out["allocated"] += st.st_blocks * 512
        rel = path.relative_to(data_dir).parts[0]
        if rel == "warm":
            out["warm"] += st.st_size
        elif rel == "cold.sqlite3":
            out["cold"] += st.st_size
        elif rel.startswith("cold.sqlite3"):
            out["cold_wal"] += st.st_size
    return out


def snapshot(source: Path, target: Path) -> None:
    """A consistent copy of a live data directory whose cold tier is empty: LMDB's own copy
    (a read transaction, safe beside the running server) and the manifest."""
    import lmdb

    (target / "warm").mkdir(parents=True)
    env = lmdb.open(str(source / "warm"), readonly=True, max_dbs=2, readahead=False)
    try:
        env.copy(str(target / "warm"))
    finally:
        env.close()
    shutil.copy2(source / "stratacache.json", target / "stratacache.json")


def read_stored(warm_dir: Path, position: dict[str, int], out: np.ndarray) -> int:
    """Copies the vectors the server stored (LMDB copy at ``warm_dir``) into ``out`` at each
    prompt's position; returns how many entries were read."""
    import lmdb

    from stratacache.records import decode

    env = lmdb.open(str(warm_dir), readonly=True, max_dbs=2, readahead=False, lock=False)
    n = 0
    try:
        db = env.open_db(b"entries", create=False)
        with env.begin(db=db, buffers=True) as txn:
            for _, value in txn.cursor():
                entry = decode(value)
                out[position[entry.prompt]] = entry.vector
                n += 1
    finally:
        env.close()
    return n


def stage(stats: dict, name: str) -> dict[str, float]:
    s = stats["stages"].get(name)
    if not s:
        return {"count": 0}
    return {"count": int(s["count"]), "window": min(int(s["count"]), WINDOW),
            "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3)}


# --- calls ----------------------------------------------------------------------------------------

async def fill(target: str, texts: list[str], response: bytes, concurrency: int,
               desc: str) -> dict[str, float]:
    """Stores ``texts`` with at most ``concurrency`` in flight; seconds and retries."""
    retries = 0
    errors: list[BaseException] = []
    async with AsyncClient(target, timeout=TIMEOUT) as client:
        semaphore = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(texts), desc=desc, unit="entry", smoothing=0.05)

        async def one(text: str) -> None:
            nonlocal retries
            try:
                for attempt in range(8):
                    try:
                        await client.store(text, response, namespace=NAMESPACE, scope=SCOPE)
                        return
                    except (OverloadedError, UnavailableError, DeadlineExceededError):
                        if attempt == 7:
                            raise
                        retries += 1
                        await asyncio.sleep(0.05 * 2 ** attempt)
            except Exception as exc:  # noqa: BLE001 - reported after the step
                errors.append(exc)
            finally:
                semaphore.release()
                bar.update()

        started = time.perf_counter()
        tasks: set[asyncio.Task[None]] = set()
        for text in texts:
            await semaphore.acquire()
            if errors:
                break
            task = asyncio.create_task(one(text))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} stores failed, first: {errors[0]!r}") from errors[0]
    return {"seconds": seconds, "retries": retries}


async def warm_up(target: str, prompts: list[str], concurrency: int) -> None:
    """Concurrent lookups in another namespace (misses, nothing stored): the server's model runs
    batches once before its memory is taken as the empty baseline."""
    async with AsyncClient(target, timeout=TIMEOUT) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> None:
            async with semaphore:
                await client.lookup(prompt, namespace=NAMESPACE + "-warm-up")

        await asyncio.gather(*(one(p) for p in prompts))


def lookups(client: Client, warmup: list[str], timed: list[str], min_similarity: float,
            desc: str) -> tuple[list[float], list[LookupResult]]:
    """Sequential lookups: ``time_calls`` runs the warm-up prompts untimed, then times the rest.
    Returns the timed durations and the timed results."""
    prompts = iter(warmup[:WARMUP] + timed)
    results: list[LookupResult] = []
    bar = tqdm(total=WARMUP + len(timed), desc=desc, unit="call", leave=False)

    def call() -> None:
        results.append(client.lookup(next(prompts), namespace=NAMESPACE, scope=SCOPE,
                                     min_similarity=min_similarity))
        bar.update()

    assert len(warmup) >= WARMUP
    durations = time_calls(call, len(timed))
    bar.close()
    return durations, results[WARMUP:]


def server_ms(results: list[LookupResult]) -> dict[str, float]:
    return percentiles_ms([r.server_time_us / 1e6 for r in results])


# --- phases ---------------------------------------------------------------------------------------

def hot_phase(client: Client, data_dir: Path, size: int, queries: list[str], n_timed: int,
              exact_idx: np.ndarray, exact_sim: np.ndarray, texts: list[str]) -> dict[str, Any]:
    timed, warmup, flush = (queries[:n_timed], queries[n_timed:n_timed + WARMUP],
                            queries[n_timed + WARMUP:])
    results: list[LookupResult] = []
    started = time.perf_counter()
    for prompt in tqdm(flush, desc=f"hot {size:,}: fill the stage window", unit="call",
                       leave=False):
        results.append(client.lookup(prompt, namespace=NAMESPACE, scope=SCOPE, min_similarity=0.0))
    # (lookups() leaves its warm-up calls out of what it returns: recall counts the rest)
    durations, timed_results = lookups(client, warmup, timed, 0.0, f"hot {size:,}: timed")
    seconds = time.perf_counter() - started
    stats = client.stats()
    order = flush + timed  # results of these, in this order
    results += timed_results
    index = {t: i for i, t in enumerate(texts[:size])}
    q_pos = {q: i for i, q in enumerate(queries)}
    strict = tied = other = 0
    for prompt, r in zip(order, results):
        i = q_pos[prompt]
        if r.tier != "hot":
            other += 1
            continue
        j = index.get(r.matched_prompt, -1)
        if j == exact_idx[i]:
            strict += 1
            tied += 1
        elif r.similarity >= exact_sim[i] - TIE:
            tied += 1
    n = len(results)
    return {
        "how": "sequential lookups of held-out reworded questions, min_similarity=0.0, on the "
               "server that was filled (hot holds the whole partition)",
        "timed": len(timed), "lookups_at_this_size": n + WARMUP,
        "client": percentiles_ms(durations), "server": server_ms(timed_results),
        "search_hot": stage(stats, "search_hot"), "embed": stage(stats, "embed"),
        "lookup_stage": stage(stats, "lookup"),
        "recall_at_1": round(tied / n, 4), "recall_at_1_strict": round(strict / n, 4),
        "recall_n": n, "not_hot": other, "seconds": round(seconds, 1),
        "hot_entries": stats["hot"]["entries"], "hot_bytes_estimate": stats["hot"]["bytes"],
        "memory": memory(data_dir),
    }


def restart_phase(kind: str, flags: list[str], copy: Path, size: int, queries: list[str],
                  n_timed: int, exact_sim: np.ndarray) -> dict[str, Any]:
    """A server on the copied directory; lookups with min_similarity=1.0 (all misses)."""
    started = time.perf_counter()
    with serve(*flags, data_dir=copy) as server, Client(server.target, timeout=TIMEOUT) as client:
        ready = time.perf_counter() - started
        settle = 0.0
        if kind == "cold":  # wait for the start-up demotion to finish
            # Poll every 0.5 s until the count has not moved for 3 polls; the demotion ended
            # by the first poll that saw the final count (0.5 s resolution).
            t0, last, same, settle = time.perf_counter(), -1, 0, 0.0
            while same < 3 and time.perf_counter() - t0 < 3600:
                time.sleep(0.5)
                cold = client.stats()["cold"]["entries"]
                if cold == last:
                    same += 1
                else:
                    same, last, settle = 0, cold, time.perf_counter() - t0
        before = client.stats()
        timed = queries[:n_timed]
        durations, results = lookups(client, queries[n_timed:n_timed + WARMUP], timed, 1.0,
                                     f"{kind} {size:,}")
        stats = client.stats()
        mem = memory(copy)
    diff = np.abs(np.array([r.best_similarity for r in results]) - exact_sim[:len(timed)])
    out = {
        "how": ("restart of a copy of the data directory: hot empty, warm holds every entry; "
                if kind == "warm" else
                "restart of a copy with --warm-max-mib 1: warm demotes to cold at start; ")
               + "sequential lookups with min_similarity=1.0 (misses: nothing moves)",
        "start_s": round(server.start_s, 2), "ready_s": round(ready, 2),
        "timed": len(timed), "client": percentiles_ms(durations), "server": server_ms(results),
        f"search_{kind}": stage(stats, f"search_{kind}"),
        "search_warm_small": stage(stats, "search_warm") if kind == "cold" else None,
        "hits": sum(r.hit for r in results),
        "best_similarity_vs_exact_max_abs_diff": float(diff.max()) if len(diff) else None,
        "placement": {t: before[t]["entries"] for t in ("hot", "warm", "cold")},
        "memory": mem, "disk": disk(copy),
    }
    if kind == "cold":
        out["demotion_settle_s"] = round(settle, 2)
        out["cold_bytes_per_entry"] = round(out["disk"]["cold"] / max(1, before["cold"]["entries"]))
        out["cold_wal_bytes"] = out["disk"]["cold_wal"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


# --- output ---------------------------------------------------------------------------------------

def mib(n: int | None) -> str:
    return "-" if not n else f"{n / (1 << 20):,.0f}"


def fmt(d: dict | None, key: str) -> str:
    return "-" if not d or key not in d else f"{d[key]:g}"


def p50_p99(d: dict | None) -> str:
    return f"{fmt(d, 'p50_ms')} / {fmt(d, 'p99_ms')}"


def size_table(r: dict[str, Any]) -> str:
    hot, warm, cold = r["hot"], r.get("warm"), r.get("cold")
    rows = [["hot", hot["search_hot"].get("window", 0), fmt(hot["search_hot"], "p50_ms"),
             fmt(hot["search_hot"], "p99_ms"), p50_p99(hot["server"]), fmt(hot["client"], "p50_ms"),
             f"{hot['recall_at_1']:.4f} ({hot['recall_at_1_strict']:.4f} strict)",
             mib(hot["memory"].get("VmRSS")), f"{r['disk_bytes_per_entry']:,.0f}",
             "filled server"]]
    for kind, p in (("warm", warm), ("cold", cold)):
        if not p or "skipped" in p:
            rows.append([kind, "-", "-", "-", "-", "-", "-", "-", "-",
                         p["skipped"] if p else "not run"])
            continue
        s = p[f"search_{kind}"]
        note = f"restart, start {p['start_s']:.1f} s"
        if kind == "cold":
            note += f", demotion done <= {p['demotion_settle_s']:.1f} s after ready"
        per_entry = (f"{p['cold_bytes_per_entry']:,} (cold)" if kind == "cold" else "-")
        rows.append([kind, s.get("window", 0), fmt(s, "p50_ms"), fmt(s, "p99_ms"),
                     p50_p99(p["server"]),
                     fmt(p["client"], "p50_ms"), "exact", mib(p["memory"].get("VmRSS")),
                     per_entry, note])
    return table(rows, ["tier", "stage n", "search p50 ms", "search p99 ms",
                        "lookup server p50 / p99 ms", "client p50 ms", "recall@1",
                        "server RSS MiB", "disk B/entry", "how"])


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        w, c = r.get("warm") or {}, r.get("cold") or {}
        ws, cs = w.get("search_warm"), c.get("search_cold")
        rows.append([f"{r['size']:,}", f"{r['fill']['store_per_s']:.0f}",
                     f"{r['fill']['store_s_per_1000']:.2f}",
                     p50_p99(r["hot"]["search_hot"]),
                     f"{r['hot']['recall_at_1']:.4f}",
                     p50_p99(ws), p50_p99(cs),
                     mib(r["hot"]["memory"].get("VmRSS")),
                     "-" if r["hot"].get("rss_growth_bytes_per_entry") is None
                     else f"{r['hot']['rss_growth_bytes_per_entry']:,}",
                     f"{r['disk_bytes_per_entry']:,.0f}"])
    return table(rows, ["entries", "store/s", "store s/1k", "hot p50 / p99 ms", "recall@1",
                        "warm p50 / p99 ms", "cold p50 / p99 ms", "RSS MiB", "RSS growth B/entry",
                        "disk B/entry"])


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(get: Any) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in results:
            v = get(r)
            if v is not None:
                xs.append(r["size"])
                ys.append(v)
        return xs, ys

    def stage_of(phase: str, name: str, q: str) -> Any:
        def get(r: dict) -> float | None:
            p = r.get(phase)
            s = p.get(name) if p and "skipped" not in p else None
            return s.get(q) if s else None
        return get

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, get, style in [
            ("hot search p50 (HNSW)", stage_of("hot", "search_hot", "p50_ms"), "o-"),
            ("hot search p99", stage_of("hot", "search_hot", "p99_ms"), "o--"),
            ("warm search p50 (exact scan)", stage_of("warm", "search_warm", "p50_ms"), "s-"),
            ("cold search p50 (SQLite + scan)", stage_of("cold", "search_cold", "p50_ms"), "^-"),
            ("hot lookup, server p50 (incl. embed)",
             lambda r: r["hot"]["server"].get("p50_ms"), "x:")]:
        xs, ys = series(get)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entries in the partition")
    ax.set_ylabel("ms (server stage timings)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="partition sizes to measure, comma-separated (default %(default)s)")
    parser.add_argument("--max", type=int, default=10_000,
                        help="skip sizes above this (default %(default)s: about 4 minutes on 2 "
                             "cores; 30,000 takes about 12, 100,000 about 30, 1M hours)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--queries", type=int, default=200,
                        help="timed lookups per tier and size (default %(default)s)")
    parser.add_argument("--cold-queries", type=int, default=50,
                        help="timed cold lookups per size (default %(default)s)")
    parser.add_argument("--cold-max", type=int, default=100_000,
                        help="largest size with a cold phase (default %(default)s): a cold search "
                             "reads every vector of the partition out of SQLite")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="stores in flight while filling (default %(default)s)")
    parser.add_argument("--response-bytes", type=int, default=512,
                        help="size of each stored response (default %(default)s)")
    parser.add_argument("--reference", choices=("embed", "stored"), default="embed",
                        help="where the exact search's stored vectors come from: 'embed' embeds "
                             "every stored text here with the same Encoder (default; doubles the "
                             "embedding work), 'stored' reads the vectors the server stored from "
                             "the LMDB copy")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for the servers (OMP_NUM_THREADS) and this process; "
                             "default: torch's own (one per core). 1 is far steadier on a shared "
                             "machine")
    parser.add_argument("--server-args", default="",
                        help='extra serve flags for every server, e.g. "--hnsw-ef-search 128"')
    parser.add_argument("--stage-lookups", type=int, default=WINDOW,
                        help="lookups per size; the default fills the server's per-stage "
                             "window, so its percentiles cover one size only")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json", help="JSON path")
    parser.add_argument("--plot", type=Path, default=RESULTS / "scale.png", help="PNG path")
    args = parser.parse_args(argv)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    skipped_sizes = [s for s in sizes if s > args.max]
    sizes = [s for s in sizes if s <= args.max]
    if not sizes or sizes[0] < 1:
        parser.error("no size left at or below --max")
    largest = sizes[-1]
    n_timed = args.queries
    # Enough lookups per size to fill the server's stage windows, so their percentiles describe
    # this size alone (--stage-lookups lowers it for quick checks).
    n_queries = max(n_timed + WARMUP, args.stage_lookups)

    from stratacache.embed import Encoder

    pairs = load_pairs(args.data)
    pool, queries = build_corpus(pairs, n_queries)
    texts = [stored_text(pool, i) for i in range(largest)]
    position = {t: i for i, t in enumerate(texts)}
    response = (b"stratacache scale benchmark response " * (args.response_bytes // 37 + 1)
                )[:args.response_bytes]
    # Warm budget: LMDB keeps a value over ~2 KiB in whole 4 KiB overflow pages; twice that.
    page_bytes = 4096 * math.ceil((4 * 384 + args.response_bytes + 1024) / 4096)
    warm_mib = max(64, math.ceil(largest * 2 * page_bytes / (1 << 20)))
    extra = shlex.split(args.server_args)
    fill_flags = ["--hot-capacity", str(largest), "--warm-max-mib", str(warm_mib), *extra]
    cold_flags = ["--hot-capacity", str(largest), "--warm-max-mib", "1", *extra]
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # serve() passes it on
    info = machine()
    machine_line = (f"machine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}, "
                    f"python {info['python']}; load average at start "
                    f"{os.getloadavg()[0]:.2f} (other work shares the machine)")
    params_line = (f"one partition; sizes {', '.join(f'{s:,}' for s in sizes)}; "
                   f"{len(pool):,} distinct QQP questions (then '(variant k) ' copies); "
                   f"{n_timed} timed lookups ({args.cold_queries} cold), {len(queries):,} "
                   f"held-out per size for recall; response {args.response_bytes} B; "
                   f"store concurrency {args.concurrency}; reference vectors: {args.reference}; "
                   f"torch threads: {args.torch_threads or 'default'}; fill server: "
                   f"{' '.join(fill_flags)}; cold restart: {' '.join(cold_flags)}")
    print(machine_line)
    print(params_line)

    encoder = Encoder("default", device="auto")
    t0 = time.perf_counter()
    query_vectors = embed_all(encoder, queries, "embed held-out queries")
    query_embed_s = time.perf_counter() - t0
    vectors = np.zeros((largest, encoder.dimension), dtype=np.float32)

    payload: dict[str, Any] = {
        "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": {"namespace": NAMESPACE, "scope": SCOPE, "distinct_questions": len(pool),
                       "held_out_queries": len(queries), "timed_queries": n_timed,
                       "fill_server_flags": fill_flags, "cold_restart_flags": cold_flags,
                       "stage_window": WINDOW, "tie_tolerance": TIE,
                       "sizes_skipped_above_max": skipped_sizes},
        "query_embed_s": round(query_embed_s, 2), "sizes": []}
    results: list[dict[str, Any]] = payload["sizes"]
    loop = asyncio.new_event_loop()
    run_started = time.perf_counter()
    try:
        with serve(*fill_flags) as server, Client(server.target, timeout=TIMEOUT) as client:
            # A floor of 0 (kept in the data directory, so the copies have it too): lookups
            # ask min_similarity=0 to get the best candidate, and may only tighten the floor.
            client.set_policy(NAMESPACE, min_similarity=0.0)
            payload["fill_server_start_s"] = round(server.start_s, 2)
            loop.run_until_complete(warm_up(server.target, queries[-2 * args.concurrency:],
                                            args.concurrency))
            baseline = memory(server.data_dir)
            payload["fill_server_memory_empty"] = baseline
            done, rss_before = 0, baseline.get("VmRSS", 0)
            for size in sizes:
                step: dict[str, Any] = {"size": size, "load_average_before": os.getloadavg()[0]}
                phase: dict[str, float] = {}
                added = texts[done:size]
                t0 = time.perf_counter()
                if args.reference == "embed":
                    vectors[done:size] = embed_all(encoder, added,
                                                   f"embed {done:,}->{size:,} here")
                phase["bench_embed"] = time.perf_counter() - t0
                f = loop.run_until_complete(fill(server.target, added, response,
                                                 args.concurrency, f"store {done:,}->{size:,}"))
                phase["store"] = f["seconds"]
                stats = client.stats()
                held = {t: stats[t]["entries"] for t in ("hot", "warm", "cold")}
                if held != {"hot": size, "warm": size, "cold": 0}:
                    raise RuntimeError(f"after filling to {size} the tiers hold {held}")
                step["fill"] = {
                    "added": len(added), "store_s": round(f["seconds"], 2),
                    "store_per_s": round(len(added) / f["seconds"], 1),
                    "store_s_per_1000": round(1000 * f["seconds"] / len(added), 3),
                    "retries": f["retries"], "bench_embed_s": round(phase["bench_embed"], 2),
                    "bench_embed_s_per_1000": round(1000 * phase["bench_embed"] / len(added), 3),
                    "store_durable": stage(stats, "store_durable"),
                    "embed_batches": stats["embed_batches"], "embed_texts": stats["embed_texts"]}

                with tempfile.TemporaryDirectory(prefix="stratacache-scale-") as tmp:
                    # The fill server is idle now: copy its directory for the restart phases
                    # (hot lookups below write nothing to disk, so the copy is the same after).
                    copy = Path(tmp) / "data"
                    t0 = time.perf_counter()
                    snapshot(server.data_dir, copy)
                    phase["snapshot"] = time.perf_counter() - t0
                    if args.reference == "stored":
                        t0 = time.perf_counter()
                        read = read_stored(copy / "warm", position, vectors)
                        phase["read_stored_vectors"] = time.perf_counter() - t0
                        if read != size:
                            raise RuntimeError(f"the copy holds {read} entries, not {size}")
                    t0 = time.perf_counter()
                    exact_idx, exact_sim = _core.topk_ip(query_vectors, vectors[:size], 1)
                    exact_idx, exact_sim = exact_idx[:, 0], exact_sim[:, 0]
                    phase["exact_top1"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    step["hot"] = hot_phase(client, server.data_dir, size, queries, n_timed,
                                            exact_idx, exact_sim, texts)
                    phase["hot"] = time.perf_counter() - t0
                    rss = step["hot"]["memory"].get("VmRSS", 0)
                    step["hot"]["rss_growth_bytes_per_entry"] = round(
                        (rss - rss_before) / (size - done)) if rss and rss_before else None
                    rss_before, done = rss, size
                    step["disk"] = disk(server.data_dir)
                    step["disk_bytes_per_entry"] = round(step["disk"]["total"] / size, 1)

                    t0 = time.perf_counter()
                    step["warm"] = restart_phase("warm", fill_flags, copy, size, queries, n_timed,
                                                 exact_sim)
                    phase["warm"] = time.perf_counter() - t0
                    if size <= args.cold_max:
                        t0 = time.perf_counter()
                        step["cold"] = restart_phase("cold", cold_flags, copy, size, queries,
                                                     args.cold_queries, exact_sim)
                        phase["cold"] = time.perf_counter() - t0
                    else:
                        step["cold"] = {"skipped": f"size > --cold-max {args.cold_max}"}
                step["phase_s"] = {k: round(v, 2) for k, v in phase.items()}
                step["load_average_after"] = os.getloadavg()[0]
                step["elapsed_s"] = round(time.perf_counter() - run_started, 1)
                results.append(step)

                fl = step["fill"]
                print(f"\n== {size:,} entries in one partition ==")
                print(machine_line)
                print(params_line)
                print(f"fill {size - fl['added']:,} -> {size:,}: {fl['added']:,} stores in "
                      f"{fl['store_s']:.1f} s = {fl['store_per_s']:.0f} entries/s "
                      f"({fl['store_s_per_1000']:.2f} s per 1,000; {fl['retries']} retries)"
                      + (f"; embedding them here for the exact reference "
                         f"{fl['bench_embed_s_per_1000']:.2f} s per 1,000"
                         if args.reference == "embed" else ""))
                print(size_table(step))
                growth = step["hot"]["rss_growth_bytes_per_entry"]
                print(f"fill server RSS grew {growth:,} B per entry added (this step); "
                      f"load average {step['load_average_before']:.2f} before, "
                      f"{step['load_average_after']:.2f} after"
                      if growth is not None else "")
                print("phase seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                   step["phase_s"].items())
                      + f"; elapsed {step['elapsed_s']} s")
                write_json("scale", payload, args.out)
                plot(results, args.plot, f"stratacache, one partition: {info['cpu']}, "
                                         f"{info['cores']} cores")
    finally:
        loop.close()

    payload["total_s"] = round(time.perf_counter() - run_started, 1)
    print(f"\n{machine_line}\n{params_line}")
    print(summary_table(results))
    if skipped_sizes:
        print(f"skipped (above --max {args.max}): {', '.join(f'{s:,}' for s in skipped_sizes)}")
    print(f"total {payload['total_s']} s after start-up (queries embedded in "
          f"{query_embed_s:.1f} s before it)")
    path = write_json("scale", payload, args.out)
    print(f"wrote {path} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Warm and cold search at 10k, 100k and 1M entries in one partition: miss latency, recall@1
against exact search, memory per entry.

A miss searches every tier that may hold a match, so it is the lookup that pays for a large
partition. This benchmark fills ONE partition with N entries spread over the warm (LMDB) and
cold (SQLite) tiers, starts a real server on it, and sends lookups of held-out questions with
``min_similarity=1.0`` (every one a miss; nothing moves between tiers):

- **bulk fill (labelled: not the Store path).** Entries are written straight into a data
  directory's tier files with the tiers' own bulk writers (``tiers.warm.BulkWriter``,
  ``tiers.cold.BulkWriter``, as ``stratacache reindex`` does), so 1M entries fill in minutes
  instead of the hours a million embedded Stores take. Their vectors are **synthetic prompts
  around real ones**: each lies between the embeddings of two random real QQP questions
  (``--base`` distinct questions, embedded once and cached under ``--cache-dir``; a weight in
  [0.5, 1] on the first) plus Gaussian noise of ``--noise`` per component, renormalised: a
  million distinct vectors spread as real questions are, where only 73k real distinct
  questions exist. ``--warm-share`` of the entries go to warm (the newest), the rest to cold.
- **misses.** ``--queries`` held-out QQP questions (never stored, nor their neighbours'
  bases), each sent once as a warm-up (the cold tier builds the partition's codes on its first
  search) and then timed: client round trip p50/p99, and the server's ``search_warm`` and
  ``search_cold`` stages from ``Stats``.
- **recall@1.** The best similarity the server reports for each miss against the exact best
  over every stored vector (computed here with ``_core.topk_ip`` on the same vectors, the query
  embedded by the same model and backend here): found when within ``--tolerance`` (1e-4: the
  backends' thread scheduling moves the last digits). Also the largest shortfall.
- **memory.** The server's anonymous resident memory (RssAnon: what the process itself holds;
  file pages LMDB and SQLite map are the kernel's page cache, reported beside it as VmRSS)
  after the warm-up, less that of the same server on an empty data directory after the same
  lookups, per entry (so the model and the process count once), and the codes' own bytes per
  entry.
- **floors**, in the same run: one embedding (this process, same model and backend) and a bare
  gRPC echo; the target is miss p50 <= embedding + echo + 10 ms.

Prints a table per size and a summary, writes JSON after every size and a PNG of miss latency
and memory per entry against entries.

    python -m benchmarks.tier_scale [--sizes 10000,100000,1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stratacache import Client, _core, datadir, keys
from stratacache.embed import Encoder
from stratacache.records import Entry
from stratacache.tiers import codes, cold, warm

from ._common import (DEFAULT_DATA, RESULTS, distinct_texts, echo_server, load_pairs, machine,
                      percentiles_ms, serve, table, time_calls, write_json)
from .scale import memory, stage

NAMESPACE = "scale"
PARTITION = keys.partition_key(NAMESPACE, {}, None, None)
RESPONSE = b"r" * 64
WRITE_BATCH = 20_000


def base_vectors(encoder: Encoder, texts: list[str], cache_dir: Path) -> np.ndarray:
    """Embeddings of ``texts``, cached by model fingerprint and count."""
    path = cache_dir / f"base-{encoder.identity.fingerprint}-{len(texts)}.npy"
    if path.exists():
        return np.load(path)
    out = np.concatenate([encoder.encode(texts[i:i + 256]) for i in tqdm(
        range(0, len(texts), 256), desc="embedding base questions", unit="batch")])
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def synthesize(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` unit vectors, each between two random ``base`` rows (a weight in [0.5, 1] on the
    first) plus Gaussian noise of ``noise`` per component, renormalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(n, start + 100_000) - start
        weight = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
        block = (weight * base[rng.integers(0, len(base), m)]
                 + (1 - weight) * base[rng.integers(0, len(base), m)]
                 + rng.normal(0, noise, (m, base.shape[1])).astype(np.float32))
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def fill(data_dir: Path, encoder: Encoder, vectors: np.ndarray, warm_share: float) -> dict:
    """Writes ``vectors`` as entries of one partition: the oldest to cold, the newest to warm."""
    data_dir.mkdir(parents=True)
    datadir.write_manifest(data_dir / datadir.MANIFEST, encoder.identity)
    n = len(vectors)
    n_warm = int(n * warm_share)
    now = time.time()
    started = time.perf_counter()

    def entries(lo: int, hi: int) -> list[Entry]:
        return [Entry(id=uuid.uuid4().hex, namespace=NAMESPACE, partition=PARTITION,
                      exact_key=keys.exact_key(PARTITION, f"q{i}"), prompt=f"q{i}",
                      response=RESPONSE, vector=vectors[i], created_at=now - n + i)
                for i in range(lo, hi)]

    cold_writer = cold.BulkWriter(data_dir / datadir.COLD)
    warm_writer = warm.BulkWriter(data_dir / datadir.WARM, map_size=max(1, n_warm) * 4096)
    try:
        for lo in tqdm(range(0, n, WRITE_BATCH), desc=f"bulk fill {n:,}", unit="batch"):
            hi = min(n, lo + WRITE_BATCH)
            split = max(lo, min(hi, n - n_warm))
            if split > lo:
                cold_writer.put(entries(lo, split))
            if hi > split:
                warm_writer.put(entries(split, hi))
    finally:
        cold_writer.close()
        warm_writer.close()
    return {"entries": n, "warm": n_warm, "cold": n - n_warm,
            "fill_s": round(time.perf_counter() - started, 1)}


def misses(client: Client, prompts: list[str]) -> tuple[list[float], list[float]]:
    """Seconds and best similarity of each lookup (all misses)."""
    seconds, best = [], []
    for prompt in prompts:
        started = time.perf_counter()
        result = client.lookup(prompt, namespace=NAMESPACE, min_similarity=1.0)
        seconds.append(time.perf_counter() - started)
        assert not result.hit, "a lookup with min_similarity=1.0 hit: not a miss benchmark"
        best.append(result.best_similarity)
    return seconds, best


def run_size(n: int, args: argparse.Namespace, encoder: Encoder, base: np.ndarray,
             queries: list[str], query_vectors: np.ndarray, baseline: dict[str, int],
             work: Path) -> dict[str, Any]:
    data_dir = work / f"data-{n}"
    vectors = synthesize(base, n, args.noise, seed=n)
    filled = fill(data_dir, encoder, vectors, args.warm_share)
    warm_mib = max(64, 4 * (data_dir / datadir.WARM / "data.mdb").stat().st_size >> 20)
    with serve("--warm-max-mib", str(warm_mib), "--hot-capacity", "1000", *args.server_flag,
               data_dir=data_dir) as server, Client(server.target) as client:
        at_start = memory(data_dir)
        started = time.perf_counter()
        misses(client, queries[:5])  # the cold tier builds the partition's codes
        first_s = time.perf_counter() - started
        misses(client, queries)  # warm-up
        held = memory(data_dir)
        seconds, best = misses(client, queries)
        stats = client.stats()
        assert stats["warm"]["entries"] + stats["cold"]["entries"] == n, stats
    _, exact = _core.topk_ip(query_vectors, vectors, 1)
    shortfall = exact[:, 0] - np.asarray(best, dtype=np.float32)
    return {
        **filled, "start_s": round(server.start_s, 1), "first_lookups_s": round(first_s, 2),
        "miss": percentiles_ms(seconds),
        "search_warm": stage(stats, "search_warm"), "search_cold": stage(stats, "search_cold"),
        "recall_at_1": round(float(np.mean(shortfall <= args.tolerance)), 4),
        "max_shortfall": round(float(shortfall.max()), 5),
        "memory_at_start": at_start, "memory": held,
        "bytes_per_entry": round((held.get("RssAnon", 0) - baseline["RssAnon"]) / n, 1),
        "rss_bytes_per_entry": round((held.get("VmRSS", 0) - baseline["VmRSS"]) / n, 1),
        "code_bytes_per_entry": codes.row_bytes(vectors.shape[1]),
        "disk_bytes_per_entry": round(sum(
            p.stat().st_size for p in data_dir.rglob("*") if p.is_file()) / n, 1),
    }


def summary(results: list[dict[str, Any]], floor_ms: float) -> str:
    rows = [[f"{r['entries']:,}", f"{r['warm']:,}/{r['cold']:,}", r["fill_s"], r["start_s"],
             r["miss"]["p50_ms"], r["miss"]["p99_ms"], round(r["miss"]["p50_ms"] - floor_ms, 2),
             r["search_warm"].get("p50_ms"), r["search_cold"].get("p50_ms"), r["recall_at_1"],
             r["bytes_per_entry"], r["rss_bytes_per_entry"], r["disk_bytes_per_entry"]]
            for r in results]
    return table(rows, ["entries", "warm/cold", "fill s", "start s", "miss p50 ms",
                        "miss p99 ms", "p50 - floor", "warm p50", "cold p50", "recall@1",
                        "anon B/entry", "RSS B/entry", "disk B/entry"])


def plot(results: list[dict[str, Any]], floor_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["entries"] for r in results]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    lat.plot(n, [r["miss"]["p50_ms"] for r in results], "o-", label="miss p50 (client)")
    lat.plot(n, [r["search_warm"].get("p50_ms") for r in results], "s-",
             label="warm search p50 (server)")
    lat.plot(n, [r["search_cold"].get("p50_ms") for r in results], "v-",
             label="cold search p50 (server; at once with warm)")
    lat.axhline(floor_ms, color="grey", ls="--", label="floor: embedding + echo")
    lat.axhline(floor_ms + 10, color="red", ls=":", label="target: floor + 10 ms")
    lat.set(xscale="log", xlabel="entries in the partition", ylabel="ms", title="miss latency")
    lat.legend(fontsize=8)
    mem.plot(n, [r["bytes_per_entry"] for r in results], "o-", label="server anonymous memory")
    mem.plot(n, [r["rss_bytes_per_entry"] for r in results], "^-", label="server RSS (with page cache)")
    mem.axhline(600, color="red", ls=":", label="target: 600 B")
    mem.axhline(results[0]["code_bytes_per_entry"], color="grey", ls="--", label="codes")
    mem.set(xscale="log", xlabel="entries in the partition", ylabel="bytes",
            title=f"memory per entry ({results[0]['warm'] / results[0]['entries']:.0%} warm)")
    mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="entries in the partition, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="timed misses per size")
    parser.add_argument("--base", type=int, default=20_000,
                        help="distinct QQP questions whose embeddings seed the entries")
    parser.add_argument("--noise", type=float, default=0.01,
                        help="Gaussian noise per component added to a base embedding")
    parser.add_argument("--warm-share", type=float, default=0.2,
                        help="share of the entries in the warm tier (the rest are cold)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="a miss's best similarity this close to the exact best counts as "
                             "found")
    parser.add_argument("--server-flag", action="append", default=[],
                        help="extra flag for the server, e.g. --server-flag=--embed-threads=1")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" /
                        "stratacache-bench", help="where base embeddings are cached")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where data directories are built (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tier_scale.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    texts = distinct_texts(load_pairs(args.data))
    if len(texts) < args.base + args.queries:
        parser.error(f"{args.data} has {len(texts)} distinct questions, fewer than --base + "
                     f"--queries = {args.base + args.queries}")
    queries, base_texts = texts[:args.queries], texts[args.queries:args.queries + args.base]
    encoder = Encoder("default", backend="auto", cache_dir=args.cache_dir / "onnx")
    base = base_vectors(encoder, base_texts, args.cache_dir)
    query_vectors = encoder.encode(queries)
    with echo_server() as echo:
        echo_ms = float(np.median(time_calls(lambda: echo(b"x" * 64), 200)) * 1000)
    embed_ms = float(np.median(time_calls(lambda: encoder.encode([queries[0]]), 100)) * 1000)
    floor_ms = embed_ms + echo_ms
    payload: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                               "floor": {"embed_ms": round(embed_ms, 3), "echo_ms": round(echo_ms, 3),
                                         "total_ms": round(floor_ms, 3)},
                               "results": []}
    with tempfile.TemporaryDirectory(prefix="stratacache-tier-scale-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        with serve(*args.server_flag, data_dir=work / "empty") as server, \
                Client(server.target) as client:
            misses(client, queries)  # the same calls, so the same allocations, as below
            baseline = memory(work / "empty")
        payload["baseline_memory"] = baseline
        for n in sizes:
            result = run_size(n, args, encoder, base, queries, query_vectors, baseline, work)
            payload["results"].append(result)
            write_json("tier_scale", payload, args.out)
            print(summary([result], floor_ms), flush=True)
            shutil.rmtree(work / f"data-{n}")
    print(f"\nfloor: embedding {embed_ms:.2f} ms + echo {echo_ms:.2f} ms = {floor_ms:.2f} ms")
    print(summary(payload["results"], floor_ms))
    png = args.out.with_suffix(".png")
    plot(payload["results"], floor_ms, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

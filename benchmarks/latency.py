"""Latency of each kind of Lookup, through a real server and the public client.

Starts ``stratacache serve`` on a temporary data directory with a small hot tier and warm budget,
stores QQP questions so that the oldest sit in cold, the middle ones in warm and the newest in
hot, then times (client round trip and the server's own ``server_time_us``) for N calls each:

- exact hit   a stored prompt, resent verbatim (no embedding);
- hot hit     a reworded prompt whose entry is in memory;
- warm hit    a reworded prompt whose entry is only on disk in LMDB (each hit promotes it);
- cold hit    a reworded prompt whose entry is only in SQLite (each hit moves it up);
- miss        a question that was never stored.

Then throughput and latency with 1, 4, 16 and 64 concurrent clients (asyncio, one process)
for exact and for semantic lookups.

With ``--verifier DIR`` the server runs with that verifier (threshold 0, so every candidate
above the gate is served and each hit pays one verification): each semantic kind is timed
twice on disjoint halves of its prompts, with the namespace's verification off and on, side by
side in one run, and the server's per-stage times (embed, search, decide, verify) show where the
time goes.

``--embed-backend onnx,torch`` (the default) runs the whole set with the first backend's
server, then, for every backend in turn, starts a fresh server holding only the hot entries and
times the hot hit and the semantic throughput at the largest client count on the same prompts
(equal terms: the full run's server holds thousands of entries and has a history): those
figures side by side with each backend's own embedding floor, and the ratios to the first.

Every call's tier is checked; calls served from another tier than intended are not counted.
In the same run it times the floors: a bare gRPC echo on loopback and a bare embedding call
(the same model, in this process, one text), and prints each figure's ratio to its floor
(exact hit / echo; semantic / (embed + echo)). Also reports the server's start time. Prints a
table and writes JSON.

    python -m benchmarks.latency [--calls 300] [--entries 3000] [--verifier OUT/verifier]
                                 [--embed-backend onnx,torch]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from pathlib import Path

from tqdm import tqdm

from stratacache import AsyncClient, Client, LookupResult

from ._common import (DEFAULT_DATA, distinct_texts, echo_server, load_pairs, machine,
                      percentiles_ms, serve, table, time_calls, write_json)

SUFFIX = " Please answer briefly."  # rewording that keeps the meaning (cosine ~0.95)
RESPONSE = b"r" * 512


def _measure(client: Client, prompts: list[str], tier: str, min_similarity: float | None,
             label: str) -> dict[str, object]:
    round_trip, server, other = [], [], 0
    for prompt in tqdm(prompts, desc=label, unit="call", leave=False):
        started = time.perf_counter()
        result: LookupResult = client.lookup(prompt, min_similarity=min_similarity)
        elapsed = time.perf_counter() - started
        if (result.tier or "miss") != tier:
            other += 1
            continue
        round_trip.append(elapsed)
        server.append(result.server_time_us / 1e6)
    return {"round_trip": percentiles_ms(round_trip), "server": percentiles_ms(server),
            "other_tier": other}


async def _concurrent(target: str, prompts: list[str], min_similarity: float | None,
                      clients: int, calls: int) -> dict[str, object]:
    """``clients`` workers share ``calls`` lookups; per-call latency and overall calls/s."""
    source = itertools.islice(itertools.cycle(prompts), calls)
    latencies: list[float] = []
    hits = 0

    async def worker(c: AsyncClient) -> None:
        nonlocal hits
        for prompt in source:
            started = time.perf_counter()
            result = await c.lookup(prompt, min_similarity=min_similarity)
            latencies.append(time.perf_counter() - started)
            hits += result.hit

    async with AsyncClient(target, timeout=60) as c:
        await c.lookup(prompts[0])  # connect before timing
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"clients": clients, "calls": len(latencies), "hits": hits,
            "per_s": round(len(latencies) / elapsed, 1), **percentiles_ms(latencies)}


def _embed_floor(texts: list[str], calls: int, backend: str) -> dict[str, float]:
    """One bare embedding with ``backend`` (the server's), timed with no server running."""
    from stratacache.embed import Encoder

    encoder = Encoder("default", device="auto", backend=backend)
    texts_cycle = iter(texts * (calls // max(1, len(texts)) + 2))
    return percentiles_ms(time_calls(lambda: encoder.encode([next(texts_cycle)]), calls))


def _floors(texts: list[str], calls: int, backend: str) -> dict[str, dict[str, float]]:
    """The bare costs under every lookup, timed after the server has stopped (so they do not
    compete with it): a loopback gRPC echo of a lookup-sized message, and one embedding."""
    with echo_server() as echo:
        payload = b"x" * 600  # about a lookup request and its hit response
        rpc = time_calls(lambda: echo(payload), calls)
    return {"echo": percentiles_ms(rpc), "embed": _embed_floor(texts, calls, backend)}


def _hot_only(backend: str, hot: list[str], flags: list[str], calls: int,
              clients: int) -> dict[str, object]:
    """Another backend's server on the same hot entries and prompts: the hot hit's client p50
    and the semantic throughput with ``clients`` clients."""
    with serve(*flags, "--embed-backend", backend) as server, \
            Client(server.target, timeout=30) as client:
        for text in tqdm(hot, desc=f"store ({backend})", unit="entry"):
            client.store(text, RESPONSE)
        prompts = [t + SUFFIX for t in hot]
        hit = _measure(client, (prompts * (calls // len(prompts) + 1))[:calls], "hot", 0.8,
                       f"hot hit ({backend})")
        row = asyncio.run(_concurrent(server.target, prompts, 0.8, clients,
                                      max(calls, 16 * clients)))
    return {"hot_hit": hit["round_trip"], "semantic": row, "start_s": server.start_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--entries", type=int, default=3000, help="questions stored")
    parser.add_argument("--calls", type=int, default=300, help="lookups timed per kind")
    parser.add_argument("--hot-capacity", type=int, default=200)
    parser.add_argument("--warm-max-mib", type=float, default=6,
                        help="warm budget; about 4 KiB per entry, the rest goes cold")
    parser.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 4, 16, 64], help="concurrency levels, comma-separated")
    parser.add_argument("--verifier", type=Path, default=None,
                        help="verifier folder: time semantic hits with and without verification")
    parser.add_argument("--embed-backend", type=lambda v: v.split(","), default=["onnx", "torch"],
                        help="server embedding backends, comma-separated: the first runs "
                             "everything, the others the hot hit and top concurrency beside it")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    backend = args.embed_backend[0]

    texts = distinct_texts(load_pairs(args.data, limit=4 * (args.entries + args.calls)))
    stored, unseen = texts[:args.entries], texts[args.entries:args.entries + args.calls]
    if len(stored) < args.entries or len(unseen) < args.calls:
        parser.error("not enough distinct questions in --data for --entries and --calls")

    # The semantic kinds ask for 0.8: the server's floor must allow it (a request may only
    # tighten its namespace's threshold).
    flags = ["--hot-capacity", str(args.hot_capacity), "--warm-max-mib", str(args.warm_max_mib),
             "--min-similarity", "0.8"]
    base_flags = list(flags)
    if args.verifier is not None:
        flags += ["--verifier", str(args.verifier), "--verify-threshold", "0",
                  "--verify-gate", "0.8"]
    with serve(*flags, "--embed-backend", backend) as server, \
            Client(server.target, timeout=30) as client:
        started = time.perf_counter()
        for text in tqdm(stored, desc="store", unit="entry"):
            client.store(text, RESPONSE)
        store_s = time.perf_counter() - started
        time.sleep(1)  # let the warm-to-cold demotion settle
        stats = client.stats()
        n_cold, n_warm = stats["cold"]["entries"], stats["warm"]["entries"]
        # Stores are in order, and demotion takes the least recently used: the oldest are cold,
        # the newest hot. Keep clear of the borders.
        calls = args.calls
        hot = stored[-min(calls, args.hot_capacity // 2):]
        warm = stored[n_cold + 50: n_cold + 50 + calls]
        warm = [t for t in warm if t not in set(stored[-args.hot_capacity:])]
        cold = stored[: min(calls, max(0, n_cold - 50))]
        kinds: list[tuple[str, list[str], str, float | None]] = [
            ("exact hit", stored[-calls:], "exact", None),
            ("hot hit", [t + SUFFIX for t in hot] * max(1, calls // max(1, len(hot))), "hot", 0.8),
            ("warm hit", [t + SUFFIX for t in warm], "warm", 0.8),
            ("cold hit", [t + SUFFIX for t in cold], "cold", 0.8),
            ("miss", unseen, "miss", None),
        ]
        if args.verifier is not None:  # the same kinds, verified, on the other half
            client.set_policy("default", verify=False)
            halves = []
            for label, prompts, tier, min_similarity in kinds:
                if tier in ("hot", "warm", "cold"):
                    halves.append((label, prompts[0::2], tier, min_similarity, False))
                    halves.append((label + ", verified", prompts[1::2], tier, min_similarity,
                                   True))
                else:
                    halves.append((label, prompts, tier, min_similarity, False))
        else:
            halves = [(*kind, None) for kind in kinds]
        results: dict[str, dict[str, object]] = {}
        for label, prompts, tier, min_similarity, verify in halves:
            if verify is not None:
                client.set_policy("default", verify=verify)
            results[label] = _measure(client, prompts, tier, min_similarity, label)
        if args.verifier is not None:
            client.set_policy("default", verify=False)
        concurrency = []
        for kind, prompts, min_similarity in (
                ("exact", stored[-args.hot_capacity:], None),
                ("semantic", [t + SUFFIX for t in stored[-args.hot_capacity:]], 0.8)):
            for clients in args.clients:
                calls = (max(args.calls, 8 * clients) if kind == "semantic"
                         else max(10 * args.calls, 20 * clients))
                row = asyncio.run(_concurrent(server.target, prompts, min_similarity, clients,
                                              calls))
                concurrency.append({"kind": kind, **row})
        final_stats = client.stats()

    # Every backend on equal terms: a fresh server each, the same hot entries and prompts,
    # one after the other (the full run's server above has thousands of entries and a history).
    top = max(args.clients)
    side = {name: _hot_only(name, hot, base_flags, args.calls, top)
            for name in args.embed_backend}
    floors = _floors(stored[:args.calls], args.calls, backend)
    for name, row in side.items():
        row["embed_floor"] = (floors["embed"] if name == backend
                              else _embed_floor(stored[:args.calls], args.calls, name))
    rows = []
    for label, r in results.items():
        rt, sv = r["round_trip"], r["server"]
        floor = floors["echo"]["p50_ms"] + (0 if label == "exact hit" else floors["embed"]["p50_ms"])
        plain = results.get(label.removesuffix(", verified"), {}).get("round_trip", {})
        if label.endswith(", verified") and plain.get("n") and r["round_trip"].get("n"):
            r["verified_over_plain_p50"] = round(r["round_trip"]["p50_ms"] / plain["p50_ms"], 2)
        ratio = f"{rt['p50_ms'] / floor:.2f}" if rt.get("n") else "-"
        r["floor_p50_ms"], r["client_p50_over_floor"] = floor, ratio
        rows.append([label, rt.get("n", 0), rt.get("p50_ms", "-"), rt.get("p99_ms", "-"),
                     sv.get("p50_ms", "-"), sv.get("p99_ms", "-"), ratio, r["other_tier"]])
    for name, f in floors.items():
        rows.append([f"floor: {name}", f["n"], f["p50_ms"], f["p99_ms"], "", "", "", ""])
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; "
          f"server start {server.start_s:.2f} s; {args.entries} entries "
          f"(warm {n_warm}, cold {n_cold} after filling), stored at "
          f"{args.entries / store_s:.0f}/s sequentially")
    print(table(rows, ["lookup", "n", "client p50 ms", "client p99 ms", "server p50 ms",
                       "server p99 ms", "p50 / floor", "other tier"]))
    ratios = {k: v["verified_over_plain_p50"] for k, v in results.items()
              if "verified_over_plain_p50" in v}
    if ratios:
        print("verified / unverified client p50: " + ", ".join(
            f"{k.removesuffix(', verified')} {v:.2f}x" for k, v in ratios.items()))
    stages = final_stats["stages"]
    print("\nwhere the time goes (server stages, p50 / p99 ms over the last calls): " + ", ".join(
        f"{name} {st['p50_ms']:.2f}/{st['p99_ms']:.2f}" for name, st in sorted(stages.items())))
    print()
    print(table([[r["kind"], r["clients"], r["calls"], r["per_s"], r["p50_ms"], r["p90_ms"],
                  r["p99_ms"]] for r in concurrency],
                ["lookups", "clients", "calls", "calls/s", "p50 ms", "p90 ms", "p99 ms"]))
    first = side[backend]
    for row in side.values():
        hit, floor = row["hot_hit"], row["embed_floor"]
        row["hot_hit_p50_over_floor"] = (round(hit["p50_ms"] / (floor["p50_ms"] + floors["echo"][
            "p50_ms"]), 2) if hit.get("n") else None)
        row["semantic_per_s_over_first"] = round(row["semantic"]["per_s"]
                                                 / first["semantic"]["per_s"], 2)
    print(f"\nembedding backends side by side (same prompts; floor = that backend's embedding "
          f"+ echo; throughput with {top} clients):")
    print(table([[name, r["hot_hit"].get("p50_ms", "-"), r["embed_floor"]["p50_ms"],
                  r["hot_hit_p50_over_floor"], r["semantic"]["per_s"],
                  f"{r['semantic_per_s_over_first']:.2f}x", f"{r['start_s']:.1f}"]
                 for name, r in side.items()],
                ["backend", "hot hit client p50 ms", "embed floor p50 ms", "p50 / floor",
                 f"semantic/s ({top} clients)", f"vs {backend}", "server start s"]))
    path = write_json("latency", {
        "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
        "server_start_s": server.start_s, "store_per_s": args.entries / store_s,
        "placement_after_fill": {"warm": n_warm, "cold": n_cold},
        "results": results, "concurrency": concurrency, "floors": floors,
        "verifier": None if args.verifier is None else str(args.verifier),
        "verified_over_plain_p50": ratios, "server_stages": final_stats["stages"],
        "embed_backend": backend, "backends": side}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

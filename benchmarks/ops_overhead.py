"""What the operations layer costs: the same lookups against two servers side by side, one with
everything an operator turns on in production and one with all of it off.

- off: no /metrics, no key, no rate limits, text logs;
- on:  /metrics served (and scraped during the run, as Prometheus would), a keys file with a
  scoped key, every rate limit set (high enough never to be hit) and JSON logs.

Both servers hold the same entries. Exact hits (a stored prompt resent) and semantic hot hits (a
reworded prompt) are timed in alternating rounds, off then on then off..., so both see the same
machine load; the table gives client p50/p99 and the on/off p50 ratio (targets: <= 1.15 for
exact hits, <= 1.05 for semantic hits).

Then a flood of distinct user ids (``--flood-users``, 100,000 by default) goes through the
lookups of two fresh servers: one without limits, and one with keys and a per-user lookup limit
whose buckets stay alive for minutes, so it tracks every user of the flood (up to the limiter's
cap, past which new users share one bucket). The growth of each server's resident memory
(VmRSS) over the flood is reported; the target is under 50 MiB for the limited one.

    python -m benchmarks.ops_overhead [--calls 600] [--entries 200] [--flood-users 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import secrets
import socket
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from stratacache import AsyncClient, Client, RateLimitedError

from ._common import (DEFAULT_DATA, distinct_texts, load_pairs, machine, percentiles_ms, serve,
                      table, write_json)

SUFFIX = " Please answer briefly."  # rewording that keeps the meaning (cosine ~0.95)
RESPONSE = b"r" * 512
#: Calls per server per round: short rounds so load changes hit both servers alike.
ROUND = 25
FLOOD_CONCURRENCY = 32
#: The flood server's per-user lookup limit: 5 at once, full again only after 500 s, so no
#: bucket of the flood is dropped as idle during it (the worst case for memory).
FLOOD_LIMIT = "0.01,5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _keys_file(directory: Path, key: str) -> Path:
    path = directory / "keys.toml"
    path.write_text(
        "[[keys]]\n"
        'name = "bench-gateway"\n'
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        'namespaces = ["bench-*", "default"]\n'
        'roles = ["lookup", "store", "feedback"]\n')
    return path


def _on_flags(keys: Path, metrics_port: int) -> list[str]:
    limits = [f"--rate-limit-{scope}-{call}" for scope in ("user", "namespace", "global")
              for call in ("lookup", "store")]
    return ["--metrics-port", str(metrics_port), "--keys-file", str(keys), "--log-format", "json",
            *itertools.chain.from_iterable((flag, "1000000,1000000") for flag in limits)]


def _time(client: Client, prompts: list[str], want_tier: str, **kwargs: object) -> list[float]:
    out = []
    for prompt in prompts:
        started = time.perf_counter()
        result = client.lookup(prompt, min_similarity=0.8, **kwargs)
        elapsed = time.perf_counter() - started
        if result.tier != want_tier:
            raise RuntimeError(f"expected a {want_tier} hit for {prompt!r}, got {result.tier}")
        out.append(elapsed)
    return out


def _side_by_side(clients: dict[str, Client], texts: list[str], calls: int,
                  scrape: str) -> dict[str, dict[str, list[float]]]:
    """Alternating rounds of exact and semantic hits on each server."""
    # Rewordings that hit in memory (a few short questions move too far from their entry).
    reworded = [t + SUFFIX for t in texts]
    probe = next(iter(clients.values()))
    reworded = [p for p in reworded if probe.lookup(p, min_similarity=0.8).tier == "hot"]
    kinds = {"exact": (texts, "exact"), "semantic": (reworded, "hot")}
    seconds = {name: {kind: [] for kind in kinds} for name in clients}
    cycles = {kind: itertools.cycle(prompts) for kind, (prompts, _) in kinds.items()}
    rounds = -(-calls // ROUND)
    for r in tqdm(range(rounds), desc="side by side", unit="round"):
        for kind, (_, tier) in kinds.items():
            batch = [next(cycles[kind]) for _ in range(ROUND)]
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                seconds[name][kind] += _time(clients[name], batch, tier)
        if r % 10 == 0:  # a Prometheus scrape now and then, as in production
            urllib.request.urlopen(scrape, timeout=30).read()
    return seconds


async def _flood(target: str, text: str, users: int, api_key: str | None) -> dict[str, float]:
    """``users`` exact-hit lookups, each from a user id of its own: calls/s, and how many were
    refused by a rate limit (past the limiter's cap new users share one bucket)."""
    ids = iter(range(users))
    refused = 0

    async def worker(c: AsyncClient) -> None:
        nonlocal refused
        for i in ids:
            try:
                await c.lookup(text, namespace="bench-ops", user_id=f"flood-user-{i:07d}")
            except RateLimitedError:
                refused += 1

    async with AsyncClient(target, api_key=api_key, timeout=60) as c:
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(FLOOD_CONCURRENCY)))
        return {"calls_per_s": round(users / (time.perf_counter() - started), 1),
                "refused": refused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--entries", type=int, default=200, help="questions stored in each server")
    parser.add_argument("--calls", type=int, default=600,
                        help="timed lookups per server and kind (exact, semantic)")
    parser.add_argument("--flood-users", type=int, default=100_000,
                        help="distinct user ids sent through each server's lookups")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)

    texts = distinct_texts(load_pairs(args.data, args.entries))[:args.entries]
    key = secrets.token_urlsafe(32)
    metrics_port = _free_port()
    with tempfile.TemporaryDirectory(prefix="stratacache-ops-") as tmp, \
            serve() as off, serve(*_on_flags(keys := _keys_file(Path(tmp), key),
                                             metrics_port)) as on:
        servers = {"off": (off, None), "on": (on, key)}
        clients = {name: Client(s.target, api_key=k, timeout=30)
                   for name, (s, k) in servers.items()}
        try:
            for name, c in clients.items():
                for text in tqdm(texts, desc=f"store ({name})", unit="entry"):
                    c.store(text, RESPONSE, namespace="default")
            scrape = f"http://127.0.0.1:{metrics_port}/metrics"
            seconds = _side_by_side(clients, texts, args.calls, scrape)
            series = sum(1 for line in urllib.request.urlopen(scrape, timeout=30).read()
                         .decode().splitlines() if line and not line.startswith("#"))
        finally:
            for c in clients.values():
                c.close()
        # The flood: a server without limits, and one whose per-user buckets each stay alive
        # for minutes (FLOOD_LIMIT), so every user of the flood is tracked at once.
        flood = {}
        for name, flags in (("off", ()), ("on", ("--keys-file", str(keys), "--log-format",
                                                 "json", "--rate-limit-user-lookup",
                                                 FLOOD_LIMIT))):
            with serve(*flags) as server, Client(server.target, api_key=key if flags else None,
                                                 timeout=30) as client:
                client.store(texts[0], RESPONSE, namespace="bench-ops")
                before = _rss_bytes(server.pid)
                calls = asyncio.run(_flood(server.target, texts[0], args.flood_users,
                                           key if flags else None))
                after = _rss_bytes(server.pid)
            flood[name] = {"users": args.flood_users, **calls,
                           "rss_before_mib": round(before / 2**20, 1),
                           "rss_after_mib": round(after / 2**20, 1),
                           "rss_growth_mib": round((after - before) / 2**20, 1)}

    figures = {name: {kind: percentiles_ms(s) for kind, s in kinds.items()}
               for name, kinds in seconds.items()}
    ratios = {kind: round(figures["on"][kind]["p50_ms"] / figures["off"][kind]["p50_ms"], 3)
              for kind in ("exact", "semantic")}
    targets = {"exact": 1.15, "semantic": 1.05}
    rows = [(kind, figures["off"][kind]["p50_ms"], figures["on"][kind]["p50_ms"],
             figures["off"][kind]["p99_ms"], figures["on"][kind]["p99_ms"], ratios[kind],
             f"<= {targets[kind]}", "met" if ratios[kind] <= targets[kind] else "NOT met")
            for kind in ("exact", "semantic")]
    print(table(rows, ("hit", "off p50 ms", "on p50 ms", "off p99 ms", "on p99 ms",
                       "p50 on/off", "target", "")))
    print()
    print(table([(name, f["users"], f["refused"], f["calls_per_s"], f["rss_before_mib"],
                  f["rss_after_mib"], f["rss_growth_mib"]) for name, f in flood.items()],
                ("server", "distinct users", "rate-limited", "calls/s", "RSS before MiB",
                 "RSS after MiB", "growth MiB")))
    print(f"\n/metrics exposed {series} samples; rate-limit target: growth < 50 MiB "
          f"({'met' if flood['on']['rss_growth_mib'] < 50 else 'NOT met'})")
    path = write_json("ops_overhead", {
        "machine": machine(), "entries": len(texts), "calls": args.calls, "round": ROUND,
        "latency": figures, "p50_ratio_on_off": ratios, "targets": targets,
        "flood": flood, "metrics_samples": series,
        "median_round_ratio": {kind: round(statistics.median(
            _round_ratios(seconds, kind)), 3) for kind in ("exact", "semantic")},
    }, args.out)
    print(f"wrote {path}")
    return 0


def _round_ratios(seconds: dict[str, dict[str, list[float]]], kind: str) -> list[float]:
    """on/off ratio of the medians of each round (each pair of rounds ran back to back)."""
    on, off = seconds["on"][kind], seconds["off"][kind]
    return [statistics.median(on[i:i + ROUND]) / statistics.median(off[i:i + ROUND])
            for i in range(0, min(len(on), len(off)), ROUND)]


if __name__ == "__main__":
    raise SystemExit(main())

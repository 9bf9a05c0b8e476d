"""Hit quality of a running stratacache server on labelled pairs, through the public client.

Runs both protocols of ``shared/data/README.md`` exactly as a gateway would use the cache:

* **pair**: each pair gets a scope of its own (``{"bench-pair": i}``), so one server holds many
  one-entry caches side by side: ``a`` is stored, ``b`` is looked up in the same scope.
* **crowded**: every distinct ``a`` is stored in one namespace and scope; every ``b`` is looked
  up against all of them.

The threshold is swept in one pass: each lookup asks with ``min_similarity=0``, so the server
returns its best candidate and that candidate's similarity, and a threshold t serves exactly the
lookups whose similarity is >= t (the server's decision is that same comparison). Nothing is
stored twice. Reported at each threshold and at the server's default: precision, recall, hit
rate, wrong-hit rate with 95 % Wilson intervals; JSON, and a PNG precision-recall plot with the
default marked.

    python -m benchmarks.hit_quality                    # 5,000 pairs, a server of its own
    python -m benchmarks.hit_quality --limit 0          # every pair in the file
    python -m benchmarks.hit_quality --target HOST:PORT # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from stratacache import AsyncClient, Client

from ._common import DEFAULT_DATA, RESULTS, machine, serve, write_json
from ._quality import (Pair, crowded_rows, format_table, load_pairs, pair_rows,
                       parse_thresholds)

T = TypeVar("T")


async def _bounded(items: Sequence[T], work: Callable[[T], Awaitable[object]], limit: int,
                   desc: str) -> list[object]:
    """Runs ``work`` on every item with at most ``limit`` in flight; results in item order."""
    semaphore = asyncio.Semaphore(limit)
    bar = tqdm(total=len(items), desc=desc, unit="call")

    async def one(item: T) -> object:
        async with semaphore:
            result = await work(item)
        bar.update(1)
        return result

    try:
        return await asyncio.gather(*(one(i) for i in items))
    finally:
        bar.close()


async def _run(target: str, pairs: list[Pair], concurrency: int) -> dict[str, object]:
    run = uuid.uuid4().hex[:8]
    pair_ns, crowded_ns = f"bench-pair-{run}", f"bench-crowded-{run}"
    stored = list(dict.fromkeys(p.a for p in pairs))
    timings: dict[str, float] = {}
    async with AsyncClient(target, timeout=120) as c:
        started = time.perf_counter()
        await _bounded(list(enumerate(pairs)), lambda ip: c.store(
            ip[1].a, "answer to: " + ip[1].a, namespace=pair_ns,
            scope={"bench-pair": str(ip[0])}), concurrency, "pair: store")
        timings["pair_store"] = time.perf_counter() - started
        started = time.perf_counter()
        pair_results = await _bounded(list(enumerate(pairs)), lambda ip: c.lookup(
            ip[1].b, namespace=pair_ns, scope={"bench-pair": str(ip[0])}, min_similarity=0.0),
            concurrency, "pair: lookup")
        timings["pair_lookup"] = time.perf_counter() - started

        started = time.perf_counter()
        await _bounded(stored, lambda a: c.store(a, "answer to: " + a, namespace=crowded_ns),
                       concurrency, "crowded: store")
        timings["crowded_store"] = time.perf_counter() - started
        started = time.perf_counter()
        crowded_results = await _bounded(pairs, lambda p: c.lookup(
            p.b, namespace=crowded_ns, min_similarity=0.0), concurrency, "crowded: lookup")
        timings["crowded_lookup"] = time.perf_counter() - started
        # Leave the server as we found it.
        await c.invalidate_namespace(pair_ns)
        await c.invalidate_namespace(crowded_ns)
    return {"pair": pair_results, "crowded": crowded_results, "stored": stored,
            "timings": timings}


def _plot(path: Path, pair: list[dict], crowded: list[dict], default: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for rows, key, label in ((pair, "precision", "pair"),
                             (crowded, "labelled_precision", "crowded (labelled)")):
        xs = [r["recall"]["value"] for r in rows if r[key]["value"] is not None]
        ys = [r[key]["value"] for r in rows if r[key]["value"] is not None]
        line, = ax.plot(xs, ys, marker=".", label=label)
        at = [r for r in rows if abs(r["threshold"] - default) < 1e-9 and r[key]["value"]]
        if at:
            ax.scatter([at[0]["recall"]["value"]], [at[0][key]["value"]], s=120,
                       facecolors="none", edgecolors=line.get_color(), linewidths=2)
            ax.annotate(f"default {default:.2f}",
                        (at[0]["recall"]["value"], at[0][key]["value"]),
                        textcoords="offset points", xytext=(8, -12))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("stratacache hit quality by similarity threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled pairs file")
    parser.add_argument("--limit", type=int, default=5000,
                        help="pairs used, after a seeded shuffle (0 = all; default %(default)s, "
                             "about 5 minutes on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--target", default=None,
                        help="HOST:PORT of a running server (default: start one on a "
                             "temporary data directory)")
    parser.add_argument("--api-key", default=None, help="for --target servers that need one")
    parser.add_argument("--thresholds", type=parse_thresholds, default="0.70:0.99:0.01",
                        help="START:STOP:STEP or a comma list; the server default is added")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--out", type=Path, default=RESULTS / "hit_quality.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "hit_quality.png")
    args = parser.parse_args(argv)

    pairs, total = load_pairs(args.data, args.limit or None, args.seed)
    started = time.perf_counter()
    server = nullcontext(None) if args.target else serve()
    with server as process:
        target = args.target or process.target
        with Client(target, api_key=args.api_key) as c:
            default = round(float(c.stats()["default_min_similarity"]), 6)
        raw = asyncio.run(_run(target, pairs, args.concurrency))
    elapsed = time.perf_counter() - started

    thresholds = sorted(set(args.thresholds) | {default})
    pair_similarity = [r.similarity if r.hit else 0.0 for r in raw["pair"]]
    pair = pair_rows(pair_similarity, [p.duplicate for p in pairs], thresholds)
    served = [(r.matched_prompt, r.similarity) if r.hit else ("", -1.0) for r in raw["crowded"]]
    crowded_summary, crowded = crowded_rows(pairs, served, set(raw["stored"]), thresholds)

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; data "
          f"{args.data.name}: {len(pairs)} of {total} pairs (seed {args.seed}); server default "
          f"threshold {default}; {elapsed:.0f} s")
    print(format_table(pair, crowded, default, label="server default"))
    at_default = {"pair": next(r for r in pair if r["threshold"] == default),
                  "crowded": next(r for r in crowded if r["threshold"] == default)}
    path = write_json("hit_quality", {
        "machine": info, "data": {"path": str(args.data), "pairs": len(pairs),
                                  "pairs_in_file": total, "seed": args.seed},
        "server": {"target": args.target or "own", "default_min_similarity": default},
        "method": "lookups with min_similarity=0 return the best candidate; a threshold t "
                  "serves those with similarity >= t",
        "elapsed_s": elapsed, "phase_s": raw["timings"], "at_default": at_default,
        "pair": pair, "crowded": {"summary": crowded_summary, "by_threshold": crowded}},
        args.out)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(args.plot, pair, crowded, default)
    print(f"wrote {path} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

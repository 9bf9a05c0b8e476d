"""Event-loop lag and exact-hit latency under a Feedback storm, beside the same load idle.

Starts ``stratacache serve`` (CPU unless ``--device``), stores ``--entries`` QQP questions in
namespace ``lookups`` and a few in ``storm``, and gives ``storm`` a wrong-hit bound (0.05) and
``--evidence`` labelled observations, so every change of its evidence recalibrates on all of
them. The observations are written to the data directory's evidence file with the book's own
API between two starts of the server (scored like QQP paraphrase pairs: right ones high, wrong
ones low): embedding 200,000 pairs through AddEvidence would take hours on a CPU, and what is
measured here is what a calibration over that many costs the loop, not where they came from.

Then two phases of ``--seconds`` each, side by side in one run:

- idle   ``--exact-clients`` clients resend stored questions verbatim (exact hits, no model)
         and ``--semantic-clients`` clients send reworded ones (embedding, search, decide);
- storm  the same, plus ``--feedback-clients`` clients sending Feedback on ``storm``'s entries
         as fast as the server answers (each one new evidence, each one a recalibration due).

Per phase: exact-hit and semantic client p50/p99, calls answered, Feedback answered, and the
server's event-loop lag (Stats ``loop_lag``: how late a task sleeping 10 ms wakes, p50/p99/max
over its last 4096 samples, about 41 s: phases shorter than that share samples). The figures to
read: exact p99 storm / idle (target <= 2) and loop lag p99 in the storm (target <= 10 ms).
Clients run in this process, on the same machine as the server. Prints a table, writes JSON.

    python -m benchmarks.loop_lag [--seconds 45] [--evidence 190000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stratacache import AsyncClient, Client
from stratacache.policy import Defaults, Observation, PolicyBook

from ._common import (DEFAULT_DATA, distinct_texts, load_pairs, machine, percentiles_ms, serve,
                      table, write_json)
from .latency import SUFFIX

BOUND = 0.05
#: Questions of ``storm`` that Feedback reports on.
STORM_ENTRIES = 16


def _write_evidence(data_dir: Path, n: int, seed: int = 0) -> None:
    """Appends ``n`` scored observations to ``storm``'s evidence, under the embedder that
    scored the real pairs already there (so the server does not re-score them)."""
    path = data_dir / "evidence.sqlite3"
    with sqlite3.connect(path) as db:
        (embedder,) = db.execute("SELECT embedder FROM evidence LIMIT 1").fetchone()
    db.close()
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.6
    scores = np.where(correct, rng.beta(8, 1.5, n), rng.beta(1.5, 5, n))
    observations = [Observation(f"query {i}", f"stored {i}", bool(c), float(s), None)
                    for i, (c, s) in enumerate(zip(correct, scores))]

    async def add() -> None:
        book = PolicyBook(path, Defaults(min_similarity=0.95, verify_gate=0.8,
                                         verify_threshold=0.9, max_wrong_rate=None,
                                         has_verifier=False), embedder, None)
        try:
            for start in range(0, n, 50_000):
                await book.add("storm", observations[start:start + 50_000])
        finally:
            book.close()

    asyncio.run(add())


async def _phase(target: str, exact: list[str], semantic: list[str],
                 storm: list[tuple[str, str]], args: argparse.Namespace,
                 with_storm: bool) -> dict[str, object]:
    """One phase: the lookup clients (and the Feedback clients when ``with_storm``) for
    ``args.seconds``; latencies per kind and the server's loop lag at the end."""
    latencies: dict[str, list[float]] = {"exact": [], "semantic": [], "feedback": []}
    errors: dict[str, int] = {"exact": 0, "semantic": 0, "feedback": 0}

    async def worker(c: AsyncClient, kind: str, calls: Iterator) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            try:
                if kind == "feedback":
                    entry_id, prompt = next(calls)
                    await c.feedback(entry_id, prompt, True, namespace="storm")
                else:
                    result = await c.lookup(next(calls), namespace="lookups",
                                            min_similarity=None if kind == "exact" else 0.8)
                    if kind == "exact" and result.tier != "exact":
                        errors[kind] += 1
                        continue
            except Exception:  # counted: a benchmark reports failures, it does not stop
                errors[kind] += 1
                continue
            latencies[kind].append(time.perf_counter() - started)

    async with AsyncClient(target, timeout=60) as c:
        await c.lookup(exact[0], namespace="lookups")  # connect before timing
        plan = [("exact", exact)] * args.exact_clients + [("semantic", semantic)] * \
            args.semantic_clients + ([("feedback", storm)] * args.feedback_clients
                                     if with_storm else [])
        started = time.perf_counter()
        until = started + args.seconds
        await asyncio.gather(*(worker(c, kind, itertools.cycle(items[i::len(plan)] or items))
                               for i, (kind, items) in enumerate(plan)))
        elapsed = time.perf_counter() - started
        stats = await c.stats()
        policy = await c.get_policy("storm") if with_storm else None
    return {"seconds": round(elapsed, 1),
            **{kind: {**percentiles_ms(v), "per_s": round(len(v) / elapsed, 1),
                      "errors": errors[kind]} for kind, v in latencies.items()},
            "loop_lag": stats["loop_lag"], "server_stages": stats["stages"],
            "storm_evidence": None if policy is None else policy["evidence"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--entries", type=int, default=500, help="questions stored for lookups")
    parser.add_argument("--evidence", type=int, default=190_000,
                        help="labelled observations of the storm namespace (at most 200,000 "
                             "with the Feedback the storm adds)")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each phase")
    parser.add_argument("--exact-clients", type=int, default=8)
    parser.add_argument("--semantic-clients", type=int, default=2)
    parser.add_argument("--feedback-clients", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="the server's --device")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.data, limit=4 * args.entries + 100)
    texts = distinct_texts(pairs)
    stored, storm_texts = texts[:args.entries], texts[args.entries:args.entries + STORM_ENTRIES]
    if len(storm_texts) < STORM_ENTRIES:
        parser.error("not enough distinct questions in --data for --entries")
    flags = ["--device", args.device, "--min-similarity", "0.8"]
    with tempfile.TemporaryDirectory(prefix="stratacache-loop-lag-") as tmp:
        data_dir = Path(tmp) / "data"
        with serve(*flags, data_dir=data_dir) as server, Client(server.target, timeout=60) as c:
            for text in stored:
                c.store(text, b"r" * 512, namespace="lookups")
            ids = [c.store(text, b"r", namespace="storm") for text in storm_texts]
            c.add_evidence("storm", [(p["a"], p["b"], p["duplicate"]) for p in pairs[:8]])
            c.set_policy("storm", max_wrong_rate=BOUND)
        load_started = time.perf_counter()
        _write_evidence(data_dir, args.evidence)
        load_s = time.perf_counter() - load_started
        with serve(*flags, data_dir=data_dir) as server, Client(server.target, timeout=600) as c:
            start_policy = c.get_policy("storm")  # waits for the first calibration
            storm = [(entry_id, text + SUFFIX) for entry_id, text in zip(ids, storm_texts)]
            exact, semantic = stored, [t + SUFFIX for t in stored]
            phases = {name: asyncio.run(_phase(server.target, exact, semantic, storm, args,
                                               name == "storm"))
                      for name in ("idle", "storm")}

    idle, storm_ = phases["idle"], phases["storm"]
    ratio = (round(storm_["exact"]["p99_ms"] / idle["exact"]["p99_ms"], 2)
             if storm_["exact"].get("n") and idle["exact"].get("n") else None)
    rows = [[name, p["exact"].get("n", 0), p["exact"].get("p50_ms", "-"),
             p["exact"].get("p99_ms", "-"), p["semantic"].get("p50_ms", "-"),
             p["semantic"].get("p99_ms", "-"), p["feedback"].get("n", 0),
             f"{p['loop_lag']['p50_ms']:.2f}", f"{p['loop_lag']['p99_ms']:.2f}",
             f"{p['loop_lag']['max_ms']:.2f}"] for name, p in phases.items()]
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; "
          f"{args.entries} entries; storm namespace: bound {BOUND}, "
          f"{start_policy['evidence']} observations at start (written in {load_s:.1f} s), "
          f"{storm_['storm_evidence']} after the storm; {args.seconds:g} s a phase; clients: "
          f"{args.exact_clients} exact, {args.semantic_clients} semantic, "
          f"{args.feedback_clients} feedback (storm only)")
    print(table(rows, ["phase", "exact n", "exact p50 ms", "exact p99 ms", "semantic p50 ms",
                       "semantic p99 ms", "feedback n", "loop lag p50 ms", "loop lag p99 ms",
                       "loop lag max ms"]))
    print(f"exact-hit p99 storm / idle: {ratio}x (target <= 2); loop lag p99 in the storm: "
          f"{storm_['loop_lag']['p99_ms']:.2f} ms (target <= 10)")
    path = write_json("loop_lag", {
        "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
        "bound": BOUND, "evidence_at_start": start_policy["evidence"],
        "evidence_write_s": load_s, "phases": phases, "exact_p99_storm_over_idle": ratio},
        args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

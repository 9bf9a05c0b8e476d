"""Overload: waves of concurrent lookups with short deadlines against one real server.

Starts ``stratacache serve`` (CPU, server defaults unless a flag below overrides one), stores
``--entries`` QQP questions, then fires ``--waves`` waves of ``--wave`` lookups at once, each
with a ``--deadline-s`` client deadline, through several grpc.aio channels (one TCP connection
each). A wave mixes:

- semantic lookups, which need an embedding: half paraphrases of stored questions (a suffix
  that keeps the meaning), half questions never stored;
- ``--exact-fraction`` of exact lookups: stored questions resent verbatim, which the server
  answers from the exact key without the model. Each must return its own stored answer.

Calls are shuffled (fixed seed), so exact ones are spread over the wave. Before each wave the
server is drained (a probe lookup waits behind whatever is still queued). Per wave it reports:

- answered (hit or miss) and goodput (answered calls per second of the wave);
- shed: RESOURCE_EXHAUSTED, split by who refused: the embedding queue was full, its deadline
  could not be met (the batcher's deadline-aware admission, or dropped in the queue once it
  had passed), or gRPC's own cap on calls in flight (``--max-concurrent-rpcs``); with the
  latency of those refusals;
- deadline exceeded (the client gave up); cancelled: CANCELLED from gRPC core, which drops
  calls at random once more than 1000 have arrived that the server's event loop has not yet
  taken (its pending-request backlog, ``grpc.server.max_pending_requests``); any other error;
- p50/p99 latency of answered calls, and for the exact lookups alone how many were served
  and their p50/p99;
- the server's embedding rate in the wave (texts embedded per second, mean batch size), and
  the CPU seconds the server and the client (this process) used during it.

After the server stops it times the model alone in this process (one text, one full batch):
the semantic goodput the model would allow if it had the cores to itself.

The client runs in this process on the same machine as the server, so on a small machine it
takes CPU from the server: goodput here is a lower bound. Prints a table and writes JSON.

    python -m benchmarks.overload [--wave 2000] [--waves 3] [--exact-fraction 0.1]

Figures of one run (2026-11-23, ``python -m benchmarks.overload``, all defaults: 500 entries,
3 waves of 2000 lookups of which 200 exact, 1 s deadlines, 4 channels, server defaults). This
project's machine, 2 cores (AMD EPYC, AVX-512), no GPU, shared with other engineers' test runs
(the model alone, server stopped: one text 157 ms, 32 texts 268 ms, 120 texts/s):

    wave  answered  goodput/s  p50/p99 ms  shed (deadline)  shed p50/p99 ms  deadline exc.  cancel.
    1     151       119        683/992     1437             724/995          315            97
    2     46        36         695/977     383              621/982          1388           183
    3     53        40         665/990     419              606/993          1347           181

Semantic lookups answered: 2, 3, 0 of 1800; the server embedded 1-2 texts/s during a wave.
Exact lookups served: 149, 43, 53 of 200 (p50 665-692 ms); the rest hit their deadline or were
cancelled by gRPC core. Each 1.3 s wave cost the server about 1.0 CPU-s and the client 0.5-0.75.
For comparison, a wave of 2000 exact lookups alone (``--exact-fraction 1``) answered 1037 and
1015: the server's event loop, not the model, bounds a 2000-call burst here. With 30 s
deadlines (one wave), semantic calls waiting for the model filled ``--max-concurrent-rpcs``
(1024): 744 calls, 68 of the 200 exact ones among them, were refused by that cap and 112 exact
ones served; with ``--embed-max-queue 256`` none was, and 186 exact ones were served.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from stratacache import AsyncClient, DeadlineExceededError, OverloadedError, StratacacheError
from stratacache.config import DEFAULT_EMBED_THREADS, EMBED_MAX_BATCH_CPU

from ._common import (DEFAULT_DATA, distinct_texts, load_pairs, machine, percentiles_ms, serve,
                      table, time_calls, write_json)
from .latency import SUFFIX

N = TypeVar("N", int, float)

#: Concurrent stores while filling (they batch into shared embedding passes).
STORE_CONCURRENCY = 32
#: Deadline of the probe that waits for the server to drain between waves, seconds.
DRAIN_TIMEOUT_S = 120.0
#: Every channel gets its own subchannel pool, so each is a separate TCP connection (channels
#: with the same target and options otherwise share one).
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)

#: Outcomes of a call, by who decided it. A RESOURCE_EXHAUSTED reply is classified by its
#: message (the batcher's and gRPC's own), first match wins.
SHED_KINDS = (
    ("shed: rpc cap", "Concurrent RPC limit"),
    ("shed: queue full", "queue is full"),
    ("shed: in queue", "dropped unanswered"),
    ("shed: deadline", "deadline"),
)
OUTCOMES = ("answered", *(kind for kind, _ in SHED_KINDS), "shed: other", "deadline exceeded",
            "cancelled", "wrong answer", "other error")


@dataclass(frozen=True)
class _Lookup:
    prompt: str
    exact: bool
    expected: bytes = b""  # the stored answer, for exact lookups


@dataclass(frozen=True)
class _Done:
    exact: bool
    outcome: str
    seconds: float
    error: str = ""


def _answer(i: int) -> bytes:
    return f"stored answer {i}".encode()


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) process ``pid`` has used; None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shed_kind(message: str) -> str:
    return next((kind for kind, text in SHED_KINDS if text in message), "shed: other")


async def _call(client: AsyncClient, lookup: _Lookup, deadline_s: float) -> _Done:
    started = time.perf_counter()
    error = ""
    try:
        result = await client.lookup(lookup.prompt, timeout=deadline_s)
    except OverloadedError as exc:
        outcome, error = _shed_kind(str(exc)), str(exc)
    except DeadlineExceededError:
        outcome = "deadline exceeded"
    except StratacacheError as exc:
        outcome = "cancelled" if exc.code == grpc.StatusCode.CANCELLED else "other error"
        error = f"{type(exc).__name__}: {exc}"
    else:
        wrong = lookup.exact and (result.tier != "exact" or result.response != lookup.expected)
        outcome = "wrong answer" if wrong else "answered"
    return _Done(lookup.exact, outcome, time.perf_counter() - started, error)


def _summary(done: Sequence[_Done], wall_s: float) -> dict[str, object]:
    counts = Counter(d.outcome for d in done)
    shed = [d.seconds for d in done if d.outcome.startswith("shed")]
    answered = [d.seconds for d in done if d.outcome == "answered"]
    return {"calls": len(done), "outcomes": {k: counts[k] for k in OUTCOMES if counts[k]},
            "answered": len(answered), "shed": len(shed),
            "goodput_per_s": round(len(answered) / wall_s, 1),
            "answered_latency": percentiles_ms(answered), "shed_latency": percentiles_ms(shed)}


async def _wave(clients: Sequence[AsyncClient], lookups: Sequence[_Lookup], deadline_s: float,
                server_pid: int) -> dict[str, object]:
    """Fires every lookup at once (spread over the channels) and waits for all of them."""
    before = await clients[0].stats(timeout=DRAIN_TIMEOUT_S)
    server_cpu, client_cpu = _cpu_s(server_pid), time.process_time()
    started = time.perf_counter()
    done = await asyncio.gather(*(_call(clients[i % len(clients)], lookup, deadline_s)
                                  for i, lookup in enumerate(lookups)))
    wall_s = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    server_after = _cpu_s(server_pid)
    server_cpu = None if server_cpu is None or server_after is None else server_after - server_cpu
    after = await clients[0].stats(timeout=DRAIN_TIMEOUT_S)
    texts = after["embed_texts"] - before["embed_texts"]
    batches = after["embed_batches"] - before["embed_batches"]
    errors = Counter(d.error[:120] for d in done if d.outcome in ("other error", "shed: other"))
    return {"wall_s": round(wall_s, 3), **_summary(done, wall_s),
            "semantic": _summary([d for d in done if not d.exact], wall_s),
            "exact": _summary([d for d in done if d.exact], wall_s),
            # Texts embedded during the wave include stragglers of no one's call: the rate is
            # what the model managed, not what callers received.
            "server": {"embedded_texts": texts, "embed_passes": batches,
                       "mean_batch": round(texts / batches, 1) if batches else 0.0,
                       "embedded_per_s": round(texts / wall_s, 1),
                       "rejected_queue_full": after["rejected_overload"]
                       - before["rejected_overload"],
                       "cpu_s": None if server_cpu is None else round(server_cpu, 2)},
            # Both processes share the machine's cores: what the client burns, the server lacks.
            "client_cpu_s": round(client_cpu, 2),
            "other_errors": dict(errors.most_common(5))}


def _plan(stored: Sequence[str], unseen: Sequence[str], wave: int, exact_fraction: float,
          seed: int) -> list[_Lookup]:
    """One wave's lookups, shuffled: ``exact_fraction`` exact, the rest semantic (paraphrases of
    stored questions and unseen questions, alternately)."""
    rng = random.Random(seed)
    n_exact = round(wave * exact_fraction)
    exact = [_Lookup(stored[i], True, _answer(i))
             for i in (rng.randrange(len(stored)) for _ in range(n_exact))]
    semantic = [_Lookup(stored[rng.randrange(len(stored))] + SUFFIX if k % 2 else
                        unseen[rng.randrange(len(unseen))], False)
                for k in range(wave - n_exact)]
    lookups = exact + semantic
    rng.shuffle(lookups)
    return lookups


async def _run(target: str, server_pid: int, args: argparse.Namespace, stored: list[str],
               unseen: list[str]) -> dict[str, object]:
    clients = [AsyncClient(target, channel_options=CHANNEL_OPTIONS) for _ in range(args.channels)]
    try:
        gate = asyncio.Semaphore(STORE_CONCURRENCY)

        async def store(i: int, text: str) -> None:
            async with gate:
                await clients[i % len(clients)].store(text, _answer(i), timeout=DRAIN_TIMEOUT_S)

        started = time.perf_counter()
        await asyncio.gather(*(store(i, t) for i, t in enumerate(stored)))
        store_s = time.perf_counter() - started
        waves = []
        for w in range(args.waves):
            # FIFO: the probe is answered once everything queued before it has gone.
            await asyncio.gather(*(c.lookup(unseen[0], timeout=DRAIN_TIMEOUT_S) for c in clients))
            lookups = _plan(stored, unseen, args.wave, args.exact_fraction, args.seed + w)
            waves.append({"wave": w + 1,
                          **await _wave(clients, lookups, args.deadline_s, server_pid)})
        stats = await clients[0].stats(timeout=DRAIN_TIMEOUT_S)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {"store_s": round(store_s, 2), "waves": waves,
            "server_stats": {k: stats[k] for k in ("lookups", "embed_batches", "embed_texts",
                                                   "rejected_overload", "stages")}}


def _model_alone(texts: Sequence[str], batch: int, threads: int) -> dict[str, object]:
    """The model's own pace in this process, the server stopped: seconds per pass of one text
    and of ``batch`` texts, and the texts per second that full batches would embed (the most
    semantic lookups per second the server could answer if the model had the cores)."""
    from stratacache.embed import Encoder

    encoder = Encoder("default", device="cpu", threads=threads, backend="auto")  # as serve's
    one = percentiles_ms(time_calls(lambda: encoder.encode(texts[:1]), 5))
    full = percentiles_ms(time_calls(lambda: encoder.encode(texts[:batch]), 5))
    return {"one_text": one, "batch": batch, "full_batch": full,
            "texts_per_s": round(batch / full["p50_ms"] * 1000, 1)}


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return f


def _positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    def parse(value: str) -> N:
        v = kind(value)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return v
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="QQP pairs file (default: the shared dev pairs)")
    parser.add_argument("--entries", type=_positive(int), default=500,
                        help="questions stored before the waves (default 500)")
    parser.add_argument("--waves", type=_positive(int), default=3,
                        help="waves fired one after another (default 3)")
    parser.add_argument("--wave", type=_positive(int), default=2000,
                        help="lookups fired at once per wave, exact ones included (default 2000)")
    parser.add_argument("--deadline-s", type=_positive(float), default=1.0,
                        help="client deadline of each lookup, seconds (default 1.0)")
    parser.add_argument("--exact-fraction", type=_fraction, default=0.1,
                        help="share of each wave that are exact lookups of stored questions, "
                             "in [0, 1] (default 0.1)")
    parser.add_argument("--channels", type=_positive(int), default=4,
                        help="gRPC channels (TCP connections) the calls are spread over "
                             "(default 4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the mix and order of each wave (default 0)")
    parser.add_argument("--embed-max-queue", type=_positive(int), default=None,
                        help="server's --embed-max-queue (default: the server's default)")
    parser.add_argument("--max-concurrent-rpcs", type=_positive(int), default=None,
                        help="server's --max-concurrent-rpcs (default: the server's default)")
    parser.add_argument("--embed-max-batch", type=_positive(int), default=None,
                        help="server's --embed-max-batch (default: the server's default)")
    parser.add_argument("--embed-threads", type=_positive(int), default=None,
                        help="server's --embed-threads, also used to time the model alone "
                             "(default: the server's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/overload.json)")
    args = parser.parse_args(argv)

    texts = distinct_texts(load_pairs(args.data, limit=args.entries + args.wave))
    stored, unseen = texts[:args.entries], texts[args.entries:args.entries + args.wave]
    if len(stored) < args.entries or not unseen:
        parser.error(f"--data holds {len(texts)} distinct questions: too few for --entries "
                     f"{args.entries} and unseen ones to look up")

    flags = ["--device", "cpu"]
    for name in ("embed_max_queue", "max_concurrent_rpcs", "embed_max_batch", "embed_threads"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    with serve(*flags) as server:
        result = asyncio.run(_run(server.target, server.pid, args, stored, unseen))
    model = _model_alone(unseen, args.embed_max_batch or EMBED_MAX_BATCH_CPU,
                         args.embed_threads or DEFAULT_EMBED_THREADS)

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; server flags: "
          f"{' '.join(flags)}; {args.entries} entries stored in {result['store_s']} s; waves of "
          f"{args.wave} lookups ({args.exact_fraction:.0%} exact), deadline {args.deadline_s} s, "
          f"{args.channels} channels")
    print(f"model alone (server stopped): one text {model['one_text']['p50_ms']} ms, "
          f"{model['batch']} texts {model['full_batch']['p50_ms']} ms: {model['texts_per_s']} "
          f"texts/s at most")
    rows = []
    for w in result["waves"]:
        out = w["outcomes"]
        rows.append([w["wave"], w["calls"], w["answered"], w["goodput_per_s"],
                     w["answered_latency"].get("p50_ms", "-"),
                     w["answered_latency"].get("p99_ms", "-"),
                     out.get("shed: deadline", 0) + out.get("shed: in queue", 0),
                     out.get("shed: queue full", 0), out.get("shed: rpc cap", 0),
                     w["shed_latency"].get("p50_ms", "-"), w["shed_latency"].get("p99_ms", "-"),
                     out.get("deadline exceeded", 0), out.get("cancelled", 0),
                     out.get("other error", 0) + out.get("shed: other", 0)
                     + out.get("wrong answer", 0),
                     w["server"]["embedded_per_s"], w["server"]["mean_batch"],
                     w["server"]["cpu_s"], w["client_cpu_s"]])
    print(table(rows, ["wave", "calls", "answered", "goodput/s", "p50 ms", "p99 ms",
                       "shed deadline", "shed queue", "shed rpc cap", "shed p50 ms",
                       "shed p99 ms", "deadline exc.", "cancelled", "other", "embedded/s",
                       "batch", "server cpu s", "client cpu s"]))
    print()
    rows = []
    for w in result["waves"]:
        for kind in ("semantic", "exact"):
            s = w[kind]
            rows.append([w["wave"], kind, s["calls"], s["answered"],
                         s["answered_latency"].get("p50_ms", "-"),
                         s["answered_latency"].get("p99_ms", "-"),
                         ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()
                                   if k != "answered") or "-"])
    print(table(rows, ["wave", "lookups", "calls", "served", "p50 ms", "p99 ms", "not served"]))
    for w in result["waves"]:
        for error, n in w["other_errors"].items():
            print(f"wave {w['wave']}: {n} x {error}")
    path = write_json("overload", {"machine": info, "args": {k: str(v) for k, v in
                                                             vars(args).items()},
                                   "server_flags": flags, "server_start_s": server.start_s,
                                   "model_alone": model, **result}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The counters, latencies and savings of one server process, read by the Stats RPC and served
to Prometheus (``GET /metrics``), and the event loop's lag.

Everything here is counted since the server started. One set of counts feeds both readers:

- the request path adds to plain counters on the event loop thread (no lock, no allocation:
  a namespace's counters are bound once, the first time it is seen);
- a scrape, on prometheus-client's HTTP thread, reads them through a collector of this
  registry (:class:`_Collector`) and so do tier sizes, queue depths and moves between tiers,
  read at scrape time from what the engine keeps (see :meth:`Metrics.watch`);
- latency and size distributions are prometheus-client histograms (thread-safe themselves):
  each stage also keeps its most recent durations in a bounded ring for the percentiles Stats
  shows, so memory stays constant however long the server runs.

Namespaces are counted by name for the first :data:`STATS_MAX_NAMESPACES` seen (Stats and
``admin report`` show each), the rest pooled under :data:`OTHER`; /metrics gives a label of its
own to the first ``max_namespaces`` of them and sums the others into :data:`OTHER`. So a flood
of tenants cannot grow the series count or the memory without bound, and one tenant touching
many namespaces of its own cannot blank the per-namespace Stats of tenants that came later
(that needs ten thousand namespaces, not a hundred).

Each :class:`Metrics` has a ``CollectorRegistry`` of its own, never prometheus-client's global
one: a process (tests, benchmarks) may run many servers. :func:`serve_metrics` serves one.

The loop's lag is measured by :class:`LoopLagProbe`: a task that sleeps a short interval and
records how late it wakes, which is how long something else held the loop (or the GIL).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import tracing
from .config import DEFAULT_METRICS_MAX_NAMESPACES
from .messages import MissReason, NamespaceCounts
from .prices import PriceTable
from .records import AnswerCost, Tier

log = logging.getLogger(__name__)

#: Durations kept per stage for percentiles.
WINDOW = 4096
#: How long the loop-lag probe sleeps between samples, seconds: short enough to catch a stall
#: of a few milliseconds, long enough to cost the loop nothing measurable (100 wake-ups/s).
LOOP_PROBE_INTERVAL_S = 0.01
#: The label of namespaces beyond the cap (a namespace name cannot start with "_").
OTHER = "_other"
#: Namespaces counted by name for Stats (about 1.5 KB each); past this, pooled under OTHER.
STATS_MAX_NAMESPACES = 10_000
#: Model names without a price logged one by one; past this, no more such lines.
UNPRICED_MODELS_LOGGED = 100

#: The ``result`` label of a lookup: where it hit, or why it missed.
HIT_RESULTS = {tier: tier.name.lower() for tier in Tier}
MISS_RESULTS = {reason: f"miss_{reason.name.lower()}" for reason in MissReason}
RESULTS = (*HIT_RESULTS.values(), *MISS_RESULTS.values())
#: The timed stages (the ``stage`` label): the steps of ``pipeline``, and each call's total.
#: ``decide`` is the reading back and re-scoring of candidates and the decision (without the
#: verifier, which is ``verify``).
STAGES = ("validate", "exact", "embed", "search_hot", "search_warm", "search_cold", "verify",
          "decide", "store_durable", "lookup", "store")
#: The batching queues (the ``queue`` label).
QUEUES = ("embed", "verify")
#: Histogram buckets: stage latencies from 100 us (an exact hit's steps) to 10 s.
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True, slots=True)
class StageSummary:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float = 0.0


def _summary(count: int, ring: deque[float]) -> StageSummary:
    if not ring:
        return StageSummary(count, 0.0, 0.0, 0.0)
    values = np.fromiter(ring, float, len(ring)) * 1000
    p50, p99 = np.percentile(values, [50, 99])
    return StageSummary(count, float(p50), float(p99), float(values.max()))


class _Counts:
    """The live counters of one namespace label. Written on the loop thread only; a scrape
    reads them from another thread (each read of an int or float attribute is atomic, and
    ``results`` never gains a key after it is made, so iterating it is safe)."""

    __slots__ = ("results", "stores", "right", "wrong", "dollars", "prompt_tokens",
                 "completion_tokens", "model_seconds", "unpriced")

    def __init__(self) -> None:
        self.results = dict.fromkeys(RESULTS, 0)
        self.stores = self.right = self.wrong = self.unpriced = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.dollars = self.model_seconds = 0.0

    def add(self, other: "_Counts") -> None:
        """Adds ``other``'s counts to these (a scrape pools namespaces past the label cap)."""
        for result, count in list(other.results.items()):
            self.results[result] += count
        self.stores += other.stores
        self.right += other.right
        self.wrong += other.wrong
        self.unpriced += other.unpriced
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.dollars += other.dollars
        self.model_seconds += other.model_seconds

    def snapshot(self) -> NamespaceCounts:
        results = dict(self.results)
        return NamespaceCounts(
            lookups=sum(results.values()), hits=sum(results[r] for r in HIT_RESULTS.values()),
            stores=self.stores, saved_dollars=self.dollars,
            saved_prompt_tokens=self.prompt_tokens,
            saved_completion_tokens=self.completion_tokens,
            saved_model_seconds=self.model_seconds, unpriced_hits=self.unpriced)


class _Stage:
    __slots__ = ("ring", "count", "histogram")

    def __init__(self, histogram: Histogram) -> None:
        self.ring: deque[float] = deque(maxlen=WINDOW)
        self.count = 0
        self.histogram = histogram


class _Held(Protocol):
    """A tier as a scrape reads it: its entry count and ``bytes``, both plain attribute reads
    (what the tier's own budget logic uses: estimated memory for hot, record bytes on disk
    for warm and cold)."""

    bytes: int

    def __len__(self) -> int: ...


class Metrics:
    """The server's counters since start, its stage latencies and its Prometheus registry.

    Call the request-path methods (``hit``, ``miss``, ``stored``, ``feedback``, ``record``,
    ``call_finished``, ``rate_limited``) from the event loop thread only.

    Args:
        max_namespaces: namespaces with a label of their own in /metrics (the first seen); the
            rest are summed under :data:`OTHER` there. 0 pools them all. Stats counts up to
            :data:`STATS_MAX_NAMESPACES` by name either way.
        prices: the price table that turns saved tokens into dollars; None prices nothing
            (tokens and seconds are still counted).

    Attributes:
        registry: this server's Prometheus registry (for :func:`serve_metrics`).
        lookups: lookups begun; misses, stores: answered; invalidated: entries removed by
            admin calls and feedback; hits and tier_errors (lookups that skipped a failing
            tier; EXACT for the exact-key step) by tier. Moves between tiers are counted by the
            placement.
    """

    def __init__(self, *, max_namespaces: int = DEFAULT_METRICS_MAX_NAMESPACES,
                 prices: PriceTable | None = None) -> None:
        self.lookups = self.misses = self.stores = self.invalidated = 0
        self.hits: Counter[Tier] = Counter()
        self.tier_errors: Counter[Tier] = Counter()
        self._max_namespaces = max_namespaces
        self._max_counted = max(max_namespaces, STATS_MAX_NAMESPACES)
        self._prices = prices if prices is not None else PriceTable({}, "none")
        self._unpriced_models: set[str | None] = set()
        # Guards the insertion of keys a scrape iterates over (new namespaces, new call
        # outcomes), which are rare; increments of existing counters need no lock.
        self._lock = threading.Lock()
        self._namespaces: dict[str, _Counts] = {}
        self._named = 0
        self._other: _Counts | None = None
        self._calls: dict[tuple[str, str], int] = {}
        self._limited: dict[tuple[str, str], int] = {}
        self._watched: _Watched | None = None

        self.registry = CollectorRegistry()
        self._stage_seconds = Histogram(
            "stratacache_stage_seconds", "Time spent per stage of a call; lookup and store are "
            "whole calls.", ["stage"], registry=self.registry, buckets=SECONDS_BUCKETS)
        self._stages = {name: _Stage(self._stage_seconds.labels(name)) for name in STAGES}
        self._batch_size = Histogram(
            "stratacache_batch_size", "Items per model pass of a batching queue.", ["queue"],
            registry=self.registry, buckets=BATCH_BUCKETS)
        self._loop_lag = Histogram(
            "stratacache_loop_lag_seconds", "How late the event loop woke a task that slept "
            f"{LOOP_PROBE_INTERVAL_S * 1000:.0f} ms.", registry=self.registry,
            buckets=LAG_BUCKETS)
        self._build = Info("stratacache_build", "The server's version, embedding model, device "
                           "and backend.", registry=self.registry)
        self.registry.register(_Collector(self))

    # --- the request path (event loop thread) -------------------------------------------------

    def _counts(self, namespace: str) -> _Counts:
        counts = self._namespaces.get(namespace)
        if counts is None:
            counts = self._admit(namespace)
        return counts

    def _admit(self, namespace: str) -> _Counts:
        """The counters of a namespace not seen before: its own while under the cap, else the
        pooled ones (a pooled namespace is not remembered by name: the dict stays bounded)."""
        if self._named >= self._max_counted and self._other is not None:
            return self._other
        with self._lock:
            if self._named < self._max_counted:
                self._named += 1
                counts = self._namespaces[namespace] = _Counts()
                return counts
            self._other = self._namespaces[OTHER] = _Counts()
            return self._other

    def hit(self, namespace: str, tier: Tier, cost: AnswerCost | None) -> None:
        """Counts a hit, and what it saved: the cost the entry was stored with."""
        self.hits[tier] += 1
        counts = self._counts(namespace)
        counts.results[HIT_RESULTS[tier]] += 1
        if cost is not None:
            self._save(counts, cost)

    def _save(self, counts: _Counts, cost: AnswerCost) -> None:
        prompt, completion = cost.prompt_tokens or 0, cost.completion_tokens or 0
        counts.prompt_tokens += prompt
        counts.completion_tokens += completion
        if cost.latency_s is not None:
            counts.model_seconds += cost.latency_s
        if not (prompt or completion):
            return
        price = self._prices.get(cost.model)
        if price is not None:
            counts.dollars += price.dollars(prompt, completion)
            return
        counts.unpriced += 1
        if cost.model not in self._unpriced_models and \
                len(self._unpriced_models) < UNPRICED_MODELS_LOGGED:
            self._unpriced_models.add(cost.model)
            log.warning("hits of entries made by model %r save no dollars: %s; add it to the "
                        "price table (--prices) to count them (logged once per model, for the "
                        "first %d models)", cost.model,
                        "the Store gave no model name" if cost.model is None else
                        f"the price table {self._prices.source} does not list it",
                        UNPRICED_MODELS_LOGGED)

    def miss(self, namespace: str, reason: MissReason) -> None:
        self.misses += 1
        self._counts(namespace).results[MISS_RESULTS[reason]] += 1

    def stored(self, namespace: str) -> None:
        self.stores += 1
        self._counts(namespace).stores += 1

    def feedback(self, namespace: str, correct: bool) -> None:
        """Counts a feedback report (right or wrong) on a hit of the namespace."""
        counts = self._counts(namespace)
        if correct:
            counts.right += 1
        else:
            counts.wrong += 1

    def call_finished(self, method: str, code: str) -> None:
        """Counts a finished RPC by its method ("Lookup") and gRPC status name ("OK")."""
        self._bump(self._calls, (method, code))

    def rate_limited(self, method: str, limit: str) -> None:
        """Counts a call refused by a rate limit ("user", "namespace" or "global")."""
        self._bump(self._limited, (method, limit))

    def _bump(self, counts: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
        if key in counts:
            counts[key] += 1
        else:
            with self._lock:
                counts[key] = counts.get(key, 0) + 1

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the body as stage ``name`` (also when it raises)."""
        started = time.perf_counter()
        try:
            with tracing.stage(name):  # a child span of the call's, when tracing is on
                yield
        finally:
            self.record(name, time.perf_counter() - started)

    def record(self, name: str, seconds: float) -> None:
        """Records that stage ``name`` took ``seconds``."""
        stage = self._stages.get(name)
        if stage is None:
            stage = self._stages[name] = _Stage(self._stage_seconds.labels(name))
        stage.ring.append(seconds)
        stage.count += 1
        stage.histogram.observe(seconds)

    def batch_observer(self, queue: str) -> Callable[[int], None]:
        """What a batcher calls with the size of each model pass (``queue``: embed, verify)."""
        return self._batch_size.labels(queue).observe

    def observe_loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    # --- set-up -------------------------------------------------------------------------------

    def describe(self, *, model: str, device: str, backend: str) -> None:
        """Sets ``stratacache_build_info`` (the version is this package's)."""
        try:
            version = importlib.metadata.version("stratacache")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        self._build.info({"version": version, "model": model, "device": device,
                          "backend": backend})

    def watch(self, *, tiers: Mapping[str, _Held], queues: Mapping[str, Callable[[], int]],
              demotions: Mapping[Tier, int]) -> None:
        """What a scrape reads from the engine, on prometheus-client's HTTP thread, so each
        must be safe to read there without the loop: plain attribute and ``len`` reads only.

        Args:
            tiers: tier name ("hot", "warm", "cold") -> the tier (its ``len`` and ``bytes``);
                the exact-key step holds nothing of its own and has no entry here.
            queues: queue name ("embed", "verify") -> how many calls wait in it now.
            demotions: the placement's moves out of each tier for its budget: HOT entries
                dropped from memory (still on disk) and WARM entries moved to cold are
                demotions; COLD ones are evictions (gone for good).
        """
        self._watched = _Watched(dict(tiers), dict(queues), demotions)

    # --- readers ------------------------------------------------------------------------------

    def stages(self) -> dict[str, StageSummary]:
        """Each stage that ran: its count since start and percentiles over its recent window."""
        return {name: _summary(s.count, s.ring) for name, s in self._stages.items() if s.count}

    def namespaces(self) -> dict[str, NamespaceCounts]:
        """Each namespace label's counts since start (:data:`OTHER` pools those past the cap)."""
        return {label: counts.snapshot() for label, counts in self._snapshot(self._namespaces)}

    def _snapshot(self, counts: dict) -> list:
        with self._lock:
            return list(counts.items())

    def _labelled(self) -> list[tuple[str, _Counts]]:
        """The namespace counts as /metrics labels them: the first ``max_namespaces`` by name
        (in the order they were first seen), the others summed under :data:`OTHER`."""
        named, pooled = [], None
        for name, counts in self._snapshot(self._namespaces):
            if name != OTHER and len(named) < self._max_namespaces:
                named.append((name, counts))
                continue
            if pooled is None:
                pooled = _Counts()
            pooled.add(counts)
        return named if pooled is None else [*named, (OTHER, pooled)]


@dataclass(frozen=True)
class _Watched:
    tiers: dict[str, _Held]
    queues: dict[str, Callable[[], int]]
    demotions: Mapping[Tier, int]


class _Collector:
    """Builds the counter and gauge families from the live counts at each scrape (on
    prometheus-client's HTTP thread; see :class:`_Counts` and :meth:`Metrics.watch` for what
    makes those reads safe)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        lookups = CounterMetricFamily("stratacache_lookups", "Lookups answered, by namespace "
                                      "and result (the tier of a hit, or why it missed).",
                                      labels=["namespace", "result"])
        stores = CounterMetricFamily("stratacache_stores", "Entries stored.",
                                     labels=["namespace"])
        feedback = CounterMetricFamily("stratacache_feedback", "Feedback reports on hits.",
                                       labels=["namespace", "verdict"])
        dollars = CounterMetricFamily("stratacache_saved_dollars", "What hits saved, dollars "
                                      "(tokens times the price table's list prices).",
                                      labels=["namespace"])
        tokens = CounterMetricFamily("stratacache_saved_tokens", "Tokens hits saved the model "
                                     "reading (prompt) and writing (completion).",
                                     labels=["namespace", "kind"])
        seconds = CounterMetricFamily("stratacache_saved_model_seconds", "Seconds of model "
                                      "time hits saved.", labels=["namespace"])
        unpriced = CounterMetricFamily("stratacache_unpriced_hits", "Hits whose tokens have "
                                       "no price (model not in the price table): no dollars.",
                                       labels=["namespace"])
        for label, c in m._labelled():
            for result, count in c.results.items():
                lookups.add_metric([label, result], count)
            stores.add_metric([label], c.stores)
            feedback.add_metric([label, "right"], c.right)
            feedback.add_metric([label, "wrong"], c.wrong)
            dollars.add_metric([label], c.dollars)
            tokens.add_metric([label, "prompt"], c.prompt_tokens)
            tokens.add_metric([label, "completion"], c.completion_tokens)
            seconds.add_metric([label], c.model_seconds)
            unpriced.add_metric([label], c.unpriced)
        calls = CounterMetricFamily("stratacache_calls", "Finished calls by method and gRPC "
                                    "status.", labels=["method", "code"])
        for (method, code), count in m._snapshot(m._calls):
            calls.add_metric([method, code], count)
        limited = CounterMetricFamily("stratacache_rate_limited", "Calls refused by a rate "
                                      "limit (user, namespace or global).",
                                      labels=["method", "limit"])
        for (method, limit), count in m._snapshot(m._limited):
            limited.add_metric([method, limit], count)
        yield from (lookups, stores, feedback, dollars, tokens, seconds, unpriced, calls, limited)
        if m._watched is not None:
            yield from self._engine_families(m._watched)

    @staticmethod
    def _engine_families(w: _Watched) -> Iterator[Metric]:
        entries = GaugeMetricFamily("stratacache_tier_entries", "Entries each tier holds.",
                                    labels=["tier"])
        size = GaugeMetricFamily("stratacache_tier_bytes", "Bytes of the entries each tier "
                                 "holds (hot: estimated memory; warm, cold: their records).",
                                 labels=["tier"])
        for name, tier in w.tiers.items():
            entries.add_metric([name], len(tier))
            size.add_metric([name], tier.bytes)
        depth = GaugeMetricFamily("stratacache_queue_depth", "Calls waiting in a batching "
                                  "queue for a model pass.", labels=["queue"])
        for name, queued in w.queues.items():
            depth.add_metric([name], queued())
        demoted = CounterMetricFamily("stratacache_demotions", "Entries moved out of a tier "
                                      "for its budget (hot: dropped from memory, still on "
                                      "disk; warm: moved to cold).", labels=["tier"])
        evicted = CounterMetricFamily("stratacache_evictions", "Entries removed for good for "
                                      "a tier's budget.", labels=["tier"])
        for tier in (Tier.HOT, Tier.WARM):
            demoted.add_metric([HIT_RESULTS[tier]], w.demotions[tier])
        evicted.add_metric([HIT_RESULTS[Tier.COLD]], w.demotions[Tier.COLD])
        yield from (entries, size, depth, demoted, evicted)


class MetricsServer:
    """prometheus-client's HTTP server for one registry, on its own thread.

    Attributes:
        port: the port it listens on (the one asked for, or the one picked for port 0).
    """

    def __init__(self, server, thread: threading.Thread) -> None:  # type: ignore[no-untyped-def]
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    def close(self) -> None:
        """Stops serving and closes the socket (waits for the serving thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serves ``registry`` at ``http://host:port/metrics`` (prometheus-client's server, on a
    daemon thread) until ``close``.

    Args:
        registry: what to serve (``Metrics.registry``).
        host: address to listen on (``--metrics-host``).
        port: TCP port (``--metrics-port``); 0 picks a free one (see ``MetricsServer.port``).

    Returns:
        The running server.

    Raises:
        OSError: the address cannot be bound (in use, or not local); the message names
            --metrics-port.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve /metrics on {host}:{port}: "
                                 f"{exc.strerror or exc}; pick another --metrics-port (0 = off) "
                                 "or --metrics-host") from exc
    return MetricsServer(server, thread)


class LoopLagProbe:
    """Measures the event loop's lag: sleeps ``interval_s`` again and again and keeps how late
    each wake-up came (seconds) in a ring of the last ``window``.

    Args:
        interval_s: sleep between samples, seconds.
        window: samples kept for the percentiles.
        observe: also called with each sample, seconds (the /metrics histogram).
    """

    def __init__(self, interval_s: float = LOOP_PROBE_INTERVAL_S, window: int = WINDOW, *,
                 observe: Callable[[float], None] | None = None) -> None:
        self._interval_s = interval_s
        self._lags: deque[float] = deque(maxlen=window)
        self._observe = observe
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._woken: asyncio.Future[None] | None = None  # resolved at the next sample

    def start(self) -> None:
        """Starts sampling on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop lag probe")

    async def _run(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, time.perf_counter() - asked - self._interval_s)
            self._lags.append(lag)
            if self._observe is not None:
                self._observe(lag)
            self._count += 1
            if self._woken is not None:
                self._woken.set_result(None)
                self._woken = None

    async def sampled(self, count: int) -> None:
        """Waits until ``count`` samples have been taken since start (tests)."""
        while self._count < count:
            if self._woken is None:
                self._woken = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._woken)

    def summary(self) -> StageSummary:
        """Samples taken since start, and p50/p99/max lag in milliseconds over the window."""
        return _summary(self._count, self._lags)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

"""Counters and per-stage latencies of one server process, and its event loop's lag (read by the
Stats RPC).

Each stage keeps its most recent durations in a bounded ring, so percentiles describe recent
traffic and memory stays constant however long the server runs. The loop's lag is measured the
same way by :class:`LoopLagProbe`: a task that sleeps a short interval and records how late it
wakes, which is how long something else held the loop (or the GIL) meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .records import Tier

#: Durations kept per stage for percentiles.
WINDOW = 4096
#: How long the loop-lag probe sleeps between samples, seconds: short enough to catch a stall
#: of a few milliseconds, long enough to cost the loop nothing measurable (100 wake-ups/s).
LOOP_PROBE_INTERVAL_S = 0.01


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


@dataclass
class Metrics:
    """Counters of the request paths since start; ``hits`` and ``tier_errors`` (lookups that
    skipped a failing tier; EXACT for the exact-key step) are keyed by tier. Moves between
    tiers are counted by the placement."""

    lookups: int = 0
    misses: int = 0
    stores: int = 0
    invalidated: int = 0
    hits: Counter[Tier] = field(default_factory=Counter)
    tier_errors: Counter[Tier] = field(default_factory=Counter)
    _stages: dict[str, deque[float]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the body as stage ``name`` (also when it raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - started)

    def record(self, name: str, seconds: float) -> None:
        ring = self._stages.get(name)
        if ring is None:
            ring = self._stages[name] = deque(maxlen=WINDOW)
        ring.append(seconds)
        self._counts[name] = self._counts.get(name, 0) + 1

    def stages(self) -> dict[str, StageSummary]:
        return {name: _summary(self._counts[name], ring) for name, ring in self._stages.items()}


class LoopLagProbe:
    """Measures the event loop's lag: sleeps ``interval_s`` again and again and keeps how late
    each wake-up came (seconds) in a ring of the last ``window``.

    Args:
        interval_s: sleep between samples, seconds.
        window: samples kept for the percentiles.
    """

    def __init__(self, interval_s: float = LOOP_PROBE_INTERVAL_S, window: int = WINDOW) -> None:
        self._interval_s = interval_s
        self._lags: deque[float] = deque(maxlen=window)
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
            self._lags.append(max(0.0, time.perf_counter() - asked - self._interval_s))
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

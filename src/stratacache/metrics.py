"""Counters and per-stage latencies of one server process (read by the Stats RPC).

Each stage keeps its most recent durations in a bounded ring, so percentiles describe recent
traffic and memory stays constant however long the server runs.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .records import Tier

#: Durations kept per stage for percentiles.
WINDOW = 4096


@dataclass(frozen=True, slots=True)
class StageSummary:
    count: int
    p50_ms: float
    p99_ms: float


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
        out = {}
        for name, ring in self._stages.items():
            p50, p99 = np.percentile(np.fromiter(ring, float, len(ring)), [50, 99]) * 1000
            out[name] = StageSummary(self._counts[name], float(p50), float(p99))
        return out

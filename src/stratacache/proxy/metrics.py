"""The proxy's own counters, served as Prometheus text on ``GET /metrics`` of its HTTP port.

They say what the proxy did with each request (served a hit, forwarded a miss, bypassed the
cache, failed open because the cache erred), how the upstream answered, and what became of the
answers it tried to store. The cache server's own ``/metrics`` has the rest (savings, stages).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

#: What the proxy did with a chat-completions request.
RESULTS = ("hit", "miss", "bypass", "fail_open")


class ProxyMetrics:
    """One registry per proxy (a process may run several, as tests do)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stratacache_proxy_requests", "Chat-completion requests by what the proxy did",
            ["result", "stream"], registry=self.registry)
        self.seconds = Histogram(
            "stratacache_proxy_request_seconds",
            "Time to the response's headers (a streamed miss: the upstream's first byte)",
            ["result"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.cache_errors = Counter(
            "stratacache_proxy_cache_errors",
            "Calls to the cache that failed (the request went on to the upstream: fail-open)",
            ["call", "error"], registry=self.registry)
        self.upstream = Counter(
            "stratacache_proxy_upstream_responses", "Upstream answers by HTTP status "
            "('broken': a stream cut short, 'unreachable': no answer, 'timeout')",
            ["status"], registry=self.registry)
        self.stores = Counter(
            "stratacache_proxy_stores", "Answers after a miss, by what became of them "
            "(stored, not_storable: not a whole text answer, dropped: too many pending, failed)",
            ["outcome"], registry=self.registry)
        for result in RESULTS:  # every series from the first scrape, at 0
            for stream in ("false", "true"):
                self.requests.labels(result, stream)

    def exposition(self) -> bytes:
        """The current values in Prometheus' text format."""
        return generate_latest(self.registry)

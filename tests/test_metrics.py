"""Prometheus metrics (stratacache.metrics) scraped over real HTTP from a real server's registry:
lookups by result after an exact hit, a semantic hit and each kind of miss, stores, feedback,
calls and rate-limited calls, stage, batch-size and loop-lag histograms, tier and queue
gauges, build info; the namespace label cap (in /metrics and in Stats); each server's registry
of its own; and a port already in use."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stratacache import InvalidArgumentError, RateLimitedError
from stratacache.config import RateLimit
from stratacache import metrics
from stratacache.metrics import OTHER, STAGES, Metrics, MetricsServer, serve_metrics

from .processes import free_port
from .test_tiers import PARAPHRASE_0, TOPICS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of GET /metrics, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode("utf-8")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labels_of(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for n, key in samples if n == name}


@pytest.fixture
def metrics_server() -> Iterator:
    """``serve(server)``: /metrics of a RunningServer's registry on a free port (port 0)."""
    started: list[MetricsServer] = []

    def serve(server) -> MetricsServer:  # type: ignore[no-untyped-def]
        http = serve_metrics(server.engine.metrics.registry, "127.0.0.1", 0)
        started.append(http)
        return http

    yield serve
    for http in started:
        http.close()


def test_lookups_stores_feedback_stages_and_gauges_are_scraped(
        start_server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    # The server's own /metrics (--metrics-port); one store a very long while server-wide.
    port = free_port()
    server = start_server(min_similarity=0.7, metrics_port=port,
                          rate_limit_global_store=RateLimit(0.001, 1))
    with server.client() as client:
        stored = client.store(TOPICS[0], "Feed the starter, then bake.", namespace=namespace)
        with pytest.raises(RateLimitedError):
            client.store(TOPICS[1], "Over the limit.", namespace=namespace)
        with pytest.raises(InvalidArgumentError):
            client.lookup("", namespace=namespace)
        exact = client.lookup(TOPICS[0], namespace=namespace)
        semantic = client.lookup(PARAPHRASE_0, namespace=namespace)
        below = client.lookup("What are the rules of cricket?", namespace=namespace)
        nothing = client.lookup(TOPICS[1], namespace=namespace + "-empty")
        client.feedback(stored, PARAPHRASE_0, True, namespace=namespace)
        client.feedback(stored, PARAPHRASE_0, False, namespace=namespace)
    assert exact.tier == "exact" and semantic.hit and semantic.tier in ("hot", "warm")
    assert (below.miss_reason, nothing.miss_reason) == ("below_similarity", "no_candidate")
    server.run(server.engine.loop_lag.sampled(3))
    got = scrape(port)

    lookups = {r: value(got, "stratacache_lookups_total", namespace=namespace, result=r)
               for r in ("exact", semantic.tier, "miss_below_similarity", "miss_no_candidate",
                         "cold", "miss_vetoed")}
    assert lookups == {"exact": 1, semantic.tier: 1, "miss_below_similarity": 1,
                       "miss_no_candidate": 0, "cold": 0, "miss_vetoed": 0}
    assert value(got, "stratacache_lookups_total", namespace=namespace + "-empty",
                 result="miss_no_candidate") == 1
    assert value(got, "stratacache_stores_total", namespace=namespace) == 1
    assert value(got, "stratacache_feedback_total", namespace=namespace, verdict="right") == 1
    assert value(got, "stratacache_feedback_total", namespace=namespace, verdict="wrong") == 1
    assert value(got, "stratacache_calls_total", method="Lookup", code="OK") == 4
    assert value(got, "stratacache_calls_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert value(got, "stratacache_calls_total", method="Store", code="OK") == 1
    assert value(got, "stratacache_calls_total", method="Store", code="RESOURCE_EXHAUSTED") == 1
    assert value(got, "stratacache_calls_total", method="Feedback", code="OK") == 2
    assert value(got, "stratacache_rate_limited_total", method="Store", limit="global") == 1

    # Every stage of the lookups and the store was timed; each histogram has its buckets.
    for stage in ("validate", "exact", "embed", "search_hot", "decide", "lookup",
                  "store_durable", "store"):
        count = value(got, "stratacache_stage_seconds_count", stage=stage)
        assert count is not None and count >= 1, stage
        assert value(got, "stratacache_stage_seconds_bucket", stage=stage, le="+Inf") == count
    assert value(got, "stratacache_stage_seconds_count", stage="lookup") == 4
    assert labels_of(got, "stratacache_stage_seconds_count", "stage") == set(STAGES)
    with server.client() as client:
        stages = client.stats()["stages"]
    assert stages["lookup"]["count"] == 4 and stages["lookup"]["p50_ms"] > 0  # the ring stays
    assert value(got, "stratacache_batch_size_count", queue="embed") >= 1
    assert value(got, "stratacache_batch_size_sum", queue="embed") >= 4  # texts embedded
    assert value(got, "stratacache_loop_lag_seconds_count") >= 3

    assert value(got, "stratacache_tier_entries", tier="hot") == 1
    assert value(got, "stratacache_tier_entries", tier="warm") == 1
    assert value(got, "stratacache_tier_entries", tier="cold") == 0
    assert value(got, "stratacache_tier_bytes", tier="warm") > 0
    assert value(got, "stratacache_queue_depth", queue="embed") == 0
    assert labels_of(got, "stratacache_queue_depth", "queue") == {"embed"}  # no verifier
    assert value(got, "stratacache_demotions_total", tier="warm") == 0
    assert value(got, "stratacache_evictions_total", tier="cold") == 0
    encoder = server.engine.encoder
    assert value(got, "stratacache_build_info", version="0.1.0", model=encoder.identity.name,
                 device=encoder.device, backend=encoder.backend) == 1


def test_namespaces_past_the_label_cap_are_pooled_in_metrics_and_named_in_stats(
        start_server, metrics_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Stats names far more namespaces than /metrics labels: a tenant that touches many
    # namespaces of its own must not blank the per-namespace Stats of tenants after it.
    monkeypatch.setattr(metrics, "STATS_MAX_NAMESPACES", 4)
    server = start_server(metrics_max_namespaces=2)
    http = metrics_server(server)
    names = [f"tenant-{i}" for i in range(5)]
    with server.client() as client:
        for name in names:
            client.store(TOPICS[0], "bread", namespace=name)
            client.lookup(TOPICS[0], namespace=name)
        stats = client.stats()
    got = scrape(http.port)

    for metric in ("stratacache_stores_total", "stratacache_lookups_total",
                   "stratacache_saved_dollars_total"):
        assert labels_of(got, metric, "namespace") == {"tenant-0", "tenant-1", OTHER}
    assert value(got, "stratacache_stores_total", namespace=OTHER) == 3
    assert value(got, "stratacache_lookups_total", namespace=OTHER, result="exact") == 3
    assert value(got, "stratacache_lookups_total", namespace="tenant-1", result="exact") == 1
    # Stats: each of the first STATS_MAX_NAMESPACES by name, the one after pooled.
    assert set(stats["namespaces"]) == {"tenant-0", "tenant-1", "tenant-2", "tenant-3", OTHER}
    assert stats["namespaces"]["tenant-3"]["stores"] == 1
    assert stats["namespaces"][OTHER]["stores"] == 1
    assert (stats["namespaces"]["tenant-0"]["lookups"], stats["namespaces"]["tenant-0"]["hits"],
            stats["namespaces"]["tenant-0"]["stores"]) == (1, 1, 1)


def test_each_metrics_has_a_registry_of_its_own() -> None:
    """Two servers in one process register the same names without clashing (never the
    global registry)."""
    a, b = Metrics(), Metrics()
    assert a.registry is not b.registry
    a.stored("x")
    assert a.registry.get_sample_value("stratacache_stores_total", {"namespace": "x"}) == 1
    assert b.registry.get_sample_value("stratacache_stores_total", {"namespace": "x"}) is None


def test_a_port_in_use_names_the_flag_and_close_stops_serving() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*--metrics-port"):
            serve_metrics(Metrics().registry, "127.0.0.1", port)
    http = serve_metrics(Metrics().registry, "127.0.0.1", 0)
    assert ("stratacache_loop_lag_seconds_count", frozenset()) in scrape(http.port)
    http.close()
    with pytest.raises(urllib.error.URLError):
        scrape(http.port)

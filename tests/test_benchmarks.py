"""The benchmark entry points run end to end on a tiny slice, so they cannot rot. Nothing here
asserts a timing: the figures are the benchmarks' to report."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import latency, threshold_sweep

from .data import QQP


def test_latency_benchmark_runs_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    assert latency.main(["--data", str(QQP), "--entries", "320", "--calls", "8",
                         "--hot-capacity", "16", "--warm-max-mib", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"exact hit", "hot hit", "warm hit", "cold hit", "miss"}
    assert report["results"]["exact hit"]["round_trip"]["n"] == 8
    assert report["placement_after_fill"]["cold"] > 0
    assert report["floors"]["echo"]["n"] == 8 and report["floors"]["embed"]["n"] == 8


def test_threshold_sweep_runs_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    assert threshold_sweep.main(["--data", str(QQP), "--limit", "60", "--out", str(out),
                                 "--thresholds", "0.8,0.9,0.95"]) == 0
    report = json.loads(out.read_text())
    assert [row["threshold"] for row in report["pair"]] == [0.8, 0.9, 0.95]
    assert report["data"]["pairs_used"] == 60
    assert "rule" in report["selection"]

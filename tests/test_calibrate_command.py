"""`stratacache calibrate`: labelled pairs from a file become a namespace's evidence on a
running server, and the bound is set."""

from __future__ import annotations

from pathlib import Path

from stratacache.cli import main
from stratacache.pairs import write_pairs

from .data import qqp_pairs


def test_calibrate_sends_pairs_and_sets_the_bound(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, qqp_pairs(120))
    assert main(["calibrate", "--pairs", str(pairs), "--namespace", "support",
                 "--target", server.target, "--max-wrong-rate", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "added 120 labelled pairs to namespace 'support'" in printed
    with server.client() as c:
        status = c.get_policy("support")
    assert status["evidence"] == 120 and status["max_wrong_rate"] == 0.3
    assert status["message"] in printed


def test_calibrate_reports_a_missing_file(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert main(["calibrate", "--pairs", str(tmp_path / "nope.jsonl"),
                 "--target", server.target]) == 2

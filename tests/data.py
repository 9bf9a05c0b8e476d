"""The shared labelled QQP pairs (../shared/data beside the repository), for tests that need
real text."""

from __future__ import annotations

import os
from pathlib import Path

from stratacache.pairs import LabelledPair, distinct_texts, read_pairs

QQP = Path(os.environ.get(
    "STRATACACHE_QQP", Path(__file__).resolve().parents[2] / "shared/data/qqp_pairs_dev.jsonl.gz"))


def qqp_pairs(n: int) -> list[LabelledPair]:
    """The first ``n`` pairs of the shared file."""
    assert QQP.exists(), f"shared QQP data not found at {QQP}: set STRATACACHE_QQP"
    return read_pairs(QQP, n)


def qqp_texts(n: int) -> list[str]:
    """``n`` distinct question texts from the shared file."""
    return distinct_texts(qqp_pairs(4 * n))[:n]

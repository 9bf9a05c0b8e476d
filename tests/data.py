"""The shared labelled QQP pairs (../shared/data beside the repository), for tests that need
real text."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

QQP = Path(os.environ.get(
    "STRATACACHE_QQP", Path(__file__).resolve().parents[2] / "shared/data/qqp_pairs_dev.jsonl.gz"))


def qqp_pairs(n: int) -> list[dict]:
    """The first ``n`` pairs of the shared file."""
    assert QQP.exists(), f"shared QQP data not found at {QQP}: set STRATACACHE_QQP"
    pairs = []
    with gzip.open(QQP, "rt") as f:
        for line in f:
            pairs.append(json.loads(line))
            if len(pairs) == n:
                break
    return pairs


def qqp_texts(n: int) -> list[str]:
    """``n`` distinct question texts from the shared file."""
    seen: dict[str, None] = {}
    for pair in qqp_pairs(4 * n):
        seen.setdefault(pair["a"], None)
        seen.setdefault(pair["b"], None)
        if len(seen) >= n:
            break
    return list(seen)[:n]

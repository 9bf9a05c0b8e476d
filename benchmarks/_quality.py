"""Scoring shared by every hit-quality benchmark: the pair and crowded protocols of
``shared/data/README.md``, computed from what a cache served, with 95 % Wilson intervals.

A benchmark gathers, per pair, the similarity of ``b`` to ``a`` (pair protocol) and, per lookup,
the stored text served and its similarity (crowded protocol); these functions turn that into
precision, recall, hit rate and wrong-hit rate at every threshold.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stratacache.curves import threshold_at_recall
from stratacache.pairs import LabelledPair, TextClusters, read_pairs, split

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile

SELECTION_RULE = (
    "the lowest swept threshold t whose pair-protocol precision (pairs served with "
    "cos(a, b) >= t that are labelled duplicates / pairs served) has a 95% Wilson score "
    "lower bound >= the target precision")
EXACT_TEXT_NOTE = (
    "crowded protocol: when a lookup's b text is itself a stored a, it is served that entry "
    "exactly (as the server's exact tier would: similarity 1.0, a hit at every threshold) and "
    "counted as correct, since b's own text is in b's duplicate cluster")


def load_pairs(path: Path, limit: int | None, seed: int,
               part: str | None = None) -> tuple[list[LabelledPair], int]:
    """The pairs to use (the first ``limit`` after a shuffle seeded by ``seed``), and how many
    the file holds. ``part``: only that part of the text-disjoint split (stratacache.pairs)."""
    pairs = read_pairs(path)
    total = len(pairs)
    if part is not None:
        pairs = split(pairs)[part]
    random.Random(seed).shuffle(pairs)
    return (pairs[:limit] if limit is not None else pairs), total


def precision_at_recall(score: Sequence[float], duplicate: Sequence[bool],
                        recall: float) -> dict[str, object]:
    """Pair protocol: the precision of the strictest threshold whose recall reaches ``recall``
    (pairs served when score >= threshold), with its Wilson interval and the threshold."""
    s = np.asarray(score, dtype=np.float64)
    d = np.asarray(duplicate, dtype=bool)
    threshold = threshold_at_recall(s, d, recall)
    if threshold is None:
        return {"threshold": None, "precision": wilson(0, 0), "recall": wilson(0, int(d.sum()))}
    row = pair_counts(s >= threshold, d)
    return {"threshold": threshold, "precision": row["precision"], "recall": row["recall"]}


def parse_thresholds(spec: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included) or a comma-separated list, e.g. ``0.8,0.9``."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 6) for i in range(count)]
        else:
            values = sorted({round(float(x), 6) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --thresholds {spec!r}: give START:STOP:STEP (e.g. 0.70:0.99:0.01) or a "
            "comma-separated list (e.g. 0.8,0.9,0.95)") from None
    if not values or not all(-1.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"bad --thresholds {spec!r}: cosines lie in [-1, 1]")
    return values


def wilson(successes: int, n: int, z: float = Z_95) -> dict[str, object]:
    """A proportion with its Wilson score interval; value and bounds are None when n == 0."""
    if n == 0:
        return {"k": successes, "n": n, "value": None, "low": None, "high": None}
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return {"k": successes, "n": n, "value": p,
            "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def pair_counts(served: Sequence[bool] | np.ndarray,
                duplicate: Sequence[bool] | np.ndarray) -> dict[str, object]:
    """Pair protocol, given which pairs were served: counts, precision, recall, hit rate and
    wrong-hit rate (each with its Wilson interval)."""
    served = np.asarray(served, dtype=bool)
    duplicate = np.asarray(duplicate, dtype=bool)
    n, n_served = len(served), int(served.sum())
    right = int((served & duplicate).sum())
    wrong = n_served - right
    return {"served": n_served, "served_duplicate": right, "served_non_duplicate": wrong,
            "precision": wilson(right, n_served), "recall": wilson(right, int(duplicate.sum())),
            "hit_rate": wilson(n_served, n), "wrong_hit_rate": wilson(wrong, n)}


def pair_rows(cosine: np.ndarray, duplicate: Sequence[bool],
              thresholds: list[float]) -> list[dict[str, object]]:
    """Pair protocol per threshold: pair i is served when ``cosine[i] >= t``."""
    cosine = np.asarray(cosine, dtype=np.float64)
    return [{"threshold": t, **pair_counts(cosine >= t, duplicate)} for t in thresholds]


def duplicate_clusters(pairs: list[LabelledPair]) -> dict[str, str]:
    """Each text that occurs in a duplicate pair -> its cluster's representative (union-find
    over every duplicate label). A text absent from the map is alone in its cluster."""
    clusters = TextClusters()
    for p in pairs:
        if p.duplicate:
            clusters.join(p.a, p.b)
    return {text: clusters.root(text) for text in clusters.texts()}


def judge(served: str, query: str, cluster: dict[str, str],
          non_duplicates: set[frozenset[str]]) -> str:
    """``correct``, ``wrong`` or ``unlabelled``, by the README's rules, in that order."""
    if cluster.get(served, served) == cluster.get(query, query):
        return "correct"
    if frozenset((served, query)) in non_duplicates:
        return "wrong"
    return "unlabelled"


def crowded_rows(pairs: list[LabelledPair], served: Sequence[tuple[str, float]], stored: set[str],
                 thresholds: list[float]) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Crowded protocol per threshold, from what each pair's lookup of ``b`` was served:
    ``served[i]`` is (the stored text of the top candidate, its similarity); a hit at ``t`` when
    the similarity is >= t. Returns a summary and per-threshold rows."""
    cluster = duplicate_clusters(pairs)
    non_duplicates = {frozenset((p.a, p.b)) for p in pairs if not p.duplicate}
    contradictions = sum(1 for p in pairs if not p.duplicate
                         and cluster.get(p.a, p.a) == cluster.get(p.b, p.b))

    n = len(pairs)
    score = np.empty(n, dtype=np.float64)
    verdict = np.empty(n, dtype=object)
    exact = np.zeros(n, dtype=bool)
    for i, p in enumerate(pairs):
        text, score[i] = served[i]
        verdict[i] = judge(text, p.b, cluster, non_duplicates)
        exact[i] = p.b in stored
    correct, wrong = verdict == "correct", verdict == "wrong"
    duplicate = np.array([p.duplicate for p in pairs], dtype=bool)
    n_dup = int(duplicate.sum())

    results = []
    for t in thresholds:
        hit = score >= t
        hits, c, w = int(hit.sum()), int((hit & correct).sum()), int((hit & wrong).sum())
        plain = hit & ~exact  # the same counts leaving out the exact-text lookups
        pc, pw = int((plain & correct).sum()), int((plain & wrong).sum())
        results.append({
            "threshold": t, "hits": hits, "correct": c, "wrong": w,
            "unlabelled": hits - c - w,
            "labelled_precision": wilson(c, c + w), "strict_precision": wilson(c, hits),
            "recall": wilson(int((hit & correct & duplicate).sum()), n_dup),
            "hit_rate": wilson(hits, n), "wrong_hit_rate": wilson(w, n),
            "without_exact_text_lookups": {
                "labelled_precision": wilson(pc, pc + pw),
                "strict_precision": wilson(pc, int(plain.sum()))}})
    summary = {
        "stored_entries": len(stored), "lookups": n,
        "distinct_lookup_texts": len({p.b for p in pairs}),
        "duplicate_pairs": n_dup, "clustered_texts": len(cluster),
        "clusters_with_2_or_more_texts": len(set(cluster.values())),
        "non_duplicate_pairs_inside_one_cluster": contradictions,
        "exact_text_lookups": int(exact.sum()),
        "exact_text_handling": EXACT_TEXT_NOTE,
        "verdicts_of_top1_regardless_of_threshold": {
            v: int((verdict == v).sum()) for v in ("correct", "wrong", "unlabelled")},
        "label_source": "duplicate clusters and non-duplicate labels from the pairs used",
    }
    return summary, results


def choose_threshold(pair_rows: list[dict[str, object]], target: float) -> float | None:
    for r in pair_rows:  # thresholds ascend
        low = r["precision"]["low"]
        if low is not None and low >= target:
            return r["threshold"]
    return None


def format_table(pair_rows: list[dict[str, object]], crowded_rows: list[dict[str, object]],
                 chosen: float | None, label: str = "chosen") -> str:
    def pct(w: dict[str, object]) -> str:
        return "  -  " if w["value"] is None else f"{w['value']:.3f}"

    def ci(w: dict[str, object]) -> str:
        return "[  -  ,  -  ]" if w["value"] is None else f"[{w['low']:.3f},{w['high']:.3f}]"

    header = (f"{'t':>5}  {'pair P':>5} {'95% CI':<13}  {'pair R':>6}  {'crowd P lab':>11}  "
              f"{'strict P':>8}  {'crowd R':>7}  {'wrong-hit':>9}  {'(CI)':<13}")
    lines = [header, "-" * len(header)]
    for p, c in zip(pair_rows, crowded_rows):
        mark = f"  <- {label}" if p["threshold"] == chosen else ""
        lines.append(
            f"{p['threshold']:>5.{2 if round(p['threshold'], 2) == p['threshold'] else 4}f}"
            f"  {pct(p['precision']):>6} {ci(p['precision'])}  "
            f"{pct(p['recall']):>6}  {pct(c['labelled_precision']):>11}  "
            f"{pct(c['strict_precision']):>8}  {pct(c['recall']):>7}  "
            f"{pct(c['wrong_hit_rate']):>9}  {ci(c['wrong_hit_rate'])}{mark}")
    return "\n".join(lines)



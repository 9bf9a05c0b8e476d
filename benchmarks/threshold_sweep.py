"""Sweep the cosine-similarity threshold on labelled QQP pairs and choose the server's default.

What it measures, following the two protocols defined in ``shared/data/README.md``:

* **pair** (what papers report): for each pair, a cache holding only ``a`` is asked for ``b``;
  the pair is *served* when ``cos(a, b) >= t``. Reported per threshold ``t``: precision
  (duplicates served / served), recall (duplicates served / duplicates), hit rate
  (served / pairs) and wrong-hit rate (non-duplicates served / pairs).

* **crowded** (what a real cache faces): every distinct ``a`` is stored; every pair's ``b`` is
  looked up against all of them (exact top-1 by inner product with the native kernel
  ``stratacache._core.topk_ip``). A hit is judged by the labelled duplicate clusters (the union
  of every duplicate label in the data): *correct* when the served text is in ``b``'s cluster,
  *wrong* when the served text and ``b`` are labelled non-duplicates somewhere, *unlabelled*
  otherwise. Reported: labelled precision correct / (correct + wrong), strict precision
  correct / hits, recall (correct hits on duplicate pairs / duplicate pairs), hit rate and
  wrong-hit rate (wrong hits / lookups).

  When ``b``'s exact text is itself a stored ``a``, the lookup is served that entry exactly,
  as the server's exact tier would (similarity 1.0, a hit at every threshold); ``b``'s own text
  is in ``b``'s cluster, so the hit counts as correct. The number of such lookups is reported.

Every proportion comes with a 95 % Wilson score interval. The default threshold is the lowest
swept threshold whose pair-protocol precision has a Wilson lower bound >= ``--target-precision``
(a wrong answer costs more than a miss, so the bound, not the point estimate, must reach it).

Every distinct text is embedded once (batches of 64, sorted by length so that batches pad
little; the vectors are unit-normalised float32, so an inner product is the cosine).

Run from the repository root::

    python -m benchmarks.threshold_sweep            # all pairs, writes benchmarks/results/
    python -m benchmarks.threshold_sweep --limit 200
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stratacache.pairs import LabelledPair, distinct_texts

from ._common import DEFAULT_DATA, RESULTS, machine
from ._quality import (EXACT_TEXT_NOTE, SELECTION_RULE, choose_threshold, crowded_rows,
                       format_table, load_pairs, pair_rows, parse_thresholds)

DEFAULT_OUT = RESULTS / "threshold_sweep.json"
DEFAULT_THRESHOLDS = "0.70:0.99:0.01"
DEFAULT_TARGET_PRECISION = 0.85
EMBED_BATCH = 64
SEARCH_CHUNK = 256
# ---------------------------------------------------------------------------------------------
# inputs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.threshold_sweep",
        description="Sweep the cosine-similarity threshold on labelled QQP pairs (pair and "
                    "crowded protocols) and choose the server's default threshold.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="gzipped JSONL of {a, b, duplicate} pairs (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use the first N pairs after a seeded shuffle (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--model", default="default",
                        help="sentence-transformers model folder, or 'default' "
                             "(all-MiniLM-L6-v2) (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file; its folder is created (default: %(default)s)")
    parser.add_argument("--thresholds", type=parse_thresholds, default=DEFAULT_THRESHOLDS,
                        help="START:STOP:STEP (STOP included) or comma list "
                             "(default: %(default)s)")
    parser.add_argument("--target-precision", type=float, default=DEFAULT_TARGET_PRECISION,
                        help="pair precision whose 95%% Wilson lower bound the chosen "
                             "threshold must reach (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if not 0.0 < args.target_precision <= 1.0:
        parser.error("--target-precision must be in (0, 1]")
    return args


# ---------------------------------------------------------------------------------------------
# embedding


def embed_texts(encoder: object, texts: list[str]) -> np.ndarray:
    """Unit-normalised float32 vectors for ``texts`` (rows in the same order), embedded in
    batches of ``EMBED_BATCH`` taken in order of text length."""
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.empty((len(texts), encoder.dimension), dtype=np.float32)
    with tqdm(total=len(texts), unit="text", desc="embedding", file=sys.stderr) as bar:
        for start in range(0, len(order), EMBED_BATCH):
            batch = order[start:start + EMBED_BATCH]
            vectors[batch] = encoder.encode([texts[i] for i in batch])
            bar.update(len(batch))
    return vectors


# ---------------------------------------------------------------------------------------------
# pair protocol


def pair_protocol(pairs: list[LabelledPair], vectors: np.ndarray, row: dict[str, int],
                  thresholds: list[float]) -> list[dict[str, object]]:
    """Per threshold: a cache holding only ``a`` is asked for ``b``; served when cos >= t."""
    va = vectors[[row[p.a] for p in pairs]]
    vb = vectors[[row[p.b] for p in pairs]]
    cosine = np.einsum("ij,ij->i", va, vb).astype(np.float64)
    return pair_rows(cosine, [p.duplicate for p in pairs], thresholds)


# ---------------------------------------------------------------------------------------------
# crowded protocol


def top1_search(queries: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-1 row of ``matrix`` by inner product for each query, in chunks."""
    from stratacache import _core

    rows = np.empty(len(queries), dtype=np.int64)
    scores = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), SEARCH_CHUNK):
        chunk = np.ascontiguousarray(queries[start:start + SEARCH_CHUNK])
        idx, sc = _core.topk_ip(chunk, matrix, 1)
        rows[start:start + len(chunk)] = idx[:, 0]
        scores[start:start + len(chunk)] = sc[:, 0]
    return rows, scores


def crowded_protocol(pairs: list[LabelledPair], vectors: np.ndarray, row: dict[str, int],
                     thresholds: list[float]) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Store every distinct ``a``; look up every pair's ``b`` (top-1, exact); judge by clusters.

    Returns a summary (counts that do not depend on the threshold) and per-threshold rows.
    """
    stored = list(dict.fromkeys(p.a for p in pairs))
    stored_set = set(stored)
    matrix = np.ascontiguousarray(vectors[[row[t] for t in stored]])
    queries = list(dict.fromkeys(p.b for p in pairs))
    found_rows, found_scores = top1_search(vectors[[row[q] for q in queries]], matrix)

    # one decision per distinct b; a lookup per pair
    decision: dict[str, tuple[str, float]] = {}
    semantic_would_differ = 0
    for q, r, s in zip(queries, found_rows, found_scores):
        if q in stored_set:  # exact tier: b's own text is stored
            decision[q] = (q, 1.0)
            semantic_would_differ += stored[r] != q
        else:
            decision[q] = (stored[r], float(s))
    summary, rows = crowded_rows(pairs, [decision[p.b] for p in pairs], stored_set, thresholds)
    summary["exact_text_lookups_where_top1_search_served_another_text"] = semantic_would_differ
    return summary, rows


# ---------------------------------------------------------------------------------------------
# choice and report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t0 = time.perf_counter()
    pairs, total_in_file = load_pairs(args.data, args.limit, args.seed)
    texts = distinct_texts(pairs)
    row = {t: i for i, t in enumerate(texts)}
    timings["load_data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from stratacache.embed import Encoder

    encoder = Encoder(args.model, device="auto", threads=os.cpu_count() or 1)  # bulk: all cores
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vectors = embed_texts(encoder, texts)
    timings["embed"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pair_rows = pair_protocol(pairs, vectors, row, args.thresholds)
    timings["pair_protocol"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    crowded_summary, crowded_rows = crowded_protocol(pairs, vectors, row, args.thresholds)
    timings["crowded_protocol"] = time.perf_counter() - t0

    chosen = choose_threshold(pair_rows, args.target_precision)
    timings["total"] = time.perf_counter() - started

    import torch

    host = machine() | {"device": encoder.device, "torch_threads": torch.get_num_threads()}
    n_dup = sum(p.duplicate for p in pairs)
    report = {
        "measures": "cosine-threshold sweep of a semantic cache on labelled QQP pairs: "
                    "pair and crowded protocols as defined in shared/data/README.md",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.threshold_sweep",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": host,
        "model": {"requested": args.model, "name": encoder.identity.name,
                  "dimension": encoder.identity.dimension,
                  "fingerprint": encoder.identity.fingerprint},
        "data": {"path": str(args.data.resolve()), "pairs_in_file": total_in_file,
                 "pairs_used": len(pairs), "limit": args.limit, "seed": args.seed,
                 "duplicate_pairs": n_dup, "non_duplicate_pairs": len(pairs) - n_dup,
                 "distinct_texts_embedded": len(texts)},
        "method": {"served_when": "cosine >= threshold (cosine = inner product of "
                                  "unit-normalised float32 vectors, compared in float64)",
                   "confidence_intervals": "95% Wilson score intervals (z = 1.95996)",
                   "embed_batch": EMBED_BATCH, "search_chunk": SEARCH_CHUNK,
                   "crowded_search": "exact top-1 by inner product (stratacache._core.topk_ip)",
                   "exact_text_handling": EXACT_TEXT_NOTE},
        "selection": {"rule": SELECTION_RULE, "target_precision": args.target_precision,
                      "chosen_threshold": chosen},
        "thresholds": args.thresholds,
        "pair": pair_rows,
        "crowded": {"summary": crowded_summary, "by_threshold": crowded_rows},
        "elapsed_s": {k: round(v, 3) for k, v in timings.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"machine : {host['platform']}; {host['cpu']}; {host['cores']} cores; "
          f"device {host['device']}; kernel {host['simd_isa']}")
    print(f"model   : {encoder.identity.name} (dim {encoder.identity.dimension})")
    print(f"data    : {args.data.resolve()}: {len(pairs)} of {total_in_file} pairs "
          f"({n_dup} duplicates), {len(texts)} distinct texts, seed {args.seed}")
    print(f"crowded : {crowded_summary['stored_entries']} stored a's, "
          f"{crowded_summary['lookups']} lookups, {crowded_summary['exact_text_lookups']} of "
          f"them with b's exact text stored (served exactly, counted correct)")
    print()
    print(format_table(pair_rows, crowded_rows, chosen))
    print()
    print("columns: pair precision [95% Wilson CI], pair recall; crowded labelled precision "
          "correct/(correct+wrong), strict precision correct/hits, crowded recall, "
          "crowded wrong-hit rate wrong/lookups [95% Wilson CI]")
    print()
    print(f"rule    : {SELECTION_RULE} (target {args.target_precision})")
    print(f"chosen  : {chosen if chosen is not None else 'none of the swept thresholds'}")
    print("elapsed : " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"written : {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

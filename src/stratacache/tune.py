"""``stratacache tune``: train a verifier (a cross-encoder that judges whether a cached prompt's
answer is right for a new prompt) and, optionally, a fine-tuned embedder, from labelled pairs.

Data: a labelled-pair file (:mod:`stratacache.pairs`), split text-disjointly with
:data:`~stratacache.pairs.STANDARD_PARTS`. Training uses the ``train`` part only (plus, with
``--data-dir``, the feedback rows the server stored); metrics are reported on ``calibrate``, the
held-back part that shares no text with ``train``; ``test`` is never touched (it is written out
for the benchmarks).

Output layout (``--out DIR``)::

    DIR/verifier/                      CrossEncoder(str(DIR / "verifier")) loads it
    DIR/verifier/stratacache-card.json what it was trained on, how, and how well it does
    DIR/embedder/                      with --embedder: SentenceTransformer(str(DIR / "embedder"))
    DIR/embedder/stratacache-card.json
    DIR/heldout-calibrate.jsonl.gz     the exact held-back parts, for `stratacache calibrate`
    DIR/heldout-test.jsonl.gz          and the benchmarks
    DIR/checkpoints/                   while training (resume with --resume); removed at the end
                                       unless --keep-checkpoints

A verifier whose card says ``"symmetric": true`` was trained on both orders of every pair and must
be scored as the mean of ``(cached, query)`` and ``(query, cached)``.

The training libraries (``datasets``, ``accelerate``) are imported lazily: the server never
needs them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .embed import weights_fingerprint
from .errors import InvalidArgument
from .pairs import (STANDARD_PARTS, LabelledPair, TextClusters, read_pairs, split,
                    write_pairs)

log = logging.getLogger("stratacache.tune")

CARD_NAME = "stratacache-card.json"
CARD_FORMAT = 1
SPLIT_SALT = "stratacache-split-v1"
TRAIN_PART, HELDOUT_PART = "train", "calibrate"
#: The points of the precision/recall curve every card reports.
RECALL_POINTS = (0.50,)
PRECISION_POINTS = (0.90, 0.95)

#: For the subcommand's parser: ``description=DESCRIPTION, epilog=EPILOG``.
DESCRIPTION = (
    "Train a verifier (a cross-encoder that says whether a cached prompt's answer is right for "
    "a new prompt) and optionally a fine-tuned embedder from labelled pairs, split so that no "
    "text is in two parts: it learns from the 'train' part (plus the server's feedback rows "
    "with --data-dir) and reports metrics on the held-back 'calibrate' part. Nothing is "
    "downloaded.")
EPILOG = (
    "Writes OUT/verifier/ (CrossEncoder(OUT/verifier) loads it; stratacache-card.json inside "
    "says how it was made and how well it does, and whether to score both orders), "
    "OUT/embedder/ with --embedder, OUT/heldout-calibrate.jsonl.gz and "
    "OUT/heldout-test.jsonl.gz, and checkpoints in OUT/checkpoints/ while training. Exit "
    "status: 0 done, 2 bad input, 3 stopped by --stop-after-steps, 130 / 143 stopped by "
    "Ctrl-C / SIGTERM (the first one stops after the current step with a checkpoint); after "
    "3, 130 or 143 the same command with --resume continues from the checkpoint.")

DEFAULTS: dict[str, Any] = {
    "base": "default",
    "epochs": 1.0,
    "batch_size": 32,
    "max_steps": 0,
    "learning_rate": 5e-5,
    "max_length": 128,
    "save_steps": 200,
    "seed": 12,
    "device": "auto",
    "threads": 0,
    "symmetric": True,
    "transitive": True,
    "transitive_max_cluster": 8,
    "embedder_loss": "online-contrastive",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stratacache tune`` flags (use with ArgumentDefaultsHelpFormatter)."""
    d = DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument("--pairs", type=Path, required=True,
                      help="labelled-pair file (JSON lines, optionally .gz): "
                           '{"a": ..., "b": ..., "duplicate": true|false} per line')
    data.add_argument("--data-dir", type=Path, default=None,
                      help="a server data directory: its feedback rows (evidence.sqlite3, "
                           "source='feedback') are added to the training pairs")
    data.add_argument("--limit", type=int, default=0,
                      help="read only the first N pairs of --pairs (quick runs); 0 = all")
    data.add_argument("--symmetric", action=argparse.BooleanOptionalAction,
                      default=d["symmetric"],
                      help="train the verifier on both orders of every pair (the card then says "
                           "symmetric: score the mean of both orders)")
    data.add_argument("--transitive", action=argparse.BooleanOptionalAction,
                      default=d["transitive"],
                      help="add pairs implied by the train labels: duplicates closed under union "
                           "into clusters; a non-duplicate label extends to the members of both "
                           "clusters")
    data.add_argument("--transitive-max-cluster", type=int, default=d["transitive_max_cluster"],
                      help="most members of one duplicate cluster used for implied pairs (bounds "
                           "the quadratic growth of big clusters)")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True,
                     help="output folder: verifier/, embedder/, held-out parts, checkpoints/")
    out.add_argument("--overwrite", action="store_true",
                     help="replace a finished model already in --out (and its checkpoints)")
    out.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --out/checkpoints (same data "
                          "and recipe as the run that wrote it); a model already finished is "
                          "kept")
    out.add_argument("--save-steps", type=int, default=d["save_steps"],
                     help="write a checkpoint every N optimizer steps (Ctrl-C also writes one)")
    out.add_argument("--stop-after-steps", type=int, default=0,
                     help="stop with a checkpoint once this many optimizer steps are done (train "
                          "in slices; continue with --resume); 0 = run to the end")
    out.add_argument("--keep-checkpoints", action="store_true",
                     help="keep --out/checkpoints after a model is finished")

    model = parser.add_argument_group("model and training")
    model.add_argument("--base", default=d["base"],
                       help="sentence-transformers model folder to start from, or 'default' for "
                            "the bundled all-MiniLM-L6-v2; never downloaded")
    model.add_argument("--embedder", action="store_true",
                       help="also fine-tune the embedder (written to --out/embedder)")
    model.add_argument("--embedder-loss", choices=("online-contrastive", "mnrl"),
                       default=d["embedder_loss"],
                       help="embedder loss: online-contrastive (pairs with labels, hard "
                            "negatives) or mnrl (multiple negatives ranking on duplicates)")
    model.add_argument("--epochs", type=float, default=d["epochs"],
                       help="passes over the training pairs (with --symmetric, each pair "
                            "in both orders)")
    model.add_argument("--max-steps", type=int, default=d["max_steps"],
                       help="optimizer steps in all, overriding --epochs; 0 = full epochs")
    model.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help="pairs per optimizer step")
    model.add_argument("--learning-rate", type=float, default=d["learning_rate"],
                       help="peak learning rate (linear warm-up over 10 %% of the steps, then "
                            "linear decay)")
    model.add_argument("--max-length", type=int, default=d["max_length"],
                       help="verifier tokens per pair (both texts together); longer pairs are "
                            "truncated")
    model.add_argument("--device", default=d["device"],
                       help="auto (cuda when torch sees a GPU), cpu, cuda or cuda:N")
    model.add_argument("--threads", type=int, default=d["threads"],
                       help="torch CPU threads; 0 = one per core (fastest on a host of its "
                            "own); 1 is several times faster on a host shared with other busy "
                            "processes")
    model.add_argument("--seed", type=int, default=d["seed"],
                       help="random seed (head initialisation, shuffling)")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")


# ----------------------------------------------------------------------------------- metrics


def curve_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray,
                  ) -> dict[str, float | None]:
    """AUC, precision at recall 0.50, and recall at precision 0.90 / 0.95 (with the score
    thresholds that reach them) of ``scores`` as a duplicate detector. A threshold t serves the
    pairs scoring >= t; tied scores are served together."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    out: dict[str, float | None] = {"pairs": len(y), "duplicates": positives}
    if positives == 0 or negatives == 0 or not np.all(np.isfinite(s)):
        out.update({"auc": None})
        for r in RECALL_POINTS:
            out[f"precision_at_recall_{r:.2f}"] = None
        for p in PRECISION_POINTS:
            out[f"recall_at_precision_{p:.2f}"] = None
        return out
    # AUC = P(score of a duplicate > score of a non-duplicate), ties count one half.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mid_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = mid_rank[inverse]
    out["auc"] = float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]  # end of each tie group
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / positives
    threshold = s_sorted[last]
    for r in RECALL_POINTS:
        i = int(np.argmax(recall >= r))
        out[f"precision_at_recall_{r:.2f}"] = float(precision[i])
        out[f"threshold_at_recall_{r:.2f}"] = float(threshold[i])
    for p in PRECISION_POINTS:
        ok = np.nonzero(precision >= p)[0]
        if len(ok):
            i = int(ok[np.argmax(recall[ok])])
            out[f"recall_at_precision_{p:.2f}"] = float(recall[i])
            out[f"threshold_at_precision_{p:.2f}"] = float(threshold[i])
        else:
            out[f"recall_at_precision_{p:.2f}"] = 0.0
            out[f"threshold_at_precision_{p:.2f}"] = None
    return out


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights (intercept first) of an L2-regularised logistic regression, by Newton steps."""
    xb = np.c_[np.ones(len(x)), x]
    w = np.zeros(xb.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        grad = xb.T @ (p - y) + l2 * np.r_[0.0, w[1:]]
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + l2 * np.diag(np.r_[0.0, np.ones(len(w) - 1)])
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


#: Scoring both orders doubles the verifier's cost per lookup: worth it only when it gains at
#: least this much precision at recall 0.50 on the held-back part.
BOTH_ORDERS_MIN_GAIN = 0.005


def verifier_metrics(forward: np.ndarray, backward: np.ndarray, base_cosine: dict[str, Any],
                     held: Sequence[LabelledPair]) -> dict[str, Any]:
    """The card's metrics: one order, the mean of both, the base cosine, the choice of scoring
    (``score_both_orders``) and the logistic fusion of cosine and the chosen score."""
    labels = [p.duplicate for p in held]
    one_order = curve_metrics(forward, labels)
    both_orders = curve_metrics((forward + backward) / 2, labels)
    gain = ((both_orders["precision_at_recall_0.50"] or 0)
            - (one_order["precision_at_recall_0.50"] or 0))
    both = gain >= BOTH_ORDERS_MIN_GAIN
    metrics: dict[str, Any] = {
        "part": HELDOUT_PART,
        "score_both_orders": both,
        # the score the server uses: the mean of both orders only when it pays for itself
        "verifier": both_orders if both else one_order,
        "verifier_one_order": one_order,  # (cached, query) only
        "verifier_mean_of_orders": both_orders,
        "base_cosine": {k: v for k, v in base_cosine.items() if k != "scores"},
    }
    try:
        used = (forward + backward) / 2 if both else forward
        metrics["fusion_with_base_cosine"] = fusion(base_cosine["scores"], used, held)
    except (np.linalg.LinAlgError, ValueError) as exc:  # degenerate held-back part
        log.warning("no fusion metrics: %s", exc)
    return metrics


def fusion(cosine: np.ndarray, verifier: np.ndarray, pairs: Sequence[LabelledPair],
           folds: int = 5) -> dict[str, Any]:
    """A logistic fusion of the base cosine and the verifier's logit: its weights fitted on all
    of ``pairs``, and its metrics out of fold (folds by connected text component, so no text
    is scored by weights fitted on it)."""
    from .pairs import components

    eps = 1e-6
    v = np.clip(verifier, eps, 1 - eps)
    x = np.c_[cosine, np.log(v / (1 - v))]
    y = np.asarray([p.duplicate for p in pairs], dtype=np.float64)
    comp = np.asarray(components(pairs))
    fold = np.asarray([int(hashlib.blake2b(str(c).encode(), digest_size=4).hexdigest(), 16) % folds
                       for c in comp])
    out_of_fold = np.zeros(len(y))
    for k in range(folds):
        test = fold == k
        if test.all() or not test.any() or len(set(y[~test])) < 2:
            return {"features": ["cosine", "verifier_logit"], "weights": None, "metrics": None}
        w = _logistic_fit(x[~test], y[~test])
        out_of_fold[test] = np.c_[np.ones(test.sum()), x[test]] @ w
    w = _logistic_fit(x, y)
    return {"features": ["cosine", "verifier_logit"],
            "weights": {"intercept": float(w[0]), "cosine": float(w[1]),
                        "verifier_logit": float(w[2])},
            "metrics": curve_metrics(out_of_fold, y.astype(bool))}


def _metrics_line(name: str, m: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"
    return (f"{name}: AUC {f(m.get('auc'))}, precision at recall 0.50 "
            f"{f(m.get('precision_at_recall_0.50'))}, recall at precision 0.90 / 0.95 "
            f"{f(m.get('recall_at_precision_0.90'))} / {f(m.get('recall_at_precision_0.95'))}")


# -------------------------------------------------------------------------------------- data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_feedback(data_dir: Path) -> list[LabelledPair]:
    """The feedback rows a server stored in ``data_dir/evidence.sqlite3`` as pairs
    (a = the cached prompt that matched, b = the query, duplicate = the verdict). A missing file
    means no feedback."""
    path = data_dir / "evidence.sqlite3"
    if not data_dir.is_dir():
        raise InvalidArgument(f"--data-dir {str(data_dir)!r} is not a directory")
    if not path.is_file():
        log.info("no feedback: %s does not exist", path)
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT matched, query, correct FROM evidence WHERE source = 'feedback' "
            "AND matched IS NOT NULL AND query IS NOT NULL AND correct IS NOT NULL "
            "ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise InvalidArgument(f"cannot read feedback from {path}: {exc}") from None
    finally:
        conn.close()
    pairs = [LabelledPair(str(m), str(q), bool(c)) for m, q, c in rows
             if str(m).strip() and str(q).strip()]
    log.info("feedback: %d rows from %s (%d marked correct)", len(pairs), path,
             sum(p.duplicate for p in pairs))
    return pairs


def transitive_pairs(pairs: Sequence[LabelledPair], *, max_cluster: int,
                     seed: int) -> list[LabelledPair]:
    """Pairs implied by ``pairs`` and not in it: duplicate labels closed under union into
    clusters (every two members of a cluster are duplicates), and a non-duplicate label between
    two texts extended to every member of their two clusters. Clusters bigger than
    ``max_cluster`` contribute a random ``max_cluster`` members; a non-duplicate label inside
    one cluster (contradictory labels) adds nothing."""
    clusters = TextClusters()
    for p in pairs:
        clusters.root(p.a), clusters.root(p.b)
        if p.duplicate:
            clusters.join(p.a, p.b)
    root = clusters.root
    members: dict[str, list[str]] = {}
    for text in clusters.texts():
        members.setdefault(root(text), []).append(text)
    rng = random.Random(seed)
    for key, texts in members.items():
        texts.sort()
        if len(texts) > max_cluster:
            members[key] = rng.sample(texts, max_cluster)
    seen = {frozenset((p.a, p.b)) for p in pairs}
    implied: list[LabelledPair] = []

    def add(a: str, b: str, duplicate: bool) -> None:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            implied.append(LabelledPair(a, b, duplicate))

    for texts in members.values():
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                add(a, b, True)
    for p in pairs:
        if p.duplicate:
            continue
        ra, rb = root(p.a), root(p.b)
        if ra == rb:
            continue
        for a in members[ra]:
            for b in members[rb]:
                add(a, b, False)
    rng.shuffle(implied)
    return implied


@dataclass
class Data:
    pairs_path: Path
    pairs_sha256: str
    parts: dict[str, list[LabelledPair]]
    feedback: list[LabelledPair]
    feedback_dropped: int
    train: list[LabelledPair]  # train part + feedback (+ implied pairs); one order
    implied: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def load_data(args: argparse.Namespace) -> Data:
    path: Path = args.pairs
    if not path.is_file():
        raise InvalidArgument(f"--pairs file {str(path)!r} does not exist")
    log.info("reading pairs from %s%s", path, f" (first {args.limit})" if args.limit else "")
    pairs = read_pairs(path, limit=args.limit or None)
    if not pairs:
        raise InvalidArgument(f"--pairs file {str(path)!r} holds no pairs")
    parts = split(pairs, STANDARD_PARTS, salt=SPLIT_SALT)
    counts = {name: {"pairs": len(ps), "duplicates": sum(p.duplicate for p in ps)}
              for name, ps in parts.items()}
    log.info("%d pairs (%d duplicates), split without shared texts: %s", len(pairs),
             sum(p.duplicate for p in pairs),
             ", ".join(f"{n} {c['pairs']} ({c['duplicates']} dup)" for n, c in counts.items()))
    if not parts[TRAIN_PART]:
        raise InvalidArgument(f"the train part of {str(path)!r} is empty: give more pairs")
    feedback: list[LabelledPair] = []
    dropped = 0
    if args.data_dir is not None:
        held_texts = {t for name, ps in parts.items() if name != TRAIN_PART
                      for p in ps for t in (p.a, p.b)}
        for p in read_feedback(args.data_dir):
            if p.a in held_texts or p.b in held_texts:
                dropped += 1  # would leak held-back text into training
            else:
                feedback.append(p)
        if dropped:
            log.info("feedback: %d rows left out because they share a text with the held-back "
                     "parts", dropped)
    train = parts[TRAIN_PART] + feedback
    implied: list[LabelledPair] = []
    if args.transitive:
        implied = transitive_pairs(train, max_cluster=args.transitive_max_cluster, seed=args.seed)
        log.info("transitive closure of the train labels adds %d pairs (%d duplicates)",
                 len(implied), sum(p.duplicate for p in implied))
    return Data(path, _sha256(path), parts, feedback, dropped, train + implied, len(implied),
                counts)


# ---------------------------------------------------------------------------------- training


def _import_training() -> None:
    missing = []
    for module in ("datasets", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise InvalidArgument(
            f"stratacache tune needs {' and '.join(missing)}: pip install 'stratacache[tune]'")


def _length_grouped_sampler_class() -> type:
    """A batch sampler (sentence-transformers' DefaultBatchSampler interface) that shuffles,
    then sorts each window of 64 batches by text length, so a batch pads little; batch order is
    shuffled again. Deterministic for a seed and epoch, so a resumed run skips the same
    batches."""
    import torch
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class LengthGroupedBatchSampler(DefaultBatchSampler):  # type: ignore[misc]
        window_batches = 64

        def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                     valid_label_columns: list[str] | None = None,
                     generator: torch.Generator | None = None, seed: int = 0) -> None:
            super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                             valid_label_columns=valid_label_columns, generator=generator,
                             seed=seed)
            text_columns = [c for c in dataset.column_names
                            if c not in set(valid_label_columns or ()) | {"label"}]
            lengths = np.zeros(len(dataset), dtype=np.int64)
            for column in text_columns:
                lengths += np.fromiter((len(t) for t in dataset[column]), dtype=np.int64,
                                       count=len(dataset))
            self.lengths = lengths

        def __len__(self) -> int:
            n = len(self.lengths)
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

        def __iter__(self):  # type: ignore[no-untyped-def]
            g = torch.Generator()
            g.manual_seed(int(self.seed) + int(self.epoch))
            order = torch.randperm(len(self.lengths), generator=g).numpy()
            window = self.batch_size * self.window_batches
            batches = []
            for start in range(0, len(order), window):
                chunk = order[start:start + window]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                batches.extend(chunk[i:i + self.batch_size].tolist()
                               for i in range(0, len(chunk), self.batch_size))
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            for i in torch.randperm(len(batches), generator=g).tolist():
                yield batches[i]

    return LengthGroupedBatchSampler


def length_grouped_batch_sampler(dataset: Any, batch_size: int, drop_last: bool,
                                 valid_label_columns: list[str] | None = None,
                                 generator: Any = None, seed: int = 0) -> Any:
    """The trainers' ``batch_sampler`` (a module-level function, so the training arguments
    pickle into checkpoints)."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is None:
        _SAMPLER_CLASS = _length_grouped_sampler_class()
    return _SAMPLER_CLASS(dataset, batch_size=batch_size, drop_last=drop_last,
                          valid_label_columns=valid_label_columns, generator=generator, seed=seed)


_SAMPLER_CLASS: type | None = None


class _Stopper:
    """Stops training with a checkpoint on the first Ctrl-C or SIGTERM (a second one aborts
    without one) or after ``--stop-after-steps``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop_after_steps: int) -> None:
        self.stop_after_steps = stop_after_steps
        self.reason: str | None = None
        self.exit_code = 3
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.reason = f"interrupted ({name})"
        self.exit_code = 128 + signum
        log.warning("%s: stopping after this step with a checkpoint (%s again aborts without "
                    "one)", name, name)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if (stopper.reason is None and stopper.stop_after_steps
                        and state.global_step >= stopper.stop_after_steps):
                    stopper.reason = f"stopped after {state.global_step} steps (--stop-after-steps)"
                if stopper.reason is not None and state.global_step < state.max_steps:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()


def _training_args(kind: str, args: argparse.Namespace, device: str, output_dir: Path,
                   n_train: int) -> Any:
    import torch

    if kind == "verifier":
        from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments as Args
    else:
        from sentence_transformers import SentenceTransformerTrainingArguments as Args
    on_cuda = device.startswith("cuda")
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    extra: dict[str, Any] = {}
    if kind == "embedder" and args.embedder_loss == "mnrl":
        from sentence_transformers.base.sampler import BatchSamplers

        extra["batch_sampler"] = BatchSamplers.NO_DUPLICATES
    else:
        extra["batch_sampler"] = length_grouped_batch_sampler
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    return Args(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=max(1, min(100, steps_per_epoch // 10)),
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not on_cuda,
        bf16=bf16,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **extra,
    )


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _checkpoint_step(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("global_step", 0))


def _train(kind: str, model: Any, loss: Any, dataset: Any, args: argparse.Namespace,
           device: str, ckpt_dir: Path) -> tuple[int, str | None, tuple[str, int] | None, float]:
    """Runs the trainer; returns (global step, checkpoint resumed from, (why it stopped early,
    exit status) or None, seconds)."""
    if kind == "verifier":
        from sentence_transformers.cross_encoder import CrossEncoderTrainer as Trainer
    else:
        from sentence_transformers import SentenceTransformerTrainer as Trainer
    resume = _latest_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume is None:
        log.info("%s: no checkpoint in %s: starting from the beginning", kind, ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    training_args = _training_args(kind, args, device, ckpt_dir, len(dataset))
    stopper = _Stopper(args.stop_after_steps)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                      callbacks=[stopper.callback()])
    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    total = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
    log.info("%s: training on %d pairs, %d steps of %d (%.2f epochs), learning rate %g, on %s%s; "
             "checkpoints every %d steps in %s", kind, len(dataset), total, args.batch_size,
             total / max(1, steps_per_epoch), args.learning_rate, device,
             f", resuming from {resume.name}" if resume else "", args.save_steps, ckpt_dir)
    started = time.perf_counter()
    with stopper:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    stopped = None if stopper.reason is None else (stopper.reason, stopper.exit_code)
    return int(trainer.state.global_step), resume.name if resume else None, stopped, seconds


def _pair_dataset(pairs: Sequence[LabelledPair], *, symmetric: bool) -> Any:
    from datasets import Dataset

    a = [p.a for p in pairs]
    b = [p.b for p in pairs]
    y = [1.0 if p.duplicate else 0.0 for p in pairs]
    if symmetric:
        a, b, y = a + b, b + a, y + y
    return Dataset.from_dict({"sentence1": a, "sentence2": b, "label": y})


# -------------------------------------------------------------------------------- evaluation


def verifier_scores(model: Any, pairs: Sequence[LabelledPair],
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's scores of (a, b) and of (b, a), one pass for both."""
    both = [(p.a, p.b) for p in pairs] + [(p.b, p.a) for p in pairs]
    scores = np.asarray(model.predict(both, batch_size=batch_size,
                                      show_progress_bar=len(both) > 4000), dtype=np.float64)
    return scores[:len(pairs)], scores[len(pairs):]


def cosine_scores(model: Any, pairs: Sequence[LabelledPair], batch_size: int = 64) -> np.ndarray:
    texts = list(dict.fromkeys(t for p in pairs for t in (p.a, p.b)))
    index = {t: i for i, t in enumerate(texts)}
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=len(texts) > 4000)
    a = vectors[[index[p.a] for p in pairs]]
    b = vectors[[index[p.b] for p in pairs]]
    return np.einsum("ij,ij->i", a, b).astype(np.float64)


# ------------------------------------------------------------------------------------- run


def _card(kind: str, args: argparse.Namespace, data: Data, base_path: Path, base_name: str,
          device: str, steps: int, n_train: int, seconds: float, resumed_from: str | None,
          metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "format": CARD_FORMAT,
        "base": {"name": base_name, "path": str(base_path),
                 "fingerprint": weights_fingerprint(base_path)},
        "pairs": {"path": str(data.pairs_path.resolve()), "sha256": data.pairs_sha256,
                  "limit": args.limit or None},
        "split": {"salt": SPLIT_SALT, "fractions": dict(STANDARD_PARTS),
                  "trained_on": TRAIN_PART, "metrics_on": HELDOUT_PART},
        "parts": data.counts,
        "feedback_rows": len(data.feedback),
        "feedback_rows_left_out": data.feedback_dropped,
        "implied_pairs": data.implied,
        "training_pairs": n_train,
        "transitive": bool(args.transitive),
        "steps": steps,
        "epochs": args.epochs if args.max_steps <= 0 else None,
        "max_steps": args.max_steps or None,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "resumed_from": resumed_from,
        "device": device,
        "stratacache_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
        "metrics": metrics,
    }


def _write_card(folder: Path, card: dict[str, Any]) -> None:
    tmp = folder / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(folder / CARD_NAME)


def _finished(folder: Path) -> bool:
    return (folder / CARD_NAME).is_file()


def _recipe(args: argparse.Namespace, sha: str, kind: str) -> dict[str, Any]:
    recipe = {"pairs_sha256": sha, "limit": args.limit, "base": str(args.base),
              "batch_size": args.batch_size, "seed": args.seed,
              "transitive": args.transitive, "data_dir": str(args.data_dir)}
    if kind == "verifier":
        recipe.update(symmetric=args.symmetric, max_length=args.max_length)
    else:
        recipe.update(embedder_loss=args.embedder_loss)
    return recipe


def _check_recipe(ckpt_dir: Path, recipe: dict[str, Any], resume: bool) -> None:
    path = ckpt_dir / "stratacache-recipe.json"
    if resume and path.is_file() and _latest_checkpoint(ckpt_dir) is not None:
        old = json.loads(path.read_text())
        changed = sorted(k for k in recipe if old.get(k) != recipe[k])
        if changed:
            raise InvalidArgument(
                f"--resume: the checkpoints in {ckpt_dir} were made with other "
                f"{', '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                "rerun with the same data and flags, or use --overwrite to start again")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=2) + "\n")


def _tune_verifier(args: argparse.Namespace, data: Data, base_path: Path, base_name: str,
                   device: str, base_cosine: dict[str, Any], base_model: Any) -> int:
    from sentence_transformers import CrossEncoder
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    out = args.out / "verifier"
    ckpt_dir = args.out / "checkpoints" / "verifier"
    set_seed(args.seed)
    model = CrossEncoder(str(base_path), num_labels=1, max_length=args.max_length,
                         device=device, local_files_only=True)
    dataset = _pair_dataset(data.train, symmetric=args.symmetric)
    loss = BinaryCrossEntropyLoss(model)
    steps, resumed, stopped, seconds = _train("verifier", model, loss, dataset, args, device,
                                              ckpt_dir)
    if stopped:
        reason, code = stopped
        log.warning("verifier: %s at step %d; checkpoint in %s; continue with --resume",
                    reason, steps, _latest_checkpoint(ckpt_dir))
        return code
    held = data.parts[HELDOUT_PART]
    log.info("verifier: trained %d steps in %.1f min; scoring the %d held-back pairs", steps,
             seconds / 60, len(held))
    forward, backward = verifier_scores(model, held)
    metrics = verifier_metrics(forward, backward, base_cosine, held)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    card = _card("verifier", args, data, base_path, base_name, device, steps, len(dataset),
                 seconds, resumed, metrics, symmetric=bool(args.symmetric),
                 score_both_orders=metrics["score_both_orders"],
                 max_length=args.max_length, loss="BinaryCrossEntropyLoss",
                 score="mean of sigmoid(a, b) and sigmoid(b, a)" if metrics["score_both_orders"]
                 else "sigmoid(cached, query)")
    _write_card(out, card)
    log.info(_metrics_line("verifier on the held-back part", metrics["verifier"]))
    log.info(_metrics_line("base cosine on the held-back part", base_cosine))
    fused = metrics.get("fusion_with_base_cosine", {}).get("metrics")
    if fused:
        log.info(_metrics_line("logistic fusion of cosine and verifier (out of fold)", fused))
    log.info("verifier written to %s", out)
    return 0


def _tune_embedder(args: argparse.Namespace, data: Data, base_path: Path, base_name: str,
                   device: str, base_cosine: dict[str, Any], base_model: Any) -> int:
    from datasets import Dataset
    from sentence_transformers.sentence_transformer import losses
    from transformers import set_seed

    out = args.out / "embedder"
    ckpt_dir = args.out / "checkpoints" / "embedder"
    set_seed(args.seed)
    model = base_model  # trained in place: the base cosine was measured before
    if args.embedder_loss == "mnrl":
        dup = [p for p in data.train if p.duplicate]
        dataset = Dataset.from_dict({"anchor": [p.a for p in dup],
                                     "positive": [p.b for p in dup]})
        loss = losses.MultipleNegativesRankingLoss(model)
    else:
        dataset = Dataset.from_dict({"sentence1": [p.a for p in data.train],
                                     "sentence2": [p.b for p in data.train],
                                     "label": [int(p.duplicate) for p in data.train]})
        loss = losses.OnlineContrastiveLoss(model)
    steps, resumed, stopped, seconds = _train("embedder", model, loss, dataset, args, device,
                                              ckpt_dir)
    if stopped:
        reason, code = stopped
        log.warning("embedder: %s at step %d; checkpoint in %s; continue with --resume",
                    reason, steps, _latest_checkpoint(ckpt_dir))
        return code
    held = data.parts[HELDOUT_PART]
    metrics = {"part": HELDOUT_PART,
               "embedder_cosine": curve_metrics(cosine_scores(model, held),
                                                [p.duplicate for p in held]),
               "base_cosine": {k: v for k, v in base_cosine.items() if k != "scores"}}
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    card = _card("embedder", args, data, base_path, base_name, device, steps, len(dataset),
                 seconds, resumed, metrics,
                 loss=type(loss).__name__,
                 note="vectors differ from the base model's: a data directory built with the "
                      "base model must be rebuilt")
    _write_card(out, card)
    log.info(_metrics_line("embedder cosine on the held-back part", metrics["embedder_cosine"]))
    log.info("embedder written to %s", out)
    return 0


def _prepare_out(args: argparse.Namespace) -> list[str]:
    """Checks --out against --resume/--overwrite; returns the models still to train."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {str(out)!r} exists and is not a folder")
    wanted = ["verifier"] + (["embedder"] if args.embedder else [])
    if args.resume and args.overwrite:
        raise InvalidArgument("--resume and --overwrite contradict each other: pick one")
    finished = [k for k in wanted if _finished(out / k)]
    if args.overwrite:
        for folder in [out / k for k in wanted] + [out / "checkpoints" / k for k in wanted]:
            if folder.is_dir():
                log.info("--overwrite: removing %s", folder)
                shutil.rmtree(folder)
        return wanted
    if args.resume:
        for k in finished:
            log.info("%s already finished in %s: kept", k, out / k)
        return [k for k in wanted if k not in finished]
    if finished:
        raise InvalidArgument(
            f"--out {str(out)!r} already holds a finished {' and '.join(finished)}: pass "
            "--overwrite to replace it, or --resume to finish what is missing")
    stale = [k for k in wanted if _latest_checkpoint(out / "checkpoints" / k) is not None]
    if stale:
        raise InvalidArgument(
            f"--out {str(out)!r} holds checkpoints of an unfinished run "
            f"({', '.join(stale)}): pass --resume to continue it, or --overwrite to start again")
    return wanted


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "save_steps", "max_length"):
        if getattr(args, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("limit", "max_steps", "stop_after_steps", "threads"):
        if getattr(args, name) < 0:
            raise InvalidArgument(f"--{name.replace('_', '-')} must not be negative")
    if args.epochs <= 0 and args.max_steps <= 0:
        raise InvalidArgument("--epochs must be positive (or give --max-steps)")
    if not args.learning_rate > 0:
        raise InvalidArgument("--learning-rate must be positive")
    if args.transitive_max_cluster < 2:
        raise InvalidArgument("--transitive-max-cluster must be at least 2")


def tune(args: argparse.Namespace) -> int:
    """Does the work of :func:`run`; raises InvalidArgument for bad input."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _check_args(args)
    if not Path(args.pairs).is_file():
        raise InvalidArgument(f"--pairs file {str(args.pairs)!r} does not exist")
    todo = _prepare_out(args)
    if not todo:
        log.info("nothing to do: every requested model in %s is finished", args.out)
        return 0
    _import_training()
    import torch

    from .embed import pick_device, resolve_model_path

    base_path = resolve_model_path(args.base)
    base_name = "all-MiniLM-L6-v2" if args.base == "default" else base_path.resolve().name
    device = pick_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    data = load_data(args)
    for kind in todo:
        _check_recipe(args.out / "checkpoints" / kind, _recipe(args, data.pairs_sha256, kind),
                      args.resume)
    for name in (HELDOUT_PART, "test"):
        target = args.out / f"heldout-{name}.jsonl.gz"
        write_pairs(target, data.parts[name])
        log.info("held-back part %r (%d pairs) written to %s", name, len(data.parts[name]), target)
    log.info("training pairs: %d from the train part + %d feedback + %d implied = %d%s",
             len(data.parts[TRAIN_PART]), len(data.feedback), data.implied, len(data.train),
             " (x2: both orders, for the verifier)" if args.symmetric else "")

    from sentence_transformers import SentenceTransformer

    held = data.parts[HELDOUT_PART]
    log.info("base model %s (%s) on %s; scoring its cosine on the %d held-back pairs",
             base_name, base_path, device, len(held))
    base_model = SentenceTransformer(str(base_path), device=device, local_files_only=True)
    base_scores = cosine_scores(base_model, held)
    base_cosine = curve_metrics(base_scores, [p.duplicate for p in held])
    base_cosine["scores"] = base_scores  # for the fusion; not written to the card
    log.info(_metrics_line("base cosine on the held-back part", base_cosine))
    if "embedder" not in todo:
        base_model = None

    for kind in todo:
        train_one = _tune_verifier if kind == "verifier" else _tune_embedder
        code = train_one(args, data, base_path, base_name, device, base_cosine, base_model)
        if code:
            return code
        ckpt = args.out / "checkpoints" / kind
        if not args.keep_checkpoints and ckpt.is_dir():
            shutil.rmtree(ckpt)
    ckpt_root = args.out / "checkpoints"
    if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
        ckpt_root.rmdir()
    log.info("done: %s", ", ".join(str(args.out / k) for k in todo))
    return 0


def run(args: argparse.Namespace) -> int:
    """``stratacache tune``: 0 when done, 2 for bad input (the message says what to change),
    3 when stopped by --stop-after-steps, 130 / 143 when stopped by Ctrl-C / SIGTERM (these
    leave a checkpoint that --resume continues)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return tune(args)
    except InvalidArgument as exc:
        log.error("%s", exc)
        print(f"stratacache tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.warning("interrupted; the latest checkpoint (if any) in %s is what --resume "
                    "continues from", args.out / "checkpoints")
        return 130


def main(argv: list[str] | None = None) -> int:
    """``python -m stratacache.tune``: the same as ``stratacache tune``."""
    parser = argparse.ArgumentParser(
        prog="stratacache tune", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

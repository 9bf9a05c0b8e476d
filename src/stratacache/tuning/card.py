"""The model card ``stratacache tune`` writes beside each model (``stratacache-card.json``):
what the model was trained on and how, and how well it does on the held-back part, measured
here (the scores, the curve metrics of :mod:`stratacache.curves`, the choice of scoring orders
and the logistic fusion of the base cosine with the verifier's logit).

:mod:`stratacache.verify` reads a verifier's card: ``score_both_orders``, ``base.fingerprint``
and ``metrics.fusion_with_base_cosine.weights`` (``intercept``, ``cosine``,
``verifier_logit``: the fused score is ``sigmoid(intercept + cosine * cos + verifier_logit *
logit(verifier score))``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..curves import curve_metrics
from ..embed import weights_fingerprint
from ..pairs import SPLIT_SALT, STANDARD_PARTS, LabelledPair, components, distinct_texts
from .data import HELDOUT_PART, TRAIN_PART, Data
from .training import Trained, batch_size

log = logging.getLogger("stratacache.tune")

CARD_NAME = "stratacache-card.json"
CARD_FORMAT = 1
#: Scoring both orders doubles the verifier's cost per lookup: worth it only when it gains at
#: least this much precision at recall 0.50 on the held-back part.
BOTH_ORDERS_MIN_GAIN = 0.005
#: L2 penalty on the fusion's weights (not its intercept), per summed log-loss.
FUSION_L2 = 1e-3
FUSION_FEATURES = ("cosine", "verifier_logit")


# ------------------------------------------------------------------------------- scores


def verifier_scores(model: Any, pairs: Sequence[LabelledPair],
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's scores in [0, 1] of (a, b) and of (b, a), one pass for both."""
    both = [(p.a, p.b) for p in pairs] + [(p.b, p.a) for p in pairs]
    scores = np.asarray(model.predict(both, batch_size=batch_size,
                                      show_progress_bar=len(both) > 4000), dtype=np.float64)
    return scores[:len(pairs)], scores[len(pairs):]


def cosine_scores(model: Any, pairs: Sequence[LabelledPair], batch_size: int = 64) -> np.ndarray:
    """The cosine of ``a`` and ``b`` for each pair, by the SentenceTransformer ``model`` (each
    distinct text embedded once)."""
    texts = distinct_texts(pairs)
    index = {t: i for i, t in enumerate(texts)}
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=len(texts) > 4000)
    a = vectors[[index[p.a] for p in pairs]]
    b = vectors[[index[p.b] for p in pairs]]
    return np.einsum("ij,ij->i", a, b).astype(np.float64)


# ------------------------------------------------------------------------------ metrics


def verifier_metrics(forward: np.ndarray, backward: np.ndarray, base_cosine: dict[str, Any],
                     held: Sequence[LabelledPair]) -> dict[str, Any]:
    """The verifier card's metrics.

    Args:
        forward: the verifier's scores of ``(a, b)`` for each held-back pair.
        backward: its scores of ``(b, a)``.
        base_cosine: the base model's :func:`~stratacache.curves.curve_metrics` on ``held``,
            with its cosines under ``"scores"`` (left out of the card).
        held: the held-back pairs.

    Returns:
        The metrics of one order, of the mean of both and of the base cosine, the choice of
        scoring (``score_both_orders``), the logistic fusion of the cosine and the chosen
        score (:func:`fusion`; absent when the held-back part is degenerate), ``decision``:
        the metrics of the score a server with the base model thresholds (:func:`decision`),
        and ``held_back``: each pair's label, base cosine and chosen score, from which the
        server derives its default threshold (:mod:`stratacache.operating_point`).
    """
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
        "base_cosine": _public(base_cosine),
    }
    used = (forward + backward) / 2 if both else forward
    try:
        metrics["fusion_with_base_cosine"] = fusion(base_cosine["scores"], used, held)
    except ValueError as exc:  # degenerate scores
        log.warning("no fusion metrics: %s", exc)
    # from the rounded columns the card holds, so its numbers reproduce from it exactly
    metrics["held_back"] = held_back_scores(base_cosine["scores"], used, labels)
    metrics["decision"] = _decision_metrics(metrics, "verifier")
    return metrics


def add_int8_scores(metrics: dict[str, Any], int8: np.ndarray) -> None:
    """Adds to :func:`verifier_metrics`' result what the verifier scores in dynamic int8 (the
    server's CPU default): ``held_back.verifier_int8`` and ``decision_int8``. int8 scores run
    lower than full precision's on many pairs, so a server in int8 derives its threshold from
    this column, not from the full-precision one."""
    metrics["held_back"]["verifier_int8"] = [round(float(v), 6) for v in int8]
    metrics["decision_int8"] = _decision_metrics(metrics, "verifier_int8")


def decision_scores(metrics: dict[str, Any], column: str) -> np.ndarray:
    """The decision score a server with the base model thresholds, per held-back pair, from the
    card's ``held_back[column]`` verifier scores: the fused probability when the card has a
    fusion (fitted on all held-back pairs), else the verifier's score."""
    from ..verify import Fusion

    held = metrics["held_back"]
    verifier = np.asarray(held[column], dtype=np.float64)
    weights = (metrics.get("fusion_with_base_cosine") or {}).get("weights")
    return Fusion(**weights)(np.asarray(held["base_cosine"]), verifier) if weights else verifier


def _decision_metrics(metrics: dict[str, Any], column: str) -> dict[str, Any]:
    """The curve metrics of :func:`decision_scores`; thresholds are probabilities, the unit the
    server compares."""
    fused = bool((metrics.get("fusion_with_base_cosine") or {}).get("weights"))
    score = ("fused: sigmoid(intercept + cosine * cos + verifier_logit * logit(verifier))"
             if fused else "verifier")
    return {"score": score, "unit": "probability",
            **curve_metrics(decision_scores(metrics, column), metrics["held_back"]["duplicate"])}


def held_back_scores(cosine: np.ndarray, verifier: np.ndarray,
                     labels: Sequence[bool]) -> dict[str, Any]:
    """Per held-back pair (in the part's order): the label, the base cosine and the verifier's
    score, rounded to 6 decimals (about 25 bytes a pair)."""
    return {"part": HELDOUT_PART, "duplicate": [int(bool(y)) for y in labels],
            "base_cosine": [round(float(v), 6) for v in cosine],
            "verifier": [round(float(v), 6) for v in verifier]}


def embedder_metrics(cosine: np.ndarray, base_cosine: dict[str, Any],
                     held: Sequence[LabelledPair]) -> dict[str, Any]:
    """The embedder card's metrics: its cosine's and the base cosine's on the held-back part."""
    return {"part": HELDOUT_PART,
            "embedder_cosine": curve_metrics(cosine, [p.duplicate for p in held]),
            "base_cosine": _public(base_cosine)}


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "scores"}


def fusion(cosine: np.ndarray, verifier: np.ndarray, pairs: Sequence[LabelledPair],
           folds: int = 5) -> dict[str, Any]:
    """A logistic fusion of the base cosine and the verifier's logit.

    Args:
        cosine: the base model's cosine per pair.
        verifier: the verifier's score in [0, 1] per pair.
        pairs: the labelled pairs scored.
        folds: folds for the out-of-fold metrics, by connected text component (so no text is
            scored by weights fitted on it).

    Returns:
        ``features``; ``weights`` (``intercept``, ``cosine``, ``verifier_logit``) fitted on
        all of ``pairs``; ``metrics``: the out-of-fold curve metrics. Weights and metrics are
        None when a fold holds every pair, none, or trains on one class.

    Raises:
        ValueError: a score is not finite.
    """
    eps = 1e-6
    v = np.clip(verifier, eps, 1 - eps)
    x = np.c_[cosine, np.log(v / (1 - v))]
    y = np.asarray([p.duplicate for p in pairs], dtype=bool)
    fold = np.asarray([int(hashlib.blake2b(str(c).encode(), digest_size=4).hexdigest(), 16) % folds
                       for c in components(pairs)])
    out_of_fold = np.zeros(len(y))
    for k in range(folds):
        test = fold == k
        if test.all() or not test.any() or len(set(y[~test])) < 2:
            return {"features": list(FUSION_FEATURES), "weights": None, "metrics": None}
        out_of_fold[test] = _logistic(x[~test], y[~test]).decision_function(x[test])
    model = _logistic(x, y)
    return {"features": list(FUSION_FEATURES),
            "weights": {"intercept": float(model.intercept_[0]),
                        **{f: float(w) for f, w in zip(FUSION_FEATURES, model.coef_[0])}},
            "metrics": curve_metrics(out_of_fold, y)}


def _logistic(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression

    # C = 1 / L2: sklearn minimises C * (summed log-loss) + |w|^2 / 2, intercept unpenalised;
    # Newton steps to a tight tolerance, as the fusion has two features
    return LogisticRegression(C=1 / FUSION_L2, solver="newton-cholesky", tol=1e-10,
                              max_iter=100).fit(x, y)


def metrics_line(name: str, m: dict[str, Any]) -> str:
    """One log line of the headline curve metrics ``m``."""
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"
    return (f"{name}: AUC {f(m.get('auc'))}, precision at recall 0.50 "
            f"{f(m.get('precision_at_recall_0.50'))}, recall at precision 0.90 / 0.95 "
            f"{f(m.get('recall_at_precision_0.90'))} / {f(m.get('recall_at_precision_0.95'))}")


# --------------------------------------------------------------------------------- card


def build_card(kind: str, args: argparse.Namespace, data: Data, base_path: Path, base_name: str,
               device: str, trained: Trained, metrics: dict[str, Any],
               **extra: Any) -> dict[str, Any]:
    """The card of a ``kind`` ("verifier" or "embedder") model: base model, data, split,
    recipe (from the ``stratacache tune`` flags in ``args``), training run, ``extra`` fields,
    then ``metrics``."""
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
        "training_pairs": trained.examples,
        "transitive": bool(args.transitive),
        "steps": trained.steps,
        "epochs": args.epochs if args.max_steps <= 0 else None,
        "max_steps": args.max_steps or None,
        "batch_size": batch_size(args, device),
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "seconds": round(trained.seconds, 1),
        "resumed_from": trained.resumed_from,
        "device": device,
        "stratacache_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
        "metrics": metrics,
    }


def write_card(folder: Path, card: dict[str, Any]) -> None:
    """Writes ``card`` into ``folder`` atomically: a model with a card is finished."""
    tmp = folder / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(folder / CARD_NAME)


def is_finished(folder: Path) -> bool:
    """Whether ``folder`` holds a finished model (its card is written last)."""
    return (folder / CARD_NAME).is_file()

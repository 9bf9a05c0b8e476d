"""How well a score tells duplicate pairs from the rest: ROC AUC and the operating points of the
precision-recall curve (precision at a recall, recall at a precision, and the score thresholds
that reach them). Shared by ``stratacache tune``'s model cards and the hit-quality benchmarks,
so both read the same curve the same way.

A threshold ``t`` serves the pairs scoring ``>= t``; tied scores are served together, so the
curve has one point per distinct score.

scikit-learn is imported on first use: ``stratacache serve`` imports ``stratacache.tune`` (for
its flags) and should not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The points of the precision/recall curve every model card reports.
RECALL_POINTS = (0.50,)
PRECISION_POINTS = (0.90, 0.95)

Scores = Sequence[float] | np.ndarray
Labels = Sequence[bool] | np.ndarray


def pr_points(scores: Scores, labels: Labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The precision-recall curve, strictest threshold first.

    Args:
        scores: one score per pair, higher = more likely a duplicate (any finite unit).
        labels: True for a duplicate pair; at least one must be.

    Returns:
        ``(precision, recall, threshold)``, one entry per distinct score, thresholds descending
        (in the unit of ``scores``).
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, threshold = precision_recall_curve(
        np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64))
    # sklearn orders thresholds ascending and appends the (precision 1, recall 0) end point
    return precision[-2::-1], recall[-2::-1], threshold[::-1]


def at_recall(recall: np.ndarray, target: float) -> int:
    """Index (into :func:`pr_points`' arrays) of the strictest threshold whose recall reaches
    ``target``, a fraction in (0, 1] (the loosest threshold has recall 1)."""
    return int(np.argmax(recall >= target))


def threshold_at_recall(scores: Scores, labels: Labels, target: float) -> float | None:
    """The strictest score threshold whose recall reaches ``target`` (a fraction in (0, 1]);
    None when ``labels`` holds no duplicate."""
    if not np.any(labels):
        return None
    _, recall, threshold = pr_points(scores, labels)
    return float(threshold[at_recall(recall, target)])


def curve_metrics(scores: Scores, labels: Labels) -> dict[str, float | None]:
    """AUC, precision at recall 0.50, and recall at precision 0.90 / 0.95 (with the score
    thresholds that reach them) of ``scores`` as a duplicate detector.

    Args:
        scores: one score per pair (any unit; thresholds are reported in it).
        labels: True for a duplicate pair.

    Returns:
        ``pairs``, ``duplicates``, ``auc`` (ties count one half), ``precision_at_recall_0.50``,
        ``recall_at_precision_0.90`` / ``_0.95`` (0.0 where no threshold is that precise) and
        their ``threshold_at_...``; the metrics are None (and no thresholds given) when the
        labels hold one class only or a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives = int(y.sum())
    out: dict[str, float | None] = {"pairs": len(y), "duplicates": positives}
    if positives == 0 or positives == len(y) or not np.all(np.isfinite(s)):
        out["auc"] = None
        for r in RECALL_POINTS:
            out[f"precision_at_recall_{r:.2f}"] = None
        for p in PRECISION_POINTS:
            out[f"recall_at_precision_{p:.2f}"] = None
        return out
    from sklearn.metrics import roc_auc_score

    out["auc"] = float(roc_auc_score(y, s))
    precision, recall, threshold = pr_points(s, y)
    for r in RECALL_POINTS:
        i = at_recall(recall, r)
        out[f"precision_at_recall_{r:.2f}"] = float(precision[i])
        out[f"threshold_at_recall_{r:.2f}"] = float(threshold[i])
    for p in PRECISION_POINTS:
        precise = np.nonzero(precision >= p)[0]
        if len(precise):
            # the most recall; among equal recalls the strictest threshold (the first)
            i = int(precise[np.argmax(recall[precise])])
            out[f"recall_at_precision_{p:.2f}"] = float(recall[i])
            out[f"threshold_at_precision_{p:.2f}"] = float(threshold[i])
        else:
            out[f"recall_at_precision_{p:.2f}"] = 0.0
            out[f"threshold_at_precision_{p:.2f}"] = None
    return out

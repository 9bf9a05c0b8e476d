"""The verifier's default operating point: the cosine gate and the decision-score threshold a
namespace without a wrong-hit bound serves at, when ``--verify-gate`` / ``--verify-threshold``
do not set them.

They come from the verifier's card: ``stratacache tune`` records, for every pair of its
held-back part, the label, the base model's cosine and the verifier's score
(``metrics.held_back``), and :meth:`stratacache.verify.Verifier.held_back` turns them into this
server's own decision scores (the function it serves with, so the threshold is in the unit the
server compares: a probability; the card's fusion thresholds are logits and are not used). Then:

1. **target**: the held-back precision of plain cosine at the server's ``--min-similarity`` (what
   the cache serves without a verifier), plus :data:`PRECISION_MARGIN`;
2. **threshold**: of the thresholds whose held-back precision reaches the target (each serving
   at least :data:`MIN_SERVED` pairs), the one that serves the most duplicates;
3. **gate**: the highest cosine, in steps of :data:`GATE_STEP`, that costs at most
   :data:`GATE_RECALL_COST` of held-back recall at that threshold (below it no candidate is
   verified, which saves a verifier pass on lookups the verifier would reject anyway).

PRECISION_MARGIN: precision measured on the card's held-back part runs above the same
threshold's on unseen pairs (3-4 points on other QQP pairs for the verifier alone; 1 to 1.5
points on the text-disjoint test part for both the fused score and plain cosine at 0.95), so the
target compares the two on the same part, where that optimism largely cancels, and the margin
covers what is left: with a MiniLM verifier tuned for 600 steps, a threshold matched with no
margin served at 0.866 on the test part against cosine's 0.869; with 0.01, at 0.884 with 1.6x
cosine's recall (full precision). A card without held-back scores (older tune, or a plain
CrossEncoder folder) gets the built-in defaults, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .verify import HeldBack

log = logging.getLogger(__name__)

#: Held-back precision the verifier's default threshold must exceed the cosine default's by.
PRECISION_MARGIN = 0.01
#: Held-back recall (a fraction of the duplicates) the default gate may cost.
GATE_RECALL_COST = 0.005
GATE_STEP = 0.05
#: Fewest held-back pairs a threshold must serve for its precision to count.
MIN_SERVED = 30
#: What a card without held-back scores gets.
BUILT_IN_GATE = 0.80
BUILT_IN_THRESHOLD = 0.90


@dataclass(frozen=True)
class OperatingPoint:
    """The verifier's default gate (cosine) and threshold (decision score, a probability).

    Attributes:
        gate, threshold: what namespaces without a bound or a gate of their own apply.
        source: where the threshold came from: ``"verifier_card"``, ``"verify_threshold"`` (the
            flag) or ``"built_in"``.
        explanation: one sentence for logs and GetPolicy: the figures behind the choice.
    """

    gate: float
    threshold: float
    source: str
    explanation: str


def choose(held: HeldBack | None, *, min_similarity: float, gate: float | None = None,
           threshold: float | None = None, margin: float = PRECISION_MARGIN) -> OperatingPoint:
    """The verifier's operating point (see the module doc).

    Args:
        held: the card's held-back pairs in this server's decision score; None without.
        min_similarity: the server's cosine default (``--min-similarity``), whose held-back
            precision the threshold must beat by ``margin``.
        gate, threshold: set by flags (kept as given); None: derived.
        margin: see :data:`PRECISION_MARGIN`.
    """
    if held is None:
        why = ("the verifier's card holds no held-back scores (written by an older `stratacache "
               "tune`, or a CrossEncoder folder without a card)")
        return _fallback(gate, threshold, why)
    cosine, score, duplicate = held.cosine, held.score, held.duplicate
    n_dup = int(duplicate.sum())
    cos_served = cosine >= min_similarity
    if n_dup == 0 or int(cos_served.sum()) < MIN_SERVED:
        return _fallback(gate, threshold, f"its {len(duplicate)} held-back pairs hold too few "
                                          f"duplicates, or too few with cosine >= "
                                          f"{min_similarity:g}, to compare with")
    cos_precision = float(duplicate[cos_served].mean())
    cos_recall = float((duplicate & cos_served).sum() / n_dup)
    target = min(1.0, cos_precision + margin)
    source = "verify_threshold" if threshold is not None else "verifier_card"
    if threshold is None:
        derived = _loosest(score, duplicate, cosine >= (0.0 if gate is None else gate), target)
        if derived is None:
            return _fallback(gate, None, f"no threshold reaches held-back precision "
                                         f"{target:.3f} on its {len(duplicate)} pairs")
        threshold = derived
    at = score >= threshold
    recall_ungated = float((at & duplicate).sum() / n_dup)
    if gate is None:
        gate = _highest_gate(cosine, at, duplicate, n_dup, recall_ungated)
    served = at & (cosine >= gate)
    precision = float(duplicate[served].mean()) if served.any() else float("nan")
    recall = float((served & duplicate).sum() / n_dup)
    cost_080 = recall_ungated - float((at & (cosine >= 0.80) & duplicate).sum() / n_dup)
    cost = recall_ungated - recall
    versus = "" if abs(gate - 0.80) < 1e-9 else f"; a 0.80 gate, {cost_080:.3f}"
    origin = "from the verifier's card" if source == "verifier_card" else "from --verify-threshold"
    rule = (f" (the loosest threshold whose precision reaches that + {margin:g})"
            if source == "verifier_card" else "")
    explanation = (
        f"threshold {threshold:.4f} {origin}: on its {len(duplicate)} held-back "
        f"({held.part}) pairs, scored from the card's {held.scores_from!r} column, it serves at "
        f"precision {precision:.3f} and recall {recall:.3f}, against {cos_precision:.3f} and "
        f"{cos_recall:.3f} for cosine >= {min_similarity:g}{rule}; gate {gate:.2f} (costs "
        f"{cost:.3f} recall against no gate there{versus})")
    return OperatingPoint(gate, float(threshold), source, explanation)


def _loosest(score: np.ndarray, duplicate: np.ndarray, eligible: np.ndarray,
             target: float) -> float | None:
    """The threshold on ``score`` (pairs served when ``eligible`` and score >= it) whose precision
    reaches ``target`` while serving the most duplicates, among thresholds serving at least
    MIN_SERVED pairs; None when none does."""
    s = np.where(eligible, score, -np.inf)
    order = np.argsort(-s, kind="stable")
    s_sorted, right = s[order], np.cumsum(duplicate[order])
    served = np.arange(1, len(s) + 1)
    # a threshold serves every pair tied with it: evaluate at the last of each run of ties
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True] & np.isfinite(s_sorted)
    ok = last & (served >= MIN_SERVED) & (right >= target * served)
    if not ok.any():
        return None
    i = int(np.flatnonzero(ok)[np.argmax(right[ok])])  # most duplicates; strictest on ties
    return float(s_sorted[i])


def _highest_gate(cosine: np.ndarray, at: np.ndarray, duplicate: np.ndarray, n_dup: int,
                  recall_ungated: float) -> float:
    """The highest gate on the GATE_STEP grid whose recall at ``at`` is within GATE_RECALL_COST
    of no gate."""
    for gate in np.round(np.arange(1.0 - GATE_STEP, -1e-9, -GATE_STEP), 2):
        recall = float((at & (cosine >= gate) & duplicate).sum() / n_dup)
        if recall_ungated - recall <= GATE_RECALL_COST + 1e-12:
            return float(gate)
    return 0.0


def _fallback(gate: float | None, threshold: float | None, why: str) -> OperatingPoint:
    if threshold is not None:
        source, origin = "verify_threshold", f"threshold {threshold:g} from --verify-threshold"
    else:
        source, origin = "built_in", f"the built-in threshold {BUILT_IN_THRESHOLD:g}"
    gate = BUILT_IN_GATE if gate is None else gate
    return OperatingPoint(gate, BUILT_IN_THRESHOLD if threshold is None else threshold, source,
                          f"{origin} and gate {gate:.2f}: {why}; re-run `stratacache tune` for "
                          "a card with held-back scores, or set --verify-threshold")

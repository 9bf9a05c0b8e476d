"""Choosing a decision threshold that keeps a promise: at most ``max_wrong_rate`` wrong answers
among served hits, with 95 % confidence, from labelled evidence.

Evidence is a list of (score, correct) observations: a lookup prompt, the stored prompt it was
or would be served, the score the server gives the pair (cosine, or the verifier's), and whether
serving it is right (labelled pairs, and feedback on served hits).

The bound: for a threshold t, the hits served are the observations scoring >= t; with ``k`` of
those ``n`` wrong, the one-sided Clopper-Pearson upper bound U(k, n) on the wrong-hit rate holds
with the stated confidence. The threshold: thresholds are tested in a fixed order, from strict
to loose (the order depends on scores only, never on labels), and a sequence stops at its first
threshold that fails U <= max_wrong_rate. Fixed-sequence testing needs no multiplicity
correction within a sequence (the "Learn then Test" procedure of Angelopoulos et al., 2021), so
the promise holds for the threshold picked, not just for one fixed in advance; three sequences
with different starting points split the 5 % error between them (see :func:`calibrate`).

With too little evidence no threshold passes, and the caller serves no semantic hits rather than
guess (exact hits are never wrong and stay on).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr
from scipy.stats import beta

CONFIDENCE = 0.95


def upper_bounds(wrong: np.ndarray, served: np.ndarray,
                 confidence: float = CONFIDENCE) -> np.ndarray:
    """One-sided Clopper-Pearson upper confidence bounds on rates seen as ``wrong``/``served``
    (1 where nothing was served or everything was wrong)."""
    wrong, served = np.asarray(wrong), np.asarray(served)
    return np.where((served <= 0) | (wrong >= served), 1.0,
                    beta.ppf(confidence, wrong + 1, np.maximum(served - wrong, 1)))


def upper_bound(wrong: int, served: int, confidence: float = CONFIDENCE) -> float:
    return float(upper_bounds(np.array([wrong]), np.array([served]), confidence)[0])


def _passes(wrong: np.ndarray, served: np.ndarray, max_wrong_rate: float,
            confidence: float) -> np.ndarray:
    """Whether U(wrong, served) <= max_wrong_rate, elementwise, without computing U: the
    Clopper-Pearson bound is at most r exactly when P(Binomial(served, r) <= wrong) <= 1 -
    confidence, a direct CDF that costs a fraction of the beta quantile."""
    wrong, served = np.asarray(wrong), np.asarray(served)
    return (served > wrong) & (bdtr(wrong, served, max_wrong_rate) <= 1 - confidence)


def _first_failure(wrong: np.ndarray, served: np.ndarray, start: int, max_wrong_rate: float,
                   confidence: float) -> int:
    """The first index ``i >= start`` whose bound U(wrong[i], served[i]) exceeds
    ``max_wrong_rate``, or ``len(served)`` if none does. ``served`` must rise and ``wrong`` not
    fall (thresholds from strict to loose).

    Within a run of equal wrong counts the bound only falls as ``served`` grows, so a run holds
    a failure exactly when its first index fails: the bound is tested once per run (about
    ``max_wrong_rate * served`` runs before the first failure, not one per distinct score). The
    result is that of testing every index."""
    w, n = wrong[start:], served[start:]
    run_starts = np.flatnonzero(np.insert(w[1:] != w[:-1], 0, True))
    failing = np.flatnonzero(~_passes(w[run_starts], n[run_starts], max_wrong_rate, confidence))
    return start + int(run_starts[failing[0]]) if len(failing) else len(served)


def minimum_served(max_wrong_rate: float, confidence: float = CONFIDENCE) -> int:
    """Fewest served observations for which a clean record (0 wrong) meets the bound:
    U(0, n) = 1 - (1 - confidence)^(1/n) <= max_wrong_rate."""
    # log1p: log(1 - r) rounds to log(1.0) == 0 for tiny r, and the quotient divides by zero.
    return math.ceil(math.log(1 - confidence) / math.log1p(-max_wrong_rate))


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the evidence supports for one bound.

    Attributes:
        max_wrong_rate: the bound asked for.
        threshold: the loosest score threshold whose bound holds; None when none does.
        evidence: observations in all; ``evidence_correct`` of them right to serve.
        served: observations the threshold serves; ``wrong`` of them wrong.
        promised_bound: U(wrong, served) at the threshold (<= max_wrong_rate), or the bound at
            the strictest testable threshold when none passes (what could be promised).
        hit_rate: share of right-to-serve observations served (recall on the evidence).
        needed: observations a threshold must serve, with none wrong, before anything can be
            promised.
    """

    max_wrong_rate: float
    threshold: float | None
    evidence: int
    evidence_correct: int
    served: int
    wrong: int
    promised_bound: float
    hit_rate: float
    needed: int

    @property
    def message(self) -> str:
        if self.threshold is not None:
            return (f"serving scores >= {self.threshold:.4f}: {self.wrong} wrong of {self.served} "
                    f"served in {self.evidence} labelled observations; wrong-hit rate <= "
                    f"{self.promised_bound:.4f} with {CONFIDENCE:.0%} confidence; "
                    f"hit rate {self.hit_rate:.3f}")
        if self.evidence < self.needed:
            why = (f"not enough evidence for a wrong-hit bound of {self.max_wrong_rate:g}: "
                   f"{self.evidence} labelled observations ({self.evidence_correct} correct); a "
                   f"threshold must serve at least {self.needed} with none wrong")
        else:
            why = (f"no threshold keeps a wrong-hit bound of {self.max_wrong_rate:g} on "
                   f"{self.evidence} labelled observations: even the highest-scored ones hold "
                   f"too many wrong (bound {self.promised_bound:.4f}); a better verifier, or more "
                   "evidence, may reach it")
        return (why + ". Serving exact hits only until more labelled pairs (stratacache "
                "calibrate) or feedback arrive")


#: Observed wrong-hit rates, as fractions of the bound, that the test sequences are built to
#: tolerate at their first threshold (see :func:`calibrate`).
_SLACKS = (0.0, 0.5, 0.75)


@functools.lru_cache(maxsize=64)  # a few bounds, asked at every calibration
def _sequence_start(max_wrong_rate: float, slack: float, confidence: float) -> int:
    """Fewest served observations at which a wrong-hit rate of ``slack * max_wrong_rate`` still
    passes the bound: where a test sequence starts."""
    n = minimum_served(max_wrong_rate, confidence)
    while upper_bound(math.floor(slack * max_wrong_rate * n), n, confidence) > max_wrong_rate:
        n = math.ceil(n * 1.05)
    return n


def calibrate(scores: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
              max_wrong_rate: float, confidence: float = CONFIDENCE, *,
              total_correct: int | None = None) -> Calibration:
    """The loosest threshold on ``scores`` keeping the wrong-hit bound (see the module doc).
    ``total_correct``: right-to-serve observations in all, when ``scores`` leaves out some that
    can never be served (below a cosine gate); the hit rate is relative to it.

    Thresholds are tested in fixed sequences from strict to loose, each stopping at its first
    failure. One sequence starting where a single wrong hit already fails would stop at once on
    evidence with a little label noise at the top, so three run, starting where an observed rate
    of 0, 1/2 and 3/4 of the bound can still pass; each tests at (1 - confidence) / 3, so by the
    union bound the threshold picked keeps the promise with ``confidence``."""
    if not 0 < max_wrong_rate < 1:
        raise ValueError(f"max_wrong_rate must lie in (0, 1), not {max_wrong_rate}")
    s = np.asarray(scores, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    each = 1 - (1 - confidence) / len(_SLACKS)
    starts = [_sequence_start(max_wrong_rate, f, each) for f in _SLACKS]
    order = np.argsort(-s, kind="stable")
    s, ok = s[order], ok[order]
    wrong_so_far = np.cumsum(~ok)
    positives = int(ok.sum()) if total_correct is None else total_correct
    # A threshold t = s[i] serves every observation scoring >= t: test only the last index of
    # each run of equal scores.
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.array([], int)
    served_at = ends + 1
    wrong_at = wrong_so_far[ends] if len(ends) else np.array([], int)
    best: tuple[float, int, int] | None = None
    first_bound = 1.0
    for n, start in enumerate(starts):
        first = int(np.searchsorted(served_at, start))  # served_at rises: tested = a suffix
        if first == len(served_at):
            continue
        if n == 0:
            first_bound = upper_bound(int(wrong_at[first]), int(served_at[first]), each)
        failed = _first_failure(wrong_at, served_at, first, max_wrong_rate, each)
        if failed > first and (best is None or served_at[failed - 1] > best[1]):
            i = failed - 1
            best = (float(s[ends[i]]), int(served_at[i]), int(wrong_at[i]))
    if best is None:
        return Calibration(max_wrong_rate, None, len(s), positives, 0, 0, first_bound, 0.0,
                           starts[0])
    threshold, served, wrong = best
    return Calibration(max_wrong_rate, threshold, len(s), positives, served, wrong,
                       upper_bound(wrong, served, each),
                       (served - wrong) / positives if positives else 0.0, starts[0])

"""The wrong-hit bound: Clopper-Pearson figures, threshold choice, and that the promise holds
on data the threshold was not chosen on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stratacache.calibration import (CONFIDENCE, _sequence_start, calibrate, minimum_served,
                                     upper_bound, upper_bounds)


def test_upper_bound_matches_known_values() -> None:
    # 0 of n: 1 - 0.05 ** (1 / n) (the "rule of three" ~ 3/n)
    assert upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-9)
    assert upper_bound(0, 0) == 1.0
    assert upper_bound(5, 5) == 1.0
    assert 0.05 < upper_bound(5, 100) < 0.11  # observed 5 %: the bound sits above it
    assert minimum_served(0.01) == 299 and upper_bound(0, 299) <= 0.01 < upper_bound(0, 298)


def test_minimum_served_holds_for_tiny_bounds() -> None:
    """log(1 - 1e-17) rounds to 0: the count used to divide by zero (a SetPolicy of 1e-300 gave
    INTERNAL); log1p keeps it exact."""
    assert minimum_served(1e-17) == pytest.approx(-math.log(0.05) * 1e17, rel=1e-9)
    assert minimum_served(1e-300) > 1e300


def test_a_little_noise_at_the_top_does_not_stop_calibration() -> None:
    """Two wrong pairs among the 50 highest scores (label noise) must not make a 2 % bound
    unreachable when 5,000 observations at 1 % wrong support it."""
    rng = np.random.default_rng(0)
    scores = np.sort(rng.random(5_000))[::-1]
    correct = rng.random(5_000) >= 0.01
    correct[[3, 40]] = False
    cal = calibrate(scores, correct, 0.02)
    assert cal.threshold is not None and cal.served > 2_000 and cal.promised_bound <= 0.02


def _sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    correct = rng.random(n) < 0.4
    scores = np.where(correct, rng.beta(8, 1.5, n), rng.beta(1.5, 5, n))
    return scores, correct


def test_thin_evidence_promises_nothing() -> None:
    scores, correct = _sample(200, np.random.default_rng(1))
    cal = calibrate(scores, correct, 0.01)
    assert cal.threshold is None and cal.served == 0
    assert cal.needed == minimum_served(0.01, 1 - 0.05 / 3)  # each of 3 sequences tests at 5/3 %
    assert "not enough evidence" in cal.message and f"at least {cal.needed}" in cal.message


def test_no_threshold_when_even_the_top_is_too_often_wrong() -> None:
    rng = np.random.default_rng(5)
    cal = calibrate(rng.random(5_000), rng.random(5_000) < 0.9, 0.01)  # 10 % wrong everywhere
    assert cal.threshold is None and "no threshold keeps" in cal.message


def test_looser_bound_gives_lower_threshold_and_more_hits() -> None:
    scores, correct = _sample(20_000, np.random.default_rng(2))
    strict, loose = calibrate(scores, correct, 0.01), calibrate(scores, correct, 0.05)
    assert strict.threshold is not None and loose.threshold is not None
    assert loose.threshold < strict.threshold and loose.hit_rate > strict.hit_rate
    for cal in (strict, loose):
        assert cal.promised_bound <= cal.max_wrong_rate
        served = scores >= cal.threshold
        assert served.sum() == cal.served and (~correct[served]).sum() == cal.wrong


def test_more_evidence_never_needs_a_stricter_threshold_on_average() -> None:
    rng = np.random.default_rng(3)
    thin = [calibrate(*_sample(1_500, rng), 0.02).threshold for _ in range(20)]
    rich = [calibrate(*_sample(30_000, rng), 0.02).threshold for _ in range(5)]
    thin_t = [t if t is not None else 1.0 for t in thin]
    assert np.mean(thin_t) > np.mean(rich)  # thin evidence stays conservative


@pytest.mark.parametrize("bound", [0.01, 0.02, 0.05])
def test_promise_holds_on_fresh_data(bound: float) -> None:
    """Chosen on one sample, the wrong-hit rate on a new sample from the same source stays
    within the bound in (well over) 95 % of draws."""
    rng = np.random.default_rng(4)
    kept = 0
    trials = 40
    for _ in range(trials):
        cal = calibrate(*_sample(5_000, rng), bound)
        assert cal.threshold is not None
        scores, correct = _sample(200_000, rng)
        served = scores >= cal.threshold
        kept += (~correct[served]).mean() <= bound
    assert kept >= 0.9 * trials


@pytest.mark.parametrize("bound", [0.01, 0.05, 0.3])
def test_the_fast_search_picks_what_testing_every_threshold_picks(bound: float) -> None:
    """calibrate tests one threshold per run of equal wrong counts; testing every distinct score
    with the Clopper-Pearson bound itself, in the same fixed sequences, picks the same one."""
    rng = np.random.default_rng(7)
    for n in (0, 40, 900, 6000):
        correct = rng.random(n) < 0.7
        scores = np.round(np.where(correct, rng.beta(8, 1.5, n), rng.beta(1.5, 5, n)), 3)
        cal = calibrate(scores, correct, bound)
        each = 1 - (1 - CONFIDENCE) / 3
        order = np.argsort(-scores, kind="stable")
        s, wrong = scores[order], np.cumsum(~correct[order])
        ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if n else np.array([], int)
        bounds = upper_bounds(wrong[ends], ends + 1, each)
        best = None
        for slack in (0.0, 0.5, 0.75):
            start = _sequence_start(bound, slack, each)
            for i in np.flatnonzero(ends + 1 >= start):
                if bounds[i] > bound:
                    break
                if best is None or ends[i] + 1 > ends[best] + 1:
                    best = i
        assert cal.threshold == (None if best is None else s[ends[best]])
        if best is not None:
            assert cal.served == ends[best] + 1 and cal.promised_bound == bounds[best] <= bound

"""The verifier's default gate and threshold, derived from the held-back scores in its card
(stratacache.operating_point), checked against a brute-force reading of the same definition,
and served by a real server from a real card: GetPolicy says where they came from, flags
override them, and lookups compare the same decision score the card's curve is in."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratacache import operating_point
from stratacache.operating_point import GATE_RECALL_COST, GATE_STEP, MIN_SERVED, choose
from stratacache.verify import HeldBack, Verifier

STORED = "How do I reset my account password?"
PARAPHRASE = "How can I reset the password of my account?"
FUSION = {"intercept": -6.0, "cosine": 6.0, "verifier_logit": 1.0}


def _held_back(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(duplicate, cosine, verifier probability) of ``n`` synthetic pairs where both scores
    carry some signal: duplicates have higher cosines and verifier scores on average."""
    rng = np.random.default_rng(seed)
    duplicate = rng.random(n) < 0.4
    cosine = np.clip(0.80 + 0.08 * duplicate + rng.normal(0, 0.07, n), -1, 1)
    logit = 1.5 * duplicate - 0.75 + rng.normal(0, 1.2, n)
    return duplicate, cosine, 1 / (1 + np.exp(-logit))


def _brute_threshold(score: np.ndarray, duplicate: np.ndarray, eligible: np.ndarray,
                     target: float) -> float | None:
    """The definition, read literally: of the thresholds (each a pair's score) serving at least
    MIN_SERVED pairs at precision >= target, the one serving the most duplicates (the strictest
    of equals)."""
    best: tuple[int, float] | None = None
    for t in sorted({float(s) for s in score[eligible]}, reverse=True):
        served = eligible & (score >= t)
        right = int((served & duplicate).sum())
        if served.sum() >= MIN_SERVED and right >= target * served.sum():
            if best is None or right > best[0]:
                best = (right, t)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_threshold_is_the_loosest_that_beats_the_cosine_default_by_the_margin(seed: int) -> None:
    duplicate, cosine, score = _held_back(seed)
    point = choose(HeldBack("calibrate", duplicate, cosine, score, "verifier"),
                   min_similarity=0.9)
    target = duplicate[cosine >= 0.9].mean() + operating_point.PRECISION_MARGIN
    eligible = cosine >= 0.0
    assert point.threshold == _brute_threshold(score, duplicate, eligible, target)
    assert point.source == "verifier_card"
    # the gate: the highest on the grid costing at most GATE_RECALL_COST of recall
    at = score >= point.threshold
    ungated = (at & duplicate).sum() / duplicate.sum()

    def cost(g: float) -> float:
        return ungated - (at & (cosine >= g) & duplicate).sum() / duplicate.sum()

    assert cost(point.gate) <= GATE_RECALL_COST + 1e-12
    assert point.gate + GATE_STEP > 1 or cost(round(point.gate + GATE_STEP, 2)) > GATE_RECALL_COST
    assert "held-back" in point.explanation and "recall against no gate" in point.explanation


def test_a_gate_set_by_flag_is_applied_before_the_threshold_is_chosen() -> None:
    duplicate, cosine, score = _held_back(7)
    point = choose(HeldBack("calibrate", duplicate, cosine, score, "verifier"),
                   min_similarity=0.9, gate=0.85)
    target = duplicate[cosine >= 0.9].mean() + operating_point.PRECISION_MARGIN
    assert point.gate == 0.85
    assert point.threshold == _brute_threshold(score, duplicate, cosine >= 0.85, target)


def test_a_threshold_set_by_flag_is_kept_and_the_gate_derived_for_it() -> None:
    duplicate, cosine, score = _held_back(8)
    point = choose(HeldBack("calibrate", duplicate, cosine, score, "verifier"),
                   min_similarity=0.9, threshold=0.3)
    assert point.threshold == 0.3 and point.source == "verify_threshold"
    assert "--verify-threshold" in point.explanation


def test_without_held_back_scores_the_built_in_defaults_say_why() -> None:
    point = choose(None, min_similarity=0.95)
    assert (point.gate, point.threshold, point.source) == (0.80, 0.90, "built_in")
    assert "no held-back scores" in point.explanation
    assert "stratacache tune" in point.explanation
    kept = choose(None, min_similarity=0.95, gate=0.6, threshold=0.7)
    assert (kept.gate, kept.threshold, kept.source) == (0.6, 0.7, "verify_threshold")


def test_too_few_pairs_to_compare_with_fall_back_to_the_built_in_defaults() -> None:
    duplicate, cosine, score = _held_back(9, n=40)
    point = choose(HeldBack("calibrate", duplicate, cosine, score, "verifier"),
                   min_similarity=0.99)
    assert point.source == "built_in" and "too few" in point.explanation


# --- a real card, a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def carded(verifier_folder: Path, encoder, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A verifier folder whose card has a fusion for this embedder and 600 held-back pairs; its
    fusion metrics carry a logit threshold (2.5) that must never be served as a probability."""
    folder = tmp_path_factory.mktemp("carded") / "verifier"
    shutil.copytree(verifier_folder, folder)
    duplicate, cosine, probability = _held_back(11)
    (folder / "stratacache-card.json").write_text(json.dumps({
        "base": {"name": "all-MiniLM-L6-v2", "fingerprint": encoder.identity.fingerprint},
        "score_both_orders": False,
        "metrics": {
            "fusion_with_base_cosine": {"weights": FUSION,
                                        "metrics": {"threshold_at_precision_0.90": 2.5}},
            "held_back": {"part": "calibrate", "duplicate": duplicate.astype(int).tolist(),
                          "base_cosine": cosine.round(6).tolist(),
                          "verifier": probability.round(6).tolist()}}}))
    return folder


def _expected(folder: Path, min_similarity: float) -> tuple[float, float]:
    """The threshold and gate computed by hand from the card: each pair's fused probability
    sigmoid(intercept + cosine * cos + verifier_logit * logit(p)), then the definitions."""
    held = json.loads((folder / "stratacache-card.json").read_text())["metrics"]["held_back"]
    duplicate = np.asarray(held["duplicate"], dtype=bool)
    cosine = np.asarray(held["base_cosine"])
    fused = np.asarray([1 / (1 + math.exp(-(FUSION["intercept"] + FUSION["cosine"] * c
                                            + FUSION["verifier_logit"] * math.log(p / (1 - p)))))
                        for c, p in zip(cosine, held["verifier"])])
    target = duplicate[cosine >= min_similarity].mean() + operating_point.PRECISION_MARGIN
    threshold = _brute_threshold(fused, duplicate, cosine >= 0.0, target)
    assert threshold is not None
    point = choose(HeldBack("calibrate", duplicate, cosine, fused, "verifier"),
                   min_similarity=min_similarity)
    return threshold, point.gate


def test_the_server_derives_its_defaults_from_the_card_in_probabilities(
        carded: Path, encoder, start_server) -> None:  # type: ignore[no-untyped-def]
    verifier = Verifier(carded, device="cpu", embedder=encoder.identity)
    assert verifier.identity.fused
    threshold, gate = _expected(carded, 0.9)
    assert 0.0 < threshold < 1.0
    server = start_server({"verifier": verifier}, min_similarity=0.9)
    with server.client() as c:
        policy = c.get_policy("fresh")
        assert policy["threshold_source"] == "verifier_card"
        assert policy["threshold"] == pytest.approx(threshold, abs=1e-6)  # not sigmoid(2.5)
        assert policy["gate"] == pytest.approx(gate)
        assert "from the verifier's card" in policy["message"]
        assert "held-back" in policy["message"]

        # the lookup compares the same decision score: served exactly when it reaches it
        c.store(STORED, "answer")
        result = c.lookup(PARAPHRASE)
        expected = float(verifier.score([(PARAPHRASE, STORED, result.similarity
                                          if result.hit else result.best_similarity)])[0])
        assert result.verifier_score == pytest.approx(expected, abs=1e-4)
        assert result.hit == (expected >= policy["threshold"])
        if not result.hit:
            assert result.miss_reason == "rejected_by_verifier"


def test_flags_override_the_card_and_getpolicy_says_so(carded: Path, encoder,
                                                       start_server) -> None:  # type: ignore[no-untyped-def]
    verifier = Verifier(carded, device="cpu", embedder=encoder.identity)
    server = start_server({"verifier": verifier}, min_similarity=0.9, verify_threshold=1.0,
                          verify_gate=0.7)
    with server.client() as c:
        policy = c.get_policy("fresh")
        assert policy["threshold_source"] == "verify_threshold"
        assert policy["threshold"] == 1.0 and policy["gate"] == pytest.approx(0.7)
        c.store(STORED, "answer")
        miss = c.lookup(PARAPHRASE)  # no decision score reaches 1.0 (sigmoid < 1)
        assert not miss.hit and miss.miss_reason == "rejected_by_verifier"
        assert miss.verifier_score is not None and 0.0 <= miss.verifier_score < 1.0


def test_a_card_without_held_back_scores_serves_the_built_in_defaults(
        verifier, start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server({"verifier": verifier})
    with server.client() as c:
        policy = c.get_policy("fresh")
        assert policy["threshold_source"] == "built_in"
        assert policy["threshold"] == pytest.approx(0.9) and policy["gate"] == pytest.approx(0.8)
        assert "re-run `stratacache tune`" in policy["message"]
        c.set_policy("plain", verify=False)
        assert c.get_policy("plain")["threshold_source"] == "min_similarity"
        c.set_policy("own", verify=False, min_similarity=0.97)
        assert c.get_policy("own")["threshold_source"] == "policy"


def test_malformed_held_back_scores_are_refused(verifier_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(verifier_folder, folder)
    (folder / "stratacache-card.json").write_text(json.dumps({"metrics": {"held_back": {
        "duplicate": [1, 0, 1], "base_cosine": [0.9, 0.8], "verifier": [0.5, 1.5, 0.2]}}}))
    assert Verifier(folder, device="cpu").held_back() is None  # the server falls back, logged


def test_the_verifier_reads_pairs_in_the_cards_order(verifier_folder: Path) -> None:
    """tune measures (stored, lookup) = (a, b): the server scores that order too, so a card's
    one-order metrics describe what it serves."""
    from sentence_transformers import CrossEncoder

    verifier = Verifier(verifier_folder, device="cpu")
    model = CrossEncoder(str(verifier_folder), device="cpu", local_files_only=True)
    served = float(verifier.score([(PARAPHRASE, STORED, 0.9)])[0])
    assert served == pytest.approx(float(model.predict([(STORED, PARAPHRASE)])[0]), abs=1e-5)

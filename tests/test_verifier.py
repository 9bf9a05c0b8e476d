"""The verification stage and miss reasons, through a real server: a real cross-encoder scores
(lookup prompt, stored prompt) pairs before a semantic hit is served."""

from __future__ import annotations

import numpy as np
import pytest

from stratacache import Client
from stratacache.client import InvalidArgumentError
from stratacache.errors import InvalidArgument

STORED = "How do I reset my account password?"
PARAPHRASE = "How can I reset the password of my account?"


def test_verifier_scores_every_semantic_hit(start_server, verifier) -> None:  # type: ignore[no-untyped-def]
    server = start_server({"verifier": verifier}, verify_gate=0.7, verify_threshold=0.0)
    with server.client() as c:
        c.store(STORED, "answer")
        hit = c.lookup(PARAPHRASE)
        assert hit.hit and hit.tier == "hot"
        assert hit.verifier_score is not None and 0.0 <= hit.verifier_score <= 1.0
        # the score is the model's own for this pair (symmetry off: one order)
        assert hit.verifier_score == pytest.approx(
            float(verifier.score([(PARAPHRASE, STORED, hit.similarity)])[0]), abs=1e-4)
        exact = c.lookup(STORED)  # exact hits need no verification
        assert exact.hit and exact.tier == "exact" and exact.verifier_score is None
        stats = c.stats()
        assert stats["verifier"] and stats["verify_pairs"] >= 1
        assert stats["stages"]["verify"]["count"] >= 1


def test_verifier_rejection_is_a_miss_with_its_reason(start_server, verifier) -> None:  # type: ignore[no-untyped-def]
    server = start_server({"verifier": verifier}, verify_gate=0.7, verify_threshold=1.0)
    with server.client() as c:
        c.store(STORED, "answer")
        miss = c.lookup(PARAPHRASE)
        assert not miss.hit and miss.miss_reason == "rejected_by_verifier"
        assert miss.best_similarity >= 0.7


def test_verification_is_optional_per_namespace(start_server, verifier) -> None:  # type: ignore[no-untyped-def]
    server = start_server({"verifier": verifier}, verify_gate=0.7, verify_threshold=1.0,
                          min_similarity=0.7)
    with server.client() as c:
        c.store(STORED, "answer", namespace="plain")
        status = c.set_policy("plain", verify=False)
        assert status["verifier_on"] is False
        hit = c.lookup(PARAPHRASE, namespace="plain")  # cosine decides, as without a verifier
        assert hit.hit and hit.verifier_score is None


def test_verify_without_a_verifier_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="--verifier"):
        client.set_policy("default", verify=True)


def test_miss_reasons(client: Client, namespace: str) -> None:
    assert client.lookup(PARAPHRASE, namespace=namespace).miss_reason == "no_candidate"
    client.store(STORED, "answer", namespace=namespace, scope={"model": "a"})
    far = client.lookup("What is the boiling point of water at sea level?", namespace=namespace,
                        scope={"model": "a"})
    assert not far.hit and far.miss_reason == "below_similarity"
    other = client.lookup(STORED, namespace=namespace, scope={"model": "b"})
    assert not other.hit and other.miss_reason == "other_scope"
    long_prompt = "word " * 2000
    assert client.lookup(long_prompt, namespace=namespace).miss_reason == "too_long"
    assert client.lookup(STORED, namespace=namespace, scope={"model": "a"}).miss_reason == ""


def test_card_fusion_applies_only_with_its_own_embedder(verifier_folder, encoder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A tuned verifier's card may fuse the embedder's cosine with the verifier's logit; the
    weights belong to the card's base model, so another embedder gets the plain score."""
    import json
    import math
    import shutil

    from stratacache.embed import ModelIdentity
    from stratacache.verify import Verifier

    folder = tmp_path / "fused"
    shutil.copytree(verifier_folder, folder)
    weights = {"intercept": -4.0, "cosine": 5.0, "verifier_logit": 0.5}
    (folder / "stratacache-card.json").write_text(json.dumps({
        "base": {"name": "all-MiniLM-L6-v2", "fingerprint": encoder.identity.fingerprint},
        "score_both_orders": False,
        "metrics": {"fusion_with_base_cosine": {"weights": weights}}}))
    plain = Verifier(verifier_folder, device="cpu")
    fused = Verifier(folder, device="cpu", embedder=encoder.identity)
    other = Verifier(folder, device="cpu", embedder=ModelIdentity("other", 384, "f" * 32))
    assert fused.identity.fused and not other.identity.fused
    assert fused.identity.scorer != other.identity.scorer  # evidence is re-scored on change
    item = (PARAPHRASE, STORED, 0.9)
    raw = float(plain.score([item])[0])
    z = -4.0 + 5.0 * 0.9 + 0.5 * math.log(raw / (1 - raw))
    assert float(fused.score([item])[0]) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-5)
    assert float(other.score([item])[0]) == pytest.approx(raw, abs=1e-6)


def test_int8_verifier_scores_close_to_full_precision(verifier_folder) -> None:  # type: ignore[no-untyped-def]
    import torch

    from stratacache.verify import Verifier

    full = Verifier(verifier_folder, device="cpu")
    small = Verifier(verifier_folder, device="cpu", quantize="int8")
    assert small.quantized and small.identity.scorer != full.identity.scorer
    assert not any(type(m) is torch.nn.Linear for m in small._model.model.modules())
    items = [(PARAPHRASE, STORED, 0.9), ("What is a cat?", "How do engines work?", 0.1)]
    assert np.allclose(small.score(items), full.score(items), atol=0.05)
    with pytest.raises(InvalidArgument, match="none or int8"):
        Verifier(verifier_folder, device="cpu", quantize="fp16")

"""Per-namespace wrong-hit bounds calibrated on labelled evidence, and feedback, through a real
server, real model and real files."""

from __future__ import annotations

import pytest

from stratacache import Client
from stratacache.client import InvalidArgumentError, NotFoundError

from .data import qqp_pairs

STORED = "How do I reset my account password?"
PARAPHRASE = "How can I reset the password of my account?"
OTHER_PARAPHRASE = "Where is the reset password link for my account?"  # cosine 0.81 to PARAPHRASE


def _evidence(n: int, skip: int = 0) -> list[tuple[str, str, bool]]:
    return [(p.a, p.b, p.duplicate) for p in qqp_pairs(skip + n)[skip:]]


def test_bound_without_evidence_serves_exact_hits_only(client: Client, namespace: str) -> None:
    client.store(STORED, "answer", namespace=namespace)
    status = client.set_policy(namespace, max_wrong_rate=0.05)
    assert status["threshold"] is None and status["bound"] == pytest.approx(0.05)
    assert "not enough evidence" in status["message"]
    miss = client.lookup(PARAPHRASE, namespace=namespace)
    assert not miss.hit and miss.miss_reason == "uncalibrated"
    assert client.lookup(STORED, namespace=namespace).tier == "exact"


def test_thin_evidence_gives_a_stricter_threshold(client: Client, namespace: str) -> None:
    """The same bound on more evidence of the same kind allows a looser threshold (or any at
    all): with little evidence the server stays conservative."""
    client.set_policy(namespace, max_wrong_rate=0.2)
    thin = client.add_evidence(namespace, _evidence(200))["policy"]
    rich = client.add_evidence(namespace, _evidence(1300, skip=200))["policy"]
    assert rich["evidence"] == 1500
    thin_threshold = 1.0 if thin["threshold"] is None else thin["threshold"]
    assert rich["threshold"] is not None and rich["threshold"] < thin_threshold
    assert rich["promised_bound"] <= 0.2 and rich["served"] > thin["served"]
    assert 0 < rich["hit_rate"] <= 1
    # the served wrong rate on the evidence matches what the threshold claims
    assert rich["wrong"] / rich["served"] <= rich["promised_bound"]


def test_evidence_is_per_namespace_and_survives_restart(start_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with server.client() as c:
        c.set_policy("a", max_wrong_rate=0.2)
        c.add_evidence("a", _evidence(1000))
        before = c.get_policy("a")
        assert c.get_policy("b")["evidence"] == 0
    server.stop()
    again = start_server()
    with again.client() as c:
        after = c.get_policy("a")
        assert after["evidence"] == 1000 and after["threshold"] == pytest.approx(before["threshold"])
        assert after["bound"] == pytest.approx(0.2)


def test_evidence_is_rescored_when_the_verifier_changes(start_server, verifier) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    with server.client() as c:
        c.add_evidence("ns", _evidence(40))
    server.stop()
    with_verifier = start_server({"verifier": verifier})
    with with_verifier.client() as c:
        status = c.set_policy("ns", max_wrong_rate=0.5)
        assert status["verifier_on"] and status["evidence"] == 40
    rows = with_verifier.engine.policies.stale_rows()
    assert rows == []  # every row now carries this verifier's score


def test_policy_values_are_checked(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="max_wrong_rate"):
        client.set_policy("default", max_wrong_rate=1.5)
    with pytest.raises(InvalidArgumentError, match="min_similarity"):
        client.set_policy("default", min_similarity=-0.1)
    with pytest.raises(InvalidArgumentError, match="no pairs"):
        client.add_evidence("default", [])
    with pytest.raises(InvalidArgumentError, match=r"pairs\[0\].a"):
        client.add_evidence("default", [("", "b", True)])


def test_wrong_feedback_vetoes_the_entry_for_that_neighbourhood(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(min_similarity=0.75, feedback_evict_after=3)
    with server.client() as c:
        entry = c.store(STORED, "answer", namespace="ns")
        hit = c.lookup(PARAPHRASE, namespace="ns")
        assert hit.hit and hit.entry_id == entry
        result = c.feedback(entry, PARAPHRASE, False, namespace="ns")
        assert not result["entry_deleted"] and result["policy"]["feedback_wrong"] == 1
        vetoed = c.lookup(PARAPHRASE, namespace="ns")
        assert not vetoed.hit and vetoed.miss_reason == "vetoed"
        # prompts far from the reported one still get the entry
        assert c.lookup(OTHER_PARAPHRASE, namespace="ns").hit
        assert c.lookup(STORED, namespace="ns").tier == "exact"
        stats = c.stats()["namespaces"]["ns"]
        assert stats["feedback_wrong"] == 1 and stats["evidence"] == 1 and stats["vetoed_entries"] == 1
        # right reports are evidence too, and change nothing served
        c.feedback(entry, OTHER_PARAPHRASE, True, namespace="ns")
        assert c.get_policy("ns")["feedback_correct"] == 1


def test_repeated_wrong_reports_delete_the_entry(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(min_similarity=0.7, feedback_evict_after=2)
    with server.client() as c:
        entry = c.store(STORED, "answer")
        assert not c.feedback(entry, PARAPHRASE, False)["entry_deleted"]
        assert c.feedback(entry, OTHER_PARAPHRASE, False)["entry_deleted"]
        assert c.lookup(STORED).miss_reason != ""
        with pytest.raises(NotFoundError):
            c.feedback(entry, PARAPHRASE, False)


def test_wrong_feedback_on_an_exact_hit_deletes_the_answer(client: Client) -> None:
    entry = client.store(STORED, "a wrong answer")
    assert client.feedback(entry, STORED, False)["entry_deleted"]
    assert not client.lookup(STORED).hit


def test_feedback_needs_the_entry_in_that_namespace(client: Client) -> None:
    entry = client.store(STORED, "answer", namespace="mine")
    with pytest.raises(NotFoundError, match="namespace 'yours'"):
        client.feedback(entry, PARAPHRASE, False, namespace="yours")
    with pytest.raises(InvalidArgumentError, match="entry_id"):
        client.feedback("not-an-id", PARAPHRASE, False)


def test_feedback_survives_restart(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(min_similarity=0.75)
    with server.client() as c:
        entry = c.store(STORED, "answer")
        c.feedback(entry, PARAPHRASE, False)
    server.stop()
    again = start_server(min_similarity=0.75)
    with again.client() as c:
        assert c.lookup(PARAPHRASE).miss_reason == "vetoed"

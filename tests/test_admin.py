"""Each admin call removes what it names, and nothing else; what an entry was stored with comes
back with its hits."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratacache import Client, InvalidArgumentError

PROMPTS = ["How do I reset my password?", "How can I change my email address?",
           "What payment methods do you accept?", "How do I cancel my subscription?"]


def _fill(client: Client, namespace: str) -> dict[str, str]:
    """Stores each prompt in several contexts; returns a label -> entry id map."""
    ids = {}
    for i, prompt in enumerate(PROMPTS):
        ids[f"t1v1-{i}"] = client.store(prompt, "a", namespace=namespace, template_id="t1",
                                        template_version="v1", user_id="alice")
        ids[f"t1v2-{i}"] = client.store(prompt, "b", namespace=namespace, template_id="t1",
                                        template_version="v2", user_id="bob")
        ids[f"t2-{i}"] = client.store(prompt, "c", namespace=namespace, template_id="t2",
                                      user_id="alice")
        ids[f"plain-{i}"] = client.store(prompt, "d", namespace=namespace)
    return ids


def _present(client: Client, namespace: str) -> set[str]:
    """Which (template, version) contexts still answer each prompt exactly."""
    found = set()
    for i, prompt in enumerate(PROMPTS):
        for label, kwargs in (("t1v1", dict(template_id="t1", template_version="v1")),
                              ("t1v2", dict(template_id="t1", template_version="v2")),
                              ("t2", dict(template_id="t2")), ("plain", {})):
            if client.lookup(prompt, namespace=namespace, **kwargs).hit:
                found.add(f"{label}-{i}")
    return found


def test_invalidate_template_version(client: Client, namespace: str) -> None:
    ids = _fill(client, namespace)
    assert client.invalidate_template("t1", namespace=namespace, version="v1") == 4
    assert _present(client, namespace) == {k for k in ids if not k.startswith("t1v1")}


def test_invalidate_template_all_versions(client: Client, namespace: str) -> None:
    ids = _fill(client, namespace)
    _fill(client, namespace + "-other")
    assert client.invalidate_template("t1", namespace=namespace) == 8
    assert _present(client, namespace) == {k for k in ids if not k.startswith("t1")}
    assert _present(client, namespace + "-other") == set(ids)


def test_invalidate_namespace(client: Client, namespace: str) -> None:
    ids = _fill(client, namespace)
    _fill(client, namespace + "-other")
    assert client.invalidate_namespace(namespace) == len(ids)
    assert _present(client, namespace) == set()
    assert _present(client, namespace + "-other") == set(ids)
    assert client.invalidate_namespace(namespace) == 0


def test_delete_entry(client: Client, namespace: str) -> None:
    ids = _fill(client, namespace)
    assert client.delete_entry(ids["plain-2"]) is True
    assert _present(client, namespace) == set(ids) - {"plain-2"}
    assert client.delete_entry(ids["plain-2"]) is False  # NOT_FOUND becomes False
    with pytest.raises(InvalidArgumentError, match="32 lowercase hex"):
        client.delete_entry("not-an-id")


def test_delete_user(client: Client, namespace: str) -> None:
    ids = _fill(client, namespace)
    _fill(client, namespace + "-other")
    assert client.delete_user("alice", namespace=namespace) == 8
    assert _present(client, namespace) == {k for k in ids if k.startswith(("t1v2", "plain"))}
    assert _present(client, namespace + "-other") == set(ids)
    assert client.delete_user("bob") == 8  # every namespace
    assert _present(client, namespace + "-other") == {
        k for k in ids if k.startswith(("t1v1", "t2", "plain"))}


def test_stats_reports_counts(client: Client, namespace: str) -> None:
    _fill(client, namespace)
    client.lookup(PROMPTS[0], namespace=namespace)
    client.lookup("Something nobody asked before about volcano insurance", namespace=namespace)
    stats = client.stats()
    assert stats["stores"] == 16 and stats["lookups"] == 2
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["exact"]["hits"] == 1
    assert stats["hot"]["entries"] == 16 and stats["warm"]["entries"] == 16
    assert stats["dimension"] == 384 and stats["model"] == "all-MiniLM-L6-v2"
    assert stats["stages"]["embed"]["count"] >= 17
    assert stats["simd_isa"] in {"avx512", "avx2", "neon", "scalar"}


def test_delete_user_erases_the_evidence_their_entries_left(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Feedback on a user's entry becomes evidence rows holding the entry's prompt: DeleteUser
    erases them from evidence.sqlite3 and its write-ahead log, and drops the entry's vetoes."""
    marker = "quokka-zanzibar"

    def evidence_files() -> bytes:
        return b"".join(p.read_bytes() for p in (tmp_path / "data").glob("evidence.sqlite3*"))

    server = start_server(min_similarity=0.75)
    with server.client() as c:
        mine = c.store(f"How do I reset my {marker} account password?", "a", namespace="ns",
                       user_id="alice")
        theirs = c.store("How do I cancel my subscription?", "b", namespace="ns", user_id="bob")
        c.feedback(mine, f"How can I reset the password of my {marker} account?", False,
                   namespace="ns")
        c.feedback(theirs, "How can I end my subscription?", True, namespace="ns")
        assert c.get_policy("ns")["evidence"] == 2 and marker.encode() in evidence_files()
        assert c.stats()["namespaces"]["ns"]["vetoed_entries"] == 1

        assert c.delete_user("alice", namespace="ns") == 1
        status = c.get_policy("ns")
        assert status["evidence"] == 1 and status["feedback_wrong"] == 0
        assert c.stats()["namespaces"]["ns"]["vetoed_entries"] == 0
        assert marker.encode() not in evidence_files()


def test_metadata_comes_back_with_hits(client: Client, namespace: str) -> None:
    entry = client.store("How do I reset my password?", "a", namespace=namespace,
                         metadata={"source": "faq", "reviewed": "yes"})
    hit = client.lookup("How do I reset my password?", namespace=namespace)
    assert hit.entry_id == entry and hit.metadata == {"source": "faq", "reviewed": "yes"}
    assert client.lookup("Volcano insurance for hamsters?", namespace=namespace).metadata == {}

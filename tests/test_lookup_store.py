"""The gateway path: Store then Lookup, through a real server and the real model."""

from __future__ import annotations


from stratacache import Client

QUESTION = "How do I learn Python quickly?"
PARAPHRASE = "What is the fastest way to learn Python?"
UNRELATED = "What is the boiling point of water at sea level?"


def test_paraphrase_hits_and_unrelated_prompt_misses(client: Client, namespace: str) -> None:
    client.set_policy(namespace, min_similarity=0.8)
    entry_id = client.store(QUESTION, "Practice every day.", namespace=namespace)
    hit = client.lookup(PARAPHRASE, namespace=namespace)
    assert hit.hit
    assert hit.text == "Practice every day."
    assert hit.entry_id == entry_id
    assert hit.matched_prompt == QUESTION
    assert hit.tier == "hot"
    assert 0.8 <= hit.similarity < 1.0
    assert hit.age_s >= 0

    miss = client.lookup(UNRELATED, namespace=namespace)
    assert not miss.hit
    assert miss.response == b"" and miss.entry_id == "" and miss.tier == ""
    assert miss.best_similarity < 0.5


def test_exact_match_is_served_without_semantic_search(client: Client) -> None:
    client.store("  What is the capital of France?\n", b"Paris")
    result = client.lookup("What is the capital of France?")
    assert result.hit and result.tier == "exact" and result.similarity == 1.0
    assert result.response == b"Paris"


def test_default_threshold_rejects_a_near_miss(client: Client) -> None:
    client.store("Why did India attack Pakistan?", "...")
    assert not client.lookup("Did Pakistan attack India?").hit


def test_store_replaces_entry_with_same_exact_key(client: Client) -> None:
    client.set_policy("default", min_similarity=0.8)
    first = client.store(QUESTION, "old answer")
    second = client.store(QUESTION, "new answer")
    assert first != second
    result = client.lookup(QUESTION)
    assert result.text == "new answer" and result.entry_id == second
    assert client.lookup(PARAPHRASE).entry_id == second
    assert client.stats()["hot"]["entries"] == 1


def test_a_store_after_a_missed_lookup_does_not_embed_the_prompt_again(
        client: Client, namespace: str) -> None:
    """A gateway looks up, misses, calls the model, stores: one embedding, not two."""
    prompt = "Which rivers flow through Vienna?"
    before = client.stats()["embed_texts"]
    assert not client.lookup(prompt, namespace=namespace).hit
    client.store(prompt, "The Danube and the Wien.", namespace=namespace)
    assert client.stats()["embed_texts"] == before + 1
    assert client.lookup("What rivers flow through Vienna?", namespace=namespace).hit
    # a store nobody looked up first still embeds its prompt
    client.store("Which rivers flow through Prague?", "The Vltava.", namespace=namespace)
    assert client.stats()["embed_texts"] == before + 3

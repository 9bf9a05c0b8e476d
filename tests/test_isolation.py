"""Isolation is correctness: an answer is only served in the context it was made for."""

from __future__ import annotations

import asyncio

from stratacache import AsyncClient, Client

QUESTION = "How do I learn Python quickly?"
PARAPHRASE = "What is the fastest way to learn Python?"
GPT = {"model": "gpt-4o", "temperature": "0"}


def test_other_namespace_never_hits(client: Client) -> None:
    for namespace in ("team-a", "team-b"):  # an admin's floor of 0: any candidate would be served
        client.set_policy(namespace, min_similarity=0.0)
    client.store(QUESTION, "a", namespace="team-a")
    assert client.lookup(QUESTION, namespace="team-a").hit
    assert not client.lookup(QUESTION, namespace="team-b").hit
    assert not client.lookup(PARAPHRASE, namespace="team-b", min_similarity=0.0).hit


def test_other_scope_never_hits(client: Client, namespace: str) -> None:
    client.set_policy(namespace, min_similarity=0.0)
    client.store(QUESTION, "gpt answer", namespace=namespace, scope=GPT)
    for scope in ({}, {"model": "gpt-4o"}, {**GPT, "temperature": "0.7"},
                  {**GPT, "system": "You are a pirate."}):
        assert not client.lookup(QUESTION, namespace=namespace, scope=scope).hit, scope
        assert not client.lookup(PARAPHRASE, namespace=namespace, scope=scope,
                                 min_similarity=0.0).hit, scope
    same = client.lookup(QUESTION, namespace=namespace, scope=dict(reversed(GPT.items())))
    assert same.hit and same.text == "gpt answer"


def test_template_version_must_match(client: Client, namespace: str) -> None:
    client.set_policy(namespace, min_similarity=0.0)
    client.store(QUESTION, "v1 answer", namespace=namespace, template_id="faq",
                 template_version="v1")
    assert client.lookup(QUESTION, namespace=namespace, template_id="faq",
                         template_version="v1").hit
    assert not client.lookup(QUESTION, namespace=namespace, template_id="faq",
                             template_version="v2").hit
    assert not client.lookup(PARAPHRASE, namespace=namespace, template_id="faq",
                             template_version="v2", min_similarity=0.0).hit
    assert not client.lookup(QUESTION, namespace=namespace).hit  # no template: another context
    assert not client.lookup(QUESTION, namespace=namespace, template_id="other",
                             template_version="v1").hit


def test_scope_filter_costs_no_recall(server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    """A paraphrase stored under scope S is found under S even when a thousand prompts closer
    to the query (the query itself) sit under other scopes."""

    async def fill() -> None:
        # 1,000 Stores take several seconds of embedding on 2 cores: more than the default 10 s
        # store deadline leaves on a busy machine. This test is about recall.
        async with AsyncClient(server.target, timeout=120) as c:
            await c.store(QUESTION, "under S", namespace=namespace, scope={"conv": "S"})
            in_flight = asyncio.Semaphore(64)  # within the embedding queue's bound

            async def store(i: int) -> None:
                async with in_flight:
                    await c.store(PARAPHRASE, f"other {i}", namespace=namespace,
                                  scope={"conv": f"o{i}"})

            await asyncio.gather(*(store(i) for i in range(1000)))

    asyncio.run(fill())
    with server.client() as c:
        c.set_policy(namespace, min_similarity=0.7)
        result = c.lookup(PARAPHRASE, namespace=namespace, scope={"conv": "S"},
                          min_similarity=0.7)
        assert result.hit and result.text == "under S" and result.tier == "hot"
        assert c.lookup(PARAPHRASE, namespace=namespace, scope={"conv": "o7"}).text == "other 7"

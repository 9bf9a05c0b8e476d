"""The public client API: its exports, the asyncio twin, and what a hit carries."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

import stratacache
from stratacache import AsyncClient, Client, LookupResult

ERRORS = ["DeadlineExceededError", "InvalidArgumentError", "NotFoundError", "OverloadedError",
          "PermissionDeniedError", "RateLimitedError", "ServerError", "StorageFullError",
          "UnauthenticatedError", "UnavailableError"]


def test_public_exports() -> None:
    assert sorted(stratacache.__all__) == sorted([
        "AsyncClient", "Client", "LookupResult", "StratacacheError", "Timeout", "__version__",
        *ERRORS])
    assert sorted(stratacache.client.__all__) == sorted(
        n for n in stratacache.__all__ if n != "__version__")
    for name in stratacache.__all__:
        assert getattr(stratacache, name) is not None
    for name in ERRORS:
        assert issubclass(getattr(stratacache, name), stratacache.StratacacheError)


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_async_client_has_every_method_of_the_sync_one() -> None:
    assert _public(Client) == _public(AsyncClient)

    async def check() -> None:
        async with AsyncClient("127.0.0.1:1") as a:
            with Client("127.0.0.1:1") as c:
                for name in _public(Client) - {"close"}:
                    sync, awaited = getattr(c, name), getattr(a, name)
                    assert sync.__doc__ and sync.__doc__ == awaited.__doc__, name
                    assert inspect.signature(sync) == inspect.signature(awaited), name
                    assert "self" not in inspect.signature(sync).parameters, name
                    assert not inspect.iscoroutinefunction(sync), name
                    assert inspect.iscoroutinefunction(awaited), name

    asyncio.run(check())


def test_async_client_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        AsyncClient("127.0.0.1:1")


def test_async_client_round_trip(server) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[LookupResult, LookupResult, int, bool, dict]:
        async with AsyncClient(server.target) as c:
            entry_id = await c.store("Where is the Eiffel Tower?", b"Paris", namespace="geo",
                                     user_id="u", template_id="t", template_version="1")
            hit = await c.lookup("Where is the Eiffel Tower?", namespace="geo", template_id="t",
                                 template_version="1")
            miss = await c.lookup("Where is the Eiffel Tower?", namespace="geo")
            removed = await c.invalidate_template("t", namespace="geo", version="1")
            deleted = await c.delete_entry(entry_id)
            stats = await c.stats()
            assert hit.entry_id == entry_id
            return hit, miss, removed, deleted, stats

    hit, miss, removed, deleted, stats = asyncio.run(scenario())
    assert hit.hit and hit.text == "Paris" and hit.tier == "exact"
    assert not miss.hit and removed == 1 and deleted is False
    assert stats["stores"] == 1 and stats["invalidated"] == 1


def test_add_evidence_in_batches_reports_progress(server,  # type: ignore[no-untyped-def]
                                                   namespace: str) -> None:
    pairs = [(f"What is {i} plus {i}?", f"How much is {i} plus {i}?", True)
             for i in range(stratacache.client.EVIDENCE_BATCH + 1)]
    sent: list[int] = []

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(server.target) as c:
            return await c.add_evidence(namespace, pairs, progress=sent.append)

    result = asyncio.run(scenario())
    assert sent == [stratacache.client.EVIDENCE_BATCH, 1]
    assert result["added"] + result["skipped"] == len(pairs)
    assert result["policy"]["evidence"] == result["added"]


def test_hit_returns_the_stored_metadata(client: Client, namespace: str) -> None:
    metadata = {"model": "gpt-test", "cost_usd": "0.0042"}
    client.store("Summarise the plot of Hamlet.", "A prince avenges his father.",
                 namespace=namespace, metadata=metadata)
    hit = client.lookup("Summarise the plot of Hamlet.", namespace=namespace)
    assert hit.hit and hit.metadata == metadata and type(hit.metadata) is dict
    miss = client.lookup("Name the capital of Peru.", namespace=namespace)
    assert not miss.hit and miss.metadata == {}
    hash(hit)  # still hashable: the metadata dict is left out of the hash


def test_health_needs_no_key_and_names_an_unknown_service(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_key="k" * 40)
    with server.client() as c:  # no key: health stays open, as load balancers ask it
        assert c.health() == "SERVING"
        assert c.health("stratacache.v1.SemanticCache") == "SERVING"
        assert c.health("stratacache.writes") == "SERVING"  # no shared store to lose
        with pytest.raises(stratacache.NotFoundError):
            c.health("no.such.Service")

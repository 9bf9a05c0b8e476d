"""The public client API: its exports and the asyncio twin."""

from __future__ import annotations

import asyncio

import stratacache
from stratacache import AsyncClient, LookupResult


def test_public_exports() -> None:
    assert sorted(stratacache.__all__) == sorted([
        "AsyncClient", "Client", "DeadlineExceededError", "InvalidArgumentError", "LookupResult",
        "NotFoundError", "OverloadedError", "ServerError", "StratacacheError", "Timeout",
        "UnauthenticatedError", "UnavailableError", "__version__"])
    for name in stratacache.__all__:
        assert getattr(stratacache, name) is not None
    for name in ("InvalidArgumentError", "NotFoundError", "OverloadedError",
                 "UnauthenticatedError", "UnavailableError", "DeadlineExceededError",
                 "ServerError"):
        assert issubclass(getattr(stratacache, name), stratacache.StratacacheError)


def test_async_client_has_every_method_of_the_sync_one() -> None:
    public = {n for n in dir(stratacache.Client) if not n.startswith("_")}
    assert public == {n for n in dir(AsyncClient) if not n.startswith("_")}


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

"""The clients' limits: message sizes, channel options, deadlines and typed errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from stratacache import (AsyncClient, Client, DeadlineExceededError, LookupResult,
                         OverloadedError, PermissionDeniedError, ServerError, StorageFullError,
                         StratacacheError)
from stratacache.client import _error
from stratacache.validation import MAX_RESPONSE_BYTES

LARGEST = bytes(range(256)) * (MAX_RESPONSE_BYTES // 256)


def test_largest_response_comes_back_whole(server,  # type: ignore[no-untyped-def]
                                           namespace: str) -> None:
    # The reply carries the response plus its other fields, so it is past gRPC's default 4 MiB
    # receive limit: the old client got RESOURCE_EXHAUSTED (OverloadedError) here.
    assert len(LARGEST) == MAX_RESPONSE_BYTES
    prompt = "Write the longest answer the cache keeps."
    with Client(server.target) as c:
        entry_id = c.store(prompt, LARGEST, namespace=namespace)
        hit = c.lookup(prompt, namespace=namespace)
    assert hit.hit and hit.tier == "exact" and hit.entry_id == entry_id
    assert hit.response == LARGEST

    async def lookup() -> LookupResult:
        # An unrelated option of the caller's keeps the default message limits.
        async with AsyncClient(server.target,
                               channel_options=[("grpc.primary_user_agent", "limits-test")]) as c:
            return await c.lookup(prompt, namespace=namespace)

    hit = asyncio.run(lookup())
    assert hit.hit and hit.tier == "exact" and hit.entry_id == entry_id
    assert hit.response == LARGEST


def test_channel_options_override_the_defaults(  # type: ignore[no-untyped-def]
        client: Client, server, namespace: str) -> None:
    client.store("A two kilobyte answer, please.", b"x" * 2048, namespace=namespace)
    with Client(server.target,
                channel_options=[("grpc.max_receive_message_length", 1024)]) as small:
        with pytest.raises(OverloadedError, match="RESOURCE_EXHAUSTED"):
            small.lookup("A two kilobyte answer, please.", namespace=namespace)


def test_timeout_zero_fails_at_once(server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    # 0 used to be read as "no timeout given" and replaced by the default. Each call is made
    # many times: gRPC alone, given a deadline of "now", still answers most of them.
    prompt = "What is two plus two?"
    with Client(server.target) as c:
        c.store(prompt, "4", namespace=namespace)
        for timeout in [0, 0.0, -1.0] * 20:
            with pytest.raises(DeadlineExceededError, match="give a positive timeout") as caught:
                c.lookup(prompt, namespace=namespace, timeout=timeout)
            assert caught.value.__cause__ is None  # failed here, never sent
        assert c.lookup(prompt, namespace=namespace).hit
    with Client(server.target, timeout=0) as c:
        with pytest.raises(DeadlineExceededError):
            c.stats()
        with pytest.raises(DeadlineExceededError):
            c.add_evidence(namespace, [("a", "b", True)])

    async def scenario() -> None:
        async with AsyncClient(server.target) as c:
            for _ in range(20):
                with pytest.raises(DeadlineExceededError):
                    await c.lookup(prompt, namespace=namespace, timeout=0)
            assert (await c.lookup(prompt, namespace=namespace)).hit

    asyncio.run(scenario())
    with Client(server.target) as c:
        assert c.stats()["lookups"] == 2  # only the two without timeout=0 reached the server


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK],
                         ids=lambda c: c.name)
def test_every_status_has_its_error(code: grpc.StatusCode) -> None:
    rpc_error = AioRpcError(code, Metadata(), Metadata(), details="what the server said")
    error = _error(rpc_error)
    assert isinstance(error, StratacacheError) and error.code is code
    assert str(error) == f"{code.name}: what the server said"
    expected = {grpc.StatusCode.FAILED_PRECONDITION: StorageFullError,
                grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError}.get(code)
    if expected is not None:
        assert type(error) is expected
    if type(error) is not ServerError:
        assert type(error).code is code

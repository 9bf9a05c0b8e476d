"""The embedder batches concurrent requests into one forward pass and bounds its queue."""

from __future__ import annotations

import asyncio

import numpy as np

from stratacache import AsyncClient, OverloadedError
from stratacache.embed import Encoder

QUESTIONS = [f"What is a good name for a pet number {i}?" for i in range(48)]


def test_vectors_are_normalised_and_dimensioned(encoder: Encoder) -> None:
    vectors = encoder.encode(["hello world", "a cache for language models"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert encoder.identity.dimension == 384 and len(encoder.identity.fingerprint) == 32


def test_concurrent_requests_share_forward_passes(server) -> None:  # type: ignore[no-untyped-def]
    async def burst() -> list:
        async with AsyncClient(server.target) as c:
            return await asyncio.gather(*(c.lookup(q) for q in QUESTIONS))

    results = asyncio.run(burst())
    assert len(results) == len(QUESTIONS) and not any(r.hit for r in results)
    with server.client() as c:
        stats = c.stats()
    assert stats["embed_texts"] == len(QUESTIONS)
    assert stats["embed_batches"] < len(QUESTIONS) / 2  # batched, not one pass per request


def test_full_queue_is_resource_exhausted(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(embed_max_batch=1, embed_max_queue=1)

    async def flood() -> list:
        async with AsyncClient(server.target) as c:
            return await asyncio.gather(*(c.store(q, "a") for q in QUESTIONS),
                                        return_exceptions=True)

    outcomes = asyncio.run(flood())
    rejected = [o for o in outcomes if isinstance(o, OverloadedError)]
    stored = [o for o in outcomes if isinstance(o, str)]
    assert rejected and stored and len(rejected) + len(stored) == len(QUESTIONS)
    assert "embedding queue is full" in str(rejected[0])
    with server.client() as c:
        stats = c.stats()
        assert stats["rejected_overload"] == len(rejected)
        assert stats["warm"]["entries"] == len(stored)  # rejected stores left nothing behind


def test_unavailable_device_is_a_clear_error() -> None:
    import pytest
    import torch

    from stratacache.embed import pick_device
    from stratacache.errors import InvalidArgument

    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidArgument, match="'cuda:99' is not available here"):
        pick_device("cuda:99")
    with pytest.raises(InvalidArgument, match="use auto, cpu, cuda or cuda:N"):
        pick_device("tpu")

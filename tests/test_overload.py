"""Overload through a real server: exact lookups stay served while the embedding queue is full,
and a semantic lookup whose deadline the queue cannot meet is refused at once.

The model is stopped deterministically: a task occupying the server's one model thread (every
embedding pass runs on it) keeps the pass in progress waiting until the test releases it, so the
embedding queue holds exactly what the test sent when it sends the next call. Conditions are
waited for, never durations; awaits have a generous timeout only as a safety net, so a call
that would wait forever fails the test instead of hanging it. Nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

from stratacache import AsyncClient, LookupResult, OverloadedError
from stratacache.batching import Batcher

from .conftest import RunningServer

SAFETY_NET_S = 120.0
T = TypeVar("T")
Call = asyncio.Task[LookupResult]


def _embedder(server: RunningServer) -> Batcher[str, object]:
    # The engine's embedding batcher is private; its queue depth is what these tests wait on.
    return server.engine._embedder


def _in_pass(server: RunningServer) -> int:
    """Calls the embedding consumer has taken off the queue for the pass in progress."""
    return len(_embedder(server)._held)


@contextmanager
def _model_held(server: RunningServer) -> Iterator[None]:
    """Occupies the server's model thread until the block ends: a pass that starts meanwhile
    waits for the thread, so it neither finishes nor takes more calls off the queue."""
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(SAFETY_NET_S)

    server.engine._model_thread.submit(hold)
    try:
        assert entered.wait(SAFETY_NET_S), "the model thread never became free"
        yield
    finally:
        gate.set()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Returns once ``condition()`` holds (polled); fails after the safety net."""
    give_up = time.monotonic() + SAFETY_NET_S
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def _client(server: RunningServer) -> AsyncIterator[tuple[AsyncClient, list[Call]]]:
    """An AsyncClient, and a list for the tasks of its calls. On exit the client is closed, which
    cancels the calls still running (so a failing test leaves none behind), and the tasks are
    awaited."""
    client = AsyncClient(server.target, timeout=SAFETY_NET_S)
    tasks: list[Call] = []
    try:
        yield client, tasks
    finally:
        await client.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _settle(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, SAFETY_NET_S)


def _semantic(i: int) -> str:
    """A prompt never stored (so it needs an embedding), distinct per ``i``."""
    return f"What happens to request number {i} when the cache is overloaded?"


async def _occupy_consumer(client: AsyncClient, server: RunningServer) -> Call:
    """With the model held, sends one semantic lookup and waits until the consumer has taken it
    into its pass: from then on the consumer takes nothing more off the queue."""
    first = asyncio.create_task(client.lookup(_semantic(-1)))
    await _until(lambda: _in_pass(server) == 1 and _embedder(server).queued == 0,
                 "the first semantic lookup to enter the held pass")
    return first


def test_exact_lookups_are_served_while_the_embedding_queue_is_full(
        start_server: Callable[..., RunningServer]) -> None:
    queue, flood = 8, 40
    server = start_server(embed_max_batch=1, embed_max_queue=queue)
    stored = {f"How do I reset my password, case {i}?": f"answer {i}".encode() for i in range(5)}
    with server.client() as c:
        for prompt, answer in stored.items():
            c.store(prompt, answer)

    async def scenario() -> None:
        async with _client(server) as (client, tasks):
            with _model_held(server):
                first = await _occupy_consumer(client, server)
                semantic = [asyncio.create_task(client.lookup(_semantic(i))) for i in range(flood)]
                tasks += [first, *semantic]
                # The consumer is stuck in its pass: exactly `queue` calls fit, the rest are
                # refused at once.
                await _until(lambda: _embedder(server).queued == queue
                             and sum(t.done() for t in semantic) == flood - queue,
                             "the flood to fill the embedding queue")
                exact = await _settle(asyncio.gather(
                    *(client.lookup(p) for p in list(stored) * 4)))
                # Answered while the model is still held: they needed no embedding, and did not
                # wait behind the full queue.
                for prompt, result in zip(list(stored) * 4, exact):
                    assert result.hit and result.tier == "exact", result
                    assert result.response == stored[prompt]
            outcomes = await _settle(asyncio.gather(first, *semantic, return_exceptions=True))
        for outcome in outcomes:
            assert isinstance(outcome, (LookupResult, OverloadedError)), repr(outcome)
        refused = [o for o in outcomes if isinstance(o, OverloadedError)]
        assert len(refused) == flood - queue
        assert all("queue is full" in str(o) and "--embed-max-queue" in str(o) for o in refused)

    asyncio.run(scenario())


def test_a_lookup_whose_deadline_the_queue_cannot_meet_is_refused_at_once(
        start_server: Callable[..., RunningServer]) -> None:
    """Behind K queued calls and one-text passes, the server estimates a wait of K mean passes;
    a lookup whose timeout is half of that is refused, without waiting for any pass.

    The timeout is not tiny: a tiny one would race the client's own deadline (DEADLINE_EXCEEDED
    before the refusal arrives). Instead the backlog is sized from the measured pass time so
    that the estimated wait is twice a comfortable timeout."""
    server = start_server(embed_max_batch=1, embed_max_queue=10_000,
                          max_concurrent_rpcs=10_000)
    with server.client() as c:
        for i in range(3):  # passes to measure
            c.lookup(_semantic(10_000 + i), timeout=SAFETY_NET_S)
    mean_s = _embedder(server).pass_timer.mean_s
    assert mean_s is not None and mean_s > 0
    # About 10 s of estimated wait; at most 900 calls, below the 1000 calls gRPC core holds
    # before the application takes them (past that it cancels arriving calls at random).
    backlog = min(900, math.ceil(2 * 5.0 / mean_s))
    timeout_s = backlog * mean_s / 2

    async def scenario() -> str:
        # Exits in reverse: the client is closed, cancelling the backlog (no need for its
        # passes), then the model is released; the server drops the cancelled calls before
        # this loop closes (gRPC core would otherwise deliver their events to a closed loop).
        with _model_held(server):
            async with _client(server) as (client, tasks):
                tasks.append(await _occupy_consumer(client, server))
                tasks += [asyncio.create_task(client.lookup(_semantic(i)))
                          for i in range(backlog - 1)]
                await _until(lambda: _embedder(server).queued == backlog - 1,
                             "the backlog to queue")
                assert not any(t.done() for t in tasks)
                # Estimated wait: `backlog` passes of mean_s (none can finish meanwhile, so
                # the estimate stays put), twice the call's whole timeout. Answered while
                # the model is held: refused without waiting for any pass.
                try:
                    await _settle(client.lookup("Is this lookup refused at once?",
                                                timeout=timeout_s))
                except OverloadedError as exc:
                    refusal = str(exc)
                else:
                    raise AssertionError("a lookup the queue cannot reach in time was served")
                assert _embedder(server).queued == backlog - 1  # it was never queued
        await _until(lambda: _embedder(server).queued == 0 and _in_pass(server) == 0,
                     "the cancelled backlog to leave the queue")
        return refusal

    refusal = asyncio.run(scenario())
    assert "RESOURCE_EXHAUSTED" in refusal and "would not reach this call before its deadline" \
        in refusal, refusal

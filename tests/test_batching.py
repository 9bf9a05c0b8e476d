"""The batcher: faulty model passes fail their callers, a dead consumer restarts, and deadlines
shed calls the queue would not reach in time.

Real Batchers on the real model executor, with plain callables as the model pass. A pass can be
held on a threading.Event, so the queue's state is known when a test submits. Awaits are guarded
by a generous timeout only as a safety net: a caller that would wait forever fails the test
instead of hanging it. Nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from stratacache.batching import Batcher, PassTimer, model_executor
from stratacache.errors import Overloaded, Unavailable

SAFETY_NET_S = 60
T = TypeVar("T")


class Model:
    """A model pass that doubles each item. It records the batches it saw, can be held at a
    gate, and applies ``fault`` (once) to the first pass that starts after it is set."""

    def __init__(self) -> None:
        self.executor = model_executor()
        self.seen: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.fault: Callable[[list[int]], object] | None = None

    def __call__(self, items: list[int]) -> object:
        fault, self.fault = self.fault, None
        self.seen.append(list(items))
        self.entered.set()
        self.gate.wait()
        return [2 * i for i in items] if fault is None else fault(items)

    def hold(self) -> None:
        """Passes that start from now on wait until :meth:`release`."""
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


class Fatal(BaseException):
    """Not an ``Exception``: the per-pass handler lets it through, so it kills the consumer."""


@pytest.fixture
def model() -> Iterator[Model]:
    m = Model()
    yield m
    m.release()  # a failed test must not leave the model thread held
    m.executor.shutdown(wait=True)


def make_batcher(model: Model, **overrides: Any) -> Batcher[int, int]:
    settings: dict[str, Any] = dict(max_batch=4, max_wait_s=0.0, max_queue=16) | overrides
    b: Batcher[int, int] = Batcher(model, name="doubling", flag="--doubling-max-queue",
                                   executor=model.executor, **settings)
    b.start()
    return b


async def settle(awaitable: Awaitable[T]) -> T:
    """Awaits with a safety net, so a call that never completes fails instead of hanging."""
    return await asyncio.wait_for(awaitable, SAFETY_NET_S)


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)
    await settle(poll())


async def hold_a_pass(b: Batcher[int, int], model: Model) -> asyncio.Task[int]:
    """Starts a pass of item 0 and returns once the model is held inside it."""
    model.hold()
    running = asyncio.ensure_future(b.submit(0))
    await until(model.entered.is_set)
    return running


def submit(b: Batcher[int, int], *items: int, **kwargs: Any) -> list[asyncio.Task[int]]:
    return [asyncio.ensure_future(b.submit(i, **kwargs)) for i in items]


# -- collecting a batch -------------------------------------------------------------------------

def test_single_item_completes_when_max_wait_is_positive(model: Model) -> None:
    async def scenario() -> int:
        b = make_batcher(model, max_wait_s=0.05)
        try:
            return await settle(b.submit(3))
        finally:
            await b.close()

    assert asyncio.run(scenario()) == 6


def test_a_full_batch_runs_without_waiting_out_max_wait(model: Model) -> None:
    async def scenario() -> list[int]:
        b = make_batcher(model, max_batch=2, max_wait_s=3600.0)
        try:
            return await settle(asyncio.gather(b.submit(1), b.submit(2)))
        finally:
            await b.close()

    assert asyncio.run(scenario()) == [2, 4]
    assert model.seen == [[1, 2]]


# -- faulty passes and a dead consumer ----------------------------------------------------------

def _raise(items: list[int]) -> object:
    raise ValueError("the model broke")


@pytest.mark.parametrize(("fault", "error", "message"), [
    (lambda items: [2 * i for i in items][:-1], RuntimeError,
     "doubling model pass returned 2 results for 3 items"),
    (lambda items: [2 * i for i in items] + [0], RuntimeError,
     "doubling model pass returned 4 results for 3 items"),
    (lambda items: None, RuntimeError, "doubling model pass returned a NoneType, not a sequence"),
    (_raise, ValueError, "the model broke"),
], ids=["too-few", "too-many", "none", "raises"])
def test_a_faulty_pass_fails_its_callers_and_the_batcher_keeps_serving(
        model: Model, fault: Callable[[list[int]], object], error: type[Exception],
        message: str) -> None:
    async def scenario() -> None:
        b = make_batcher(model)
        try:
            running = await hold_a_pass(b, model)
            model.fault = fault  # for the next pass: items 1, 2 and 3 together
            faulty = submit(b, 1, 2, 3)
            await until(lambda: b.queued == 3)
            model.release()
            outcomes = await settle(asyncio.gather(*faulty, return_exceptions=True))
            assert await settle(running) == 0
            for outcome in outcomes:
                assert isinstance(outcome, error) and message in str(outcome)
            assert await settle(b.submit(5)) == 10
            assert b.healthy and b.stats.restarts == 0 and b.stats.batches == 2
        finally:
            await b.close()

    asyncio.run(scenario())
    assert model.seen == [[0], [1, 2, 3], [5]]


def test_a_dead_consumer_fails_every_call_and_restarts(
        model: Model, caplog: pytest.LogCaptureFixture) -> None:
    def die(items: list[int]) -> object:
        raise Fatal("escaped the pass")

    async def scenario() -> None:
        b = make_batcher(model, max_batch=1)
        try:
            model.fault = die  # the held pass of item 0 kills the consumer
            running = await hold_a_pass(b, model)
            waiting = submit(b, 1, 2)
            await until(lambda: b.queued == 2)
            model.release()
            outcomes = await settle(asyncio.gather(running, *waiting, return_exceptions=True))
            for outcome in outcomes:
                assert isinstance(outcome, Unavailable)
                assert "doubling batcher failed unexpectedly and restarted" in str(outcome)
            assert b.stats.restarts == 1
            assert await settle(b.submit(5)) == 10  # served by the new consumer
            assert b.healthy
        finally:
            await b.close()
        assert not b.healthy

    with caplog.at_level(logging.ERROR, logger="stratacache.batching"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "doubling batcher's consumer died" in errors[0].getMessage()
    assert model.seen == [[0], [5]]  # items 1 and 2 were failed, not run


def test_close_fails_running_and_queued_calls(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model)
        running = await hold_a_pass(b, model)
        waiting = submit(b, 1)
        await until(lambda: b.queued == 1)
        await settle(b.close())
        for outcome in await settle(asyncio.gather(running, *waiting, return_exceptions=True)):
            assert isinstance(outcome, Unavailable) and "shutting down" in str(outcome)
        assert not b.healthy
        with pytest.raises(Unavailable, match="shutting down"):
            await b.submit(2)

    asyncio.run(scenario())


# -- admission: the queue bound and deadlines ---------------------------------------------------

def test_a_full_queue_is_refused_whatever_the_deadline(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model, max_queue=2)
        try:
            running = await hold_a_pass(b, model)
            waiting = submit(b, 1, 2)
            await until(lambda: b.queued == 2)
            with pytest.raises(Overloaded, match="doubling queue is full"):
                await b.submit(3, deadline=time.monotonic() + 3600)
            with pytest.raises(Overloaded, match="raise --doubling-max-queue"):
                await b.submit_many([3])
            assert b.stats.rejected == 2 and b.stats.shed == 0
            model.release()
            assert await settle(asyncio.gather(running, *waiting)) == [0, 2, 4]
        finally:
            await b.close()

    asyncio.run(scenario())


def test_a_past_deadline_is_shed_at_submit_even_without_an_estimate(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model)
        try:
            with pytest.raises(Overloaded, match="deadline passed .* before it reached the "
                                                 "doubling queue"):
                await b.submit(1, deadline=time.monotonic() - 1)
            with pytest.raises(Overloaded, match="deadline passed"):
                await b.submit_many([1, 2], deadline=time.monotonic() - 1)
            assert b.stats.shed == 2 and b.queued == 0
            assert await settle(b.submit(3, deadline=time.monotonic() + 3600)) == 6
        finally:
            await b.close()

    asyncio.run(scenario())
    assert model.seen == [[3]]


def test_a_deadline_the_queue_cannot_reach_is_shed_and_the_rest_complete(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model, max_batch=1)
        try:
            assert await settle(b.submit(1)) == 2  # one pass, so there is an estimate
            mean_s = b.pass_timer.mean_s
            assert mean_s is not None
            running = await hold_a_pass(b, model)
            waiting = submit(b, 2)
            await until(lambda: b.queued == 1)
            # One call queued and max_batch 1: this call needs two more passes, at least
            # 2 * mean_s, and has less than mean_s left.
            with pytest.raises(Overloaded, match="deadline"):
                await b.submit(3, deadline=time.monotonic() + mean_s)
            admitted = asyncio.ensure_future(
                b.submit_many([4, 5], deadline=time.monotonic() + 3600))
            await until(lambda: b.queued == 3)
            model.release()
            assert await settle(asyncio.gather(running, *waiting)) == [0, 4]
            assert await settle(admitted) == [8, 10]
            assert b.stats.shed == 1
        finally:
            await b.close()

    asyncio.run(scenario())
    assert [3] not in model.seen


def test_the_shed_message_gives_the_queue_the_estimate_and_the_time_left(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model, max_batch=1)
        try:
            b.pass_timer.record(1800.0)  # as if a pass took half an hour
            running = await hold_a_pass(b, model)
            waiting = submit(b, 2, 3)
            await until(lambda: b.queued == 2)
            with pytest.raises(Overloaded, match=(
                    r"the doubling queue would not reach this call before its deadline "
                    r"\(2 waiting, estimated wait \d+ ms, \d+ ms left\): retry later")):
                await b.submit(4, deadline=time.monotonic() + 3600)  # needs 3 more passes
            admitted = submit(b, 5, deadline=time.monotonic() + 86400)
            await until(lambda: b.queued == 3)
            model.release()
            assert await settle(asyncio.gather(running, *waiting, *admitted)) == [0, 4, 6, 10]
            assert b.stats.shed == 1
        finally:
            await b.close()

    asyncio.run(scenario())


def test_a_call_whose_deadline_passes_in_the_queue_is_dropped_unrun(model: Model) -> None:
    async def scenario() -> None:
        b = make_batcher(model)
        try:
            running = await hold_a_pass(b, model)  # no pass has finished: no estimate, admit
            margin_s = 0.05
            while True:  # a loaded machine may take longer than the margin to run submit
                deadline = time.monotonic() + margin_s
                [late] = submit(b, 1, deadline=deadline)
                await until(lambda: late.done() or b.queued == 1)
                if not late.done():
                    break
                margin_s *= 2
            cancelled, kept = submit(b, 2, 3)
            await until(lambda: b.queued == 3)
            cancelled.cancel()
            await until(lambda: time.monotonic() > deadline)
            model.release()
            assert await settle(running) == 0
            with pytest.raises(Overloaded, match="passed while it waited in the doubling queue"):
                await settle(late)
            assert await settle(kept) == 6
            assert b.stats.shed == 1
        finally:
            await b.close()

    asyncio.run(scenario())
    assert model.seen == [[0], [3]]  # neither the late call nor the cancelled one ran


# -- the pass-time estimate ---------------------------------------------------------------------

def test_no_estimate_before_the_first_pass() -> None:
    timer = PassTimer()
    assert timer.mean_s is None
    assert timer.wait_s(ahead=100, count=1, max_batch=4, running_s=None) is None


def test_the_first_passes_are_averaged_plainly_then_weighted() -> None:
    timer = PassTimer(weight=0.2)
    timer.record(0.1)
    timer.record(0.3)
    assert timer.mean_s == pytest.approx(0.2)
    for _ in range(3):
        timer.record(0.2)
    assert timer.mean_s == pytest.approx(0.2)  # five passes: still their plain mean
    timer.record(0.7)
    assert timer.mean_s == pytest.approx(0.2 + 0.2 * 0.5)
    for _ in range(100):
        timer.record(1.0)
    assert timer.mean_s == pytest.approx(1.0, abs=1e-6)


def test_the_wait_counts_full_passes_ahead_and_the_rest_of_the_running_one() -> None:
    timer = PassTimer()
    timer.record(0.1)
    assert timer.wait_s(ahead=0, count=1, max_batch=4, running_s=None) == pytest.approx(0.1)
    assert timer.wait_s(ahead=8, count=1, max_batch=4, running_s=None) == pytest.approx(0.3)
    assert timer.wait_s(ahead=7, count=1, max_batch=4, running_s=None) == pytest.approx(0.2)
    assert timer.wait_s(ahead=3, count=2, max_batch=4, running_s=None) == pytest.approx(0.2)
    assert timer.wait_s(ahead=0, count=1, max_batch=4, running_s=0.04) == pytest.approx(0.16)
    assert timer.wait_s(ahead=0, count=1, max_batch=4, running_s=5.0) == pytest.approx(0.1)


def test_the_weight_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        PassTimer(weight=0)

"""Batching of model calls across concurrent requests, shared by the embedder and the verifier.

Callers ``submit`` items and await their results; one consumer takes what has queued (up to
``max_batch``, waiting at most ``max_wait_s``), runs one model pass on the model thread, and
resolves the futures. Admission is bounded twice, and a refused call fails at once with
:class:`~stratacache.errors.Overloaded`, so the gateway can call the model instead of waiting
behind a backlog:

- the queue holds at most ``max_queue`` items;
- a call with a deadline is refused ("shed") when the queue ahead of it would not reach it
  before then, judged from the measured pass time (:class:`PassTimer`). A queued call whose
  deadline passes before its pass is shed too, so no model time goes to answers nobody awaits.

The consumer is supervised: a pass that fails, or returns other than one result per item, fails
that batch's callers; if the consumer itself dies, every call it held or that waited fails with
:class:`~stratacache.errors.Unavailable` and a new consumer starts (``stats.restarts``,
``healthy``). No caller waits forever.

Every batcher of a server runs its passes on one shared single-thread executor: torch already
uses every core inside a pass, so two models' passes side by side would only slow each other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from .errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

#: Weight of the newest pass in the mean pass time (0 < w <= 1): higher follows a change of
#: load or batch size sooner, lower is steadier. The first ``1 / w`` passes are averaged
#: plainly, so one odd first pass (a model warming up) does not linger.
PASS_TIME_WEIGHT = 0.2


def model_executor() -> ThreadPoolExecutor:
    """The one thread model passes run on (the models are not re-entrant)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


@dataclass
class BatchStats:
    """Counters of one batcher (all since it was created)."""

    #: model passes that returned a result per item
    batches: int = 0
    #: items those passes answered
    items: int = 0
    #: calls refused because the queue was full
    rejected: int = 0
    #: calls failed for their deadline: at submit (the queue would not reach them in time) or
    #: when taken (the deadline had passed while they waited)
    shed: int = 0
    #: times the consumer died unexpectedly and was restarted
    restarts: int = 0


class PassTimer:
    """Estimates how long a queue takes to drain, from the measured seconds per model pass.

    Args:
        weight: weight of the newest pass in the mean (see :data:`PASS_TIME_WEIGHT`).
    """

    def __init__(self, *, weight: float = PASS_TIME_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self._weight = weight
        self._passes = 0
        self._mean_s: float | None = None

    @property
    def mean_s(self) -> float | None:
        """Mean seconds per pass (exponentially weighted); None before the first pass."""
        return self._mean_s

    def record(self, seconds: float) -> None:
        """Adds one pass that took ``seconds`` (wall clock, including any wait for the thread)."""
        self._passes += 1
        if self._mean_s is None:
            self._mean_s = seconds
        else:
            weight = max(self._weight, 1 / self._passes)  # a plain mean until it has 1/w passes
            self._mean_s += weight * (seconds - self._mean_s)

    def wait_s(self, *, ahead: int, count: int, max_batch: int,
               running_s: float | None) -> float | None:
        """Estimated seconds until ``count`` items queued now behind ``ahead`` others are done.

        Args:
            ahead: items already queued (not counting the pass in progress).
            count: items being queued together.
            max_batch: most items in one pass.
            running_s: seconds the pass in progress has run; None when none runs.

        Returns:
            Seconds, or None before the first pass (no estimate yet).
        """
        if self._mean_s is None:
            return None
        in_progress = 0.0 if running_s is None else max(0.0, self._mean_s - running_s)
        return in_progress + math.ceil((ahead + count) / max_batch) * self._mean_s


class _Call(NamedTuple, Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    deadline: float | None


class Batcher(Generic[In, Out]):
    """Batches concurrent ``submit`` calls into passes of ``run``.

    Args:
        run: the model pass: a list of items in, a sequence of one result per item out, in
            order.
        name: what the queue holds, for messages ("embedding", "verification").
        flag: the serve flag that sizes the queue, named in the overload message.
        max_batch: most items in one pass.
        max_wait_s: once the model is free and one item waits, how long to wait for more
            (seconds; 0 takes only what queued while the model was busy).
        max_queue: most items waiting; beyond it ``submit`` raises ``Overloaded``.
        executor: the thread passes run on (see :func:`model_executor`).
        on_batch: called with the number of items of each pass that runs (a metric).

    Attributes:
        stats: counters (:class:`BatchStats`), for the server's Stats.
        pass_timer: the measured pass time that deadlines are judged by.
    """

    def __init__(self, run: Callable[[list[In]], Sequence[Out]], *, name: str, flag: str,
                 max_batch: int, max_wait_s: float, max_queue: int,
                 executor: ThreadPoolExecutor,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._run_batch = run
        self._name = name
        self._flag = flag
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Call[In, Out]] = asyncio.Queue(max_queue)
        self._executor = executor
        self._on_batch = on_batch
        self._consumer: asyncio.Task[None] | None = None
        # Calls the consumer has taken off the queue (collecting or in its pass): close and the
        # supervisor fail these as well as the queued ones.
        self._held: list[_Call[In, Out]] = []
        self._pass_started: float | None = None
        self._closed = False
        self.stats = BatchStats()
        self.pass_timer = PassTimer()

    @property
    def healthy(self) -> bool:
        """Whether the consumer is running (started, not closed, not dead awaiting restart)."""
        return not self._closed and self._consumer is not None and not self._consumer.done()

    @property
    def queued(self) -> int:
        """Calls waiting for a pass (not counting the pass in progress). Safe to read from
        another thread (a /metrics scrape): it is the length of the queue's deque."""
        return self._queue.qsize()

    def start(self) -> None:
        """Starts the consumer on the running event loop; it is restarted if it ever dies."""
        self._pass_started = None
        self._consumer = asyncio.get_running_loop().create_task(self._consume(),
                                                                name=f"{self._name}-batcher")
        self._consumer.add_done_callback(self._restart_if_dead)

    async def submit(self, item: In, *, deadline: float | None = None) -> Out:
        """The result of ``run`` for ``item``.

        Args:
            item: what to pass to the model.
            deadline: when the caller gives up: an absolute time on the ``time.monotonic()``
                clock, in seconds (not a duration); None for never. The call is shed if the
                queue would not reach it before then.

        Returns:
            The model pass's result for ``item``.

        Raises:
            Overloaded: the queue is full, or it would not reach the call before ``deadline``,
                or the deadline passed while the call waited.
            Unavailable: the batcher is closing, or its consumer died and was restarted.
            RuntimeError: the model pass returned other than one result per item.
            Exception: whatever the model pass raised.
        """
        self._admit(1, deadline)
        return await self._enqueue(item, deadline)

    async def submit_many(self, items: Sequence[In], *,
                          deadline: float | None = None) -> list[Out]:
        """Results for several items, queued together (all or none: a full queue, or a
        deadline the last of them would miss, queues none).

        Args, Raises: as :meth:`submit`; ``deadline`` applies to every item.

        Returns:
            One result per item, in order.
        """
        if not items:
            return []
        self._admit(len(items), deadline)
        return list(await asyncio.gather(*(self._enqueue(i, deadline) for i in items)))

    def _admit(self, count: int, deadline: float | None) -> None:
        """Raises unless ``count`` items can be queued now and done before ``deadline``."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        queued = self._queue.qsize()
        if count > self._queue.maxsize - queued:
            self.stats.rejected += 1
            raise Overloaded(
                f"{self._name} queue is full ({self._queue.maxsize} waiting): retry with "
                f"backoff, or raise {self._flag} / add capacity")
        if deadline is None:
            return
        now = time.monotonic()
        left_s = deadline - now
        if left_s <= 0:
            self.stats.shed += 1
            raise Overloaded(
                f"the call's deadline passed {-left_s * 1000:.0f} ms before it reached the "
                f"{self._name} queue: give the call a longer deadline")
        wait_s = self.pass_timer.wait_s(
            ahead=queued, count=count, max_batch=self._max_batch,
            running_s=None if self._pass_started is None else now - self._pass_started)
        if wait_s is not None and wait_s > left_s:
            self.stats.shed += 1
            raise Overloaded(
                f"the {self._name} queue would not reach this call before its deadline "
                f"({queued} waiting, estimated wait {wait_s * 1000:.0f} ms, "
                f"{left_s * 1000:.0f} ms left): retry later with backoff, give the call a "
                f"longer deadline, or add capacity")

    def _enqueue(self, item: In, deadline: float | None) -> asyncio.Future[Out]:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        # Cannot be full: _admit checked the room and nothing has run since.
        self._queue.put_nowait(_Call(item, future, deadline))
        return future

    def _take(self, call: _Call[In, Out], batch: list[_Call[In, Out]]) -> None:
        """Adds ``call`` to ``batch`` unless nobody awaits it any more."""
        if call.future.done():  # its caller was cancelled
            return
        if call.deadline is not None and call.deadline <= time.monotonic():
            self.stats.shed += 1
            call.future.set_exception(Overloaded(
                f"the call's deadline passed while it waited in the {self._name} queue; it was "
                f"dropped unanswered: retry later with backoff, give the call a longer "
                f"deadline, or add capacity"))
            return
        batch.append(call)

    async def _take_within(self, batch: list[_Call[In, Out]], timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` seconds for one more queued call and takes it into
        ``batch``; False if none came. (``asyncio.wait`` times out without an exception, and
        unlike 3.11's ``wait_for`` never swallows a cancellation.)"""
        get = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait((get,), timeout=timeout_s)
        finally:
            took = get.done()
            if took:  # even if this task is being cancelled: held calls are failed by close
                self._take(get.result(), batch)
            else:  # a get cancelled before it took a call leaves the queue as it was
                get.cancel()
        return took

    async def _next_batch(self) -> list[_Call[In, Out]]:
        batch: list[_Call[In, Out]] = []
        self._held = batch
        while not batch:
            self._take(await self._queue.get(), batch)
        close_at = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                self._take(self._queue.get_nowait(), batch)
                continue
            left_s = close_at - time.monotonic()
            if left_s <= 0 or not await self._take_within(batch, left_s):
                break
        return batch

    def _one_per_item(self, results: object, count: int) -> Sequence[Out]:
        """``results`` if it holds exactly ``count`` results; raises otherwise."""
        try:
            got = len(results)  # type: ignore[arg-type]
        except TypeError:
            described = f"a {type(results).__name__}, not a sequence"
        else:
            if got == count:
                return results  # type: ignore[return-value]
            described = f"{got} results"
        raise RuntimeError(
            f"the {self._name} model pass returned {described} for {count} items; it must "
            f"return one result per item, in order (a bug in the model wrapper: report it)")

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = self._pass_started = time.monotonic()
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = self._one_per_item(await loop.run_in_executor(
                    self._executor, self._run_batch, [c.item for c in batch]), len(batch))
            except Exception as exc:  # a failed pass fails its callers, not the batcher
                log.exception("%s batch of %d failed", self._name, len(batch))
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(exc)
            else:
                # Measured on the loop, so it includes any wait for the shared model thread:
                # that wait is part of what a queued call will wait.
                self.pass_timer.record(time.monotonic() - started)
                self.stats.batches += 1
                self.stats.items += len(batch)
                for call, result in zip(batch, results):
                    if not call.future.done():
                        call.future.set_result(result)
            self._held, self._pass_started = [], None

    def _restart_if_dead(self, consumer: asyncio.Task[None]) -> None:
        if consumer.cancelled() or self._closed:
            return
        exc = consumer.exception()
        failed = self._fail_all(f"the {self._name} batcher failed unexpectedly and restarted: "
                                f"retry the call (the server logged the cause)")
        self.stats.restarts += 1
        log.error("%s batcher's consumer died (%r); failed %d calls and restarted it "
                  "(restart %d)", self._name, exc, failed, self.stats.restarts, exc_info=exc)
        self.start()

    def _fail_all(self, message: str) -> int:
        """Fails every call held or queued with ``Unavailable(message)``; returns how many."""
        calls = self._held + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        self._held = []
        failed = 0
        for call in calls:
            if not call.future.done():
                call.future.set_exception(Unavailable(message))
                failed += 1
        return failed

    async def close(self) -> None:
        """Stop taking items, fail what still waits, and stop the consumer (the executor is
        its owner's to shut down)."""
        self._closed = True
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.wait((self._consumer,))  # returns, never raises, once it has stopped
        self._fail_all("the server is shutting down")

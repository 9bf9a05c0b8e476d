"""A growable float32 matrix of entry vectors with exact top-k search by the native kernel.

Used where a set of vectors is small enough that an exact scan is the right search: the hot
tier's small partitions (the warm and cold tiers search compact codes instead: ``tiers.codes``).
"""

from __future__ import annotations

import numpy as np

from .. import _core
from .base import Candidate

#: One row to start: most partitions (one per conversation digest, say) hold a single entry;
#: doubling keeps growth amortised.
_INITIAL_ROWS = 1


class VectorMatrix:
    """Rows of unit-normalised vectors keyed by entry id; removal swaps the last row in."""

    def __init__(self, dimension: int) -> None:
        self._data = np.empty((_INITIAL_ROWS, dimension), dtype=np.float32)
        self._ids: list[str] = []
        self._row: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._row

    def add(self, entry_id: str, vector: np.ndarray) -> None:
        if entry_id in self._row:
            self._data[self._row[entry_id]] = vector
            return
        n = len(self._ids)
        if n == self._data.shape[0]:
            grown = np.empty((2 * n, self._data.shape[1]), dtype=np.float32)
            grown[:n] = self._data
            self._data = grown
        self._data[n] = vector
        self._ids.append(entry_id)
        self._row[entry_id] = n

    def remove(self, entry_id: str) -> bool:
        row = self._row.pop(entry_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._data[row] = self._data[last]
            self._ids[row] = moved
            self._row[moved] = row
        self._ids.pop()
        return True

    def vector(self, entry_id: str) -> np.ndarray:
        """A copy of the row of ``entry_id``."""
        return self._data[self._row[entry_id]].copy()

    def rows(self) -> tuple[list[str], np.ndarray]:
        """Ids and a view of their vectors (valid until the next change)."""
        return self._ids, self._data[:len(self._ids)]

    def search(self, query: np.ndarray, k: int) -> list[Candidate]:
        """The ``k`` rows most similar to ``query`` (cosine, best first)."""
        return _top_k(self._ids, self._data[:len(self._ids)], query, k)


def _top_k(ids: list[str], vectors: np.ndarray, query: np.ndarray, k: int) -> list[Candidate]:
    if not ids:
        return []
    idx, scores = _core.topk_ip(query, vectors, k)
    return [Candidate(ids[i], float(s)) for i, s in zip(idx[0], scores[0])]

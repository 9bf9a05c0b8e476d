"""Compact codes: how the warm and cold tiers search a partition without float32 vectors in RAM.

Each entry keeps ``row_bytes(dim)`` bytes (436 at 384 dimensions, against 1,536 for its float32
vector): the signs of its components (one bit each, in a matrix of their own that a search
streams) and the components as int8 with a float32 scale (layout in
``cpp/include/stratacache/codes.hpp``). A search
(:meth:`CodeMatrix.search`, native and GIL-free) scans every row's sign bits for the
``candidates_for(n)`` rows nearest the query by Hamming distance, ranks those by the query
against their int8 components, and returns the best few with *estimated* similarities; the tier
then re-scores them against the exact float32 vectors it stores on disk
(:func:`exact_top_k`), so what it returns, and what the engine serves, meets the threshold
exactly. Recall@1 against an exact scan is measured in ``tests/test_codes.py`` and by
``benchmarks/scale.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from .. import _core
from .base import Candidate

#: Sign-bit candidates ranked by their int8 codes: at least MIN_CANDIDATES, or one row in
#: CANDIDATE_SHARE of a large partition. Measured on synthetic prompts around real QQP
#: embeddings (tests/test_codes.py, benchmarks/tier_scale.py; 200 queries): recall@1 against an
#: exact scan at 40k rows 0.985 with 1,024 candidates and 1.0 with 2,048 (its misses fell
#: short by up to 0.008 of similarity); 1.0 with 3,906 at 1M. Ranking 2,048 int8 rows costs
#: about 0.2 ms.
MIN_CANDIDATES = 2048
CANDIDATE_SHARE = 1 / 256
#: Rows re-scored exactly per search, at least (the engine asks for k; a few more absorb the
#: int8 estimate's error, about 1e-3 of similarity).
MIN_RESCORED = 16
#: Threads of one large scan (the bit scan splits rows; below 128k rows one thread).
SCAN_THREADS = 2
#: Rows to start with, and the growth factor once a partition is large: 1.25x keeps the spare
#: capacity (memory paid for nothing) at 12 % on average instead of doubling's 25 %.
_INITIAL_ROWS = 1
_LARGE_ROWS = 4096
_LARGE_GROWTH = 1.25
#: Rows encoded at a time.
_ENCODE_ROWS = 4096


def bits_bytes(dimension: int) -> int:
    """Bytes of an entry's sign bits (whole 64-bit words)."""
    return 8 * -(-dimension // 64)


def values_bytes(dimension: int) -> int:
    """Bytes of an entry's int8 components and float32 scale."""
    return dimension + 4


def row_bytes(dimension: int) -> int:
    """Bytes an entry's codes take."""
    return bits_bytes(dimension) + values_bytes(dimension)


def encode(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``vectors`` (n, dim) float32: sign bits, uint8 (n, bits_bytes(dim)), and
    values, uint8 (n, values_bytes(dim))."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    n, dim = vectors.shape
    bits = np.zeros((n, bits_bytes(dim)), dtype=np.uint8)
    packed = np.packbits(vectors > 0, axis=1)
    bits[:, :packed.shape[1]] = packed
    values = np.empty((n, values_bytes(dim)), dtype=np.uint8)
    peak = np.abs(vectors).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
    values[:, :dim] = np.rint(vectors / scale[:, None]).astype(np.int8).view(np.uint8)
    values[:, dim:] = scale[:, None].view(np.uint8)
    return bits, values


def query_bits(query: np.ndarray) -> np.ndarray:
    """The query's sign bits, laid out as an entry's."""
    return encode(query[None, :])[0][0]


def candidates_for(rows: int) -> int:
    """Sign-bit candidates a search of ``rows`` rows ranks by int8 codes."""
    return max(MIN_CANDIDATES, int(rows * CANDIDATE_SHARE))


class CodeMatrix:
    """Code rows keyed by entry ids (str) or, with ``int_keys``, by int64 row ids kept in an
    array (8 bytes a key instead of about 36 for a Python int in a list); removal swaps the
    last row in. Holds no float32 vector. Not thread-safe: each tier calls it from one thread.
    """

    def __init__(self, dimension: int, *, int_keys: bool = False) -> None:
        self.dimension = dimension
        self._n = 0
        self._bits = np.empty((_INITIAL_ROWS, bits_bytes(dimension)), dtype=np.uint8)
        self._values = np.empty((_INITIAL_ROWS, values_bytes(dimension)), dtype=np.uint8)
        self._keys: list[Hashable] | np.ndarray = (
            np.empty(_INITIAL_ROWS, dtype=np.int64) if int_keys else [])

    def __len__(self) -> int:
        return self._n

    def nbytes(self) -> int:
        """Memory of the codes (and of int keys), spare capacity included."""
        keys = self._keys.nbytes if isinstance(self._keys, np.ndarray) else 0
        return self._bits.nbytes + self._values.nbytes + keys

    def add(self, keys: Sequence[Hashable], vectors: np.ndarray) -> None:
        """Appends rows for ``keys`` (new keys: the caller removes a key before re-adding it)."""
        self._make_room(self._n + len(keys))
        for start in range(0, len(keys), _ENCODE_ROWS):  # bounded temporaries (~10 MB)
            stop = start + _ENCODE_ROWS
            self.add_codes(keys[start:stop], *encode(vectors[start:stop]))

    def add_codes(self, keys: Sequence[Hashable], bits: np.ndarray, values: np.ndarray) -> None:
        """Appends rows for ``keys`` from their codes (as :func:`encode` returns them)."""
        if not len(keys):
            return
        n, need = self._n, self._n + len(keys)
        self._make_room(need)
        self._bits[n:need], self._values[n:need] = bits, values
        if isinstance(self._keys, np.ndarray):
            self._keys[n:need] = keys
        else:
            self._keys.extend(keys)
        self._n = need

    def _make_room(self, need: int) -> None:
        if need > self._bits.shape[0]:
            grow = 2 if need <= _LARGE_ROWS else _LARGE_GROWTH
            self._resize(max(need, int(self._bits.shape[0] * grow)))

    def reserve(self, rows: int) -> None:
        """Makes room for ``rows`` rows in all, at once: a bulk build that grew step by step
        left the freed smaller copies as heap holes (measured: 571 bytes an entry resident for
        444 of codes at 100k entries)."""
        if rows > self._bits.shape[0]:
            self._resize(rows)

    def compact(self) -> None:
        """Drops the spare capacity (after a bulk build: growth left up to a quarter spare)."""
        if self._bits.shape[0] > max(self._n, _INITIAL_ROWS):
            self._resize(max(self._n, _INITIAL_ROWS))

    def _resize(self, rows: int) -> None:
        arrays = ["_bits", "_values"] + (["_keys"] if isinstance(self._keys, np.ndarray) else [])
        for name in arrays:
            old = getattr(self, name)
            new = np.empty((rows, *old.shape[1:]), dtype=old.dtype)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)

    def _rows_of(self, keys: Sequence[Hashable]) -> list[int]:
        if isinstance(self._keys, np.ndarray):
            return np.flatnonzero(np.isin(self._keys[:self._n], np.asarray(keys))).tolist()
        if len(keys) == 1:
            try:
                return [self._keys.index(keys[0])]
            except ValueError:
                return []
        wanted = set(keys)
        return [r for r, key in enumerate(self._keys) if key in wanted]

    def remove(self, keys: Sequence[Hashable]) -> int:
        """Removes the rows of ``keys`` that are here; returns how many. One pass over the keys
        whatever their number (a partition of a million rows: a few ms)."""
        rows = self._rows_of(keys)
        for row in sorted(rows, reverse=True):  # highest first: a swapped-in row is never lost
            last = self._n - 1
            if row != last:
                self._bits[row] = self._bits[last]
                self._values[row] = self._values[last]
                self._keys[row] = self._keys[last]
            if isinstance(self._keys, list):
                self._keys.pop()
            self._n = last
        if self._n < self._bits.shape[0] // 4 and self._bits.shape[0] > _LARGE_ROWS:
            self._resize(max(self._n, _INITIAL_ROWS))
        return len(rows)

    def search(self, query: np.ndarray, k: int) -> list[tuple[Hashable, float]]:
        """Up to ``k`` keys whose rows score best against ``query`` (unit float32), with their
        estimated similarities, best first. GIL-free: callable from any one thread; called
        while the owner changes the matrix, a key returned may have moved to another row or
        been removed (the owner checks what it reads back)."""
        # One read of each attribute: from another thread (the warm tier searches large
        # partitions off the loop) a resize may swap the arrays between two reads.
        bits, values, keys = self._bits, self._values, self._keys
        n = min(self._n, bits.shape[0], values.shape[0], len(keys))
        if not n:
            return []
        idx, scores = _core.search_codes(query, query_bits(query), bits[:n], values[:n], k,
                                         candidates_for(n), SCAN_THREADS)
        if isinstance(keys, np.ndarray):
            return list(zip(keys[idx].tolist(), scores.tolist()))
        found = []
        for i, score in zip(idx.tolist(), scores.tolist()):
            try:
                found.append((keys[i], score))
            except IndexError:  # removed meanwhile (a search off the owner's thread)
                continue
        return found

    def rekey(self, new_keys: np.ndarray) -> None:
        """Replaces each key ``k`` with ``new_keys[k]`` (``int_keys`` only: the owner renumbered
        the rows its keys name)."""
        self._keys[:self._n] = new_keys[self._keys[:self._n]]


def rescored(k: int) -> int:
    """Rows a tier re-scores exactly to return its best ``k``."""
    return max(k, MIN_RESCORED)


def exact_top_k(found: Sequence[tuple[Hashable, float]], k: int,
                read: Callable[[list[Hashable]], list[tuple[str, np.ndarray]]],
                query: np.ndarray) -> list[Candidate]:
    """The best ``k`` of ``found`` by exact similarity: ``read`` gives (entry id, float32
    vector) for the keys it still holds (unexpired, readable); the rest are left out."""
    if not found:
        return []
    got = read([key for key, _ in found])
    if not got:
        return []
    sims = np.stack([v for _, v in got]) @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return [Candidate(got[i][0], float(sims[i])) for i in order]

"""stratacache native similarity kernel: exact inner-product top-k over float32 matrices.

Scores are inner products. For unit-normalised vectors (as stratacache stores them) an inner
product is the cosine similarity, in [-1, 1]; for other vectors it is unbounded.

Every array argument must already be a ``numpy.ndarray`` of dtype float32 (native byte order),
C-contiguous: inputs are read in place, never copied or converted. Anything else raises
``ValueError`` with a message that says how to fix it (for example
``"matrix must be float32, got float64: pass matrix.astype(np.float32)"``). The GIL is
released while the kernel runs, so calls from several Python threads run in parallel.
"""

from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__version__: Final[str]  # "0.1.0"

def topk_ip(
    queries: npt.NDArray[np.float32],
    matrix: npt.NDArray[np.float32],
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact top-k rows of ``matrix`` by inner product with each query.

    Args:
        queries: float32, C-contiguous; shape ``(dim,)`` for one query or ``(n_queries, dim)``.
        matrix: float32, C-contiguous, shape ``(n_rows, dim)``; ``n_rows`` may be 0.
        k: number of results per query, ``>= 1``; clamped to ``n_rows``.

    Returns:
        ``(indices, scores)``, both of shape ``(n_queries, min(k, n_rows))`` (a 1-D query gives
        ``n_queries == 1``): int64 row indices into ``matrix`` and their float32 scores (inner
        products; cosine similarity in [-1, 1] for unit-normalised vectors). Each row is sorted
        by score descending, ties broken by the lower row index; NaN scores rank last.

    Raises:
        ValueError: a non-array or non-float32 input, a non-C-contiguous input, wrong rank,
            ``dim == 0``, a query dimension that differs from the matrix's, or ``k < 1``.
    """

def inner_products(
    queries: npt.NDArray[np.float32],
    matrix: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """All inner products between the queries and the rows of ``matrix``.

    Args:
        queries: float32, C-contiguous; shape ``(dim,)`` for one query or ``(n_queries, dim)``.
        matrix: float32, C-contiguous, shape ``(n_rows, dim)``; ``n_rows`` may be 0.

    Returns:
        float32 array of shape ``(n_queries, n_rows)`` with
        ``scores[i, j] = queries[i] . matrix[j]`` (cosine similarity in [-1, 1] for
        unit-normalised vectors).

    Raises:
        ValueError: under the same rules as :func:`topk_ip`.
    """

def simd_isa() -> Literal["avx512", "avx2", "neon", "scalar"]:
    """The SIMD path the kernel uses on this CPU, picked once at first use.

    ``"avx512"`` (AVX-512F), ``"avx2"`` (AVX2 + FMA), ``"neon"`` (aarch64) or ``"scalar"``
    (portable fallback). The choice affects speed and the last bits of float rounding only.
    """

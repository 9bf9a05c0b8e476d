"""Tests for the native similarity kernel (stratacache._core), checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from stratacache import _core

DIMS = [1, 3, 97, 257, 384]


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _check_topk_against_numpy(
    queries: np.ndarray, matrix: np.ndarray, k: int, idx: np.ndarray, score: np.ndarray
) -> None:
    """idx/score must be a correct top-k of queries @ matrix.T (up to float rounding)."""
    q2 = queries.reshape(-1, matrix.shape[1])
    kk = min(k, matrix.shape[0])
    assert idx.shape == (q2.shape[0], kk) and idx.dtype == np.int64
    assert score.shape == (q2.shape[0], kk) and score.dtype == np.float32
    full = q2.astype(np.float64) @ matrix.astype(np.float64).T
    for qi in range(q2.shape[0]):
        # reported scores are the inner products of the reported rows ...
        np.testing.assert_allclose(score[qi], full[qi, idx[qi]], rtol=1e-4, atol=1e-4)
        # ... sorted descending, over distinct rows ...
        assert np.all(np.diff(score[qi]) <= 0)
        assert len(set(idx[qi].tolist())) == kk
        # ... and they are the k best (compare values, not indices, to be robust to rounding).
        expected = np.sort(full[qi])[::-1][:kk]
        np.testing.assert_allclose(score[qi], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", DIMS)
def test_topk_matches_numpy_odd_dims(dim: int) -> None:
    rng = np.random.default_rng(1000 + dim)
    matrix = _rand(rng, 200, dim)
    queries = _rand(rng, 7, dim)
    idx, score = _core.topk_ip(queries, matrix, 5)
    _check_topk_against_numpy(queries, matrix, 5, idx, score)


@pytest.mark.parametrize("dim", DIMS)
def test_inner_products_match_numpy(dim: int) -> None:
    rng = np.random.default_rng(2000 + dim)
    matrix = _rand(rng, 53, dim)
    queries = _rand(rng, 4, dim)
    out = _core.inner_products(queries, matrix)
    assert out.shape == (4, 53) and out.dtype == np.float32
    expected = queries.astype(np.float64) @ matrix.astype(np.float64).T
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.sqrt(dim))


@pytest.mark.parametrize("dim", [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127])
def test_tails_are_exact_on_integer_data(dim: int) -> None:
    # Small integers: every partial sum is exact in float32, so any SIMD path and any tail
    # handling must give exactly numpy's answer; a wrong tail (lost or garbage lanes) shows up.
    rng = np.random.default_rng(3000 + dim)
    matrix = rng.integers(-4, 5, size=(40, dim)).astype(np.float32)
    queries = rng.integers(-4, 5, size=(3, dim)).astype(np.float32)
    np.testing.assert_array_equal(_core.inner_products(queries, matrix), queries @ matrix.T)


def test_unit_vectors_give_cosine_in_range() -> None:
    rng = np.random.default_rng(4)
    matrix = _rand(rng, 100, 384)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    idx, score = _core.topk_ip(matrix[17], matrix, 3)
    assert idx[0, 0] == 17
    np.testing.assert_allclose(score[0, 0], 1.0, rtol=1e-5)
    assert np.all(score <= 1.0 + 1e-5) and np.all(score >= -1.0 - 1e-5)


def test_empty_matrix_gives_empty_outputs() -> None:
    rng = np.random.default_rng(5)
    matrix = np.empty((0, 16), dtype=np.float32)
    queries = _rand(rng, 3, 16)
    idx, score = _core.topk_ip(queries, matrix, 4)
    assert idx.shape == (3, 0) and idx.dtype == np.int64
    assert score.shape == (3, 0) and score.dtype == np.float32
    idx, score = _core.topk_ip(queries[0], matrix, 4)
    assert idx.shape == (1, 0) and score.shape == (1, 0)
    out = _core.inner_products(queries, matrix)
    assert out.shape == (3, 0) and out.dtype == np.float32


def test_zero_queries() -> None:
    matrix = _rand(np.random.default_rng(6), 10, 8)
    idx, score = _core.topk_ip(np.empty((0, 8), dtype=np.float32), matrix, 3)
    assert idx.shape == (0, 3) and score.shape == (0, 3)
    assert _core.inner_products(np.empty((0, 8), dtype=np.float32), matrix).shape == (0, 10)


def test_single_row() -> None:
    rng = np.random.default_rng(7)
    matrix = _rand(rng, 1, 33)
    query = _rand(rng, 33)
    idx, score = _core.topk_ip(query, matrix, 1)
    assert idx.tolist() == [[0]]
    np.testing.assert_allclose(score[0, 0], float(matrix[0] @ query), rtol=1e-5)


def test_k_larger_than_n_rows_is_clamped() -> None:
    rng = np.random.default_rng(8)
    matrix = _rand(rng, 6, 12)
    queries = _rand(rng, 2, 12)
    idx, score = _core.topk_ip(queries, matrix, 50)
    assert idx.shape == (2, 6) and score.shape == (2, 6)
    for qi in range(2):
        assert sorted(idx[qi].tolist()) == list(range(6))  # every row, once
    _check_topk_against_numpy(queries, matrix, 50, idx, score)


def test_one_dimensional_query_is_one_row() -> None:
    rng = np.random.default_rng(9)
    matrix = _rand(rng, 300, 97)
    query = _rand(rng, 97)
    idx1, score1 = _core.topk_ip(query, matrix, 4)
    idx2, score2 = _core.topk_ip(query.reshape(1, -1), matrix, 4)
    assert idx1.shape == (1, 4) and score1.shape == (1, 4)
    np.testing.assert_array_equal(idx1, idx2)
    np.testing.assert_array_equal(score1, score2)
    out = _core.inner_products(query, matrix)
    assert out.shape == (1, 300)
    _check_topk_against_numpy(query, matrix, 4, idx1, score1)


def test_ties_are_broken_by_lower_row_index() -> None:
    # Integer data, so equal scores are exactly equal whatever the SIMD path.
    query = np.array([1, 0, 0, 0], dtype=np.float32)
    matrix = np.array(
        [
            [1, 5, 0, 0],  # 1
            [3, 0, 0, 0],  # 3
            [3, 1, 1, 1],  # 3
            [2, 0, 0, 0],  # 2
            [3, 0, 9, 0],  # 3
            [1, 0, 0, 0],  # 1
        ],
        dtype=np.float32,
    )
    idx, score = _core.topk_ip(query, matrix, 6)
    assert idx.tolist() == [[1, 2, 4, 3, 0, 5]]
    assert score.tolist() == [[3, 3, 3, 2, 1, 1]]
    # k cuts through a tie: the lower indices win.
    idx, _ = _core.topk_ip(query, matrix, 2)
    assert idx.tolist() == [[1, 2]]
    idx, _ = _core.topk_ip(query, matrix, 5)
    assert idx.tolist() == [[1, 2, 4, 3, 0]]


def test_nan_scores_rank_last() -> None:
    matrix = np.array([[np.nan], [1.0], [np.nan], [2.0]], dtype=np.float32)
    idx, score = _core.topk_ip(np.ones(1, dtype=np.float32), matrix, 4)
    assert idx.tolist() == [[3, 1, 0, 2]]
    assert score[0, :2].tolist() == [2.0, 1.0] and np.isnan(score[0, 2:]).all()
    idx, _ = _core.topk_ip(np.ones(1, dtype=np.float32), matrix, 2)
    assert idx.tolist() == [[3, 1]]


def test_all_equal_rows() -> None:
    matrix = np.ones((1000, 5), dtype=np.float32)
    idx, score = _core.topk_ip(np.ones(5, dtype=np.float32), matrix, 7)
    assert idx.tolist() == [list(range(7))]
    assert np.all(score == 5.0)


def test_multithreaded_batch_equals_single_queries() -> None:
    # 67 * 2000 * 384 multiply-adds is well above the threading threshold; 67 queries do not
    # split evenly into the kernel's query blocks, so a partial block is covered too.
    rng = np.random.default_rng(10)
    matrix = _rand(rng, 2000, 384)
    queries = _rand(rng, 67, 384)
    idx, score = _core.topk_ip(queries, matrix, 10)
    ips = _core.inner_products(queries, matrix)
    for qi in range(queries.shape[0]):
        i1, s1 = _core.topk_ip(queries[qi], matrix, 10)
        np.testing.assert_array_equal(i1[0], idx[qi])
        np.testing.assert_array_equal(s1[0], score[qi])
        np.testing.assert_array_equal(_core.inner_products(queries[qi], matrix)[0], ips[qi])
        np.testing.assert_array_equal(ips[qi, idx[qi]], score[qi])
    _check_topk_against_numpy(queries[:8], matrix, 10, idx[:8], score[:8])


@pytest.mark.parametrize("n_queries", [2, 3, 9])
def test_small_batches_equal_single_queries(n_queries: int) -> None:
    rng = np.random.default_rng(20 + n_queries)
    matrix = _rand(rng, 150, 257)
    queries = _rand(rng, n_queries, 257)
    idx, score = _core.topk_ip(queries, matrix, 150)  # k == n_rows: a full ranking
    for qi in range(n_queries):
        i1, s1 = _core.topk_ip(queries[qi], matrix, 150)
        np.testing.assert_array_equal(i1[0], idx[qi])
        np.testing.assert_array_equal(s1[0], score[qi])
    _check_topk_against_numpy(queries, matrix, 150, idx, score)


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(11)
    matrix = _rand(rng, 50, 16)
    queries = _rand(rng, 3, 16)
    m0, q0 = matrix.copy(), queries.copy()
    _core.topk_ip(queries, matrix, 5)
    _core.inner_products(queries, matrix)
    np.testing.assert_array_equal(matrix, m0)
    np.testing.assert_array_equal(queries, q0)


# ---- argument errors -------------------------------------------------------------------------


def test_float64_matrix_rejected() -> None:
    matrix = np.zeros((4, 3), dtype=np.float64)
    with pytest.raises(ValueError, match=r"matrix must be float32, got float64.*astype\(np\.float32\)"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), matrix, 1)
    with pytest.raises(ValueError, match=r"matrix must be float32, got float64"):
        _core.inner_products(np.zeros(3, dtype=np.float32), matrix)


def test_float64_queries_rejected() -> None:
    with pytest.raises(ValueError, match=r"queries must be float32, got float64.*astype"):
        _core.topk_ip(np.zeros(3), np.zeros((4, 3), dtype=np.float32), 1)


def test_other_dtypes_rejected() -> None:
    m32 = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"queries must be float32, got float16"):
        _core.topk_ip(np.zeros(3, dtype=np.float16), m32, 1)
    with pytest.raises(ValueError, match=r"matrix must be float32, got int64"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), np.zeros((4, 3), dtype=np.int64), 1)
    with pytest.raises(ValueError, match=r"matrix must be float32"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), m32.astype(">f4"), 1)  # byte-swapped


def test_non_contiguous_rejected() -> None:
    rng = np.random.default_rng(12)
    big = _rand(rng, 8, 6)
    with pytest.raises(ValueError, match=r"matrix must be C-contiguous.*np\.ascontiguousarray\(matrix\)"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), big[:, ::2], 1)
    with pytest.raises(ValueError, match=r"matrix must be C-contiguous"):
        _core.inner_products(np.zeros(8, dtype=np.float32), big.T)  # Fortran order
    with pytest.raises(ValueError, match=r"queries must be C-contiguous"):
        _core.topk_ip(big[::2], np.zeros((4, 6), dtype=np.float32), 1)
    # the suggested fix works
    idx, _ = _core.topk_ip(np.ascontiguousarray(big[::2]), np.zeros((4, 6), dtype=np.float32), 1)
    assert idx.shape == (4, 1)


def test_dimension_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match=r"queries has dimension 3 but matrix rows have 4"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), np.zeros((5, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match=r"queries has dimension 3 but matrix rows have 4"):
        _core.inner_products(np.zeros((2, 3), dtype=np.float32), np.zeros((5, 4), dtype=np.float32))


def test_wrong_rank_rejected() -> None:
    q = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"matrix must be 2-D.*reshape\(1, -1\)"):
        _core.topk_ip(q, np.zeros(4, dtype=np.float32), 1)
    with pytest.raises(ValueError, match=r"matrix must be 2-D"):
        _core.topk_ip(q, np.zeros((2, 2, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match=r"queries must be 1-D .* or 2-D"):
        _core.topk_ip(np.zeros((1, 1, 4), dtype=np.float32), np.zeros((2, 4), dtype=np.float32), 1)
    with pytest.raises(ValueError, match=r"queries must be 1-D .* or 2-D"):
        _core.inner_products(np.array(1.0, dtype=np.float32), np.zeros((2, 1), dtype=np.float32))


def test_zero_dimension_rejected() -> None:
    with pytest.raises(ValueError, match=r"dimension >= 1"):
        _core.topk_ip(np.zeros(0, dtype=np.float32), np.zeros((3, 0), dtype=np.float32), 1)


@pytest.mark.parametrize("k", [0, -1])
def test_bad_k_rejected(k: int) -> None:
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        _core.topk_ip(np.zeros(3, dtype=np.float32), np.zeros((4, 3), dtype=np.float32), k)


def test_non_arrays_are_rejected_with_a_hint() -> None:
    # No silent conversion (it would copy on every call): say how to make the array.
    m32 = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"queries must be a numpy float32 array, got list"):
        _core.topk_ip([1.0, 2.0], m32, 1)
    with pytest.raises(ValueError, match=r"np\.asarray\(matrix, dtype=np\.float32\)"):
        _core.inner_products(np.zeros(2, dtype=np.float32), m32.tolist())
    with pytest.raises(ValueError, match=r"queries must be a numpy float32 array, got float32"):
        _core.topk_ip(np.float32(1.0), np.zeros((4, 1), dtype=np.float32), 1)  # numpy scalar


# ---- module metadata -------------------------------------------------------------------------


def test_simd_isa_is_known() -> None:
    assert _core.simd_isa() in {"avx512", "avx2", "neon", "scalar"}
    assert _core.simd_isa() == _core.simd_isa()


def test_version() -> None:
    assert _core.__version__ == "0.1.0"
    assert _core.__doc__ and "inner product" in _core.__doc__

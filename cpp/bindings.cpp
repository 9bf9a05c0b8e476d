// pybind11 glue for the similarity kernel (cpp/include/stratacache/kernel.hpp): stratacache._core.
//
// Inputs are read in place (no copies): they must already be float32, C-contiguous numpy arrays;
// anything else is rejected with a ValueError that says how to fix it. Outputs are allocated with
// the GIL held, then the GIL is released and the kernel touches only raw pointers (the same
// pattern as hnswlib's knnQuery_return_numpy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "stratacache/codes.hpp"
#include "stratacache/kernel.hpp"

namespace py = pybind11;

namespace {

struct matrix_view {
    const float* data;
    std::size_t rows;
    std::size_t dim;
};

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    if (a.ndim() == 1) s += ",";
    return s + ")";
}

// Checks dtype / layout / rank of `a` (named `name` in messages) and returns a view of its data.
// allow_1d: a 1-D array (d,) is viewed as a single row (1, d).
matrix_view as_view(const py::object& obj, const char* name, bool allow_1d) {
    const std::string n(name);
    if (!py::isinstance<py::array>(obj)) {
        // Lists, scalars, torch tensors, ...: no silent conversion (it would copy on every call).
        throw std::invalid_argument(
            n + " must be a numpy float32 array, got " +
            py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>() +
            ": pass np.asarray(" + n + ", dtype=np.float32)");
    }
    const auto a = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<float>>(a)) {
        throw std::invalid_argument(n + " must be float32, got " +
                                    py::str(a.dtype()).cast<std::string>() + ": pass " + n +
                                    ".astype(np.float32)");
    }
    if (allow_1d) {
        if (a.ndim() != 1 && a.ndim() != 2) {
            throw std::invalid_argument(n + " must be 1-D (dim,) or 2-D (n_queries, dim), got shape " +
                                        shape_str(a));
        }
    } else if (a.ndim() != 2) {
        throw std::invalid_argument(n + " must be 2-D (n_rows, dim), got shape " + shape_str(a) +
                                    (a.ndim() == 1 ? ": pass " + n + ".reshape(1, -1) for a single row"
                                                   : std::string()));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(n + " must be C-contiguous: pass np.ascontiguousarray(" + n +
                                    ")");
    }
    const auto* data = static_cast<const float*>(a.data());
    if (reinterpret_cast<std::uintptr_t>(data) % alignof(float) != 0) {
        throw std::invalid_argument(n + " data is not aligned to 4 bytes: pass " + n + ".copy()");
    }
    matrix_view v{data, 1, 0};
    if (a.ndim() == 1) {
        v.dim = static_cast<std::size_t>(a.shape(0));
    } else {
        v.rows = static_cast<std::size_t>(a.shape(0));
        v.dim = static_cast<std::size_t>(a.shape(1));
    }
    return v;
}

// Validates the (queries, matrix) pair; returns their views.
std::pair<matrix_view, matrix_view> check_pair(const py::object& queries,
                                               const py::object& matrix) {
    const matrix_view q = as_view(queries, "queries", /*allow_1d=*/true);
    const matrix_view m = as_view(matrix, "matrix", /*allow_1d=*/false);
    if (m.dim == 0) {
        throw std::invalid_argument("matrix rows must have dimension >= 1, got shape " +
                                    shape_str(py::reinterpret_borrow<py::array>(matrix)));
    }
    if (q.dim != m.dim) {
        throw std::invalid_argument("queries has dimension " + std::to_string(q.dim) +
                                    " but matrix rows have " + std::to_string(m.dim));
    }
    return {q, m};
}

// Arguments are taken as py::object (not py::array) so that a non-array gets the same
// "what to fix" ValueError as a wrong dtype, instead of pybind11's generic TypeError.
py::tuple topk_ip(const py::object& queries, const py::object& matrix, py::ssize_t k) {
    if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
    const auto [q, m] = check_pair(queries, matrix);
    const std::size_t kk = std::min(static_cast<std::size_t>(k), m.rows);

    py::array_t<std::int64_t> idx({static_cast<py::ssize_t>(q.rows), static_cast<py::ssize_t>(kk)});
    py::array_t<float> score({static_cast<py::ssize_t>(q.rows), static_cast<py::ssize_t>(kk)});
    std::int64_t* idx_ptr = idx.mutable_data();
    float* score_ptr = score.mutable_data();
    if (q.rows > 0 && kk > 0) {
        py::gil_scoped_release release;
        stratacache::topk_ip(q.data, q.rows, m.data, m.rows, m.dim, kk, idx_ptr, score_ptr);
    }
    return py::make_tuple(std::move(idx), std::move(score));
}

py::array_t<float> inner_products(const py::object& queries, const py::object& matrix) {
    const auto [q, m] = check_pair(queries, matrix);
    py::array_t<float> out({static_cast<py::ssize_t>(q.rows), static_cast<py::ssize_t>(m.rows)});
    float* out_ptr = out.mutable_data();
    if (q.rows > 0 && m.rows > 0) {
        py::gil_scoped_release release;
        stratacache::inner_products(q.data, q.rows, m.data, m.rows, m.dim, out_ptr);
    }
    return out;
}


// A C-contiguous numpy array of exactly `ndim` dimensions and dtype T, or a ValueError naming
// `name` that says how to fix it.
template <class T>
py::array_t<T> checked(const py::object& obj, const char* name, py::ssize_t ndim,
                       const char* dtype) {
    const std::string n(name);
    if (!py::isinstance<py::array_t<T>>(obj)) {
        throw std::invalid_argument(n + " must be a numpy " + dtype + " array: pass np.asarray(" +
                                    n + ", dtype=np." + dtype + ")");
    }
    auto a = py::reinterpret_borrow<py::array_t<T>>(obj);
    if (a.ndim() != ndim) {
        throw std::invalid_argument(n + " must be " + std::to_string(ndim) + "-D, got shape " +
                                    shape_str(a));
    }
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(n + " must be C-contiguous: pass np.ascontiguousarray(" + n +
                                    ")");
    }
    return a;
}

py::tuple search_codes(const py::object& query, const py::object& query_bits,
                       const py::object& bits, const py::object& values, py::ssize_t k,
                       py::ssize_t candidates, py::ssize_t threads) {
    if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
    if (candidates < 1) {
        throw std::invalid_argument("candidates must be >= 1, got " + std::to_string(candidates));
    }
    if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
    const auto q = checked<float>(query, "query", 1, "float32");
    const auto qb = checked<std::uint8_t>(query_bits, "query_bits", 1, "uint8");
    const auto b = checked<std::uint8_t>(bits, "bits", 2, "uint8");
    const auto v = checked<std::uint8_t>(values, "values", 2, "uint8");
    const auto dim = static_cast<std::size_t>(q.shape(0));
    if (dim == 0) throw std::invalid_argument("query must have dimension >= 1");
    const std::size_t nb = stratacache::code_bits_bytes(dim);
    if (static_cast<std::size_t>(qb.shape(0)) != nb || static_cast<std::size_t>(b.shape(1)) != nb) {
        throw std::invalid_argument("query_bits and bits rows must have " + std::to_string(nb) +
                                    " bytes for a query of dimension " + std::to_string(dim) +
                                    ", got " + std::to_string(qb.shape(0)) + " and " +
                                    std::to_string(b.shape(1)));
    }
    if (b.shape(0) != v.shape(0)) {
        throw std::invalid_argument("bits has " + std::to_string(b.shape(0)) + " rows but values has " +
                                    std::to_string(v.shape(0)));
    }
    if (reinterpret_cast<std::uintptr_t>(b.data()) % 8 != 0) {
        throw std::invalid_argument("bits data is not aligned to 8 bytes: pass bits.copy()");
    }
    const auto n_rows = static_cast<std::size_t>(b.shape(0));
    if (n_rows > 0xFFFFFFFFu) throw std::invalid_argument("bits has more than 2^32 rows");
    std::vector<std::uint64_t> qwords(nb / 8);
    std::memcpy(qwords.data(), qb.data(), nb);  // an aligned copy of the query's bits
    const std::size_t most = std::min<std::size_t>(static_cast<std::size_t>(k), n_rows);
    py::array_t<std::int64_t> idx(static_cast<py::ssize_t>(most));
    py::array_t<float> score(static_cast<py::ssize_t>(most));
    std::size_t found = 0;
    {
        py::gil_scoped_release release;
        found = stratacache::search_codes(
            q.data(), qwords.data(), reinterpret_cast<const std::uint64_t*>(b.data()), v.data(),
            n_rows, static_cast<std::size_t>(v.shape(1)), dim, static_cast<std::size_t>(candidates),
            static_cast<std::size_t>(k), static_cast<std::size_t>(threads), idx.mutable_data(),
            score.mutable_data());
    }
    idx.resize({static_cast<py::ssize_t>(found)});
    score.resize({static_cast<py::ssize_t>(found)});
    return py::make_tuple(std::move(idx), std::move(score));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() =
        "stratacache native similarity kernel: exact inner-product top-k over float32 matrices.\n"
        "\n"
        "Scores are inner products; for unit-normalised vectors that is cosine similarity in\n"
        "[-1, 1]. Inputs must be float32 and C-contiguous (they are read without copying); the\n"
        "GIL is released while the kernel runs. The SIMD path is chosen once, on first use, from\n"
        "what the running CPU supports: see simd_isa().";
    m.attr("__version__") = "0.1.0";

    m.def("topk_ip", &topk_ip, py::arg("queries"), py::arg("matrix"), py::arg("k"),
          "topk_ip(queries, matrix, k) -> (indices, scores)\n"
          "\n"
          "For each query, the k rows of `matrix` (n_rows, dim) with the largest inner product.\n"
          "`queries` is (dim,) for one query or (n_queries, dim). Returns int64 row indices and\n"
          "float32 scores, both of shape (n_queries, min(k, n_rows)) (a 1-D query gives one row),\n"
          "sorted by score descending, ties broken by lower row index. k must be >= 1.");
    m.def("inner_products", &inner_products, py::arg("queries"), py::arg("matrix"),
          "inner_products(queries, matrix) -> scores\n"
          "\n"
          "All inner products: float32 array of shape (n_queries, n_rows) with\n"
          "scores[i, j] = queries[i] . matrix[j]. `queries` is (dim,) or (n_queries, dim).");
    m.def("search_codes", &search_codes, py::arg("query"), py::arg("query_bits"),
          py::arg("bits"), py::arg("values"), py::arg("k"), py::arg("candidates"),
          py::arg("threads") = 1,
          "search_codes(query, query_bits, bits, values, k, candidates, threads=1)\n"
          "    -> (indices, scores)\n"
          "\n"
          "Approximate top-k over compact codes (layout in cpp/include/stratacache/codes.hpp):\n"
          "`bits` uint8 (n_rows, 8*ceil(dim/64)) sign bits, `values` uint8 (n_rows, >= dim+4)\n"
          "int8 components then a float32 scale. The `candidates` rows whose sign bits are\n"
          "nearest `query_bits` (Hamming) are ranked by `query` (float32, (dim,)) against their\n"
          "int8 components times their scale. Returns\n"
          "int64 row indices and float32 estimated scores, best first, at most\n"
          "min(k, candidates, n_rows). `threads` bounds the threads of the bit scan.");
    m.def("simd_isa", &stratacache::simd_isa,
          "Name of the SIMD path in use: 'avx512', 'avx2', 'neon' or 'scalar'.");
}

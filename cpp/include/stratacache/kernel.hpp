// stratacache native similarity kernel: exact inner-product search over a dense float32 matrix.
//
// Plain C++17, header-only, no Python types (the pybind11 glue lives in cpp/bindings.cpp).
//
// SIMD: the dot product has AVX-512F and AVX2+FMA paths on x86 (each compiled per function with
// __attribute__((target(...))), so the rest of the build stays baseline x86-64 and no
// -march=native is needed), a NEON path on aarch64 and a portable scalar fallback. The path is
// picked once, at first use, from what the running CPU supports (__builtin_cpu_supports) and
// cached in a function-local static; simd_isa() names it.
//
// Scores are raw inner products; for unit-normalised vectors that is cosine similarity.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define STRATACACHE_X86_SIMD 1
#include <immintrin.h>
#else
#define STRATACACHE_X86_SIMD 0
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace stratacache {

using dot_fn_t = float (*)(const float* a, const float* b, std::size_t d);

namespace detail {

// ---------------------------------------------------------------------------------------------
// Dot-product implementations. All handle any d >= 0 (tails included); d == 0 gives 0.
// ---------------------------------------------------------------------------------------------

// Portable fallback. Eight independent partial sums: the compiler can keep them in one SSE2/NEON
// register pair (baseline ISA, no fast-math needed) and the dependency chain is 8x shorter.
inline float dot_scalar(const float* a, const float* b, std::size_t d) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    std::size_t i = 0;
    for (; i + 8 <= d; i += 8) {
        for (std::size_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < d; ++i) s += a[i] * b[i];
    return s;
}

#if STRATACACHE_X86_SIMD

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 shuf = _mm_movehdup_ps(lo);  // (1,1,3,3)
    __m128 sums = _mm_add_ps(lo, shuf);
    shuf = _mm_movehl_ps(shuf, sums);
    sums = _mm_add_ss(sums, shuf);
    return _mm_cvtss_f32(sums);
}

__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b,
                                                           std::size_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    std::size_t i = 0;
    for (; i + 32 <= d; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= d; i += 8) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    }
    if (i < d) {
        // Masked load of the last 1..7 floats: masked-off lanes are not read (no fault past the
        // end of the buffer) and come back as 0.
        const int rem = static_cast<int>(d - i);
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, mask), _mm256_maskload_ps(b + i, mask), s1);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

__attribute__((target("avx512f"))) inline float dot_avx512(const float* a, const float* b,
                                                            std::size_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    std::size_t i = 0;
    for (; i + 64 <= d; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= d; i += 16) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    }
    if (i < d) {
        // Masked load of the last 1..15 floats (masked-off lanes are not read, come back as 0).
        const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    // Horizontal sum by folding 512 -> 128 bits. The masked (all-lanes) intrinsic forms are used
    // on purpose: _mm512_reduce_add_ps and the unmasked shuffle/extract forms pass an
    // _mm*_undefined_* source that makes GCC 12 emit a spurious -Wuninitialized.
    __m512 v = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 x = _mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, v, 0);
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

#endif  // STRATACACHE_X86_SIMD

#if defined(__aarch64__)

inline float dot_neon(const float* a, const float* b, std::size_t d) {
    float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f);
    float32x4_t s2 = vdupq_n_f32(0.f), s3 = vdupq_n_f32(0.f);
    std::size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= d; i += 4) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < d; ++i) s += a[i] * b[i];
    return s;
}

#endif  // __aarch64__

struct simd_dispatch {
    dot_fn_t dot;
    const char* isa;
};

inline simd_dispatch detect_simd() {
#if STRATACACHE_X86_SIMD
    // GCC's and clang's cpu-feature probes also check (via XGETBV) that the OS saves the
    // AVX / AVX-512 register state, so a "supported" answer is safe to act on.
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return {&dot_avx512, "avx512"};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {&dot_avx2, "avx2"};
#endif
#if defined(__aarch64__)
    return {&dot_neon, "neon"};  // Advanced SIMD is mandatory on AArch64
#else
    return {&dot_scalar, "scalar"};
#endif
}

// Chosen once (thread-safe magic static); one instance program-wide (inline function).
inline const simd_dispatch& simd() {
    static const simd_dispatch chosen = detect_simd();
    return chosen;
}

// ---------------------------------------------------------------------------------------------
// Threading: split [0, n) across workers; the calling thread is one of them. Workers take
// items one at a time from a shared counter; the first exception stops the others from taking
// more, and is rethrown in the caller after every worker has been joined (hnswlib ParallelFor).
// ---------------------------------------------------------------------------------------------

// Below this much work (multiply-adds) thread start-up costs more than it saves.
constexpr double kParallelWork = static_cast<double>(std::size_t(1) << 22);  // ~4M

// Worker count for a batch of n_queries (threads split queries, never one query's rows).
inline std::size_t pick_threads(std::size_t n_queries, std::size_t n_rows, std::size_t dim) {
    if (n_queries < 2) return 1;
    const double work = static_cast<double>(n_queries) * static_cast<double>(n_rows) *
                        static_cast<double>(dim);
    if (work <= kParallelWork) return 1;
    std::size_t hw = std::thread::hardware_concurrency();
    if (hw == 0) hw = 1;
    return std::min(hw, n_queries);
}

// fn(item, worker_id), worker_id in [0, n_threads).
template <class Fn>
void parallel_for(std::size_t n, std::size_t n_threads, Fn&& fn) {
    if (n_threads <= 1 || n <= 1) {
        for (std::size_t i = 0; i < n; ++i) fn(i, std::size_t(0));
        return;
    }
    std::atomic<std::size_t> next(0);
    std::exception_ptr first_error = nullptr;
    std::mutex error_mutex;

    auto worker = [&](std::size_t worker_id) {
        while (true) {
            const std::size_t i = next.fetch_add(1);
            if (i >= n) break;
            try {
                fn(i, worker_id);
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mutex);
                if (!first_error) first_error = std::current_exception();
                next.store(n);  // others stop taking work
                break;
            }
        }
    };

    std::vector<std::thread> threads;
    threads.reserve(n_threads - 1);
    for (std::size_t t = 1; t < n_threads; ++t) {
        try {
            threads.emplace_back(worker, t);
        } catch (const std::system_error&) {
            break;  // could not start more threads: the ones we have (and this one) do the work
        }
    }
    worker(0);
    for (auto& th : threads) th.join();
    if (first_error) std::rethrow_exception(first_error);
}

// ---------------------------------------------------------------------------------------------
// Top-k selection
// ---------------------------------------------------------------------------------------------

struct candidate {
    float score;
    std::int64_t idx;
};

// Strict weak order "a ranks before b": higher score first, ties by lower row index; NaN
// scores rank after every number.
inline bool ranks_before(const candidate& a, const candidate& b) {
    const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);
    if (a_nan != b_nan) return b_nan;
    if (!a_nan && a.score != b.score) return a.score > b.score;
    return a.idx < b.idx;
}

// Queries are processed in blocks: for each matrix row, the dot products with every query of
// the block are taken while the row is still in L1, so a batch streams the matrix from memory
// once per block instead of once per query (the matrix is usually far larger than the cache).
// Per query and row the computation is the same whatever the blocking or threading, so results
// are identical for single-query and batched calls.
constexpr std::size_t kQueryBlock = 8;

// Bounded heap of the best k candidates of one query. With ranks_before as the heap's "less",
// front() is the worst kept candidate.
struct topk_heap {
    std::vector<candidate> items;
    float worst = 0.f;

    void start(std::size_t k) {
        items.clear();
        items.reserve(k);
    }
    // Rows 0..k-1 go in unconditionally; then heapify.
    void fill(float s, std::size_t r) { items.push_back({s, static_cast<std::int64_t>(r)}); }
    void heapify() {
        std::make_heap(items.begin(), items.end(), ranks_before);
        worst = items.front().score;
    }
    // Rows arrive in increasing index order, so an equal score never displaces a kept row
    // (lower index wins ties); a number displaces a kept NaN.
    void offer(float s, std::size_t r) {
        if (s > worst || (std::isnan(worst) && !std::isnan(s))) {
            std::pop_heap(items.begin(), items.end(), ranks_before);
            items.back() = {s, static_cast<std::int64_t>(r)};
            std::push_heap(items.begin(), items.end(), ranks_before);
            worst = items.front().score;
        }
    }
    void write(std::int64_t* out_idx, float* out_score) {
        std::sort_heap(items.begin(), items.end(), ranks_before);  // best first
        for (std::size_t i = 0; i < items.size(); ++i) {
            out_idx[i] = items[i].idx;
            out_score[i] = items[i].score;
        }
    }
};

// Queries [q0, q0 + nb), nb <= kQueryBlock, 1 <= k <= n_rows. heaps: >= nb scratch heaps.
inline void topk_block(const float* queries, std::size_t q0, std::size_t nb, const float* matrix,
                       std::size_t n_rows, std::size_t dim, std::size_t k, dot_fn_t dot,
                       topk_heap* heaps, std::int64_t* out_idx, float* out_score) {
    const float* qb = queries + q0 * dim;
    for (std::size_t j = 0; j < nb; ++j) heaps[j].start(k);
    std::size_t r = 0;
    for (; r < k; ++r) {
        const float* row = matrix + r * dim;
        for (std::size_t j = 0; j < nb; ++j) heaps[j].fill(dot(qb + j * dim, row, dim), r);
    }
    for (std::size_t j = 0; j < nb; ++j) heaps[j].heapify();
    for (; r < n_rows; ++r) {
        const float* row = matrix + r * dim;
        for (std::size_t j = 0; j < nb; ++j) heaps[j].offer(dot(qb + j * dim, row, dim), r);
    }
    for (std::size_t j = 0; j < nb; ++j) {
        heaps[j].write(out_idx + (q0 + j) * k, out_score + (q0 + j) * k);
    }
}

// Block size for n_queries over n_threads workers: at most kQueryBlock, small enough that every
// worker gets a block.
inline std::size_t query_block(std::size_t n_queries, std::size_t n_threads) {
    const std::size_t per_thread = (n_queries + n_threads - 1) / n_threads;
    return std::max<std::size_t>(1, std::min(kQueryBlock, per_thread));
}

inline void check_common(const float* queries, std::size_t n_queries, const float* matrix,
                         std::size_t n_rows, std::size_t dim) {
    if (dim == 0) throw std::invalid_argument("dim must be >= 1");
    if (n_queries > 0 && queries == nullptr) {
        throw std::invalid_argument("queries is null but n_queries > 0");
    }
    if (n_rows > 0 && matrix == nullptr) {
        throw std::invalid_argument("matrix is null but n_rows > 0");
    }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

// Name of the SIMD path in use: "avx512", "avx2", "neon" or "scalar".
inline const char* simd_isa() { return detail::simd().isa; }

// Inner product of a and b (length d) with the run-time-selected SIMD path. d == 0 gives 0.
inline float dot(const float* a, const float* b, std::size_t d) {
    return detail::simd().dot(a, b, d);
}

// For each of the n_queries queries (row-major, n_queries x dim), the k rows of `matrix`
// (row-major, n_rows x dim) with the largest inner product, best first, ties broken by lower row
// index (NaN scores rank last). Writes n_queries x k row indices to out_idx and scores to
// out_score. k must be <= n_rows (the caller clamps). Memory is O(k) per query in flight
// (bounded min-heaps; at most kQueryBlock queries per worker). Large batches (n_queries > 1 and
// n_queries*n_rows*dim > ~4M) are split across std::thread workers (at most
// hardware_concurrency()). Results do not depend on batching or the number of threads.
inline void topk_ip(const float* queries, std::size_t n_queries, const float* matrix,
                    std::size_t n_rows, std::size_t dim, std::size_t k, std::int64_t* out_idx,
                    float* out_score) {
    detail::check_common(queries, n_queries, matrix, n_rows, dim);
    if (k > n_rows) {
        throw std::invalid_argument("k (" + std::to_string(k) + ") must be <= n_rows (" +
                                    std::to_string(n_rows) + ")");
    }
    if (n_queries == 0 || k == 0) return;
    if (out_idx == nullptr || out_score == nullptr) {
        throw std::invalid_argument("out_idx and out_score must not be null");
    }
    const dot_fn_t dot_fn = detail::simd().dot;
    const std::size_t n_threads = detail::pick_threads(n_queries, n_rows, dim);
    const std::size_t block = detail::query_block(n_queries, n_threads);
    const std::size_t n_blocks = (n_queries + block - 1) / block;
    std::vector<detail::topk_heap> heaps(n_threads * block);  // O(k) each
    detail::parallel_for(n_blocks, n_threads, [&](std::size_t bi, std::size_t worker) {
        const std::size_t q0 = bi * block;
        const std::size_t nb = std::min(block, n_queries - q0);
        detail::topk_block(queries, q0, nb, matrix, n_rows, dim, k, dot_fn,
                           heaps.data() + worker * block, out_idx, out_score);
    });
}

// out[i * n_rows + j] = <queries[i], matrix[j]> for an n_queries x n_rows result (row-major).
// Blocked and threaded across queries under the same rule as topk_ip.
inline void inner_products(const float* queries, std::size_t n_queries, const float* matrix,
                           std::size_t n_rows, std::size_t dim, float* out) {
    detail::check_common(queries, n_queries, matrix, n_rows, dim);
    if (n_queries == 0 || n_rows == 0) return;
    if (out == nullptr) throw std::invalid_argument("out must not be null");
    const dot_fn_t dot_fn = detail::simd().dot;
    const std::size_t n_threads = detail::pick_threads(n_queries, n_rows, dim);
    const std::size_t block = detail::query_block(n_queries, n_threads);
    const std::size_t n_blocks = (n_queries + block - 1) / block;
    detail::parallel_for(n_blocks, n_threads, [&](std::size_t bi, std::size_t) {
        const std::size_t q0 = bi * block;
        const std::size_t nb = std::min(block, n_queries - q0);
        const float* qb = queries + q0 * dim;
        float* ob = out + q0 * n_rows;
        for (std::size_t r = 0; r < n_rows; ++r) {
            const float* row = matrix + r * dim;
            for (std::size_t j = 0; j < nb; ++j) ob[j * n_rows + r] = dot_fn(qb + j * dim, row, dim);
        }
    });
}

}  // namespace stratacache

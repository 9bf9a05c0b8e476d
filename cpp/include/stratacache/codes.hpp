// stratacache compact-code search: candidates by 1-bit codes, ranked by int8 codes.
//
// Plain C++17, header-only (the pybind11 glue lives in cpp/bindings.cpp). The warm and cold
// tiers keep no float32 vector in memory; per entry they keep two rows of codes, in two
// matrices:
//
//   bits:   [ sign bits: nb bytes ]                      nb = 8 * ceil(dim / 64), tail bits 0
//   values: [ int8 components: dim bytes | scale: float32 | padding ]
//
// where component i is about scale * int8[i]. A search streams the bits matrix (Hamming
// distance to the query's signs, 64 bits per popcount; the bits are a matrix of their own so
// the scan reads them sequentially: interleaved with the int8 rows, every row cost a cache miss
// the prefetcher did not hide, 50 ns instead of 2), keeps the n_candidates nearest, scores
// those by the query (float32) against their int8 components, and returns the k best by that
// score. Callers re-score what they return against the exact stored vectors: the scores here
// are estimates.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "stratacache/kernel.hpp"

namespace stratacache {

namespace detail {

inline std::size_t popcount64_portable(std::uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return static_cast<std::size_t>((x * 0x0101010101010101ULL) >> 56);
}

using hamming_fn_t = void (*)(const std::uint64_t* query, const std::uint64_t* rows,
                              std::size_t words, std::size_t begin, std::size_t end,
                              std::uint16_t* out, std::uint32_t* hist);

inline void hamming_portable(const std::uint64_t* query, const std::uint64_t* rows,
                             std::size_t words, std::size_t begin, std::size_t end,
                             std::uint16_t* out, std::uint32_t* hist) {
    for (std::size_t r = begin; r < end; ++r) {
        const std::uint64_t* row = rows + r * words;
        std::size_t d = 0;
        for (std::size_t w = 0; w < words; ++w) d += popcount64_portable(row[w] ^ query[w]);
        out[r] = static_cast<std::uint16_t>(d);
        ++hist[d];
    }
}

#if STRATACACHE_X86_SIMD
__attribute__((target("popcnt"))) inline void hamming_popcnt(
    const std::uint64_t* query, const std::uint64_t* rows, std::size_t words, std::size_t begin,
    std::size_t end, std::uint16_t* out, std::uint32_t* hist) {
    for (std::size_t r = begin; r < end; ++r) {
        const std::uint64_t* row = rows + r * words;
        std::size_t d = 0;
        for (std::size_t w = 0; w < words; ++w) {
            d += static_cast<std::size_t>(__builtin_popcountll(row[w] ^ query[w]));
        }
        out[r] = static_cast<std::uint16_t>(d);
        ++hist[d];
    }
}
#endif

// Eight 64-bit words per instruction: a 384-dimension row (six words) is one masked load,
// one XOR and one VPOPCNTQ.
__attribute__((target("avx512f,avx512vpopcntdq"))) inline void hamming_avx512(
    const std::uint64_t* query, const std::uint64_t* rows, std::size_t words, std::size_t begin,
    std::size_t end, std::uint16_t* out, std::uint32_t* hist) {
    for (std::size_t r = begin; r < end; ++r) {
        const std::uint64_t* row = rows + r * words;
        __m512i acc = _mm512_setzero_si512();
        for (std::size_t w = 0; w < words; w += 8) {
            const std::size_t left = std::min<std::size_t>(8, words - w);
            const __mmask8 m = static_cast<__mmask8>((1u << left) - 1u);
            const __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi64(m, row + w),
                                               _mm512_maskz_loadu_epi64(m, query + w));
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
        }
        const auto d = static_cast<std::uint16_t>(_mm512_reduce_add_epi64(acc));
        out[r] = d;
        ++hist[d];
    }
}

inline hamming_fn_t pick_hamming() {
#if STRATACACHE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vpopcntdq")) return &hamming_avx512;
    if (__builtin_cpu_supports("popcnt")) return &hamming_popcnt;
#endif
    return &hamming_portable;  // aarch64 compilers turn the portable form into CNT
}

// query (float32) . int8 row, without the row's scale.
using dot_i8_fn_t = float (*)(const float* query, const std::int8_t* row, std::size_t dim);

inline float dot_i8_scalar(const float* query, const std::int8_t* row, std::size_t dim) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    std::size_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        for (std::size_t j = 0; j < 8; ++j) acc[j] += query[i + j] * static_cast<float>(row[i + j]);
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < dim; ++i) s += query[i] * static_cast<float>(row[i]);
    return s;
}

#if STRATACACHE_X86_SIMD
__attribute__((target("avx512f"))) inline float dot_i8_avx512(const float* query,
                                                               const std::int8_t* row,
                                                               std::size_t dim) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    std::size_t i = 0;
    for (; i + 32 <= dim; i += 32) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i + 16));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(query + i), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(query + i + 16),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s1);
    }
    __m512 v = _mm512_add_ps(s0, s1);
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 x = _mm512_mask_extractf32x4_ps(_mm_setzero_ps(), 0xF, v, 0);
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    float s = _mm_cvtss_f32(x);
    for (; i < dim; ++i) s += query[i] * static_cast<float>(row[i]);
    return s;
}
#endif

inline dot_i8_fn_t pick_dot_i8() {
#if STRATACACHE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return &dot_i8_avx512;
#endif
    return &dot_i8_scalar;
}

struct code_kernels {
    hamming_fn_t hamming;
    dot_i8_fn_t dot_i8;
};

inline const code_kernels& code_simd() {
    static const code_kernels chosen{pick_hamming(), pick_dot_i8()};
    return chosen;
}

// Rows per worker below which a second thread costs more than it saves (~0.2 ms of scan).
constexpr std::size_t kHammingRowsPerThread = std::size_t(1) << 17;

}  // namespace detail

// Bytes of a row's sign bits for `dim` components (whole 64-bit words).
inline std::size_t code_bits_bytes(std::size_t dim) { return 8 * ((dim + 63) / 64); }

// Smallest stride of a values row for `dim`: int8 components and the float32 scale.
inline std::size_t code_min_values_stride(std::size_t dim) { return dim + 4; }

// Searches n_rows entries (bits: n_rows x code_bits_bytes(dim) bytes, 8-byte aligned; values:
// row r at values + r * stride; layout above) for `query` (dim float32) whose sign bits are
// query_bits (code_bits_bytes(dim) bytes, 8-byte aligned). Writes up to k row indices (best
// estimated inner product first, ties by lower row) and their estimated scores; returns how
// many were written (min(k, n_candidates, n_rows)). The Hamming scan is split over up to
// max_threads threads (the calling thread included) for large n_rows.
inline std::size_t search_codes(const float* query, const std::uint64_t* query_bits,
                                const std::uint64_t* bits, const std::uint8_t* values,
                                std::size_t n_rows, std::size_t stride, std::size_t dim,
                                std::size_t n_candidates, std::size_t k, std::size_t max_threads,
                                std::int64_t* out_idx, float* out_score) {
    if (dim == 0) throw std::invalid_argument("dim must be >= 1");
    if (stride < code_min_values_stride(dim)) {
        throw std::invalid_argument("values row stride " + std::to_string(stride) +
                                    " is below " + std::to_string(code_min_values_stride(dim)) +
                                    " for dim " + std::to_string(dim));
    }
    const std::size_t take = std::min({k, n_candidates, n_rows});
    if (take == 0) return 0;
    const std::size_t words = code_bits_bytes(dim) / 8;
    const detail::code_kernels& kern = detail::code_simd();

    // 1. Hamming distance of every row, and how many rows are at each distance (one histogram
    //    per thread, summed after).
    const std::size_t n_bins = 64 * words + 1;
    std::unique_ptr<std::uint16_t[]> dist(new std::uint16_t[n_rows]);  // no zeroing: all written
    const std::size_t n_threads = std::max<std::size_t>(
        1, std::min(max_threads, n_rows / detail::kHammingRowsPerThread));
    std::vector<std::uint32_t> hists(n_threads * n_bins, 0);
    const std::size_t chunk = (n_rows + n_threads - 1) / n_threads;
    detail::parallel_for(n_threads, n_threads, [&](std::size_t t, std::size_t) {
        const std::size_t begin = t * chunk, end = std::min(n_rows, begin + chunk);
        if (begin < end) {
            kern.hamming(query_bits, bits, words, begin, end, dist.get(), &hists[t * n_bins]);
        }
    });
    std::vector<std::size_t> hist(n_bins, 0);
    for (std::size_t t = 0; t < n_threads; ++t) {
        for (std::size_t d = 0; d < n_bins; ++d) hist[d] += hists[t * n_bins + d];
    }

    // 2. The n_candidates nearest rows: every row below the cutoff distance, and the lowest rows
    //    at it (one more pass over the distances, no sort).
    const std::size_t want = std::min(n_candidates, n_rows);
    std::size_t cutoff = 0, below = 0;
    while (below + hist[cutoff] < want) below += hist[cutoff++];
    std::size_t at_cutoff = want - below;  // rows at exactly `cutoff` to keep, lowest rows first
    std::vector<std::uint32_t> chosen;
    chosen.reserve(want);
    for (std::size_t r = 0; r < n_rows; ++r) {
        if (dist[r] < cutoff || (dist[r] == cutoff && at_cutoff > 0 && at_cutoff--)) {
            chosen.push_back(static_cast<std::uint32_t>(r));
        }
    }

    // 3. Their int8 scores; the best `take`.
    std::vector<detail::candidate> scored(chosen.size());
    for (std::size_t i = 0; i < chosen.size(); ++i) {
        const std::uint8_t* row = values + static_cast<std::size_t>(chosen[i]) * stride;
        float scale;
        std::memcpy(&scale, row + dim, 4);  // rows need not be 4-byte aligned
        scored[i] = {scale * kern.dot_i8(query, reinterpret_cast<const std::int8_t*>(row), dim),
                     static_cast<std::int64_t>(chosen[i])};
    }
    std::partial_sort(scored.begin(), scored.begin() + static_cast<std::ptrdiff_t>(take),
                      scored.end(), detail::ranks_before);
    for (std::size_t i = 0; i < take; ++i) {
        out_idx[i] = scored[i].idx;
        out_score[i] = scored[i].score;
    }
    return take;
}

}  // namespace stratacache

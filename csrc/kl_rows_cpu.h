#pragma once
// The CPU row kernels of the fused KL(p_T || p_S) + gradient, shared by dupfast::kl_div_fused
// (csrc/kl_cpu.cpp) and the chunked fused linear + KL op (csrc/linear_kl_cpu.cpp), which runs them on
// each chunk of logits it computes. Per row, two passes over V:
//   pass 1, block by block (online softmax): each block's max and exp(y - max) of the scaled
//           logits y = x / T for both rows;
//           the exponentials are kept in a per-thread row buffer (L2-resident) and the block sums
//           merged into running log-sum-exps;
//   pass 2: p = kept exponential * exp(log p of the block max), then the loss terms and gradient.
// So each element costs two exps (not four), and the loops are `omp simd` so that expf is
// vectorised (glibc libmvec, enabled by -ffast-math; toolchain.md §4.2).
//
// In place: g may be the student's own buffer (g == s). Both row kernels read every block of s
// into their float scratch before they write that block of g (kl_rows), or read the whole chunk
// before writing any gradient (kl_rows_small); the linear + KL op relies on this to keep one
// [rows, V] buffer for the logits and their gradient.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "kl_math.h"

namespace dupfast::kl {

constexpr int64_t kBlock = 1024;  // float scratch of one block per input: stays in L1
// Below this many elements one thread does it all: a fork/join costs more than it saves there, and
// far more on a loaded machine.
constexpr int64_t kParallelMin = int64_t{1} << 17;

// exp(z) of a shifted logit z = y - max <= 0 (or -inf, or NaN). Below kExpFloor the float result is
// at most a subnormal (< 1.7e-38) and glibc's vector expf takes its scalar fallback for that lane:
// measured 6x the row kernel's time on logits spread over more than 87 nats (a confident model;
// std-15 logits at V = 49,152) and 2x on a top-k teacher's -inf slots. So the argument is clamped and
// the result selected to an exact 0 there (a -inf slot stays 0; NaN stays NaN, the compare is false).
// The only change in value: a slot with 0 < p < 1.7e-38 now has p = 0 (it adds nothing to the loss,
// and a student -inf there no longer makes it +inf).
constexpr float kExpFloor = -87.0f;
inline float exp_shifted(float z) {
  const float e = expf(z < kExpFloor ? kExpFloor : z);
  return z < kExpFloor ? 0.0f : e;
}

// A gradient entry below the smallest normal float (|g| < 1.2e-38) becomes 0: subnormal entries are
// common where the model is confident (26% of them at std-21 logits, V = 49,152) and every later
// product with them takes a microcode assist on x86: the head's g @ W GEMM of the fused linear + KL
// op measured 20x slower (4.8 s vs 0.23 s at 512 x 49,152 x 576). Bit test, so it vectorises and
// -ffast-math cannot drop it; NaN and inf are kept (their exponent bits are all ones).
inline float flush_subnormal(float g) { return (std::bit_cast<uint32_t>(g) & 0x7f800000u) == 0u ? 0.0f : g; }

// ---- loading (16-bit types as raw bits, so the loops vectorise) -------------------------------

// buf[j] = float(p[j]) * inv_t: the scaled logits y, rounded once and stored, so every later use
// sees the same values (kl_math.h).
template <typename T>
inline const float* load_scaled(const T* p, int64_t n, float inv_t, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = p[j] * inv_t;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const auto* u = reinterpret_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = std::bit_cast<float>(static_cast<uint32_t>(u[j]) << 16) * inv_t;
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    int64_t j = 0;
#if defined(__F16C__)
    const __m256 k = _mm256_set1_ps(inv_t);
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(buf + j, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))), k));
#endif
    for (; j < n; ++j) buf[j] = static_cast<float>(p[j]) * inv_t;
  }
  return buf;
}

// The block's scaled logits shifted by the block maximum, z = y - m, stored: the log-ratio in pass 2
// must be formed from z (of the order of a log-probability); left as y - m inside the loop, g++
// -ffast-math may re-associate it with the loop invariants and round at the magnitude of |y|.
template <typename T>
inline const float* load_shifted(const T* p, int64_t n, float inv_t, float m, float* buf) {
  load_scaled(p, n, inv_t, buf);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] -= m;
  return buf;
}

// Round n floats to T (round-to-nearest-even) and store them.
template <typename T>
inline void store_from_f32(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    auto* u = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t b = std::bit_cast<uint32_t>(src[j]);
      const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
      u[j] = static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // keep NaN a NaN
    }
  } else {
    static_assert(std::is_same_v<T, c10::Half>);
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; ++j) dst[j] = c10::Half(src[j]);
  }
}

// ---- the two passes ----------------------------------------------------------------------------

// Pass 1 on one block of scaled logits, both rows in the same loops so that a tie (student ==
// teacher) is reduced by the same instructions and gives bit-identical results. Writes
// e = exp(y - m) for the block, merges (m, sum e) into the running log-sum-exps and returns the
// block maxima m through ms_out / mt_out.
inline void block_pass1(const float* ys, const float* yt, int64_t n, float* es, float* et, Lse& ls, Lse& lt,
                        float& ms_out, float& mt_out) {
  float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < n; ++j) {
    ms = std::max(ms, ys[j]);
    mt = std::max(mt, yt[j]);
  }
  // An all-masked block (max = -inf) is shifted by 0 instead: its exponentials are exp(-inf) = 0
  // and it is not merged.
  const bool dead_s = is_neg_inf(ms), dead_t = is_neg_inf(mt);
  if (dead_s) ms = 0.0f;
  if (dead_t) mt = 0.0f;
  float ss = 0.0f, st = 0.0f;
#pragma omp simd reduction(+ : ss, st)
  for (int64_t j = 0; j < n; ++j) {
    es[j] = exp_shifted(ys[j] - ms);
    et[j] = exp_shifted(yt[j] - mt);
    ss += es[j];
    st += et[j];
  }
  if (!dead_s) ls = lse_merge(ls, Lse{ms, ss});
  if (!dead_t) lt = lse_merge(lt, Lse{mt, st});
  ms_out = ms;
  mt_out = mt;
}

// Pass 2 on one block, from z = y - m (m the block maximum; load_shifted) and the
// log-probabilities of the block maxima lc = log p(m) = (m - M) - log S (row max M, row sum S):
// p = e * exp(lc) and log p_T - log p_S = (z_T - z_S) + (lc_T - lc_S), every operand of the order
// of a log-probability, never of |y|. Returns the block's loss terms, summed; writes the gradient.
// Where both rows share the block scale (always so for a tie) the gradient is coef * c * (e_S - e_T),
// which is exactly 0 for a tie; coef * (e_S * c_S - e_T * c_T) would not be once the compiler
// contracts it into an fma.
inline double block_pass2(const float* zs, const float* zt, const float* es, const float* et, int64_t n, float lcs,
                         float lct, float coef, float* g) {
  const float cs = expf(lcs), ct = expf(lct), dc = keep(lct - lcs);
  double acc = 0.0;  // signed terms: a float sum measured 2-3x the error of PyTorch's loss
  if (float_bits(cs) == float_bits(ct)) {
    const float k = coef * cs;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      g[j] = flush_subnormal(k * (es[j] - et[j]));
      acc += kl_term(et[j] * ct, zt[j] - zs[j], dc);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      g[j] = flush_subnormal(coef * (es[j] * cs - et[j] * ct));
      acc += kl_term(et[j] * ct, zt[j] - zs[j], dc);
    }
  }
  return acc;
}

template <typename TS, typename TT>
void kl_rows(const TS* s, const TT* t, const float* w, float* loss, TS* g, int64_t rows, int64_t v, float inv_t,
             float grad_scale) {
  const int64_t nblocks = (v + kBlock - 1) / kBlock;
  const int nthreads = rows * v >= kParallelMin ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(nthreads)
  {
    alignas(64) float buf_s[kBlock];
    alignas(64) float buf_t[kBlock];
    alignas(64) float buf_g[kBlock];
    std::vector<float> es(v), et(v), ms(nblocks), mt(nblocks);  // one row's exponentials, block maxima
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const TS* sr = s + r * v;
      const TT* tr = t + r * v;
      TS* gr = g + r * v;
      const float wr = w ? w[r] : 1.0f;
      if (wr == 0.0f) {  // masked row: zero loss, zero gradient, inputs never read
        std::fill(gr, gr + v, TS(0.0f));
        loss[r] = 0.0f;
        continue;
      }
      Lse ls = lse_empty(), lt = lse_empty();
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t j0 = b * kBlock, n = std::min(kBlock, v - j0);
        block_pass1(load_scaled(sr + j0, n, inv_t, buf_s), load_scaled(tr + j0, n, inv_t, buf_t), n, es.data() + j0,
                    et.data() + j0, ls, lt, ms[b], mt[b]);
      }
      const RowNorm ns = row_norm(ls), nt = row_norm(lt);
      const float coef = wr * inv_t * grad_scale;
      double row = 0.0;
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t j0 = b * kBlock, n = std::min(kBlock, v - j0);
        float* go = buf_g;
        if constexpr (std::is_same_v<TS, float>) go = gr + j0;
        row += block_pass2(load_shifted(sr + j0, n, inv_t, ms[b], buf_s), load_shifted(tr + j0, n, inv_t, mt[b], buf_t),
                           es.data() + j0, et.data() + j0, n, log_prob(ms[b], ns), log_prob(mt[b], nt), coef, go);
        if constexpr (!std::is_same_v<TS, float>) store_from_f32(buf_g, n, gr + j0);
      }
      loss[r] = wr * static_cast<float>(row);
    }
  }
}

// ---- small vocabularies (V <= kSmallVocab: classification heads) -------------------------------
// One row is too short for SIMD, so a chunk of rows is swept column by column: every loop runs over
// the rows of the chunk (stride V), vectorised across rows. Same formulas as above with a single
// block per row: z = y - m stored, e = exp(z), p = e / S, log p_T - log p_S = (z_T - z_S) +
// (log S_S - log S_T).

constexpr int64_t kSmallVocab = 16;
constexpr int64_t kChunkRows = 256;

template <typename TS, typename TT>
void kl_rows_small(const TS* s, const TT* t, const float* w, float* loss, TS* g, int64_t rows, int64_t v,
                   float inv_t, float grad_scale) {
  const int64_t nchunks = (rows + kChunkRows - 1) / kChunkRows;
  const int nthreads = rows * v >= kParallelMin ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> zs(kChunkRows * v), zt(kChunkRows * v), es(kChunkRows * v), et(kChunkRows * v),
        gb(kChunkRows * v);
    alignas(64) float ms[kChunkRows], mt[kChunkRows], ss[kChunkRows], st[kChunkRows], acc[kChunkRows];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t r0 = c * kChunkRows, nr = std::min(kChunkRows, rows - r0), n = nr * v;
      float* ys = zs.data();  // scaled logits, shifted in place to z below
      float* yt = zt.data();
      load_scaled(s + r0 * v, n, inv_t, ys);
      load_scaled(t + r0 * v, n, inv_t, yt);
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) ms[i] = mt[i] = -INFINITY;
      for (int64_t j = 0; j < v; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < nr; ++i) {
          ms[i] = std::max(ms[i], ys[i * v + j]);
          mt[i] = std::max(mt[i], yt[i * v + j]);
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) ss[i] = st[i] = 0.0f;
      for (int64_t j = 0; j < v; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t k = i * v + j;
          ys[k] -= ms[i];  // z, stored (see load_shifted)
          yt[k] -= mt[i];
          es[k] = exp_shifted(ys[k]);
          et[k] = exp_shifted(yt[k]);
          ss[i] += es[k];
          st[i] += et[k];
        }
      }
      // per row: 1/S into ss/st, log S_S - log S_T into ms, coef into mt (ms/mt are no longer needed)
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) {
        ms[i] = logf(ss[i]) - logf(st[i]);
        ss[i] = 1.0f / ss[i];
        st[i] = 1.0f / st[i];
        const float wr = w ? w[r0 + i] : 1.0f;
        mt[i] = wr * inv_t * grad_scale;
        acc[i] = 0.0f;
      }
      for (int64_t j = 0; j < v; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t k = i * v + j;
          const float pt = et[k] * st[i];
          // 1/S shared (always so for a tie): an exact zero for a tie whatever the compiler contracts
          const float gk = float_bits(ss[i]) == float_bits(st[i]) ? mt[i] * ss[i] * (es[k] - et[k])
                                                                   : mt[i] * (es[k] * ss[i] - pt);
          const bool masked = w && w[r0 + i] == 0.0f;  // zero, whatever the row holds (NaN/inf)
          gb[k] = masked ? 0.0f : flush_subnormal(gk);
          acc[i] += kl_term(pt, yt[k] - ys[k], ms[i]);
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) {
        const float wr = w ? w[r0 + i] : 1.0f;
        loss[r0 + i] = wr == 0.0f ? 0.0f : wr * acc[i];
      }
      if constexpr (std::is_same_v<TS, float>) {
        std::copy(gb.data(), gb.data() + n, g + r0 * v);
      } else {
        store_from_f32(gb.data(), n, g + r0 * v);
      }
    }
  }
}

template <typename F>
void with_dtype(c10::ScalarType st, F&& f) {
  switch (st) {
    case c10::kFloat: return f(float{});
    case c10::kBFloat16: return f(c10::BFloat16{});
    case c10::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "kl_div_fused: unsupported dtype ", st);
  }
}

// kl_rows_small for classification heads (V <= kSmallVocab), kl_rows otherwise.
template <typename TS, typename TT>
void kl_rows_any(const TS* s, const TT* t, const float* w, float* loss, TS* g, int64_t rows, int64_t v, float inv_t,
                 float grad_scale) {
  if (v <= kSmallVocab) {
    kl_rows_small<TS, TT>(s, t, w, loss, g, rows, v, inv_t, grad_scale);
  } else {
    kl_rows<TS, TT>(s, t, w, loss, g, rows, v, inv_t, grad_scale);
  }
}

}  // namespace dupfast::kl

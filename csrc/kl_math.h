#pragma once
// Math of the fused KL(p_T || p_S) + gradient, shared by the CPU op (g++) and the CUDA kernels
// (nvcc), so every host test of the CPU op exercises exactly the formulas the GPU runs.
//
// Per row, on the scaled logits y = x * inv_t (inv_t = 1/T; rounded once, then used everywhere, so
// that e.g. V = 1 gives exactly 0 like log_softmax does), with the row maximum m and s = sum exp(y - m):
//   log p = (y - m) - log s                                 (never y - lse: |y| may be >> |log p|)
//   loss  = sum_j p_T[j] * (log p_T[j] - log p_S[j])        (a slot with p_T[j] == 0 adds 0)
//   grad  = coef * (p_S - p_T),   coef = weight * inv_t * reduction_scale
// Masked vocabulary slots are -inf logits. g++ builds this with -ffast-math, which lets it assume
// there are no infinities (`x == -INFINITY` and std::isinf may be folded to false), so -inf and
// exact zeros are recognised by their bit patterns, which no floating-point assumption can remove.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "df_common.h"
#include "float_bits.h"

namespace dupfast::kl {

// The bit pattern (float_bits.h), under the name the KL code and its host checks use.
DF_HD uint32_t float_bits(float x) { return df_bits(x); }

DF_HD bool is_neg_inf(float x) { return float_bits(x) == 0xff800000u; }

// +0.0f: exp() of a finite or -inf argument never returns -0.0, so this is "p == 0".
DF_HD bool is_pos_zero(float x) { return float_bits(x) == 0u; }

// Running log-sum-exp: max m and sum s of exp(x - m). An empty or all-masked part has m = -inf,
// s = 0 and is skipped when merged, so -inf - (-inf) = NaN never arises.
struct Lse {
  float m;
  float s;
};

DF_HD Lse lse_empty() { return Lse{-INFINITY, 0.0f}; }

DF_HD Lse lse_merge(Lse a, Lse b) {
  if (is_neg_inf(b.m)) return a;
  if (is_neg_inf(a.m)) return b;
  const float m = a.m > b.m ? a.m : b.m;
  return Lse{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// One element, one exp: rescale only when the maximum moves.
DF_HD void lse_push(Lse& a, float x) {
  if (is_neg_inf(x)) return;
  if (is_neg_inf(a.m)) {
    a.m = x;
    a.s = 1.0f;
  } else if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
}

// logsumexp of the pushed values; -inf for an empty or all-masked row.
DF_HD float lse_value(Lse a) { return a.m + logf(a.s); }

// Returns x unchanged, but g++ cannot see through it: -ffast-math lets it re-associate
// (a - b) - c into a - (b + c), which rounds at the magnitude of b and loses ~eps * |y| in a
// log-probability when the scaled logits are large. nvcc does not re-associate; device code
// needs no barrier.
DF_HD float keep(float x) {
#if !defined(__CUDA_ARCH__) && defined(__GNUC__)
  __asm__("" : "+m"(x));
#endif
  return x;
}

// A finished row normaliser: log p = (y - m) - log_s. Keeping m and log s apart (rather than
// lse = m + log s) keeps log p accurate when |y| is large (low temperature, large logits).
struct RowNorm {
  float m;
  float log_s;
};

DF_HD RowNorm row_norm(Lse a) { return RowNorm{a.m, logf(a.s)}; }

DF_HD float log_prob(float y, RowNorm n) { return keep(y - n.m) - n.log_s; }

// lse_s - lse_t, as differences of like quantities.
DF_HD float norm_diff(RowNorm s, RowNorm t) { return keep(s.m - t.m) + keep(s.log_s - t.log_s); }

// The KL term p_T * (log p_T - log p_S) of one vocabulary slot from p_T and the log-ratio split as
// dy + dc: dy a difference of the two (shifted) scaled logits, dc the difference of the rows'
// normalising constants. Both are differences of like quantities, so the log-ratio stays accurate,
// and it is exactly 0 for a tie however the compiler contracts or re-associates it.
DF_HD float kl_term(float pt, float dy, float dc) {
  // p_T == 0 (a masked teacher slot, or one that underflowed) contributes 0, even where the
  // student slot is -inf too (0 * inf would be NaN).
  return is_pos_zero(pt) ? 0.0f : pt * (dy + dc);
}

// One vocabulary slot from the scaled logits and the rows' normalisers (dnorm = norm_diff(ns, nt)):
// writes the gradient coef * (p_S - p_T) to *g and returns the KL term. Identical inputs give
// bit-identical p_S and p_T, hence an exactly zero gradient (a freshly initialised LoRA student).
DF_HD float kl_elem(float ys, float yt, RowNorm ns, RowNorm nt, float dnorm, float coef, float* g) {
  const float ps = expf(log_prob(ys, ns));
  const float pt = expf(log_prob(yt, nt));
  *g = coef * (ps - pt);
  return kl_term(pt, yt - ys, dnorm);
}

}  // namespace dupfast::kl

// Per-row math of the multi-layer Mahalanobis op, shared by the CPU op (g++) and the CUDA kernel.
//
// Distance of x to mean mu_k under precision P = W W^T:  q_k = ||(x - mu_k) W||^2.
// For K means the GEMM is done once per row block, centred at the centroid mu0 of the K means:
//     Y = (x - mu0) W,   S_k = (mu_k - mu0) W   (per layer, computed once),
//     q_k = ||Y - S_k||^2                          (epilogue, elementwise difference then square).
// We never use the expanded form ||xW||^2 - 2 xW.S_k + ||S_k||^2: it cancels catastrophically when
// x is near mu_k and ||xW|| is large. The centred difference loses only about
// eps * ||S_k|| / ||Y - S_k|| relative, and for K = 1 (mu0 = mu_1, S = 0) it is the exact centred form.
#pragma once
#include <cmath>
#include <cstdint>

#include "df_common.h"
#include "float_bits.h"

// Centroid of the K means of one layer, coordinate i (means: [K, d] row-major). fp64 sum.
DF_HD float maha_centroid(const float* means, int64_t K, int64_t d, int64_t i) {
  double s = 0.0;
  for (int64_t k = 0; k < K; ++k) s += static_cast<double>(means[k * d + i]);
  return static_cast<float>(s / static_cast<double>(K));
}

// Coordinate j of the whitened mean shift S_k = (mu_k - mu0) W (mu_k: [d], mu0: [d], W: [d, d]
// row-major); fp64 accumulation, so S_k carries only the final fp32 rounding.
DF_HD float maha_shift(const float* mu_k, const float* mu0, const float* W, int64_t d, int64_t j) {
  double s = 0.0;
  for (int64_t i = 0; i < d; ++i)
    s += (static_cast<double>(mu_k[i]) - static_cast<double>(mu0[i])) * static_cast<double>(W[i * d + j]);
  return static_cast<float>(s);
}

DF_HD float maha_sqrt(float x) { return sqrtf(x); }
DF_HD double maha_sqrt(double x) { return sqrt(x); }

// Squared distance -> output value: clamp the tiny negatives of finite-precision arithmetic to 0
// (a NaN stays NaN: rows with NaN features must not come out as a finite distance).
template <typename T>
DF_HD T maha_finalize(T q, bool squared) {
  if (!df_isnan(q) && q < T(0)) q = T(0);
  return squared ? q : maha_sqrt(q);
}

// min over the K means that propagates NaN (fminf/std::min drop it under fast-math).
DF_HD float maha_min(float a, float b) {
  if (df_isnan(a)) return a;
  if (df_isnan(b)) return b;
  return b < a ? b : a;
}

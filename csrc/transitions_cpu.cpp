// CPU layer transitions: per sample, one pass over its [L, d] features builds the fp64 Gram
// G = H H^T (register-tiled, AVX2 vectors of 4 doubles); cosines and the (L-1)x(L-1) difference
// Gram come from G (transitions_math.h), and kLanes samples at a time share one SIMD Jacobi
// eigen-solve. No [N, L-1, d] difference tensor and no per-sample SVD.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "transitions_checks.h"
#include "transitions_math.h"

namespace {

constexpr int kLanes = 8;  // samples per Jacobi solve: two AVX2 fp64 vectors per scalar op
typedef double v4d __attribute__((vector_size(32)));

inline v4d load4(const double* p) {
  v4d v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline double hsum(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// G[i, j] for i in [i0, i0+TI), j in [j0, j0+TJ) with i <= j, from X ([L, d] fp64 rows). Row
// indices past L are clamped (their results are dropped); the lower triangle is mirrored.
template <int TI, int TJ>
void gram_tile(const double* X, int L, int64_t d, int i0, int j0, double* G) {
  const double* ri[TI];
  const double* rj[TJ];
  for (int a = 0; a < TI; ++a) ri[a] = X + std::min(i0 + a, L - 1) * d;
  for (int b = 0; b < TJ; ++b) rj[b] = X + std::min(j0 + b, L - 1) * d;
  v4d acc[TI][TJ];
  for (int a = 0; a < TI; ++a)
    for (int b = 0; b < TJ; ++b) acc[a][b] = v4d{0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    v4d y[TJ];
    for (int b = 0; b < TJ; ++b) y[b] = load4(rj[b] + k);
    for (int a = 0; a < TI; ++a) {
      const v4d x = load4(ri[a] + k);
      for (int b = 0; b < TJ; ++b) acc[a][b] += x * y[b];
    }
  }
  for (int a = 0; a < TI; ++a)
    for (int b = 0; b < TJ; ++b) {
      const int i = i0 + a, j = j0 + b;
      if (i >= L || j >= L || i > j) continue;
      double s = hsum(acc[a][b]);
      for (int64_t t = k; t < d; ++t) s += ri[a][t] * rj[b][t];
      G[i * L + j] = s;
      G[j * L + i] = s;
    }
}

void gram_fp64(const double* X, int L, int64_t d, double* G) {
  constexpr int TI = 2, TJ = 4;  // 8 accumulators + 4 row vectors + 1: fits the 16 ymm registers
  for (int i0 = 0; i0 < L; i0 += TI)
    for (int j0 = (i0 / TJ) * TJ; j0 < L; j0 += TJ) gram_tile<TI, TJ>(X, L, d, i0, j0, G);
}

template <typename In>
void transitions_impl(const In* feat, int64_t N, int L, int64_t d, int64_t s_n, int64_t s_l,
                      float* gram, float* cos, float* conc) {
  const int n = L - 1;
  const int64_t ngroups = (N + kLanes - 1) / kLanes;
#pragma omp parallel
  {
    std::vector<double> X(static_cast<size_t>(L) * d);
    std::vector<double> G(static_cast<size_t>(L) * L);
    std::vector<double> A(static_cast<size_t>(n) * n * kLanes);
    bool bad[kLanes];
#pragma omp for schedule(dynamic, 4)
    for (int64_t g = 0; g < ngroups; ++g) {
      for (int s = 0; s < kLanes; ++s) {
        const int64_t i = g * kLanes + s;
        bad[s] = false;
        if (i >= N) {  // tail lanes: a zero matrix, nothing written
          tr_zero_lane(A.data(), n, kLanes, s);
          continue;
        }
        for (int l = 0; l < L; ++l) {
          const In* src = feat + i * s_n + l * s_l;
          double* dst = X.data() + static_cast<int64_t>(l) * d;
#pragma omp simd
          for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<double>(static_cast<float>(src[t]));
        }
        gram_fp64(X.data(), L, d, G.data());
        float* gout = gram + i * L * L;
        for (int t = 0; t < L * L; ++t) gout[t] = static_cast<float>(G[t]);
        float* cout = cos + i * n;
        if (!tr_all_finite(G.data(), L)) {  // non-finite features: NaN scores, not a fake number
          bad[s] = true;
          for (int l = 0; l < n; ++l) cout[l] = df_nanf();
          tr_zero_lane(A.data(), n, kLanes, s);
          continue;
        }
        tr_cosines(G.data(), L, cout);
        tr_fill_diff_gram(G.data(), L, A.data(), kLanes, s);
      }
      tr_jacobi_eigenvalues<kLanes>(A.data(), n, kLanes);
      for (int s = 0; s < kLanes; ++s) {
        const int64_t i = g * kLanes + s;
        if (i < N) conc[i] = bad[s] ? df_nanf() : tr_concentration(A.data(), n, kLanes, s);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_transitions_cpu(const at::Tensor& features) {
  transitions_check_args(features);
  const int64_t N = features.size(0), L = features.size(1), d = features.size(2);
  const at::Tensor feat = features.stride(2) == 1 ? features : features.contiguous();
  const auto fopt = features.options().dtype(at::kFloat);
  at::Tensor gram = at::empty({N, L, L}, fopt);
  at::Tensor cos = at::empty({N, L - 1}, fopt);
  at::Tensor conc = at::empty({N}, fopt);
  if (N == 0) return {gram, cos, conc};
  const int Li = static_cast<int>(L);
  if (feat.scalar_type() == at::kFloat)
    transitions_impl(feat.data_ptr<float>(), N, Li, d, feat.stride(0), feat.stride(1),
                     gram.data_ptr<float>(), cos.data_ptr<float>(), conc.data_ptr<float>());
  else
    transitions_impl(feat.data_ptr<c10::BFloat16>(), N, Li, d, feat.stride(0), feat.stride(1),
                     gram.data_ptr<float>(), cos.data_ptr<float>(), conc.data_ptr<float>());
  return {gram, cos, conc};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dupfast, m) {
  m.def("layer_transitions(Tensor features) -> (Tensor gram, Tensor cosines, Tensor concentration)");
}

TORCH_LIBRARY_IMPL(dupfast, CPU, m) { m.impl("layer_transitions", &layer_transitions_cpu); }

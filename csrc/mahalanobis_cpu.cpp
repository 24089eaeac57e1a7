// CPU multi-layer Mahalanobis: for each selected layer, row blocks of kRowBlock samples are centred
// (x - mu0, fp32, bf16 upcast) into a per-thread buffer, multiplied by W with ATen's GEMM (MKL here)
// in column panels, and reduced to squared distances in the epilogue. The only buffers are per
// thread and block sized; there is no [N, L, d] (or [N, d]) intermediate.
//
// W lower triangular (a Cholesky factor) is detected per layer: panel [j0, j0+w) of (x - mu0) W
// then only needs rows j0.. of W, which skips ~40% of the flops at d = 768.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "mahalanobis_checks.h"
#include "mahalanobis_math.h"
#include "whitener_layout.h"

namespace {

constexpr int64_t kRowBlock = 256;  // rows per task: a 256 x 768 fp32 block is 768 KB (L2)
constexpr int64_t kPanel = 128;     // output columns per GEMM call

struct LayerPlan {
  int64_t layer = 0;
  bool lower = false;           // W has an all-zero strict upper triangle
  std::vector<float> mu0;       // [d] centroid of the K means
  std::vector<float> shift;     // [K, d] (mu_k - mu0) W; empty when K == 1 (then it is 0)
  at::Tensor w;                 // [d, d] view of W (fp32) or its bf16 copy for the bf16 GEMM
};

using dupfast::blas_view;
using dupfast::strictly_lower;

LayerPlan plan_layer(const at::Tensor& means, const at::Tensor& whiteners, int64_t layer, bool bf16_gemm) {
  const int64_t K = means.size(1), d = means.size(2);
  const float* mu = means.data_ptr<float>() + layer * K * d;
  const at::Tensor wl = blas_view(whiteners, layer);
  const float* W = wl.data_ptr<float>();
  const int64_t si = wl.stride(0), sj = wl.stride(1);
  LayerPlan p;
  p.layer = layer;
  p.lower = strictly_lower(W, d, si, sj);
  p.mu0.resize(d);
  for (int64_t i = 0; i < d; ++i) p.mu0[i] = maha_centroid(mu, K, d, i);
  if (K > 1) {
    p.shift.resize(K * d);
    // S_k = (mu_k - mu0) W: a K x d x d product in fp64, row-wise so the j loop vectorises.
    std::vector<double> acc(d);
    for (int64_t k = 0; k < K; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t i = 0; i < d; ++i) {
        const double dm = static_cast<double>(mu[k * d + i]) - static_cast<double>(p.mu0[i]);
        const float* wr = W + i * si;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) acc[j] += dm * static_cast<double>(wr[j * sj]);
      }
      for (int64_t j = 0; j < d; ++j) p.shift[k * d + j] = static_cast<float>(acc[j]);
    }
  }
  p.w = bf16_gemm ? wl.to(at::kBFloat16).contiguous() : wl;
  return p;
}

// Element conversions on the bit patterns (float_bits.h): they vectorise, c10's scalar ones do not.
inline float load_float(float x) { return x; }
inline float load_float(c10::BFloat16 x) { return df_float_from_bf16_bits(x.x); }
inline void store_buf(float* dst, float v) { *dst = v; }
inline void store_buf(c10::BFloat16* dst, float v) { dst->x = df_bf16_bits_rne(v); }

// Centres rows [n0, n0 + rows) of layer `layer` into xc (row-major [rows, d]).
template <typename In, typename Buf>
void pack_block(const In* feat, int64_t s_n, int64_t s_l, int64_t layer, int64_t n0, int64_t rows,
                int64_t d, const float* mu0, Buf* xc) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* src = feat + (n0 + r) * s_n + layer * s_l;
    Buf* dst = xc + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store_buf(dst + i, load_float(src[i]) - mu0[i]);
  }
}

// q[r, k] += sum_j (Y[r, j] - S_k[j0 + j])^2 over one panel.
template <typename Y>
void panel_epilogue(const Y* y, int64_t rows, int64_t w, const float* shift, int64_t K, int64_t d,
                    int64_t j0, double* q) {
  for (int64_t r = 0; r < rows; ++r) {
    const Y* yr = y + r * w;
    if (shift == nullptr) {
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < w; ++j) {
        const float v = load_float(yr[j]);
        s += v * v;
      }
      q[r] += s;
      continue;
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* sk = shift + k * d + j0;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < w; ++j) {
        const float v = load_float(yr[j]) - sk[j];
        s += v * v;
      }
      q[r * K + k] += s;
    }
  }
}

template <typename In, typename Buf>
void run_layer(const LayerPlan& p, const In* feat, int64_t N, int64_t s_n, int64_t s_l, int64_t d,
               int64_t K, int64_t lsel, int64_t nsel, bool squared, bool reduce_min, float* out) {
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  const at::ScalarType buf_type = std::is_same_v<Buf, float> ? at::kFloat : at::kBFloat16;
  const auto opts = at::TensorOptions().dtype(buf_type);
  const float* shift = p.shift.empty() ? nullptr : p.shift.data();
#pragma omp parallel
  {
    std::vector<Buf> xc(kRowBlock * d);
    std::vector<Buf> ypanel(kRowBlock * std::min(kPanel, d));
    std::vector<double> q(kRowBlock * K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t n0 = b * kRowBlock, rows = std::min(kRowBlock, N - n0);
      pack_block(feat, s_n, s_l, p.layer, n0, rows, d, p.mu0.data(), xc.data());
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t j0 = 0; j0 < d; j0 += kPanel) {
        const int64_t w = std::min(kPanel, d - j0);
        const int64_t k0 = p.lower ? j0 : 0;  // rows < j0 of a lower-triangular panel are zero
        at::Tensor a = at::from_blob(xc.data() + k0, {rows, d - k0}, {d, 1}, opts);
        at::Tensor y = at::from_blob(ypanel.data(), {rows, w}, {w, 1}, opts);
        at::mm_out(y, a, p.w.narrow(0, k0, d - k0).narrow(1, j0, w));
        panel_epilogue(ypanel.data(), rows, w, shift, K, d, j0, q.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        if (reduce_min) {
          float best = maha_finalize(static_cast<float>(q[r * K]), squared);
          for (int64_t k = 1; k < K; ++k)
            best = maha_min(best, maha_finalize(static_cast<float>(q[r * K + k]), squared));
          out[n * nsel + lsel] = best;
        } else {
          for (int64_t k = 0; k < K; ++k)
            out[(n * nsel + lsel) * K + k] = maha_finalize(static_cast<float>(q[r * K + k]), squared);
        }
      }
    }
  }
}

at::Tensor mahalanobis_cpu(const at::Tensor& features, const at::Tensor& means,
                           const at::Tensor& whiteners, at::IntArrayRef layers, bool squared,
                           bool reduce_min, bool bf16_gemm) {
  maha_check_args(features, means, whiteners, layers);
  const int64_t N = features.size(0), d = features.size(2);
  const int64_t K = means.size(1), nsel = static_cast<int64_t>(layers.size());
  at::Tensor feat = features.stride(2) == 1 ? features : features.contiguous();
  const at::Tensor mu = means.contiguous();  // whiteners: used per layer in place (blas_view)
  // bf16_gemm is the opt-in precision="bf16" (dupfast/ops/mahalanobis.py has its error bound); the
  // default upcasts bf16 features and multiplies in fp32 on every CPU.
  const bool use_bf16 = bf16_gemm;
  const bool bf16_in = feat.scalar_type() == at::kBFloat16;
  at::Tensor out = reduce_min ? at::empty({N, nsel}, features.options().dtype(at::kFloat))
                              : at::empty({N, nsel, K}, features.options().dtype(at::kFloat));
  if (N == 0 || nsel == 0) return out;
  float* o = out.data_ptr<float>();
  const int64_t s_n = feat.stride(0), s_l = feat.stride(1);
  for (int64_t ls = 0; ls < nsel; ++ls) {
    const LayerPlan p = plan_layer(mu, whiteners, layers[ls], use_bf16);
    if (!bf16_in && !use_bf16) {
      run_layer<float, float>(p, feat.data_ptr<float>(), N, s_n, s_l, d, K, ls, nsel, squared, reduce_min, o);
    } else if (!bf16_in) {
      run_layer<float, c10::BFloat16>(p, feat.data_ptr<float>(), N, s_n, s_l, d, K, ls, nsel, squared,
                                      reduce_min, o);
    } else if (use_bf16) {
      run_layer<c10::BFloat16, c10::BFloat16>(p, feat.data_ptr<c10::BFloat16>(), N, s_n, s_l, d, K, ls,
                                              nsel, squared, reduce_min, o);
    } else {
      run_layer<c10::BFloat16, float>(p, feat.data_ptr<c10::BFloat16>(), N, s_n, s_l, d, K, ls, nsel,
                                      squared, reduce_min, o);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dupfast, m) {
  m.def(
      "mahalanobis(Tensor features, Tensor means, Tensor whiteners, int[] layers, bool squared, "
      "bool reduce_min, bool bf16_gemm) -> Tensor");
}

TORCH_LIBRARY_IMPL(dupfast, CPU, m) { m.impl("mahalanobis", &mahalanobis_cpu); }

// CPU token-level multi-layer Mahalanobis: for every selected layer and row, the distances of the row's valid
// tokens to the row's mean (means[l, classes[b]], or means[l, 0]) under W W^T, reduced per (row, layer) to the
// mean of the topk largest and the arg-max token (csrc/token_mahalanobis_math.h).
//
// Streaming: the valid tokens (mask != 0) are listed once, row by row ([B, T] bookkeeping, no d). A task is
// (selected layer, group of consecutive rows whose valid tokens fit one block of kTokBlock, or one longer row
// done in several blocks); it gathers its valid tokens, centred (h - mu, fp32, bf16 upcast exactly) into a
// per-thread [kTokBlock, d] buffer, multiplies them by W with ATen's GEMM in column panels (kPanel wide; with
// a lower-triangular W, panel [j0, j0 + w) uses rows j0.. of W only) and folds each panel into the tokens'
// squared norms. The distances go straight into the rows' kept top-k lists. Pads are never read or
// multiplied: the work is proportional to the valid tokens, the extra memory to one block per thread (plus the
// token list). Small problems (< kMinParallelMacs) run on one thread: waking a team costs more.
// The hidden states are read in place, one tensor per layer (an HF `output_hidden_states` tuple needs no
// stacking), with any batch and token strides; a layer whose last dimension is strided is copied first.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ne.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "token_mahalanobis_checks.h"
#include "token_mahalanobis_math.h"
#include "whitener_layout.h"

namespace {

constexpr int64_t kTokBlock = 256;  // tokens per GEMM: a 256 x 768 fp32 block is 768 KB (L2)
constexpr int64_t kPanel = 128;     // output columns per GEMM call
constexpr double kMinParallelMacs = 1 << 22;  // below this many multiply-adds (~0.1 ms) one thread does it all

using dupfast::blas_view;
using dupfast::strictly_lower;

inline float load_float(float x) { return x; }
inline float load_float(c10::BFloat16 x) { return df_float_from_bf16_bits(x.x); }

// One selected layer: its hidden states (in place unless the last dimension was strided), W and its means.
struct LayerPlan {
  at::Tensor x;       // [B, T, d], stride(2) == 1
  at::Tensor w;       // [d, d] BLAS view of W
  bool lower = false;
  const float* means = nullptr;  // [K, d] of this layer
};

// The valid tokens, row by row: tokens [start[b], start[b + 1]) of the lists are row b's, in index order.
struct TokenList {
  std::vector<int32_t> row, tok;
  std::vector<int64_t> start;
};

TokenList list_tokens(const at::Tensor& mask) {
  const at::Tensor m = (mask.scalar_type() == at::kBool ? mask : at::ne(mask, 0)).contiguous();
  const bool* v = m.data_ptr<bool>();
  const int64_t B = m.size(0), T = m.size(1);
  TokenList list;
  list.start.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t)
      if (v[b * T + t]) {
        list.row.push_back(static_cast<int32_t>(b));
        list.tok.push_back(static_cast<int32_t>(t));
      }
    list.start[b + 1] = static_cast<int64_t>(list.row.size());
  }
  return list;
}

// Rows [g[i], g[i + 1]) form group i: consecutive rows whose valid tokens fill one block of at most kTokBlock
// (a row with more tokens than that is a group of its own, done in several blocks).
std::vector<int64_t> group_rows(const std::vector<int64_t>& start, int64_t B) {
  std::vector<int64_t> g{0};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t held = start[b] - start[g.back()], row = start[b + 1] - start[b];
    if (held > 0 && held + row > kTokBlock) g.push_back(b);
  }
  g.push_back(B);
  return g;
}

template <typename In>
void run(const std::vector<LayerPlan>& plans, const TokenList& list, const std::vector<int64_t>& groups,
         const int64_t* classes, int64_t d, int64_t keff, bool squared, float* scores, int64_t* argmax) {
  const int64_t nsel = static_cast<int64_t>(plans.size());
  const int64_t ngroups = static_cast<int64_t>(groups.size()) - 1;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // threads only for work worth waking them (a parallel region costs ~10-100 us, ms on a loaded machine) and
  // never more than there are tasks
  const int64_t ntasks = nsel * ngroups;
  const double macs = static_cast<double>(list.row.size()) * static_cast<double>(nsel) * static_cast<double>(d * d);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), ntasks)));
#pragma omp parallel num_threads(threads) if (macs >= kMinParallelMacs)
  {
    std::vector<float> xc(kTokBlock * d);
    std::vector<float> ypanel(kTokBlock * std::min(kPanel, d));
    std::vector<double> q(kTokBlock);
    std::vector<float> kv;
    std::vector<int32_t> ki, kn;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t ls = task / ngroups, g = task % ngroups;
      const LayerPlan& p = plans[ls];
      const In* x = p.x.data_ptr<In>();
      const int64_t s_b = p.x.stride(0), s_t = p.x.stride(1);
      const int64_t r0 = groups[g], rows = groups[g + 1] - r0;
      kv.assign(rows * keff, 0.0f);
      ki.assign(rows * keff, 0);
      kn.assign(rows, 0);
      const int64_t e1 = list.start[r0 + rows];
      for (int64_t c0 = list.start[r0]; c0 < e1; c0 += kTokBlock) {
        const int64_t n = std::min(kTokBlock, e1 - c0);
        for (int64_t i = 0; i < n; ++i) {  // gather + centre: row b's token t minus row b's mean
          const int64_t b = list.row[c0 + i], t = list.tok[c0 + i];
          const In* src = x + b * s_b + t * s_t;
          const float* mu = p.means + (classes ? classes[b] : 0) * d;
          float* dst = xc.data() + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dst[j] = load_float(src[j]) - mu[j];
        }
        std::fill(q.begin(), q.begin() + n, 0.0);
        for (int64_t j0 = 0; j0 < d; j0 += kPanel) {
          const int64_t w = std::min(kPanel, d - j0);
          const int64_t k0 = p.lower ? j0 : 0;  // rows < j0 of a lower-triangular panel are zero
          at::Tensor a = at::from_blob(xc.data() + k0, {n, d - k0}, {d, 1}, opts);
          at::Tensor y = at::from_blob(ypanel.data(), {n, w}, {w, 1}, opts);
          at::mm_out(y, a, p.w.narrow(0, k0, d - k0).narrow(1, j0, w));
          for (int64_t i = 0; i < n; ++i) {
            const float* yr = ypanel.data() + i * w;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < w; ++j) s += yr[j] * yr[j];
            q[i] += s;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = list.row[c0 + i] - r0;
          tm_topk_push(kv.data() + r * keff, ki.data() + r * keff, kn[r], static_cast<int32_t>(keff),
                       tm_distance(static_cast<float>(q[i]), squared), list.tok[c0 + i]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = (r0 + r) * nsel + ls;
        tm_topk_finish(kv.data() + r * keff, ki.data() + r * keff, kn[r], scores + o, argmax + o);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> token_mahalanobis_cpu(at::TensorList hidden, const at::Tensor& mask,
                                                         const at::Tensor& means, const at::Tensor& whiteners,
                                                         const c10::optional<at::Tensor>& classes,
                                                         at::IntArrayRef layers, int64_t topk, bool squared) {
  tm_check_args(hidden, mask, means, whiteners, classes, layers, topk);
  const int64_t B = hidden[0].size(0), T = hidden[0].size(1), d = hidden[0].size(2);
  const int64_t K = means.size(1), nsel = static_cast<int64_t>(layers.size());
  TORCH_CHECK(T < (int64_t{1} << 31), "token_mahalanobis: T must be below 2^31");
  at::Tensor scores = at::empty({B, nsel}, hidden[0].options().dtype(at::kFloat));
  at::Tensor argmax = at::empty({B, nsel}, hidden[0].options().dtype(at::kLong));
  if (B == 0) return {scores, argmax};
  const at::Tensor mu = means.contiguous();
  at::Tensor cls;
  const int64_t* cptr = nullptr;
  if (classes.has_value()) {
    cls = classes->contiguous();
    cptr = cls.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(cptr[b] >= 0 && cptr[b] < K, "token_mahalanobis: classes[", b, "] = ", cptr[b],
                  " out of range [0, ", K, ")");
  }
  std::vector<LayerPlan> plans(nsel);
  for (int64_t ls = 0; ls < nsel; ++ls) {
    const int64_t l = layers[ls];
    LayerPlan& p = plans[ls];
    p.x = hidden[l].stride(2) == 1 ? hidden[l] : hidden[l].contiguous();
    p.w = blas_view(whiteners, l);
    p.lower = strictly_lower(p.w.data_ptr<float>(), d, p.w.stride(0), p.w.stride(1));
    p.means = mu.data_ptr<float>() + l * K * d;
  }
  const TokenList list = list_tokens(mask);
  const std::vector<int64_t> groups = group_rows(list.start, B);
  const int64_t keff = std::max<int64_t>(1, std::min(topk, T));  // a row never keeps more than T tokens
  float* s = scores.data_ptr<float>();
  int64_t* a = argmax.data_ptr<int64_t>();
  if (hidden[0].scalar_type() == at::kFloat)
    run<float>(plans, list, groups, cptr, d, keff, squared, s, a);
  else
    run<c10::BFloat16>(plans, list, groups, cptr, d, keff, squared, s, a);
  return {scores, argmax};
}

// The GPU kernel's row reduction replayed on the host (csrc/cuda/token_mahalanobis_kernel.cu, reduce_kernel):
// `lanes` lists per row, lane l pushing the valid tokens t = l, l + lanes, ... in index order, then merged
// pairwise (lane i takes lane i + s, s = lanes/2, ..., 1) when lanes is a power of 2, else into lane 0 one by
// one. dist, mask: [R, T]. The tests hold it (lanes = 1, the CPU op's order, and lanes = 32, the kernel's)
// to the order's definition on NaNs, ties and empty rows: the header is tested here through the cpu build.
std::tuple<at::Tensor, at::Tensor> token_mahalanobis_reduce(const at::Tensor& dist, const at::Tensor& mask,
                                                            int64_t topk, int64_t lanes) {
  TORCH_CHECK(dist.dim() == 2 && dist.scalar_type() == at::kFloat, "token_mahalanobis_reduce: dist must be "
              "float32 [R, T]");
  TORCH_CHECK(mask.sizes() == dist.sizes() && mask.scalar_type() == at::kBool, "token_mahalanobis_reduce: mask "
              "must be bool and shaped like dist");
  TORCH_CHECK(topk >= 1 && lanes >= 1, "token_mahalanobis_reduce: topk and lanes must be >= 1");
  const at::Tensor dv = dist.contiguous(), mv = mask.contiguous();
  const int64_t R = dv.size(0), T = dv.size(1);
  const int32_t keff = static_cast<int32_t>(std::max<int64_t>(1, std::min(topk, T)));
  at::Tensor scores = at::empty({R}, dv.options());
  at::Tensor argmax = at::empty({R}, dv.options().dtype(at::kLong));
  const float* d = dv.data_ptr<float>();
  const bool* m = mv.data_ptr<bool>();
  std::vector<float> vals(lanes * keff);
  std::vector<int32_t> idx(lanes * keff), cnt(lanes);
  for (int64_t r = 0; r < R; ++r) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t lane = 0; lane < lanes; ++lane)
      for (int64_t t = lane; t < T; t += lanes)
        if (m[r * T + t])
          tm_topk_push(&vals[lane * keff], &idx[lane * keff], cnt[lane], keff, d[r * T + t], static_cast<int32_t>(t));
    if ((lanes & (lanes - 1)) == 0) {
      for (int64_t s = lanes / 2; s >= 1; s /= 2)
        for (int64_t lane = 0; lane < s; ++lane)
          tm_topk_merge(&vals[lane * keff], &idx[lane * keff], cnt[lane], keff, &vals[(lane + s) * keff],
                        &idx[(lane + s) * keff], cnt[lane + s]);
    } else {
      for (int64_t lane = 1; lane < lanes; ++lane)
        tm_topk_merge(vals.data(), idx.data(), cnt[0], keff, &vals[lane * keff], &idx[lane * keff], cnt[lane]);
    }
    tm_topk_finish(vals.data(), idx.data(), cnt[0], scores.data_ptr<float>() + r, argmax.data_ptr<int64_t>() + r);
  }
  return {scores, argmax};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dupfast, m) {
  m.def(
      "token_mahalanobis(Tensor[] hidden, Tensor mask, Tensor means, Tensor whiteners, Tensor? classes, "
      "int[] layers, int topk, bool squared) -> (Tensor, Tensor)");
  m.def("token_mahalanobis_reduce(Tensor dist, Tensor mask, int topk, int lanes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dupfast, CPU, m) {
  m.impl("token_mahalanobis", &token_mahalanobis_cpu);
  m.impl("token_mahalanobis_reduce", &token_mahalanobis_reduce);
}

#pragma once
// dupfast::linear_kl_div_fused: the LM head and the signed-weight KL(p_T || p_S) in chunks of rows,
// shared by the CPU op (csrc/linear_kl_cpu.cpp) and the CUDA binding (csrc/linear_kl_cuda_binding.cpp).
// Device-generic: the GEMMs are ATen calls on chunk views (MKL / oneDNN on CPU, cuBLAS on CUDA); the
// per-row softmax / KL / gradient math of each chunk is the kl_div_fused row kernel of the device,
// passed in as `rows_fn`.
//
// Per chunk of `chunk_rows` rows (hidden rows h, teacher rows):
//   s = h @ W^T (+ b)                      [n, V] student logits, in the inputs' dtype
//   t = th @ W_T^T (+ b_T),  or the rows of cached teacher logits,  or a cached top-k teacher
//       scattered into float32 -inf rows (its distribution: softmax over the k cached slots, 0
//       elsewhere). The row kernel pays for the -inf slots: glibc's vector expf takes its scalar
//       fallback on them (measured 2x the row kernel's time with a finite teacher); a sparse-teacher
//       row kernel would not.
//   loss[r], g = w_r / T * scale * (p_S - p_T)    (rows_fn, into g, which may be s itself)
//   grad_hidden[rows] = g @ W;  grad_weight += g^T @ h;  grad_bias += sum_r g
// so the extra memory is O(chunk_rows * V) (one or two logit buffers) plus the gradients, never
// [R, V]. Rows with w_r == 0 are zeroed in h (and th) before any GEMM: a masked row holding NaN
// would otherwise reach grad_weight through 0 * NaN. 16-bit weight / bias gradients are
// accumulated over the chunks in float32 and rounded once at the end (the weight's in vocabulary
// slices, so the only [V, H] buffers are the accumulator and the result).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/masked_fill.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace dupfast::linear_kl {

// Vocabulary rows per 16-bit weight-gradient product (its temporary: kVocabSlice x H).
constexpr int64_t kVocabSlice = 8192;

inline bool supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

// The checks the Python wrapper (dupfast/ops/linear_kl.py) makes with friendlier messages, repeated
// for direct callers of the op.
inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& teacher_hidden,
                         const std::optional<at::Tensor>& teacher_weight,
                         const std::optional<at::Tensor>& teacher_bias,
                         const std::optional<at::Tensor>& teacher_logits,
                         const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_values,
                         const std::optional<at::Tensor>& weights, double inv_temperature, int64_t chunk_rows,
                         c10::DeviceType device) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2,
              "linear_kl_div_fused: hidden must be [R, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  const int64_t rows = hidden.size(0), h = hidden.size(1), v = weight.size(0);
  TORCH_CHECK(weight.size(1) == h, "linear_kl_div_fused: hidden ", hidden.sizes(), " and weight ", weight.sizes(),
              " disagree on H");
  TORCH_CHECK(rows > 0 && v > 0, "linear_kl_div_fused: need R >= 1 and V >= 1, got hidden ", hidden.sizes(),
              ", weight ", weight.sizes());
  TORCH_CHECK(supported_dtype(hidden.scalar_type()) && weight.scalar_type() == hidden.scalar_type(),
              "linear_kl_div_fused: hidden and weight must share a dtype among float32/bfloat16/float16, got ",
              hidden.scalar_type(), " / ", weight.scalar_type());
  TORCH_CHECK(hidden.device().type() == device && weight.device() == hidden.device(),
              "linear_kl_div_fused: hidden and weight must be on the same ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "linear_kl_div_fused: inputs must be contiguous");
  TORCH_CHECK(inv_temperature > 0.0, "linear_kl_div_fused: inv_temperature must be > 0, got ", inv_temperature);
  TORCH_CHECK(chunk_rows >= 1, "linear_kl_div_fused: chunk_rows must be >= 1, got ", chunk_rows);
  auto check_vec = [&](const std::optional<at::Tensor>& b, const at::Tensor& head, const char* name) {
    if (!b.has_value()) return;
    TORCH_CHECK(b->dim() == 1 && b->size(0) == head.size(0), "linear_kl_div_fused: ", name, " must be [V] with V = ",
                head.size(0), ", got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == head.scalar_type() && b->device() == head.device() && b->is_contiguous(),
                "linear_kl_div_fused: ", name, " must be contiguous, with its head's dtype and device");
  };
  check_vec(bias, weight, "bias");
  TORCH_CHECK(topk_indices.has_value() == topk_values.has_value(),
              "linear_kl_div_fused: the top-k teacher needs both its indices and its values");
  TORCH_CHECK(int(teacher_hidden.has_value()) + int(teacher_logits.has_value()) + int(topk_indices.has_value()) == 1,
              "linear_kl_div_fused: give exactly one of teacher_hidden, teacher_logits and the top-k teacher");
  TORCH_CHECK(teacher_hidden.has_value() || (!teacher_weight.has_value() && !teacher_bias.has_value()),
              "linear_kl_div_fused: teacher_weight / teacher_bias go with teacher_hidden");
  if (topk_indices.has_value()) {
    const at::Tensor& ix = *topk_indices;
    const at::Tensor& val = *topk_values;
    TORCH_CHECK(ix.dim() == 2 && ix.size(0) == rows && ix.size(1) >= 1 && ix.size(1) <= v && val.sizes() == ix.sizes(),
                "linear_kl_div_fused: top-k indices and values must both be [R, k] with R = ", rows,
                " and 1 <= k <= V = ", v, ", got ", ix.sizes(), " and ", val.sizes());
    TORCH_CHECK(ix.scalar_type() == c10::kLong && supported_dtype(val.scalar_type()),
                "linear_kl_div_fused: top-k indices must be int64 and values float32/bfloat16/float16, got ",
                ix.scalar_type(), " / ", val.scalar_type());
    TORCH_CHECK(ix.device() == hidden.device() && val.device() == hidden.device() && ix.is_contiguous() &&
                    val.is_contiguous(),
                "linear_kl_div_fused: top-k tensors must be contiguous and on hidden's device");
  } else if (teacher_logits.has_value()) {
    const at::Tensor& t = *teacher_logits;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows, "linear_kl_div_fused: teacher_logits must be [R, V] with R = ",
                rows, ", got ", t.sizes());
    TORCH_CHECK(t.size(1) == v, "linear_kl_div_fused: vocabulary mismatch: teacher_logits ", t.sizes(), " vs weight ",
                weight.sizes());
    TORCH_CHECK(supported_dtype(t.scalar_type()) && t.device() == hidden.device() && t.is_contiguous(),
                "linear_kl_div_fused: teacher_logits must be contiguous float32/bfloat16/float16 on hidden's device");
  } else {
    const at::Tensor& th = *teacher_hidden;
    TORCH_CHECK(teacher_weight.has_value(), "linear_kl_div_fused: teacher_hidden needs teacher_weight");
    const at::Tensor& tw = *teacher_weight;
    TORCH_CHECK(th.dim() == 2 && th.size(0) == rows, "linear_kl_div_fused: teacher_hidden must be [R, H_T] with R = ",
                rows, ", got ", th.sizes());
    TORCH_CHECK(tw.dim() == 2 && tw.size(1) == th.size(1), "linear_kl_div_fused: teacher_hidden ", th.sizes(),
                " and teacher_weight ", tw.sizes(), " disagree on H_T");
    TORCH_CHECK(tw.size(0) == v, "linear_kl_div_fused: vocabulary mismatch: teacher_weight ", tw.sizes(),
                " vs weight ", weight.sizes());
    TORCH_CHECK(supported_dtype(th.scalar_type()) && tw.scalar_type() == th.scalar_type(),
                "linear_kl_div_fused: teacher_hidden and teacher_weight must share a float32/bfloat16/float16 dtype");
    TORCH_CHECK(th.device() == hidden.device() && tw.device() == hidden.device() && th.is_contiguous() &&
                    tw.is_contiguous(),
                "linear_kl_div_fused: teacher tensors must be contiguous and on hidden's device");
    check_vec(teacher_bias, tw, "teacher_bias");
  }
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == rows, "linear_kl_div_fused: weights must be [R] with R = ", rows,
                ", got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == c10::kFloat, "linear_kl_div_fused: weights must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.device() == hidden.device() && w.is_contiguous(),
                "linear_kl_div_fused: weights must be contiguous and on the inputs' device");
  }
}

// out = x @ head^T (+ b), into a preallocated buffer.
inline void head_logits(at::Tensor& out, const at::Tensor& x, const at::Tensor& head,
                        const std::optional<at::Tensor>& b) {
  if (b.has_value()) {
    at::addmm_out(out, *b, x, head.t());
  } else {
    at::mm_out(out, x, head.t());
  }
}

// rows_fn(s, t, w, loss, g, inv_t, grad_scale): the kl_div_fused row kernel on [n, V] logits s, t;
// w: n float32 row weights or nullptr, loss: n floats to write, g: [n, V] gradient in s's dtype
// (g may be s when in_place is true). All pointers are device pointers.
template <typename RowsFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_values,
    const std::optional<at::Tensor>& weights, double inv_temperature, double grad_scale, int64_t chunk_rows,
    bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, bool in_place, RowsFn&& rows_fn) {
  const int64_t rows = hidden.size(0), h = hidden.size(1), v = weight.size(0);
  const int64_t cr = std::min(chunk_rows, rows);
  const bool need_grad_bias_ = need_grad_bias && bias.has_value();
  const auto f32 = hidden.options().dtype(c10::kFloat);
  at::Tensor loss = at::empty({rows}, f32);
  at::Tensor grad_hidden = need_grad_hidden ? at::empty({rows, h}, hidden.options()) : at::empty({0}, hidden.options());
  // The weight gradient: fp32 accumulates in place over the chunks; 16-bit in a float32 accumulator,
  // each chunk's 16-bit product formed kVocabSlice vocabulary rows at a time (a small temporary, not a
  // second [V, H]); a single chunk writes the 16-bit result directly (one rounding, as PyTorch).
  const bool one_chunk = cr == rows;
  const bool gw_direct = weight.scalar_type() == c10::kFloat || one_chunk;
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor gw_acc, gw_tmp, gb_acc;
  if (need_grad_weight) {
    gw_acc = at::empty({v, h}, gw_direct ? weight.options() : f32);
    if (!gw_direct) gw_tmp = at::empty({std::min(v, kVocabSlice), h}, weight.options());
  }
  if (need_grad_bias_) gb_acc = at::zeros({v}, f32);

  at::Tensor s_buf = at::empty({cr, v}, hidden.options());
  at::Tensor t_buf = teacher_hidden.has_value() ? at::empty({cr, v}, teacher_hidden->options())
                     : topk_values.has_value()  ? at::empty({cr, v}, f32)  // scatter_ into 16-bit: 4x slower
                                                : at::Tensor();
  at::Tensor g_buf = in_place ? s_buf : at::empty({cr, v}, hidden.options());

  // Masked rows (w == 0), known on the host once (one device-to-host copy of R bytes on CUDA).
  at::Tensor masked, masked_host;
  if (weights.has_value()) {
    masked = weights->eq(0.0);
    masked_host = masked.device().is_cpu() ? masked : masked.to(at::kCPU);
  }
  const bool* mh = masked_host.defined() ? masked_host.const_data_ptr<bool>() : nullptr;
  const float* w_ptr = weights.has_value() ? weights->const_data_ptr<float>() : nullptr;
  float* loss_ptr = loss.mutable_data_ptr<float>();

  for (int64_t r0 = 0; r0 < rows; r0 += cr) {
    const int64_t n = std::min(cr, rows - r0);
    at::Tensor hc = hidden.narrow(0, r0, n);
    at::Tensor thc = teacher_hidden.has_value() ? teacher_hidden->narrow(0, r0, n) : at::Tensor();
    if (mh != nullptr && std::any_of(mh + r0, mh + r0 + n, [](bool m) { return m; })) {
      const at::Tensor m = masked.narrow(0, r0, n).unsqueeze(1);
      hc = hc.masked_fill(m, 0.0);
      if (thc.defined()) thc = thc.masked_fill(m, 0.0);
    }
    at::Tensor s = s_buf.narrow(0, 0, n);
    head_logits(s, hc, weight, bias);
    at::Tensor t;
    if (thc.defined()) {
      t = t_buf.narrow(0, 0, n);
      head_logits(t, thc, *teacher_weight, teacher_bias);
    } else if (topk_indices.has_value()) {  // the cached top-k, -inf elsewhere (p_T = 0 there)
      t = t_buf.narrow(0, 0, n);
      t.fill_(-std::numeric_limits<double>::infinity());
      t.scatter_(1, topk_indices->narrow(0, r0, n), topk_values->narrow(0, r0, n).to(c10::kFloat));
    } else {
      t = teacher_logits->narrow(0, r0, n);
    }
    at::Tensor g = g_buf.narrow(0, 0, n);
    rows_fn(s, t, w_ptr ? w_ptr + r0 : nullptr, loss_ptr + r0, g, static_cast<float>(inv_temperature),
            static_cast<float>(grad_scale));
    if (need_grad_hidden) {
      at::Tensor gh = grad_hidden.narrow(0, r0, n);
      at::mm_out(gh, g, weight);
    }
    if (need_grad_weight) {
      if (gw_direct) {
        if (r0 == 0) {
          at::mm_out(gw_acc, g.t(), hc);
        } else {
          gw_acc.addmm_(g.t(), hc);
        }
      } else {
        for (int64_t v0 = 0; v0 < v; v0 += kVocabSlice) {
          const int64_t nv = std::min(kVocabSlice, v - v0);
          at::Tensor tmp = gw_tmp.narrow(0, 0, nv);
          at::mm_out(tmp, g.narrow(1, v0, nv).t(), hc);
          at::Tensor acc = gw_acc.narrow(0, v0, nv);
          if (r0 == 0) {
            acc.copy_(tmp);
          } else {
            acc.add_(tmp);
          }
        }
      }
    }
    if (need_grad_bias_) gb_acc.add_(at::sum(g, {0}, false, c10::kFloat));
  }
  if (need_grad_weight) grad_weight = gw_direct ? gw_acc : gw_acc.to(weight.scalar_type());
  at::Tensor grad_bias = need_grad_bias_ ? gb_acc.to(bias->scalar_type()) : at::empty({0}, weight.options());
  return {loss, grad_hidden, grad_weight, grad_bias};
}

}  // namespace dupfast::linear_kl

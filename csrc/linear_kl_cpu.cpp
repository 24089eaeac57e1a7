// CPU op of dupfast::linear_kl_div_fused: the chunked LM head + signed-weight KL of
// csrc/linear_kl_op.h, with ATen's CPU GEMMs (MKL fp32, oneDNN bf16) on the chunk views and the
// kl_div_fused row kernels (csrc/kl_rows_cpu.h, OpenMP over the chunk's rows) for the softmax / KL /
// gradient math. The row kernel writes the gradient over the student logits (in place), so one
// chunk needs one [chunk_rows, V] buffer, plus one for the teacher's logits when they are recomputed.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kl_rows_cpu.h"
#include "linear_kl_op.h"

namespace dupfast::linear_kl {
namespace {

void cpu_rows(const at::Tensor& s, const at::Tensor& t, const float* w, float* loss, const at::Tensor& g, float inv_t,
              float grad_scale) {
  kl::with_dtype(s.scalar_type(), [&](auto s_tag) {
    using TS = decltype(s_tag);
    kl::with_dtype(t.scalar_type(), [&](auto t_tag) {
      using TT = decltype(t_tag);
      kl::kl_rows_any<TS, TT>(s.const_data_ptr<TS>(), t.const_data_ptr<TT>(), w, loss, g.mutable_data_ptr<TS>(),
                              s.size(0), s.size(1), inv_t, grad_scale);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_div_fused_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_values,
    const std::optional<at::Tensor>& weights, double inv_temperature, double grad_scale, int64_t chunk_rows,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  check_inputs(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_indices,
               topk_values, weights, inv_temperature, chunk_rows, c10::DeviceType::CPU);
  return linear_kl_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           topk_indices, topk_values, weights, inv_temperature, grad_scale, chunk_rows, grad_hidden,
                           grad_weight, grad_bias, /*in_place=*/true, cpu_rows);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dupfast, m) {
  m.def(
      "linear_kl_div_fused(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, Tensor? teacher_weight,"
      " Tensor? teacher_bias, Tensor? teacher_logits, Tensor? teacher_topk_indices, Tensor? teacher_topk_values,"
      " Tensor? weights, float inv_temperature, float grad_scale,"
      " int chunk_rows, bool grad_hidden, bool grad_weight, bool grad_bias)"
      " -> (Tensor row_loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(dupfast, CPU, m) { m.impl("linear_kl_div_fused", &linear_kl_div_fused_cpu); }

}  // namespace dupfast::linear_kl

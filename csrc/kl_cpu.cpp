// CPU kernel of dupfast::kl_div_fused: per row, the KL(p_T || p_S) loss and its gradient w.r.t. the
// student logits in one call, two passes over V, rows in parallel (OpenMP). The row kernels are in
// csrc/kl_rows_cpu.h (shared with the fused linear + KL op).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kl_op.h"
#include "kl_rows_cpu.h"

namespace dupfast::kl {
namespace {

std::tuple<at::Tensor, at::Tensor> kl_div_fused_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& weights, double inv_temperature,
                                                    double grad_scale) {
  auto [loss, grad] = check_and_alloc(student, teacher, weights, inv_temperature, c10::DeviceType::CPU);
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  with_dtype(student.scalar_type(), [&](auto s_tag) {
    using TS = decltype(s_tag);
    with_dtype(teacher.scalar_type(), [&](auto t_tag) {
      using TT = decltype(t_tag);
      kl_rows_any<TS, TT>(student.const_data_ptr<TS>(), teacher.const_data_ptr<TT>(), w,
                          loss.mutable_data_ptr<float>(), grad.mutable_data_ptr<TS>(), student.size(0), student.size(1),
                          static_cast<float>(inv_temperature), static_cast<float>(grad_scale));
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dupfast, m) {
  m.def(
      "kl_div_fused(Tensor student, Tensor teacher, Tensor? weights, float inv_temperature, float grad_scale)"
      " -> (Tensor row_loss, Tensor grad_student)");
}

TORCH_LIBRARY_IMPL(dupfast, CPU, m) { m.impl("kl_div_fused", &kl_div_fused_cpu); }

}  // namespace dupfast::kl

#pragma once
// Input checks and output allocation shared by the CPU op and the CUDA binding of
// dupfast::kl_div_fused (lean ATen headers only).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace dupfast::kl {

inline bool supported_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

// Returns (row_loss [R] float32, grad [R, V] in the student's dtype), both uninitialised.
inline std::tuple<at::Tensor, at::Tensor> check_and_alloc(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& weights,
                                                         double inv_temperature, c10::DeviceType device) {
  TORCH_CHECK(student.dim() == 2, "kl_div_fused: student must be [R, V], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "kl_div_fused: teacher shape ", teacher.sizes(),
              " != student shape ", student.sizes());
  TORCH_CHECK(supported_dtype(student.scalar_type()) && supported_dtype(teacher.scalar_type()),
              "kl_div_fused: student/teacher must be float32, bfloat16 or float16, got ",
              student.scalar_type(), " / ", teacher.scalar_type());
  TORCH_CHECK(student.device().type() == device && teacher.device() == student.device(),
              "kl_div_fused: student and teacher must be on the same ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "kl_div_fused: inputs must be contiguous");
  TORCH_CHECK(inv_temperature > 0.0, "kl_div_fused: inv_temperature must be > 0, got ", inv_temperature);
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == student.size(0), "kl_div_fused: weights must be [R] with R = ",
                student.size(0), ", got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == c10::kFloat, "kl_div_fused: weights must be float32, got ", w.scalar_type());
    TORCH_CHECK(w.device() == student.device() && w.is_contiguous(),
                "kl_div_fused: weights must be contiguous and on the inputs' device");
  }
  at::Tensor loss = at::empty({student.size(0)}, student.options().dtype(c10::kFloat));
  at::Tensor grad = at::empty(student.sizes(), student.options());
  return {loss, grad};
}

}  // namespace dupfast::kl

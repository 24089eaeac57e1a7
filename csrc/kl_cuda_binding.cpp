// CUDA kernel of dupfast::kl_div_fused: a thin torch binding over the torch-free launchers of
// csrc/cuda/kl_kernel.cu. Checks inputs, allocates outputs, picks the launcher from the dtypes and
// launches on the current stream. Built only by a CUDA torch (setup.py's CUDAExtension).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kl_launch.h"
#include "kl_op.h"

namespace dupfast::kl {
namespace {

using Launcher = int (*)(const void*, const void*, const float*, float*, void*, int64_t, int64_t, float, float,
                         CUstream_st*);

int dtype_index(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return 0;
    case c10::kBFloat16: return 1;
    case c10::kHalf: return 2;
    default: TORCH_CHECK(false, "kl_div_fused: unsupported dtype ", t);
  }
}

// Student-major, teacher-minor: the order of DUPFAST_KL_DTYPE_PAIRS, which is dtype_index order.
#define DUPFAST_KL_LAUNCHER_PTR(S, T) dupfast_kl_rows_##S##_##T,
constexpr Launcher kLaunchers[9] = {DUPFAST_KL_DTYPE_PAIRS(DUPFAST_KL_LAUNCHER_PTR)};
#undef DUPFAST_KL_LAUNCHER_PTR

std::tuple<at::Tensor, at::Tensor> kl_div_fused_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& weights, double inv_temperature,
                                                     double grad_scale) {
  const c10::cuda::CUDAGuard guard(student.device());
  auto [loss, grad] = check_and_alloc(student, teacher, weights, inv_temperature, c10::DeviceType::CUDA);
  const Launcher launch = kLaunchers[3 * dtype_index(student.scalar_type()) + dtype_index(teacher.scalar_type())];
  const int err = launch(student.const_data_ptr(), teacher.const_data_ptr(),
                         weights.has_value() ? weights->const_data_ptr<float>() : nullptr,
                         loss.mutable_data_ptr<float>(), grad.mutable_data_ptr(), student.size(0), student.size(1),
                         static_cast<float>(inv_temperature), static_cast<float>(grad_scale),
                         c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(dupfast, CUDA, m) { m.impl("kl_div_fused", &kl_div_fused_cuda); }

}  // namespace dupfast::kl

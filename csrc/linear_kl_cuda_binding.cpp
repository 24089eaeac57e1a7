// CUDA op of dupfast::linear_kl_div_fused: the chunk driver of csrc/linear_kl_op.h (the GEMMs are
// ATen calls on CUDA chunk views, i.e. cuBLAS) with the kl_div_fused CUDA row kernels
// (csrc/cuda/kl_kernel.cu, through the torch-free launchers of csrc/cuda/kl_launch.h; their math is
// csrc/kl_math.h, shared with and host-tested through the CPU op) for the softmax / KL / gradient of
// each chunk, on the current stream. The launchers' pointers are __restrict__, so the gradient gets
// its own [chunk_rows, V] buffer (the CPU op writes it over the logits). Built only by a CUDA torch
// (setup.py's CUDAExtension). Never run on a GPU: compiled against the host headers in
// tests/ops/test_linear_kl.py only.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kl_launch.h"
#include "linear_kl_op.h"

namespace dupfast::linear_kl {
namespace {

using Launcher = int (*)(const void*, const void*, const float*, float*, void*, int64_t, int64_t, float, float,
                         CUstream_st*);

int dtype_index(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return 0;
    case c10::kBFloat16: return 1;
    case c10::kHalf: return 2;
    default: TORCH_CHECK(false, "linear_kl_div_fused: unsupported dtype ", t);
  }
}

// Student-major, teacher-minor: the order of DUPFAST_KL_DTYPE_PAIRS, which is dtype_index order.
#define DUPFAST_LINEAR_KL_LAUNCHER_PTR(S, T) dupfast_kl_rows_##S##_##T,
constexpr Launcher kLaunchers[9] = {DUPFAST_KL_DTYPE_PAIRS(DUPFAST_LINEAR_KL_LAUNCHER_PTR)};
#undef DUPFAST_LINEAR_KL_LAUNCHER_PTR

void cuda_rows(const at::Tensor& s, const at::Tensor& t, const float* w, float* loss, const at::Tensor& g, float inv_t,
               float grad_scale) {
  const Launcher launch = kLaunchers[3 * dtype_index(s.scalar_type()) + dtype_index(t.scalar_type())];
  const int err = launch(s.const_data_ptr(), t.const_data_ptr(), w, loss, g.mutable_data_ptr(), s.size(0), s.size(1),
                         inv_t, grad_scale, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_div_fused_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& topk_indices, const std::optional<at::Tensor>& topk_values,
    const std::optional<at::Tensor>& weights, double inv_temperature, double grad_scale, int64_t chunk_rows,
    bool grad_hidden, bool grad_weight, bool grad_bias) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_inputs(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_indices,
               topk_values, weights, inv_temperature, chunk_rows, c10::DeviceType::CUDA);
  return linear_kl_forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                           topk_indices, topk_values, weights, inv_temperature, grad_scale, chunk_rows, grad_hidden,
                           grad_weight, grad_bias, /*in_place=*/false, cuda_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(dupfast, CUDA, m) { m.impl("linear_kl_div_fused", &linear_kl_div_fused_cuda); }

}  // namespace dupfast::linear_kl

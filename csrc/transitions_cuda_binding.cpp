// CUDA binding of dupfast::layer_transitions (compiled only in a CUDA build of torch): checks,
// output and fp64 scratch allocation, and the extern "C" launchers of csrc/cuda/transitions_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/transitions_launch.h"
#include "transitions_checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_transitions_cuda(const at::Tensor& features) {
  transitions_check_args(features);
  TORCH_CHECK(features.is_cuda(), "layer_transitions: the CUDA kernel needs CUDA tensors");
  const int64_t N = features.size(0), L = features.size(1), d = features.size(2);
  TORCH_CHECK(L <= DUPFAST_TRANSITIONS_MAX_L, "layer_transitions: the CUDA kernel supports at most ",
              DUPFAST_TRANSITIONS_MAX_L, " layers, got L = ", L);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor feat = features.stride(2) == 1 ? features : features.contiguous();
  const auto fopt = features.options().dtype(at::kFloat);
  at::Tensor gram = at::empty({N, L, L}, fopt);
  at::Tensor cos = at::empty({N, L - 1}, fopt);
  at::Tensor conc = at::empty({N}, fopt);
  if (N == 0) return {gram, cos, conc};
  const auto dopt = features.options().dtype(at::kDouble);
  at::Tensor gram64 = at::empty({N, L, L}, dopt);
  at::Tensor kbuf = at::empty({(L - 1) * (L - 1) * N}, dopt);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int Li = static_cast<int>(L);
  if (feat.scalar_type() == at::kFloat) {
    C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_transitions_gram_f32(
        feat.data_ptr<float>(), feat.stride(0), feat.stride(1), N, Li, d, gram64.data_ptr<double>(),
        gram.data_ptr<float>(), stream)));
  } else {
    C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_transitions_gram_bf16(
        feat.data_ptr(), feat.stride(0), feat.stride(1), N, Li, d, gram64.data_ptr<double>(),
        gram.data_ptr<float>(), stream)));
  }
  C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_transitions_spectrum(
      gram64.data_ptr<double>(), N, Li, kbuf.data_ptr<double>(), cos.data_ptr<float>(), conc.data_ptr<float>(),
      stream)));
  return {gram, cos, conc};
}

}  // namespace

TORCH_LIBRARY_IMPL(dupfast, CUDA, m) { m.impl("layer_transitions", &layer_transitions_cuda); }

// CUDA binding of dupfast::mahalanobis (compiled only in a CUDA build of torch): checks, output and
// scratch allocation, and the extern "C" launchers of csrc/cuda/mahalanobis_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/mahalanobis_launch.h"
#include "mahalanobis_checks.h"

namespace {

at::Tensor mahalanobis_cuda(const at::Tensor& features, const at::Tensor& means, const at::Tensor& whiteners,
                            at::IntArrayRef layers, bool squared, bool reduce_min, bool /*bf16_gemm: CPU only*/) {
  maha_check_args(features, means, whiteners, layers);
  TORCH_CHECK(features.is_cuda(), "mahalanobis: the CUDA kernel needs CUDA tensors");
  const int64_t N = features.size(0), d = features.size(2);
  const int64_t K = means.size(1), nsel = static_cast<int64_t>(layers.size());
  TORCH_CHECK(K <= DUPFAST_MAHA_MAX_K, "mahalanobis: the CUDA kernel supports at most ", DUPFAST_MAHA_MAX_K,
              " means per layer, got K = ", K);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor feat = features.stride(2) == 1 ? features : features.contiguous();
  const at::Tensor mu = means.contiguous(), wh = whiteners.contiguous();
  const auto fopt = features.options().dtype(at::kFloat);
  at::Tensor out = reduce_min ? at::empty({N, nsel}, fopt) : at::empty({N, nsel, K}, fopt);
  if (N == 0 || nsel == 0) return out;
  at::Tensor mu0 = at::empty({nsel, d}, fopt);
  at::Tensor shift = at::empty({nsel, K, d}, fopt);
  at::Tensor lower = at::empty({nsel}, features.options().dtype(at::kInt));
  const std::vector<int64_t> sel(layers.begin(), layers.end());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_maha_prepare(
      mu.data_ptr<float>(), wh.data_ptr<float>(), sel.data(), nsel, K, d, mu0.data_ptr<float>(),
      shift.data_ptr<float>(), lower.data_ptr<int32_t>(), stream)));
  if (feat.scalar_type() == at::kFloat) {
    C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_maha_f32(
        feat.data_ptr<float>(), feat.stride(0), feat.stride(1), wh.data_ptr<float>(), mu0.data_ptr<float>(),
        shift.data_ptr<float>(), lower.data_ptr<int32_t>(), sel.data(), N, d, K, nsel, squared, reduce_min,
        out.data_ptr<float>(), stream)));
  } else {
    C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_maha_bf16(
        feat.data_ptr(), feat.stride(0), feat.stride(1), wh.data_ptr<float>(), mu0.data_ptr<float>(),
        shift.data_ptr<float>(), lower.data_ptr<int32_t>(), sel.data(), N, d, K, nsel, squared, reduce_min,
        out.data_ptr<float>(), stream)));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dupfast, CUDA, m) { m.impl("mahalanobis", &mahalanobis_cuda); }

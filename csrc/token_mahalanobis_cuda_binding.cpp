// CUDA binding of dupfast::token_mahalanobis (compiled only in a CUDA build of torch): checks, the valid-token
// list (built on the device from the mask: no host sync), scratch and output allocation, and the extern "C"
// launchers of csrc/cuda/token_mahalanobis_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cuda/token_mahalanobis_launch.h"
#include "token_mahalanobis_checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor> token_mahalanobis_cuda(at::TensorList hidden, const at::Tensor& mask,
                                                          const at::Tensor& means, const at::Tensor& whiteners,
                                                          const c10::optional<at::Tensor>& classes,
                                                          at::IntArrayRef layers, int64_t topk, bool squared) {
  tm_check_args(hidden, mask, means, whiteners, classes, layers, topk);
  TORCH_CHECK(hidden[0].is_cuda(), "token_mahalanobis: the CUDA kernel needs CUDA tensors");
  const int64_t B = hidden[0].size(0), T = hidden[0].size(1), d = hidden[0].size(2);
  const int64_t K = means.size(1), nsel = static_cast<int64_t>(layers.size());
  TORCH_CHECK(T < (int64_t{1} << 31), "token_mahalanobis: T must be below 2^31");
  const int64_t keff = std::max<int64_t>(1, std::min(topk, T));
  TORCH_CHECK(keff <= DUPFAST_TM_MAX_TOPK, "token_mahalanobis: the CUDA kernel keeps at most ", DUPFAST_TM_MAX_TOPK,
              " tokens per row, got min(topk, T) = ", keff);
  const c10::cuda::CUDAGuard guard(hidden[0].device());
  const auto fopt = hidden[0].options().dtype(at::kFloat);
  at::Tensor scores = at::empty({B, nsel}, fopt);
  at::Tensor argmax = at::empty({B, nsel}, fopt.dtype(at::kLong));
  if (B == 0) return {scores, argmax};
  const bool bf16 = hidden[0].scalar_type() == at::kBFloat16;

  // the selected layers, each read in place unless its last dimension is strided
  std::vector<at::Tensor> keep(nsel);
  std::vector<const void*> xs(nsel);
  std::vector<int64_t> s_b(nsel), s_t(nsel);
  const std::vector<int64_t> sel(layers.begin(), layers.end());
  for (int64_t ls = 0; ls < nsel; ++ls) {
    const at::Tensor& h = hidden[sel[ls]];
    keep[ls] = h.stride(2) == 1 ? h : h.contiguous();
    xs[ls] = keep[ls].data_ptr();
    s_b[ls] = keep[ls].stride(0);
    s_t[ls] = keep[ls].stride(1);
  }
  const at::Tensor mu = means.contiguous(), wh = whiteners.contiguous();
  const at::Tensor valid = (mask.scalar_type() == at::kBool ? mask : at::ne(mask, 0)).contiguous();
  at::Tensor cls;
  if (classes.has_value()) cls = classes->contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // valid-token list: ids[pos[f] - 1] = f for every valid flat id f (pads go to the spare slot n); count = pos[n - 1]
  const int64_t n = B * T;
  const auto lopt = hidden[0].options().dtype(at::kLong);
  at::Tensor dist = at::empty({nsel, n}, fopt);
  if (n > 0) {
    const at::Tensor flat = valid.reshape({n});
    const at::Tensor pos = at::cumsum(flat, 0, at::kLong);
    const at::Tensor dest = at::where(flat, pos.sub(1), n);
    at::Tensor ids = at::empty({n + 1}, lopt);
    ids.scatter_(0, dest, at::arange(n, lopt));
    at::Tensor lower = at::empty({nsel}, hidden[0].options().dtype(at::kInt));
    C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_tm_lower(wh.data_ptr<float>(), sel.data(), nsel, d,
                                                             lower.data_ptr<int32_t>(), stream)));
    const int64_t* cptr = classes.has_value() ? cls.data_ptr<int64_t>() : nullptr;
    const auto launch = bf16 ? dupfast_tm_dist_bf16 : dupfast_tm_dist_f32;
    C10_CUDA_CHECK(static_cast<cudaError_t>(launch(xs.data(), s_b.data(), s_t.data(), sel.data(), nsel,
                                                   wh.data_ptr<float>(), mu.data_ptr<float>(), cptr,
                                                   lower.data_ptr<int32_t>(), ids.data_ptr<int64_t>(),
                                                   pos.data_ptr<int64_t>() + (n - 1), B, T, d, K, squared,
                                                   dist.data_ptr<float>(), stream)));
  }
  C10_CUDA_CHECK(static_cast<cudaError_t>(dupfast_tm_reduce(dist.data_ptr<float>(),
                                                            reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>()),
                                                            B, T, nsel, keff, scores.data_ptr<float>(),
                                                            argmax.data_ptr<int64_t>(), stream)));
  return {scores, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(dupfast, CUDA, m) { m.impl("token_mahalanobis", &token_mahalanobis_cuda); }

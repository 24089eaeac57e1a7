// Argument checks of dupfast::mahalanobis shared by the CPU op and the CUDA binding (host only).
// The Python wrapper raises ValueError/TypeError first; these guard direct torch.ops calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

inline void maha_check_args(const at::Tensor& features, const at::Tensor& means, const at::Tensor& whiteners,
                            c10::IntArrayRef layers) {
  TORCH_CHECK(features.dim() == 3, "mahalanobis: features must be [N, L, d], got ", features.sizes());
  TORCH_CHECK(means.dim() == 3, "mahalanobis: means must be [L, K, d], got ", means.sizes());
  TORCH_CHECK(whiteners.dim() == 3, "mahalanobis: whiteners must be [L, d, d], got ", whiteners.sizes());
  const int64_t L = features.size(1), d = features.size(2);
  TORCH_CHECK(means.size(0) == L && means.size(2) == d, "mahalanobis: means ", means.sizes(),
              " do not match features ", features.sizes());
  TORCH_CHECK(whiteners.size(0) == L && whiteners.size(1) == d && whiteners.size(2) == d,
              "mahalanobis: whiteners ", whiteners.sizes(), " do not match features ", features.sizes());
  TORCH_CHECK(means.size(1) >= 1 && d >= 1, "mahalanobis: need K >= 1 means and d >= 1");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kBFloat16,
              "mahalanobis: features must be float32 or bfloat16, got ", features.scalar_type());
  TORCH_CHECK(means.scalar_type() == at::kFloat && whiteners.scalar_type() == at::kFloat,
              "mahalanobis: means and whiteners must be float32");
  TORCH_CHECK(means.device() == features.device() && whiteners.device() == features.device(),
              "mahalanobis: features, means and whiteners must be on one device");
  for (int64_t l : layers) TORCH_CHECK(l >= 0 && l < L, "mahalanobis: layer index ", l, " out of range [0, ", L, ")");
}

// Argument checks of dupfast::token_mahalanobis shared by the CPU op and the CUDA binding (host only).
// The Python wrapper (dupfast/ops/token_mahalanobis.py) raises ValueError/TypeError first; these guard
// direct torch.ops calls. The class range of `classes` is checked by the callers (it reads device memory).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

inline void tm_check_args(at::TensorList hidden, const at::Tensor& mask, const at::Tensor& means,
                          const at::Tensor& whiteners, const c10::optional<at::Tensor>& classes,
                          c10::IntArrayRef layers, int64_t topk) {
  TORCH_CHECK(!hidden.empty(), "token_mahalanobis: hidden has no layers");
  const at::Tensor& h0 = hidden[0];
  TORCH_CHECK(h0.dim() == 3, "token_mahalanobis: every hidden layer must be [B, T, d], got ", h0.sizes());
  const int64_t L = static_cast<int64_t>(hidden.size()), B = h0.size(0), T = h0.size(1), d = h0.size(2);
  for (const at::Tensor& h : hidden) {
    TORCH_CHECK(h.sizes() == h0.sizes(), "token_mahalanobis: hidden layers differ in shape: ", h.sizes(), " vs ",
                h0.sizes());
    TORCH_CHECK(h.scalar_type() == h0.scalar_type(), "token_mahalanobis: hidden layers differ in dtype");
    TORCH_CHECK(h.device() == h0.device(), "token_mahalanobis: hidden layers on different devices");
  }
  TORCH_CHECK(h0.scalar_type() == at::kFloat || h0.scalar_type() == at::kBFloat16,
              "token_mahalanobis: hidden must be float32 or bfloat16, got ", h0.scalar_type());
  TORCH_CHECK(d >= 1, "token_mahalanobis: hidden has d = 0");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T, "token_mahalanobis: mask must be [B, T] = [",
              B, ", ", T, "], got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool || !at::isFloatingType(mask.scalar_type()),
              "token_mahalanobis: mask must be bool or integer, got ", mask.scalar_type());
  TORCH_CHECK(means.dim() == 3 && means.size(0) == L && means.size(2) == d && means.size(1) >= 1,
              "token_mahalanobis: means must be [L, K, d] with K >= 1 to match ", L, " layers of d = ", d, ", got ",
              means.sizes());
  TORCH_CHECK(whiteners.dim() == 3 && whiteners.size(0) == L && whiteners.size(1) == d && whiteners.size(2) == d,
              "token_mahalanobis: whiteners must be [L, d, d] = [", L, ", ", d, ", ", d, "], got ", whiteners.sizes());
  TORCH_CHECK(means.scalar_type() == at::kFloat && whiteners.scalar_type() == at::kFloat,
              "token_mahalanobis: means and whiteners must be float32");
  TORCH_CHECK(mask.device() == h0.device() && means.device() == h0.device() && whiteners.device() == h0.device(),
              "token_mahalanobis: hidden, mask, means and whiteners must be on one device");
  if (classes.has_value()) {
    const at::Tensor& c = *classes;
    TORCH_CHECK(c.dim() == 1 && c.size(0) == B && c.scalar_type() == at::kLong,
                "token_mahalanobis: classes must be an int64 tensor [B] = [", B, "], got ", c.scalar_type(), " ",
                c.sizes());
    TORCH_CHECK(c.device() == h0.device(), "token_mahalanobis: classes on another device than hidden");
  } else {
    TORCH_CHECK(means.size(1) == 1, "token_mahalanobis: K = ", means.size(1),
                " means per layer need classes (one per row); without classes K must be 1");
  }
  TORCH_CHECK(topk >= 1, "token_mahalanobis: topk must be >= 1, got ", topk);
  TORCH_CHECK(!layers.empty(), "token_mahalanobis: layers is empty");
  for (int64_t l : layers)
    TORCH_CHECK(l >= 0 && l < L, "token_mahalanobis: layer index ", l, " out of range [0, ", L, ")");
}

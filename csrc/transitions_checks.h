// Argument checks of dupfast::layer_transitions shared by the CPU op and the CUDA binding (host only).
#pragma once
#include <ATen/core/Tensor.h>

inline void transitions_check_args(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 3, "layer_transitions: features must be [N, L, d], got ", features.sizes());
  TORCH_CHECK(features.size(1) >= 2, "layer_transitions: need at least 2 layers, got L = ", features.size(1));
  TORCH_CHECK(features.size(2) >= 1, "layer_transitions: need d >= 1");
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kBFloat16,
              "layer_transitions: features must be float32 or bfloat16, got ", features.scalar_type());
}

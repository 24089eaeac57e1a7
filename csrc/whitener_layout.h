// How the CPU Mahalanobis ops read a layer's whitening factor W [d, d] (shared by mahalanobis_cpu.cpp and
// token_mahalanobis_cpu.cpp): as a BLAS-usable view in place when it is row- or column-major, and whether it is
// lower triangular (a Cholesky factor), so the GEMM panels can skip its zero blocks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dupfast {

// True when every entry above the diagonal is zero (element (i, j) at W[i * si + j * sj]).
inline bool strictly_lower(const float* W, int64_t d, int64_t si, int64_t sj) {
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i + 1; j < d; ++j)
      if (W[i * si + j * sj] != 0.0f) return false;
  return true;
}

// W of one layer as a BLAS-usable matrix: row- or column-major views are used in place (a batched
// torch.linalg.cholesky returns column-major factors; copying all L of them would cost L d^2 floats per call),
// anything else is copied.
inline at::Tensor blas_view(const at::Tensor& whiteners, int64_t layer) {
  at::Tensor w = whiteners.select(0, layer);
  const int64_t d = w.size(0);
  const bool row_major = w.stride(1) == 1 && w.stride(0) >= d;
  const bool col_major = w.stride(0) == 1 && w.stride(1) >= d;
  return (row_major || col_major) ? w : w.contiguous();
}

}  // namespace dupfast

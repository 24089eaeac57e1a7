#pragma once
// extern "C" launchers of the fused KL(p_T || p_S) + gradient kernels (csrc/cuda/kl_kernel.cu), one
// per (student dtype, teacher dtype). Raw device pointers, so this header needs no CUDA or torch
// include; 16-bit tensors are passed as void*. Per row r of the [rows, vocab] inputs:
//   row_loss[r] = w_r * KL(softmax(t_r * inv_temperature) || softmax(s_r * inv_temperature))
//   grad[r, :]  = w_r * inv_temperature * grad_scale * (p_S - p_T)       (in the student's dtype)
// weights may be null (all ones); a row with w_r == 0 gets zero loss and gradient. Returns the
// cudaError_t of the launch (0 = success).
#include <cstdint>

struct CUstream_st;  // what cudaStream_t points to

#ifdef __cplusplus
extern "C" {
#endif

// One launcher per (student, teacher) dtype pair, named dupfast_kl_rows_<S>_<T>; the list is written
// once here and expanded by the kernel file (definitions) and the torch binding (its dispatch table).
#define DUPFAST_KL_DTYPE_PAIRS(X) \
  X(f32, f32) X(f32, bf16) X(f32, f16) X(bf16, f32) X(bf16, bf16) X(bf16, f16) X(f16, f32) X(f16, bf16) X(f16, f16)

#define DUPFAST_KL_LAUNCHER_DECL(S, T)                                                                       \
  int dupfast_kl_rows_##S##_##T(const void* student, const void* teacher, const float* weights,            \
                                float* row_loss, void* grad, int64_t rows, int64_t vocab, float inv_temperature, \
                                float grad_scale, struct CUstream_st* stream);

DUPFAST_KL_DTYPE_PAIRS(DUPFAST_KL_LAUNCHER_DECL)

#ifdef __cplusplus
}
#endif

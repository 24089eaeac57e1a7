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

int dupfast_kl_rows_f32_f32(const void* student, const void* teacher, const float* weights, float* row_loss,
                            void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                            struct CUstream_st* stream);
int dupfast_kl_rows_f32_bf16(const void* student, const void* teacher, const float* weights, float* row_loss,
                             void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                             struct CUstream_st* stream);
int dupfast_kl_rows_f32_f16(const void* student, const void* teacher, const float* weights, float* row_loss,
                            void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                            struct CUstream_st* stream);
int dupfast_kl_rows_bf16_f32(const void* student, const void* teacher, const float* weights, float* row_loss,
                             void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                             struct CUstream_st* stream);
int dupfast_kl_rows_bf16_bf16(const void* student, const void* teacher, const float* weights, float* row_loss,
                              void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                              struct CUstream_st* stream);
int dupfast_kl_rows_bf16_f16(const void* student, const void* teacher, const float* weights, float* row_loss,
                             void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                             struct CUstream_st* stream);
int dupfast_kl_rows_f16_f32(const void* student, const void* teacher, const float* weights, float* row_loss,
                            void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                            struct CUstream_st* stream);
int dupfast_kl_rows_f16_bf16(const void* student, const void* teacher, const float* weights, float* row_loss,
                             void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                             struct CUstream_st* stream);
int dupfast_kl_rows_f16_f16(const void* student, const void* teacher, const float* weights, float* row_loss,
                            void* grad, int64_t rows, int64_t vocab, float inv_temperature, float grad_scale,
                            struct CUstream_st* stream);

#ifdef __cplusplus
}
#endif

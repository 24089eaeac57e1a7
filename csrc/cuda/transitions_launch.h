// extern "C" launchers of csrc/cuda/transitions_kernel.cu (raw device pointers, sizes, a stream).
// Each returns the cudaError_t of its launches as an int (0 = success).
#pragma once
#include <stdint.h>

struct CUstream_st;

// Largest L the Gram kernel's shared memory holds (L x 32 fp32 chunk + L x L fp64 Gram < 48 KiB).
#define DUPFAST_TRANSITIONS_MAX_L 64

#ifdef __cplusplus
extern "C" {
#endif

// Per sample (element (n, l, i) of x at n * s_n + l * s_l + i): the fp64 Gram into gram64 [N, L, L]
// and its fp32 copy into gram [N, L, L]. x is float (f32) or __nv_bfloat16.
int dupfast_transitions_gram_f32(const float* x, int64_t s_n, int64_t s_l, int64_t N, int L, int64_t d,
                                 double* gram64, float* gram, struct CUstream_st* stream);
int dupfast_transitions_gram_bf16(const void* x, int64_t s_n, int64_t s_l, int64_t N, int L, int64_t d,
                                  double* gram64, float* gram, struct CUstream_st* stream);

// From gram64: cosines [N, L-1] and concentration [N]; kbuf is fp64 scratch of (L-1)^2 * N.
int dupfast_transitions_spectrum(const double* gram64, int64_t N, int L, double* kbuf, float* cos,
                                 float* conc, struct CUstream_st* stream);

#ifdef __cplusplus
}
#endif

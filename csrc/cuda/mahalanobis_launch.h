// extern "C" launchers of csrc/cuda/mahalanobis_kernel.cu (raw device pointers, sizes, a stream).
// Each returns the cudaError_t of its launches as an int (0 = success).
#pragma once
#include <stdint.h>

struct CUstream_st;

// Largest number of means per layer the main kernel keeps in shared memory.
#define DUPFAST_MAHA_MAX_K 128

#ifdef __cplusplus
extern "C" {
#endif

// Per selected layer (layers: host array of nsel indices into the L layers of means / W):
// mu0 [nsel, d] centroid of the K means, shift [nsel, K, d] = (mu_k - mu0) W,
// lower [nsel] = 1 where W's strict upper triangle is all zero.
int dupfast_maha_prepare(const float* means, const float* W, const int64_t* layers, int64_t nsel,
                         int64_t K, int64_t d, float* mu0, float* shift, int32_t* lower,
                         struct CUstream_st* stream);

// out [N, nsel] (reduce_min) or [N, nsel, K]: distances of features rows (element (n, l, i) at
// n * s_n + l * s_l + i) to the K means of each selected layer. x is float (f32) or __nv_bfloat16.
int dupfast_maha_f32(const float* x, int64_t s_n, int64_t s_l, const float* W, const float* mu0,
                     const float* shift, const int32_t* lower, const int64_t* layers, int64_t N,
                     int64_t d, int64_t K, int64_t nsel, int squared, int reduce_min, float* out,
                     struct CUstream_st* stream);
int dupfast_maha_bf16(const void* x, int64_t s_n, int64_t s_l, const float* W, const float* mu0,
                      const float* shift, const int32_t* lower, const int64_t* layers, int64_t N,
                      int64_t d, int64_t K, int64_t nsel, int squared, int reduce_min, float* out,
                      struct CUstream_st* stream);

#ifdef __cplusplus
}
#endif

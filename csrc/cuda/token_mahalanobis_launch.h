// extern "C" launchers of csrc/cuda/token_mahalanobis_kernel.cu (raw device pointers, sizes, a stream).
// Each returns the cudaError_t of its launches as an int (0 = success).
#pragma once
#include <stdint.h>

struct CUstream_st;

// Largest min(topk, T) the row reduction keeps (32 lanes x this many (value, index) pairs in shared memory:
// 32 KiB at 128). dupfast/ops/token_mahalanobis.py's MAX_GPU_TOPK.
#define DUPFAST_TM_MAX_TOPK 128

#ifdef __cplusplus
extern "C" {
#endif

// lower [nsel] = 1 where W[layers[i]] (W: [L, d, d] row-major) has an all-zero strict upper triangle.
// layers: host array of nsel indices.
int dupfast_tm_lower(const float* W, const int64_t* layers, int64_t nsel, int64_t d, int32_t* lower,
                     struct CUstream_st* stream);

// Squared whitened norms -> distances of the valid tokens, for every selected layer:
//   dist[ls * B * T + f] = finalize(||(h[layers[ls]][b, t] - means[layers[ls], cls[b]]) W[layers[ls]]||^2)
// for f = ids[i] = b * T + t, i < *count (device scalar: the number of valid tokens; ids lists them). Host
// arrays (nsel entries): x[ls] the base of selected layer ls's hidden states (float for _f32, __nv_bfloat16
// for _bf16; element (b, t, j) at b * s_b[ls] + t * s_t[ls] + j), layers[ls] its index into means [L, K, d]
// and W [L, d, d] (row-major). cls: device [B] int64 class per row, or NULL (class 0); a class outside [0, K)
// gives NaN distances (the Python wrapper raises first). Entries of pads are not written.
int dupfast_tm_dist_f32(const void* const* x, const int64_t* s_b, const int64_t* s_t, const int64_t* layers,
                        int64_t nsel, const float* W, const float* means, const int64_t* cls, const int32_t* lower,
                        const int64_t* ids, const int64_t* count, int64_t B, int64_t T, int64_t d, int64_t K,
                        int squared, float* dist, struct CUstream_st* stream);
int dupfast_tm_dist_bf16(const void* const* x, const int64_t* s_b, const int64_t* s_t, const int64_t* layers,
                         int64_t nsel, const float* W, const float* means, const int64_t* cls, const int32_t* lower,
                         const int64_t* ids, const int64_t* count, int64_t B, int64_t T, int64_t d, int64_t K,
                         int squared, float* dist, struct CUstream_st* stream);

// Per (row b, selected layer ls): the row's valid tokens (mask [B, T], bool bytes) reduced over
// dist[ls * B * T + b * T + t] with csrc/token_mahalanobis_math.h (32 lanes, then a pairwise merge):
// scores[b * nsel + ls] = mean of the keff best, argmax[b * nsel + ls] = the best token (-1: no valid token).
// 1 <= keff <= DUPFAST_TM_MAX_TOPK.
int dupfast_tm_reduce(const float* dist, const uint8_t* mask, int64_t B, int64_t T, int64_t nsel, int64_t keff,
                      float* scores, int64_t* argmax, struct CUstream_st* stream);

#ifdef __cplusplus
}
#endif

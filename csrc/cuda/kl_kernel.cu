// CUDA kernels of the fused KL(p_T || p_S) + gradient. Torch-free: only CUDA headers and the
// project's headers, so CI compiles this file for sm_80/sm_90 with nvcc alone (toolchain.md §6.2).
// The per-element math (online log-sum-exp, KL term, gradient, -inf rules) is csrc/kl_math.h,
// which the CPU op shares, so the host tests exercise it.
//
// A group of TPR threads handles one row, two passes over V:
//   pass 1: each thread keeps an online (max, sum-exp) for the student and the teacher over its
//           strided slots; the group merges them (warp shuffles, then shared memory across warps);
//   pass 2: each thread recomputes p_S, p_T for its slots, stores the gradient and sums the loss.
// Small V: one warp per row (8 rows per 256-thread block); large V: one 512-thread block per row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kl_launch.h"
#include "kl_math.h"

namespace {

using dupfast::kl::kl_elem;
using dupfast::kl::Lse;
using dupfast::kl::lse_empty;
using dupfast::kl::lse_merge;
using dupfast::kl::lse_push;
using dupfast::kl::norm_diff;
using dupfast::kl::row_norm;
using dupfast::kl::RowNorm;

constexpr int kWarp = 32;
constexpr int64_t kSmallVocab = 1024;  // up to this V, one warp per row

// Explicit conversions: torch builds .cu files with -D__CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ Lse warp_lse(Lse a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1)
    a = lse_merge(a, Lse{__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off)});
  return a;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Merge over the TPR threads of a row group (TPR = 32: a warp; TPR = blockDim.x: the block).
// Every thread of the group gets the merged value.
template <int TPR>
__device__ __forceinline__ Lse group_lse(Lse a, Lse* smem) {
  a = warp_lse(a);
  if constexpr (TPR > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) smem[warp] = a;
    __syncthreads();
    a = warp_lse(lane < TPR / kWarp ? smem[lane] : lse_empty());
    __syncthreads();  // smem may be reused right after
  }
  return a;
}

template <int TPR>
__device__ __forceinline__ float group_sum(float x, float* smem) {
  x = warp_sum(x);
  if constexpr (TPR > kWarp) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) smem[warp] = x;
    __syncthreads();
    x = warp_sum(lane < TPR / kWarp ? smem[lane] : 0.0f);
    __syncthreads();
  }
  return x;
}

template <typename TS, typename TT, int TPR, int THREADS>
__global__ void __launch_bounds__(THREADS)
    kl_rows_kernel(const TS* __restrict__ s, const TT* __restrict__ t, const float* __restrict__ w,
                   float* __restrict__ loss, TS* __restrict__ g, int64_t rows, int64_t v, float inv_t,
                   float grad_scale) {
  static_assert(TPR % kWarp == 0 && THREADS % TPR == 0 && TPR / kWarp <= kWarp, "a row group is 1..32 whole warps");
  __shared__ Lse sm_s[THREADS / kWarp];
  __shared__ Lse sm_t[THREADS / kWarp];
  __shared__ float sm_f[THREADS / kWarp];
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (THREADS / TPR) + threadIdx.x / TPR;
  if (row >= rows) return;  // a whole group leaves together: no barrier is skipped by part of it
  const TS* sr = s + row * v;
  const TT* tr = t + row * v;
  TS* gr = g + row * v;
  const float wr = w ? w[row] : 1.0f;
  if (wr == 0.0f) {  // masked row: zero loss and gradient, inputs never read
    for (int64_t j = lane; j < v; j += TPR) gr[j] = from_f32<TS>(0.0f);
    if (lane == 0) loss[row] = 0.0f;
    return;
  }
  Lse ls = lse_empty(), lt = lse_empty();
  for (int64_t j = lane; j < v; j += TPR) {
    lse_push(ls, to_f32(sr[j]) * inv_t);  // scaled logits y = x / T (kl_math.h)
    lse_push(lt, to_f32(tr[j]) * inv_t);
  }
  ls = group_lse<TPR>(ls, sm_s);
  lt = group_lse<TPR>(lt, sm_t);
  const RowNorm ns = row_norm(ls), nt = row_norm(lt);
  const float dnorm = norm_diff(ns, nt);
  const float coef = wr * inv_t * grad_scale;
  float acc = 0.0f;
  for (int64_t j = lane; j < v; j += TPR) {
    float gj;
    acc += kl_elem(to_f32(sr[j]) * inv_t, to_f32(tr[j]) * inv_t, ns, nt, dnorm, coef, &gj);
    gr[j] = from_f32<TS>(gj);
  }
  acc = group_sum<TPR>(acc, sm_f);
  if (lane == 0) loss[row] = wr * acc;
}

template <typename TS, typename TT>
int launch(const void* s, const void* t, const float* w, float* loss, void* g, int64_t rows, int64_t v, float inv_t,
           float grad_scale, cudaStream_t stream) {
  if (rows <= 0 || v <= 0) return static_cast<int>(cudaSuccess);
  const auto* sp = static_cast<const TS*>(s);
  const auto* tp = static_cast<const TT*>(t);
  auto* gp = static_cast<TS*>(g);
  if (v <= kSmallVocab) {
    constexpr int kThreads = 256, kRowsPerBlock = kThreads / kWarp;
    const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    kl_rows_kernel<TS, TT, kWarp, kThreads>
        <<<blocks, kThreads, 0, stream>>>(sp, tp, w, loss, gp, rows, v, inv_t, grad_scale);
  } else {
    constexpr int kThreads = 512;
    kl_rows_kernel<TS, TT, kThreads, kThreads>
        <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(sp, tp, w, loss, gp, rows, v, inv_t, grad_scale);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// the C type of each dtype tag of DUPFAST_KL_DTYPE_PAIRS
using kl_f32 = float;
using kl_bf16 = __nv_bfloat16;
using kl_f16 = __half;

#define DUPFAST_KL_LAUNCHER(S, T)                                                                                 \
  extern "C" int dupfast_kl_rows_##S##_##T(const void* student, const void* teacher, const float* weights,      \
                                           float* row_loss, void* grad, int64_t rows, int64_t vocab,            \
                                           float inv_temperature, float grad_scale, struct CUstream_st* stream) { \
    return launch<kl_##S, kl_##T>(student, teacher, weights, row_loss, grad, rows, vocab, inv_temperature,      \
                                  grad_scale, stream);                                                           \
  }

DUPFAST_KL_DTYPE_PAIRS(DUPFAST_KL_LAUNCHER)

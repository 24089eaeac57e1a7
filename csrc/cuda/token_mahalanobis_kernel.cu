// CUDA token-level multi-layer Mahalanobis (torch-free: CUDA headers and project headers only).
//
// dist_kernel: one CTA per (64 valid tokens, selected layer). The valid tokens come as a list of flat ids
// b * T + t (built by the binding from the mask, on the device, no host sync; CTAs past the count exit at
// once), so pads are never loaded or multiplied. The CTA gathers its tokens' rows, centres them on their
// row's mean (bf16 upcast on load), walks W's 64-wide column tiles with a shared-memory tiled fp32 GEMM
// (starting at row j0 when W is lower triangular) and folds each 64x64 tile of (h - mu) W into the tokens'
// squared norms (16-lane shuffle reduction, one writer per token: deterministic). It writes one fp32
// distance per valid token into an [L', B * T] buffer: no whitened copy beyond the tile ever exists.
// reduce_kernel: one warp per (row, selected layer): lane i keeps the best keff of tokens i, i + 32, ...
// (csrc/token_mahalanobis_math.h, lists in shared memory), the 32 lists are merged pairwise in 5 rounds and
// lane 0 writes the score (mean of the kept distances) and the argmax (the best token; -1 for no token).
// The order is total, so the result does not depend on the lane layout; the cpu build replays this exact
// layout in dupfast::token_mahalanobis_reduce, which the tests check.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "token_mahalanobis_math.h"
#include "cuda/token_mahalanobis_launch.h"

namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
constexpr int kMaxLayersPerLaunch = 32;
constexpr int kLanes = 32;

struct LayerChunk {  // by value: up to kMaxLayersPerLaunch selected layers of one launch
  const void* x[kMaxLayersPerLaunch];
  int64_t s_b[kMaxLayersPerLaunch];
  int64_t s_t[kMaxLayersPerLaunch];
  int32_t idx[kMaxLayersPerLaunch];
};

LayerChunk chunk_of(const void* const* x, const int64_t* s_b, const int64_t* s_t, const int64_t* layers,
                    int64_t ls0, int64_t count) {
  LayerChunk c{};
  for (int64_t i = 0; i < count; ++i) {
    c.x[i] = x ? x[ls0 + i] : nullptr;
    c.s_b[i] = s_b ? s_b[ls0 + i] : 0;
    c.s_t[i] = s_t ? s_t[ls0 + i] : 0;
    c.idx[i] = static_cast<int32_t>(layers[ls0 + i]);
  }
  return c;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__global__ void lower_kernel(const float* __restrict__ W, LayerChunk layers, int64_t d, int32_t* __restrict__ lower,
                             int64_t ls0) {
  const float* w = W + static_cast<int64_t>(layers.idx[blockIdx.x]) * d * d;
  int nonzero = 0;
  for (int64_t e = threadIdx.x; e < d * d; e += blockDim.x) {
    const int64_t i = e / d, j = e % d;
    nonzero |= (j > i) && (w[e] != 0.0f);
  }
  nonzero = __syncthreads_or(nonzero);
  if (threadIdx.x == 0) lower[ls0 + blockIdx.x] = nonzero ? 0 : 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dist_kernel(
    LayerChunk layers, int64_t ls0, const float* __restrict__ W, const float* __restrict__ means,
    const int64_t* __restrict__ cls, const int32_t* __restrict__ lower_all, const int64_t* __restrict__ ids,
    const int64_t* __restrict__ count, int64_t B, int64_t Tn, int64_t d, int64_t K, int squared,
    float* __restrict__ dist) {
  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN];
  __shared__ float qs[kBM];
  __shared__ const T* xrow[kBM];
  __shared__ const float* murow[kBM];
  __shared__ int64_t tokf[kBM];  // flat id b * T + t of the CTA's token r, -1 past the list
  __shared__ int bad[kBM];       // class outside [0, K): NaN

  const int64_t nvalid = *count;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  if (row0 >= nvalid) return;  // uniform per CTA, before any barrier
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int ls_local = blockIdx.y;
  const int64_t ls = ls0 + ls_local;
  const int64_t layer = layers.idx[ls_local];
  const float* w = W + layer * d * d;
  const bool lower = lower_all[ls] != 0;

  if (tid < kBM) {
    const int64_t i = row0 + tid;
    qs[tid] = 0.0f;
    if (i < nvalid) {
      const int64_t f = ids[i], b = f / Tn, t = f - b * Tn;
      const int64_t c = cls ? cls[b] : 0;
      const bool ok = c >= 0 && c < K;
      tokf[tid] = f;
      xrow[tid] = static_cast<const T*>(layers.x[ls_local]) + b * layers.s_b[ls_local] + t * layers.s_t[ls_local];
      murow[tid] = means + (layer * K + (ok ? c : 0)) * d;
      bad[tid] = ok ? 0 : 1;
    } else {
      tokf[tid] = -1;
      xrow[tid] = nullptr;
      murow[tid] = nullptr;
      bad[tid] = 0;
    }
  }
  __syncthreads();

  for (int64_t j0 = 0; j0 < d; j0 += kBN) {
    float acc[4][4] = {};
    const int64_t kstart = lower ? (j0 / kBK) * kBK : 0;
    for (int64_t k0 = kstart; k0 < d; k0 += kBK) {
      for (int e = tid; e < kBM * kBK; e += kThreads) {  // centred tokens, transposed into As[k][r]
        const int r = e / kBK, kk = e % kBK;
        const int64_t i = k0 + kk;
        float v = 0.0f;
        if (xrow[r] != nullptr && i < d) v = to_float(xrow[r][i]) - murow[r][i];
        As[kk][r] = v;
      }
      for (int e = tid; e < kBK * kBN; e += kThreads) {
        const int kk = e / kBN, c = e % kBN;
        const int64_t i = k0 + kk, j = j0 + c;
        Bs[kk][c] = (i < d && j < d) ? w[i * d + j] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        float a[4], bv[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          a[t] = As[kk][ty * 4 + t];
          bv[t] = Bs[kk][tx * 4 + t];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], bv[c], acc[r][c]);
      }
      __syncthreads();
    }
    // epilogue: q[r] += sum over this tile's columns < d of Y^2 (a padded column is 0, or NaN where an infinite
    // input met Bs's zero padding: skipped)
    float part[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float s = 0.0f;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (j0 + tx * 4 + c < d) s = fmaf(acc[r][c], acc[r][c], s);
      part[r] = s;
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) part[r] += __shfl_xor_sync(0xffffffffu, part[r], off, 16);
    if (tx == 0) {
#pragma unroll
      for (int r = 0; r < 4; ++r) qs[ty * 4 + r] += part[r];
    }
  }
  __syncthreads();
  if (tid < kBM && tokf[tid] >= 0)
    dist[ls * B * Tn + tokf[tid]] = bad[tid] ? df_nanf() : tm_distance(qs[tid], squared != 0);
}

__global__ void __launch_bounds__(kLanes) reduce_kernel(const float* __restrict__ dist,
                                                        const uint8_t* __restrict__ mask, int64_t B, int64_t Tn,
                                                        int64_t nsel, int32_t keff, float* __restrict__ scores,
                                                        int64_t* __restrict__ argmax) {
  extern __shared__ float lists[];  // vals [kLanes][keff], then idx [kLanes][keff]
  __shared__ int32_t cnt[kLanes];
  float* vals = lists;
  int32_t* idx = reinterpret_cast<int32_t*>(lists + kLanes * keff);
  const int lane = threadIdx.x;
  const int64_t b = blockIdx.x, ls = blockIdx.y;
  const float* drow = dist + (ls * B + b) * Tn;
  const uint8_t* mrow = mask + b * Tn;
  int32_t n = 0;
  for (int64_t t = lane; t < Tn; t += kLanes)
    if (mrow[t]) tm_topk_push(vals + lane * keff, idx + lane * keff, n, keff, drow[t], static_cast<int32_t>(t));
  cnt[lane] = n;
  __syncwarp();
  for (int s = kLanes / 2; s >= 1; s >>= 1) {
    if (lane < s) {
      int32_t m = cnt[lane];
      tm_topk_merge(vals + lane * keff, idx + lane * keff, m, keff, vals + (lane + s) * keff, idx + (lane + s) * keff,
                    cnt[lane + s]);
      cnt[lane] = m;
    }
    __syncwarp();
  }
  if (lane == 0) tm_topk_finish(vals, idx, cnt[0], scores + b * nsel + ls, argmax + b * nsel + ls);
}

template <typename T>
int launch_dist(const void* const* x, const int64_t* s_b, const int64_t* s_t, const int64_t* layers, int64_t nsel,
                const float* W, const float* means, const int64_t* cls, const int32_t* lower, const int64_t* ids,
                const int64_t* count, int64_t B, int64_t Tn, int64_t d, int64_t K, int squared, float* dist,
                cudaStream_t stream) {
  if (d < 1 || K < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t tokens = B * Tn;
  if (tokens == 0 || nsel == 0) return 0;
  const unsigned tiles = static_cast<unsigned>((tokens + kBM - 1) / kBM);  // enough for every token valid
  for (int64_t ls0 = 0; ls0 < nsel; ls0 += kMaxLayersPerLaunch) {
    const int64_t n = nsel - ls0 < kMaxLayersPerLaunch ? nsel - ls0 : kMaxLayersPerLaunch;
    dist_kernel<T><<<dim3(tiles, static_cast<unsigned>(n)), kThreads, 0, stream>>>(
        chunk_of(x, s_b, s_t, layers, ls0, n), ls0, W, means, cls, lower, ids, count, B, Tn, d, K, squared, dist);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dupfast_tm_lower(const float* W, const int64_t* layers, int64_t nsel, int64_t d, int32_t* lower,
                                cudaStream_t stream) {
  for (int64_t ls0 = 0; ls0 < nsel; ls0 += kMaxLayersPerLaunch) {
    const int64_t n = nsel - ls0 < kMaxLayersPerLaunch ? nsel - ls0 : kMaxLayersPerLaunch;
    lower_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(W, chunk_of(nullptr, nullptr, nullptr, layers, ls0, n),
                                                               d, lower, ls0);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int dupfast_tm_dist_f32(const void* const* x, const int64_t* s_b, const int64_t* s_t,
                                   const int64_t* layers, int64_t nsel, const float* W, const float* means,
                                   const int64_t* cls, const int32_t* lower, const int64_t* ids, const int64_t* count,
                                   int64_t B, int64_t T, int64_t d, int64_t K, int squared, float* dist,
                                   cudaStream_t stream) {
  return launch_dist<float>(x, s_b, s_t, layers, nsel, W, means, cls, lower, ids, count, B, T, d, K, squared, dist,
                            stream);
}

extern "C" int dupfast_tm_dist_bf16(const void* const* x, const int64_t* s_b, const int64_t* s_t,
                                    const int64_t* layers, int64_t nsel, const float* W, const float* means,
                                    const int64_t* cls, const int32_t* lower, const int64_t* ids,
                                    const int64_t* count, int64_t B, int64_t T, int64_t d, int64_t K, int squared,
                                    float* dist, cudaStream_t stream) {
  return launch_dist<__nv_bfloat16>(x, s_b, s_t, layers, nsel, W, means, cls, lower, ids, count, B, T, d, K, squared,
                                    dist, stream);
}

extern "C" int dupfast_tm_reduce(const float* dist, const uint8_t* mask, int64_t B, int64_t T, int64_t nsel,
                                 int64_t keff, float* scores, int64_t* argmax, cudaStream_t stream) {
  if (keff < 1 || keff > DUPFAST_TM_MAX_TOPK) return static_cast<int>(cudaErrorInvalidValue);
  if (B == 0 || nsel == 0) return 0;
  const size_t smem = static_cast<size_t>(kLanes) * keff * (sizeof(float) + sizeof(int32_t));
  reduce_kernel<<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(nsel)), kLanes, smem, stream>>>(
      dist, mask, B, T, nsel, static_cast<int32_t>(keff), scores, argmax);
  return static_cast<int>(cudaGetLastError());
}

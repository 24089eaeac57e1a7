// CUDA multi-layer Mahalanobis (torch-free: CUDA headers and project headers only).
//
// Main kernel: one CTA per (64-row block, selected layer). It walks W's column tiles (64 wide);
// for each it runs a shared-memory tiled fp32 GEMM of the centred rows (x - mu0, bf16 upcast on
// load) against W, starting at row j0 when W is lower triangular, then folds the 64x64 tile of
// Y = (x - mu0) W into q_k += ||Y - S_k||^2 for every mean k (16-lane shuffle reduction, one writer
// per row: deterministic). Only the CTA's 64 rows x K partial sums live in shared memory.
// The per-element math (centroid, shift, finalize, NaN-propagating min) is csrc/mahalanobis_math.h.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "mahalanobis_math.h"
#include "cuda/mahalanobis_launch.h"

namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
constexpr int kMaxLayersPerLaunch = 256;

struct LayerList {
  int32_t idx[kMaxLayersPerLaunch];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__global__ void centroid_kernel(const float* __restrict__ means, LayerList layers, int64_t K, int64_t d,
                                float* __restrict__ mu0, int64_t ls0) {
  const int ls = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  mu0[(ls0 + ls) * d + i] = maha_centroid(means + static_cast<int64_t>(layers.idx[ls]) * K * d, K, d, i);
}

__global__ void shift_kernel(const float* __restrict__ means, const float* __restrict__ W, LayerList layers,
                             int64_t K, int64_t d, const float* __restrict__ mu0, float* __restrict__ shift,
                             int64_t ls0) {
  const int ls = blockIdx.y / static_cast<int>(K), k = blockIdx.y % static_cast<int>(K);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const int64_t layer = layers.idx[ls];
  shift[((ls0 + ls) * K + k) * d + j] =
      maha_shift(means + (layer * K + k) * d, mu0 + (ls0 + ls) * d, W + layer * d * d, d, j);
}

__global__ void lower_kernel(const float* __restrict__ W, LayerList layers, int64_t d, int32_t* __restrict__ lower,
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
__global__ void __launch_bounds__(kThreads) maha_kernel(
    const T* __restrict__ x, int64_t s_n, int64_t s_l, const float* __restrict__ W,
    const float* __restrict__ mu0_all, const float* __restrict__ shift_all, const int32_t* __restrict__ lower_all,
    LayerList layers, int64_t ls0, int64_t N, int64_t d, int64_t K, int64_t nsel, int squared, int reduce_min,
    float* __restrict__ out) {
  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN];
  extern __shared__ float qs[];  // [kBM][K]

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int ls_local = blockIdx.y;
  const int64_t ls = ls0 + ls_local;
  const int64_t layer = layers.idx[ls_local];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const float* w = W + layer * d * d;
  const float* mu0 = mu0_all + ls * d;
  const float* shift = shift_all + ls * K * d;
  const bool lower = lower_all[ls] != 0;

  for (int e = tid; e < kBM * K; e += kThreads) qs[e] = 0.0f;

  for (int64_t j0 = 0; j0 < d; j0 += kBN) {
    float acc[4][4] = {};
    const int64_t kstart = lower ? (j0 / kBK) * kBK : 0;
    for (int64_t k0 = kstart; k0 < d; k0 += kBK) {
      for (int e = tid; e < kBM * kBK; e += kThreads) {  // centred rows, transposed into As[k][r]
        const int r = e / kBK, kk = e % kBK;
        const int64_t n = row0 + r, i = k0 + kk;
        float v = 0.0f;
        if (n < N && i < d) v = to_float(x[n * s_n + layer * s_l + i]) - mu0[i];
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
        float a[4], b[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          a[t] = As[kk][ty * 4 + t];
          b[t] = Bs[kk][tx * 4 + t];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
      }
      __syncthreads();
    }
    // epilogue: q[r][k] += sum over this tile's columns of (Y - S_k)^2
    for (int64_t k = 0; k < K; ++k) {
      float part[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t j = j0 + tx * 4 + c;
          if (j < d) {
            const float v = acc[r][c] - shift[k * d + j];
            s = fmaf(v, v, s);
          }
        }
        part[r] = s;
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) part[r] += __shfl_xor_sync(0xffffffffu, part[r], off, 16);
      if (tx == 0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) qs[(ty * 4 + r) * K + k] += part[r];
      }
    }
  }
  __syncthreads();
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t n = row0 + r;
    if (n >= N) continue;
    if (reduce_min) {
      float best = maha_finalize(qs[r * K], squared != 0);
      for (int64_t k = 1; k < K; ++k) best = maha_min(best, maha_finalize(qs[r * K + k], squared != 0));
      out[n * nsel + ls] = best;
    } else {
      for (int64_t k = 0; k < K; ++k) out[(n * nsel + ls) * K + k] = maha_finalize(qs[r * K + k], squared != 0);
    }
  }
}

LayerList chunk_of(const int64_t* layers, int64_t ls0, int64_t count) {
  LayerList list{};
  for (int64_t t = 0; t < count; ++t) list.idx[t] = static_cast<int32_t>(layers[ls0 + t]);
  return list;
}

template <typename T>
int launch_maha(const T* x, int64_t s_n, int64_t s_l, const float* W, const float* mu0, const float* shift,
                const int32_t* lower, const int64_t* layers, int64_t N, int64_t d, int64_t K, int64_t nsel,
                int squared, int reduce_min, float* out, cudaStream_t stream) {
  if (K < 1 || K > DUPFAST_MAHA_MAX_K) return static_cast<int>(cudaErrorInvalidValue);
  if (N == 0 || nsel == 0) return 0;
  const size_t smem = static_cast<size_t>(kBM) * K * sizeof(float);
  for (int64_t ls0 = 0; ls0 < nsel; ls0 += kMaxLayersPerLaunch) {
    const int64_t count = nsel - ls0 < kMaxLayersPerLaunch ? nsel - ls0 : kMaxLayersPerLaunch;
    const dim3 grid(static_cast<unsigned>((N + kBM - 1) / kBM), static_cast<unsigned>(count));
    maha_kernel<T><<<grid, kThreads, smem, stream>>>(x, s_n, s_l, W, mu0, shift, lower, chunk_of(layers, ls0, count),
                                                     ls0, N, d, K, nsel, squared, reduce_min, out);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dupfast_maha_prepare(const float* means, const float* W, const int64_t* layers, int64_t nsel,
                                    int64_t K, int64_t d, float* mu0, float* shift, int32_t* lower,
                                    cudaStream_t stream) {
  const unsigned col_blocks = static_cast<unsigned>((d + 255) / 256);
  for (int64_t ls0 = 0; ls0 < nsel; ls0 += kMaxLayersPerLaunch) {
    const int64_t count = nsel - ls0 < kMaxLayersPerLaunch ? nsel - ls0 : kMaxLayersPerLaunch;
    const LayerList list = chunk_of(layers, ls0, count);
    centroid_kernel<<<dim3(col_blocks, static_cast<unsigned>(count)), 256, 0, stream>>>(means, list, K, d, mu0, ls0);
    shift_kernel<<<dim3(col_blocks, static_cast<unsigned>(count * K)), 256, 0, stream>>>(means, W, list, K, d, mu0,
                                                                                        shift, ls0);
    lower_kernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(W, list, d, lower, ls0);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int dupfast_maha_f32(const float* x, int64_t s_n, int64_t s_l, const float* W, const float* mu0,
                                const float* shift, const int32_t* lower, const int64_t* layers, int64_t N,
                                int64_t d, int64_t K, int64_t nsel, int squared, int reduce_min, float* out,
                                cudaStream_t stream) {
  return launch_maha<float>(x, s_n, s_l, W, mu0, shift, lower, layers, N, d, K, nsel, squared, reduce_min, out,
                            stream);
}

extern "C" int dupfast_maha_bf16(const void* x, int64_t s_n, int64_t s_l, const float* W, const float* mu0,
                                 const float* shift, const int32_t* lower, const int64_t* layers, int64_t N,
                                 int64_t d, int64_t K, int64_t nsel, int squared, int reduce_min, float* out,
                                 cudaStream_t stream) {
  return launch_maha<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), s_n, s_l, W, mu0, shift, lower, layers,
                                    N, d, K, nsel, squared, reduce_min, out, stream);
}

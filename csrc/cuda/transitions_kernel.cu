// CUDA layer transitions (torch-free: CUDA headers and project headers only).
//
// gram_kernel: one CTA per sample streams its [L, d] features through shared memory in 32-column
// chunks; thread t owns Gram entries (i <= j) t, t + 128, ... and accumulates fp32 x fp32 products
// in fp64 (exact products), so every entry has one writer and no atomics.
// spectrum_kernel: one thread per sample runs csrc/transitions_math.h (cosines, difference Gram,
// cyclic Jacobi, concentration) with its matrix interleaved across samples (stride N) so the
// threads of a warp read consecutive addresses.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "transitions_math.h"
#include "cuda/transitions_launch.h"

namespace {

constexpr int kChunk = 32;       // feature columns per shared-memory chunk
constexpr int kPitch = kChunk + 1;  // padded row pitch: rows i != j fall in different banks
constexpr int kGramThreads = 128;
constexpr int kSpectrumThreads = 128;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// (i, j) with i <= j of upper-triangle entry number p (row-major over the upper triangle).
__device__ __forceinline__ void pair_of(int p, int L, int* i, int* j) {
  int row = 0, len = L;
  while (p >= len) {
    p -= len;
    ++row;
    --len;
  }
  *i = row;
  *j = row + p;
}

template <typename T>
__global__ void __launch_bounds__(kGramThreads) gram_kernel(const T* __restrict__ x, int64_t s_n, int64_t s_l,
                                                            int L, int64_t d, double* __restrict__ gram64,
                                                            float* __restrict__ gram) {
  extern __shared__ double smem[];
  double* G = smem;                                      // [L * L]
  float* H = reinterpret_cast<float*>(smem + L * L);     // [L][kPitch]
  const int64_t sample = blockIdx.x;
  const int tid = threadIdx.x;
  const int pairs = L * (L + 1) / 2;
  for (int p = tid; p < pairs; p += kGramThreads) G[p] = 0.0;  // packed upper triangle first
  const T* xs = x + sample * s_n;
  for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
    __syncthreads();
    for (int e = tid; e < L * kChunk; e += kGramThreads) {
      const int l = e / kChunk, c = e % kChunk;
      H[l * kPitch + c] = (c0 + c < d) ? to_float(xs[l * s_l + c0 + c]) : 0.0f;
    }
    __syncthreads();
    for (int p = tid; p < pairs; p += kGramThreads) {
      int i, j;
      pair_of(p, L, &i, &j);
      double s = 0.0;
#pragma unroll 8
      for (int c = 0; c < kChunk; ++c)
        s = fma(static_cast<double>(H[i * kPitch + c]), static_cast<double>(H[j * kPitch + c]), s);
      G[p] += s;
    }
  }
  __syncthreads();
  double* g64 = gram64 + sample * L * L;
  float* g32 = gram + sample * L * L;
  for (int p = tid; p < pairs; p += kGramThreads) {
    int i, j;
    pair_of(p, L, &i, &j);
    const double v = G[p];
    g64[i * L + j] = v;
    g64[j * L + i] = v;
    g32[i * L + j] = static_cast<float>(v);
    g32[j * L + i] = static_cast<float>(v);
  }
}

__global__ void __launch_bounds__(kSpectrumThreads, 4) spectrum_kernel(const double* __restrict__ gram64, int64_t N,
                                                                    int L, double* __restrict__ kbuf,
                                                                    float* __restrict__ cos,
                                                                    float* __restrict__ conc) {
  const int64_t sample = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sample >= N) return;
  const int n = L - 1;
  const double* G = gram64 + sample * L * L;
  double* A = kbuf + sample;  // lane `sample` of the interleaved [n][n][N] scratch
  float* c = cos + sample * n;
  if (!tr_all_finite(G, L)) {  // non-finite features: NaN scores, not a fake number
    for (int l = 0; l < n; ++l) c[l] = df_nanf();
    conc[sample] = df_nanf();
    return;
  }
  tr_cosines(G, L, c);
  tr_fill_diff_gram(G, L, A, N, 0);
  tr_jacobi_eigenvalues<1>(A, n, N);
  conc[sample] = tr_concentration(A, n, N, 0);
}

template <typename T>
int launch_gram(const T* x, int64_t s_n, int64_t s_l, int64_t N, int L, int64_t d, double* gram64, float* gram,
                cudaStream_t stream) {
  if (L < 2 || L > DUPFAST_TRANSITIONS_MAX_L) return static_cast<int>(cudaErrorInvalidValue);
  if (N == 0) return 0;
  const size_t smem = static_cast<size_t>(L) * L * sizeof(double) + static_cast<size_t>(L) * kPitch * sizeof(float);
  gram_kernel<T><<<static_cast<unsigned>(N), kGramThreads, smem, stream>>>(x, s_n, s_l, L, d, gram64, gram);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dupfast_transitions_gram_f32(const float* x, int64_t s_n, int64_t s_l, int64_t N, int L, int64_t d,
                                            double* gram64, float* gram, cudaStream_t stream) {
  return launch_gram<float>(x, s_n, s_l, N, L, d, gram64, gram, stream);
}

extern "C" int dupfast_transitions_gram_bf16(const void* x, int64_t s_n, int64_t s_l, int64_t N, int L, int64_t d,
                                             double* gram64, float* gram, cudaStream_t stream) {
  return launch_gram<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), s_n, s_l, N, L, d, gram64, gram, stream);
}

extern "C" int dupfast_transitions_spectrum(const double* gram64, int64_t N, int L, double* kbuf, float* cos,
                                            float* conc, cudaStream_t stream) {
  if (L < 2) return static_cast<int>(cudaErrorInvalidValue);
  if (N == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((N + kSpectrumThreads - 1) / kSpectrumThreads);
  spectrum_kernel<<<blocks, kSpectrumThreads, 0, stream>>>(gram64, N, L, kbuf, cos, conc);
  return static_cast<int>(cudaGetLastError());
}

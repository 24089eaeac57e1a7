// NaN / finiteness tests on the bit pattern, shared by host (g++) and device (nvcc) code.
//
// Why bits: the CPU build uses -ffast-math, which implies -ffinite-math-only, so the compiler may
// fold std::isnan(x) to false and turn `q < 0 ? 0 : q` into a max that drops NaN. Integer tests on
// the representation cannot be optimised away, so NaN inputs keep producing NaN outputs.
#pragma once
#include <cstdint>
#include <cstring>

#include "df_common.h"

DF_HD uint32_t df_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DF_HD uint64_t df_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DF_HD bool df_isnan(float x) { return (df_bits(x) & 0x7fffffffu) > 0x7f800000u; }
DF_HD bool df_isnan(double x) {
  return (df_bits(x) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}
DF_HD bool df_isfinite(float x) { return (df_bits(x) & 0x7f800000u) != 0x7f800000u; }
DF_HD bool df_isfinite(double x) {
  return (df_bits(x) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// A quiet NaN without relying on std::numeric_limits (which fast-math code may not honour).
DF_HD float df_nanf() {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(0x7fc00000u);
#else
  const uint32_t u = 0x7fc00000u;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// float -> bf16 bits, round to nearest even (what c10::BFloat16(float) does), NaN kept a quiet NaN.
// Branch-free integer arithmetic, so `#pragma omp simd` loops over it vectorise (the c10 constructor
// does not, and was the larger part of the opt-in bf16 Mahalanobis path's time).
DF_HD uint16_t df_bf16_bits_rne(float x) {
  const uint32_t u = df_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(df_isnan(x) ? 0x7fc0u : rounded);
}

DF_HD float df_float_from_bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

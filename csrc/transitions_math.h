// Per-sample math of the layer-transition op, shared by the CPU op (g++) and the CUDA kernel.
//
// From the per-sample layer Gram G = H H^T (L x L, fp64):
//   cosines        c_l = G[l,l+1] / sqrt(G[l,l] G[l+1,l+1])        (0 when a norm is 0)
//   diff Gram      K_ij = G[i+1,j+1] - G[i+1,j] - G[i,j+1] + G[i,j]  ((L-1) x (L-1), = Delta Delta^T)
//   concentration  sigma = sqrt(max(eig(K), 0)),  sigma_1 / sum(sigma)  (0 when the sum is 0)
// K is formed by cancellation when consecutive layers are close, which is why G is fp64.
//
// The symmetric eigenproblem is solved by cyclic Jacobi in fp64, written over LANES independent
// matrices stored interleaved: entry (i, j) of lane l is A[(i * n + j) * stride + l]. The CPU runs
// LANES = stride = 8 samples in SIMD lanes (every lane takes the same (p, q) schedule, so there is
// no divergence); the CUDA kernel runs one sample per thread with LANES = 1 and stride = N, so the
// threads of a warp touch consecutive addresses.
#pragma once
#include <cmath>
#include <cstdint>

#include "df_common.h"
#include "float_bits.h"

// Largest eigen-sweep count; cyclic Jacobi converges quadratically, n <= 64 needs < 15 sweeps.
constexpr int kTrMaxSweeps = 40;
// Converged when the off-diagonal Frobenius norm is below 1e-13 of the diagonal's (squared here).
constexpr double kTrOffTol2 = 1e-26;

DF_HD double tr_diff_gram(const double* G, int L, int i, int j) {
  return G[(i + 1) * L + (j + 1)] - G[(i + 1) * L + j] - G[i * L + (j + 1)] + G[i * L + j];
}

DF_HD bool tr_all_finite(const double* G, int L) {
  bool ok = true;
  for (int i = 0; i < L * L; ++i) ok = ok && df_isfinite(G[i]);
  return ok;
}

// Consecutive-layer cosines from G (cos: L-1 values).
DF_HD void tr_cosines(const double* G, int L, float* cos) {
  for (int l = 0; l + 1 < L; ++l) {
    const double a = G[l * L + l], b = G[(l + 1) * L + (l + 1)];
    double c = 0.0;
    if (a > 0.0 && b > 0.0) {
      c = G[l * L + l + 1] / (sqrt(a) * sqrt(b));
      c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);  // |c| <= 1 up to rounding
    }
    cos[l] = static_cast<float>(c);
  }
}

// Writes K (from G) into lane `lane` of A (n = L - 1), scaled by 1 / max diag(K):
// the concentration is scale-free and the scaling keeps Jacobi's tolerances relative.
// An all-zero K (no movement between layers) stays zero.
DF_HD void tr_fill_diff_gram(const double* G, int L, double* A, int64_t stride, int lane) {
  const int n = L - 1;
  double dmax = 0.0;
  for (int i = 0; i < n; ++i) {
    const double v = tr_diff_gram(G, L, i, i);
    dmax = v > dmax ? v : dmax;
  }
  const double inv = dmax > 0.0 ? 1.0 / dmax : 0.0;
  for (int i = 0; i < n; ++i)
    for (int j = i; j < n; ++j) {
      const double v = tr_diff_gram(G, L, i, j) * inv;
      A[(i * n + j) * stride + lane] = v;
      A[(j * n + i) * stride + lane] = v;
    }
}

DF_HD void tr_zero_lane(double* A, int n, int64_t stride, int lane) {
  for (int i = 0; i < n * n; ++i) A[i * stride + lane] = 0.0;
}

// Whether every lane's off-diagonal mass is below tolerance.
template <int LANES>
DF_HD bool tr_jacobi_converged(const double* A, int n, int64_t stride) {
  bool done = true;
  for (int s = 0; s < LANES; ++s) {
    double off = 0.0, diag = 0.0;
    for (int p = 0; p < n; ++p) {
      const double d = A[(p * n + p) * stride + s];
      diag += d * d;
      for (int q = p + 1; q < n; ++q) {
        const double v = A[(p * n + q) * stride + s];
        off += v * v;
      }
    }
    done = done && (off <= kTrOffTol2 * diag);
  }
  return done;
}

// One Jacobi rotation annihilating A[p][q] in every lane (Numerical Recipes' update, written without
// branches on the data and without divisions by zero: a zero A[p][q] gives the identity rotation).
template <int LANES>
DF_HD void tr_jacobi_rotate(double* A, int n, int64_t stride, int p, int q) {
  double c[LANES], s[LANES];
  for (int l = 0; l < LANES; ++l) {
    const double app = A[(p * n + p) * stride + l];
    const double aqq = A[(q * n + q) * stride + l];
    const double apq = A[(p * n + q) * stride + l];
    const double tau = aqq - app;
    const double sgn = tau >= 0.0 ? 1.0 : -1.0;
    const double den = fabs(tau) + sqrt(tau * tau + 4.0 * apq * apq);
    const double t = 2.0 * apq * sgn / (den > 0.0 ? den : 1.0);  // tan of the rotation angle
    const double cc = 1.0 / sqrt(1.0 + t * t);
    c[l] = cc;
    s[l] = t * cc;
    A[(p * n + p) * stride + l] = app - t * apq;
    A[(q * n + q) * stride + l] = aqq + t * apq;
    A[(p * n + q) * stride + l] = 0.0;
    A[(q * n + p) * stride + l] = 0.0;
  }
  for (int k = 0; k < n; ++k) {
    if (k == p || k == q) continue;
    for (int l = 0; l < LANES; ++l) {
      const double akp = A[(k * n + p) * stride + l];
      const double akq = A[(k * n + q) * stride + l];
      const double nkp = c[l] * akp - s[l] * akq;
      const double nkq = s[l] * akp + c[l] * akq;
      A[(k * n + p) * stride + l] = nkp;
      A[(p * n + k) * stride + l] = nkp;
      A[(k * n + q) * stride + l] = nkq;
      A[(q * n + k) * stride + l] = nkq;
    }
  }
}

// Diagonalises the LANES symmetric matrices in place (eigenvalues end on the diagonal).
// Returns the number of sweeps done.
template <int LANES>
DF_HD int tr_jacobi_eigenvalues(double* A, int n, int64_t stride) {
  int sweep = 0;
  for (; sweep < kTrMaxSweeps; ++sweep) {
    if (tr_jacobi_converged<LANES>(A, n, stride)) break;
    for (int p = 0; p + 1 < n; ++p)
      for (int q = p + 1; q < n; ++q) tr_jacobi_rotate<LANES>(A, n, stride, p, q);
  }
  return sweep;
}

// sigma_1 / sum(sigma) of lane `lane` from the diagonalised A; 0 when every sigma is 0.
DF_HD float tr_concentration(const double* A, int n, int64_t stride, int lane) {
  double sum = 0.0, top = 0.0;
  for (int i = 0; i < n; ++i) {
    const double lam = A[(i * n + i) * stride + lane];
    const double sig = lam > 0.0 ? sqrt(lam) : 0.0;
    sum += sig;
    top = sig > top ? sig : top;
  }
  return sum > 0.0 ? static_cast<float>(top / sum) : 0.0f;
}

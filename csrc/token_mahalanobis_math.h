// Per-row reduction of the token-level Mahalanobis op, shared by the CPU op (g++) and the CUDA kernel
// (nvcc): distances of one (row, layer)'s valid tokens -> (score, argmax).
//
// Order. Token (v, t) ranks above token (w, u) when
//     v is NaN and w is not;  or neither is NaN and v > w;  or v and w tie (equal, or both NaN) and t < u.
// It is a total order on (value, index) pairs, so the kept set below does not depend on the order in which
// tokens are pushed or lists are merged: the CPU (tokens in index order) and the GPU (32 lanes striding over
// the row, then a tree merge) keep the same entries. NaN ranks first so a NaN distance is never hidden
// (it makes the score NaN and is the reported token); ties go to the LOWEST token index.
//
// Kept list. The best k tokens so far, sorted best first, in two arrays (vals, idx) of capacity k and a count
// n. score = mean of the kept values (fp64 sum, best first: deterministic), argmax = idx[0] (the best token:
// largest distance, lowest index among equals). A row with no valid token: score 0, argmax -1.
//
// All comparisons on the bits first (float_bits.h): the CPU build uses -ffast-math, where `v > w` with a
// NaN operand may be folded.
#pragma once
#include <cstdint>

#include "df_common.h"
#include "float_bits.h"
#include "mahalanobis_math.h"  // maha_finalize: q -> sqrt(max(q, 0)) (or q), NaN kept

DF_HD bool tm_ranks_above(float v, int32_t t, float w, int32_t u) {
  const bool nv = df_isnan(v), nw = df_isnan(w);
  if (nv != nw) return nv;
  if (!nv && v != w) return v > w;
  return t < u;
}

// Distance of one token from its squared whitened norm q (clamped at 0, NaN kept; q itself if squared).
DF_HD float tm_distance(float q, bool squared) { return maha_finalize(q, squared); }

// Insert (v, t) into the kept list (vals, idx)[0..n), capacity k >= 1, sorted best first.
DF_HD void tm_topk_push(float* vals, int32_t* idx, int32_t& n, int32_t k, float v, int32_t t) {
  if (n == k && !tm_ranks_above(v, t, vals[k - 1], idx[k - 1])) return;
  int32_t p = n < k ? n : k - 1;  // the slot that frees up: the end, or the worst entry's
  while (p > 0 && tm_ranks_above(v, t, vals[p - 1], idx[p - 1])) {
    vals[p] = vals[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  vals[p] = v;
  idx[p] = t;
  if (n < k) ++n;
}

// Merge the kept list (sv, si)[0..sn) into (dv, di)[0..dn): the best k of their union (the order is total,
// so this is the list a single pass over both lists' tokens would keep).
DF_HD void tm_topk_merge(float* dv, int32_t* di, int32_t& dn, int32_t k, const float* sv, const int32_t* si,
                         int32_t sn) {
  for (int32_t e = 0; e < sn; ++e) {
    if (dn == k && !tm_ranks_above(sv[e], si[e], dv[k - 1], di[k - 1])) break;  // src is sorted: none later fits
    tm_topk_push(dv, di, dn, k, sv[e], si[e]);
  }
}

// (score, argmax) of a finished kept list.
DF_HD void tm_topk_finish(const float* vals, const int32_t* idx, int32_t n, float* score, int64_t* argmax) {
  if (n == 0) {
    *score = 0.0f;
    *argmax = -1;
    return;
  }
  double s = 0.0;
  for (int32_t e = 0; e < n; ++e) s += static_cast<double>(vals[e]);
  *score = static_cast<float>(s / static_cast<double>(n));
  *argmax = idx[0];
}

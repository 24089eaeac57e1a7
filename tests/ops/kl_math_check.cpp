// Host check of csrc/kl_math.h, the math the CUDA kernels run (lse_push per element, lse_merge
// across threads, kl_elem in pass 2), built by tests/ops/test_kl.py with g++ and the extension's
// flags (-O3 -ffast-math -march=x86-64-v3), which is where -inf handling can silently break.
// It also replays the kernels' row algorithm (TPR threads striding over V, then a butterfly merge)
// against a double-precision reference. Prints one line per failure and "ALL OK" at the end.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kl_math.h"

using namespace dupfast::kl;

static int failures = 0;
#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      ++failures;                                          \
      std::printf("FAIL line %d: %s | ", __LINE__, #cond); \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float uniform() {  // in [-1, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<float>((rng_state >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
}

static bool bits_neg_inf(float x) { return float_bits(x) == 0xff800000u; }
static bool bits_pos_inf(float x) { return float_bits(x) == 0x7f800000u; }
static bool bits_nan(float x) { return (float_bits(x) & 0x7fffffffu) > 0x7f800000u; }

// -ffast-math lets the compiler assume no NaN/inf: comparisons with NaN may come out true and
// constant arguments may be folded (x - x -> 0). So special values go through `opaque` and every
// tolerance check rejects NaN by its bits first.
static float opaque(float x) {
  volatile float v = x;
  return v;
}
static bool near(double got, double want, double tol) {
  uint64_t b;
  std::memcpy(&b, &got, sizeof b);
  if ((b & 0x7fffffffffffffffull) > 0x7ff0000000000000ull) return false;  // NaN
  return std::fabs(got - want) <= tol;
}
static const float kNegInf = opaque(-INFINITY);

static double lse_double(const std::vector<float>& x, double inv_t) {
  double m = -HUGE_VAL;
  for (float v : x)
    if (!bits_neg_inf(v)) m = std::fmax(m, v * inv_t);
  double s = 0.0;
  for (float v : x)
    if (!bits_neg_inf(v)) s += std::exp(v * inv_t - m);
  return m + std::log(s);
}

// The kernels' row algorithm: TPR lanes push their strided slots, then a butterfly merge; pass 2
// sums kl_elem over the same lanes. Returns the row's KL and fills the gradient.
static float row_like_kernel(const std::vector<float>& s, const std::vector<float>& t, int tpr, float inv_t,
                             float coef, std::vector<float>& g) {
  const int64_t v = static_cast<int64_t>(s.size());
  std::vector<Lse> ls(tpr, lse_empty()), lt(tpr, lse_empty());
  for (int lane = 0; lane < tpr; ++lane)
    for (int64_t j = lane; j < v; j += tpr) {
      lse_push(ls[lane], s[j] * inv_t);
      lse_push(lt[lane], t[j] * inv_t);
    }
  for (int off = tpr / 2; off > 0; off >>= 1) {  // butterfly: every lane ends with the total
    std::vector<Lse> ns(tpr), nt(tpr);
    for (int lane = 0; lane < tpr; ++lane) {
      ns[lane] = lse_merge(ls[lane], ls[lane ^ off]);
      nt[lane] = lse_merge(lt[lane], lt[lane ^ off]);
    }
    ls.swap(ns);
    lt.swap(nt);
  }
  const RowNorm ns = row_norm(ls[0]), nt = row_norm(lt[0]);
  const float dnorm = norm_diff(ns, nt);
  float acc = 0.0f;
  g.assign(v, 0.0f);
  for (int64_t j = 0; j < v; ++j) acc += kl_elem(s[j] * inv_t, t[j] * inv_t, ns, nt, dnorm, coef, &g[j]);
  return acc;
}

int main() {
  // 1. lse_push / lse_merge / lse_value against double, with masked (-inf) slots.
  for (int n : {1, 2, 7, 100, 2053}) {
    for (float inv_t : {1.0f, 0.5f, 4.0f}) {
      std::vector<float> x(n);
      for (int j = 0; j < n; ++j) x[j] = 6.0f * uniform();
      if (n > 2) x[1] = kNegInf;
      Lse a = lse_empty();
      for (float v : x) lse_push(a, v * inv_t);
      const double ref = lse_double(x, inv_t);
      CHECK(near(lse_value(a), ref, 2e-6 * (1.0 + std::fabs(ref))), "n=%d inv_t=%g got %.9g want %.9g", n,
            inv_t, lse_value(a), ref);
      for (int cut : {0, 1, n / 2, n}) {  // merge of two halves == push of the whole
        Lse l = lse_empty(), r = lse_empty();
        for (int j = 0; j < n; ++j) lse_push(j < cut ? l : r, x[j] * inv_t);
        const float merged = lse_value(lse_merge(l, r));
        CHECK(near(merged, ref, 2e-6 * (1.0 + std::fabs(ref))), "n=%d cut=%d got %.9g want %.9g", n, cut,
              merged, ref);
      }
    }
  }
  // 2. Empty and all-masked parts: -inf logsumexp, skipped by merge, never NaN.
  {
    Lse a = lse_empty();
    lse_push(a, kNegInf);
    lse_push(a, kNegInf);
    CHECK(bits_neg_inf(lse_value(a)), "all-masked lse = %g", lse_value(a));
    Lse b = lse_empty();
    lse_push(b, opaque(0.25f));
    const Lse m1 = lse_merge(a, b), m2 = lse_merge(b, a), m3 = lse_merge(a, a);
    CHECK(m1.m == 0.25f && m1.s == 1.0f && m2.m == 0.25f && m2.s == 1.0f, "merge with empty changed the value");
    CHECK(bits_neg_inf(m3.m) && m3.s == 0.0f, "empty+empty is not empty");
  }
  // 3. kl_elem special cases (row normalisers with m = 1, s = 1 unless stated: log p = y - 1).
  {
    const float x = opaque(0.7f), t = opaque(0.3f), u = opaque(0.5f);
    const RowNorm one{opaque(1.0f), opaque(0.0f)}, other{opaque(1.3f), opaque(0.2f)};
    float g = 1.0f;
    float term = kl_elem(x, x, other, other, norm_diff(other, other), 2.0f, &g);
    CHECK(float_bits(g) == 0u || float_bits(g) == 0x80000000u, "tie gradient %g", g);
    CHECK(float_bits(term) == 0u || float_bits(term) == 0x80000000u, "tie term %g", term);
    term = kl_elem(t, kNegInf, one, one, 0.0f, 1.0f, &g);  // masked teacher slot
    CHECK(float_bits(term) == 0u && near(g, std::exp(0.3 - 1.0), 1e-7), "teacher -inf: term %g g %g", term, g);
    term = kl_elem(kNegInf, kNegInf, one, other, norm_diff(one, other), 1.0f, &g);  // masked in both
    CHECK(float_bits(term) == 0u && float_bits(g) == 0u, "both -inf: term %g g %g", term, g);
    term = kl_elem(kNegInf, u, one, one, 0.0f, 1.0f, &g);  // student -inf where p_T > 0: KL = +inf
    CHECK(bits_pos_inf(term), "student -inf: term %g", term);
    CHECK(near(g, -std::exp(0.5 - 1.0), 1e-7), "student -inf: gradient %g", g);
    // large |y| (T = 0.1 on logits ~ 30): log p stays accurate, y - lse would lose ~eps * |y|
    const float big = opaque(300.0f);
    const RowNorm nb{big, opaque(std::log(3.0f))};
    term = kl_elem(big, big - opaque(1.0f), nb, nb, 0.0f, 1.0f, &g);
    const double pt = std::exp(-1.0 - std::log(3.0)), ps = 1.0 / 3.0;
    CHECK(near(term, -pt, 1e-7) && near(g, ps - pt, 1e-7), "large |y|: term %.9g g %.9g", term, g);
  }
  // 4. The kernels' row algorithm against a double reference (loss and gradient), incl. ties.
  for (int v : {1, 2, 7, 1024, 2053}) {
    for (int tpr : {32, 512}) {
      const float inv_t = 0.5f, coef = 0.75f;
      std::vector<float> s(v), t(v), g;
      for (int j = 0; j < v; ++j) {
        s[j] = 4.0f * uniform();
        t[j] = 4.0f * uniform();
      }
      if (v > 3) s[2] = t[2] = kNegInf;
      if (v > 5) t[4] = kNegInf;
      if (v == 7) for (float& y : s) y += 150.0f;  // large |y|, small log p (low temperature)
      const double lse_s = lse_double(s, inv_t), lse_t = lse_double(t, inv_t);
      double kl = 0.0, gerr = 0.0;
      const float got = row_like_kernel(s, t, tpr, inv_t, coef, g);
      for (int j = 0; j < v; ++j) {
        const double ps = bits_neg_inf(s[j]) ? 0.0 : std::exp(s[j] * inv_t - lse_s);
        const double pt = bits_neg_inf(t[j]) ? 0.0 : std::exp(t[j] * inv_t - lse_t);
        if (pt > 0) kl += pt * ((t[j] * inv_t - lse_t) - (s[j] * inv_t - lse_s));
        if (!near(g[j], coef * (ps - pt), 1e-6)) gerr += 1.0;
      }
      CHECK(near(got, kl, 1e-5 * (1.0 + std::fabs(kl))), "v=%d tpr=%d loss %.9g want %.9g", v, tpr, got, kl);
      CHECK(gerr == 0.0, "v=%d tpr=%d: %g gradient entries off by more than 1e-6", v, tpr, gerr);
      const float tie = row_like_kernel(s, s, tpr, inv_t, coef, g);
      bool zero = (float_bits(tie) & 0x7fffffffu) == 0u;
      for (float x : g) zero = zero && (float_bits(x) & 0x7fffffffu) == 0u;
      CHECK(zero, "v=%d tpr=%d tie: loss %g not exactly zero or a nonzero gradient", v, tpr, tie);
    }
  }
  if (failures == 0) std::printf("ALL OK\n");
  return failures == 0 ? 0 : 1;
}

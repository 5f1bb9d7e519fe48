// The vocabulary-row kernels shared by token_logprobs and linear_token_logprobs (CPU).
//
//   stats:    online (max, sum exp(x - max), first argmax) over a row segment, merged across
//             segments, so a row may arrive whole (token_logprobs) or in vocabulary chunks
//             (linear_token_logprobs) and still be read from memory once.
//   gradient: d/dx of  a * log p(label) + b' * lse  is  a * onehot(label) + (b' - a) * softmax(x),
//             with softmax recomputed from the saved lse (exp(x - lse)); written in x's dtype.
//   logit map (fused head only): z = scale * x, then softcap * tanh(z / softcap) when softcap > 0,
//             in float32 (float64 for float64 x) on the logits rounded to x's dtype; the gradient
//             gains the chain factor dz/dx = scale * (1 - tanh^2).
//
// Non-finite logits give what log_softmax(x.float()).gather, logsumexp and argmax give:
//   NaN anywhere in the row:  lse NaN, log p NaN, argmax = the first NaN (torch's argmax takes NaN
//                             as the largest value);
//   +inf (and no NaN):        lse +inf, log p NaN (log_softmax computes inf - inf), argmax = the
//                             first +inf;
//   every entry -inf:         lse -inf, log p NaN, argmax 0;
//   gradient of such a row (lse not finite): NaN everywhere, as autograd through log_softmax.
// The SIMD max keeps NaN (at::vec::maximum is IEEE maximum), the horizontal and scalar maxima are
// NaN-propagating, and exp_u20 (which turns NaN into a large finite number) is never called on a
// row whose max is not finite.
//
// Inside a segment the row is walked in L1-sized blocks: block max first (one read from memory),
// then the exps of the same block from L1, so only one exp per element is paid (a purely online
// per-element update needs two) while memory sees a single pass.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_utils.h"

namespace pyfast::cpu {

// Running statistics of one row: max, sum of exp(x - max), index of the first max (NaN counting
// as the largest value). sum is meaningful only while max is finite.
struct RowStats {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
  int64_t argmax = -1;
};

struct RowStatsD {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  int64_t argmax = -1;
};

constexpr int64_t kBlock = 1024;  // 4 KiB of fp32: stays in L1 between the two block sweeps

// max(a, b) that returns NaN when either is NaN (std::max drops a NaN in its second argument).
template <typename F>
inline F nan_max(F a, F b) {
  return (a > b || std::isnan(a)) ? a : b;
}

// Horizontal reductions written over a stored array: at::vec's helpers differ per capability.
inline float hmax(const Vec& v) {
  alignas(64) float tmp[Vec::size()];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < Vec::size(); ++i) m = nan_max(m, tmp[i]);
  return m;
}
inline float hsum(const Vec& v) {
  alignas(64) float tmp[Vec::size()];
  v.store(tmp);
  float s = 0.0f;
  for (int i = 0; i < Vec::size(); ++i) s += tmp[i];
  return s;
}

// Merges x[0, n) (global column offset `offset`) into `st`. float32 or bfloat16 x.
template <typename T>
inline void row_stats_update(const T* x, int64_t n, int64_t offset, RowStats& st) {
  constexpr int64_t W = Vec::size();
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < n; b += kBlock) {
    if (std::isnan(st.max)) return;  // poisoned: nothing later changes lse or the first NaN
    const int64_t len = std::min(kBlock, n - b);
    const T* xb = x + b;
    // Four independent accumulators hide the max/add latency chains.
    Vec vm0(ninf), vm1(ninf), vm2(ninf), vm3(ninf);
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      vm0 = at::vec::maximum(vm0, vload(xb + i));
      vm1 = at::vec::maximum(vm1, vload(xb + i + W));
      vm2 = at::vec::maximum(vm2, vload(xb + i + 2 * W));
      vm3 = at::vec::maximum(vm3, vload(xb + i + 3 * W));
    }
    for (; i + W <= len; i += W) vm0 = at::vec::maximum(vm0, vload(xb + i));
    float bm = hmax(at::vec::maximum(at::vec::maximum(vm0, vm1), at::vec::maximum(vm2, vm3)));
    for (; i < len; ++i) bm = nan_max(bm, sload(xb + i));
    const bool bm_nan = std::isnan(bm);
    if (bm > st.max || bm_nan) {  // strictly greater: an earlier equal max keeps the argmax
      int64_t j = 0;
      if (bm_nan) {
        while (j < len && !std::isnan(sload(xb + j))) ++j;
      } else {
        while (j < len && !(sload(xb + j) == bm)) ++j;
      }
      st.argmax = offset + b + j;
      if (std::isfinite(st.max) && std::isfinite(bm)) st.sum *= std::exp(st.max - bm);
      st.max = bm;
    } else if (st.argmax < 0) {
      st.argmax = offset + b;  // every entry so far is -inf: torch's argmax is the first one
    }
    // -inf so far contributes nothing; with +inf the lse is +inf; NaN poisons the row.
    if (!std::isfinite(st.max)) continue;
    const Vec vmax(st.max);
    Vec vs0(0.0f), vs1(0.0f), vs2(0.0f), vs3(0.0f);
    i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      vs0 = vs0 + (vload(xb + i) - vmax).exp_u20();
      vs1 = vs1 + (vload(xb + i + W) - vmax).exp_u20();
      vs2 = vs2 + (vload(xb + i + 2 * W) - vmax).exp_u20();
      vs3 = vs3 + (vload(xb + i + 3 * W) - vmax).exp_u20();
    }
    for (; i + W <= len; i += W) vs0 = vs0 + (vload(xb + i) - vmax).exp_u20();
    float s = hsum((vs0 + vs1) + (vs2 + vs3));
    for (; i < len; ++i) s += std::exp(sload(xb + i) - st.max);
    st.sum += s;
  }
}

// float64 (gradcheck and exact references): plain scalar loop, same semantics.
inline void row_stats_update(const double* x, int64_t n, int64_t offset, RowStatsD& st) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(st.max)) return;
    const double v = x[j];
    if (v > st.max || std::isnan(v)) {
      if (std::isfinite(st.max) && std::isfinite(v)) st.sum *= std::exp(st.max - v);
      st.max = v;
      st.argmax = offset + j;
    } else if (st.argmax < 0) {
      st.argmax = offset + j;  // v == -inf == max
    }
    if (std::isfinite(st.max)) st.sum += std::exp(v - st.max);
  }
}

// logsumexp of the merged statistics: max + log(sum); NaN, +inf and -inf (an all -inf row) as
// torch.logsumexp.
inline float stats_lse(const RowStats& st) {
  return std::isfinite(st.max) ? st.max + std::log(st.sum) : st.max;
}
inline double stats_lse(const RowStatsD& st) {
  return std::isfinite(st.max) ? st.max + std::log(st.sum) : st.max;
}

// log p(label) = x_label - lse, except that a +inf in the row gives NaN, as log_softmax does
// (x - max is inf - inf there). NaN and all -inf rows come out NaN from the subtraction itself.
template <typename acc_t>
inline acc_t row_logprob(acc_t x_label, acc_t lse) {
  return lse == std::numeric_limits<acc_t>::infinity()
             ? std::numeric_limits<acc_t>::quiet_NaN()
             : x_label - lse;
}

template <typename T>
struct StatsOf {
  using type = RowStats;
  using acc = float;
};
template <>
struct StatsOf<double> {
  using type = RowStatsD;
  using acc = double;
};

// One whole row: its logsumexp, log p(label) and whether the label is the (first) argmax.
template <typename T, typename acc_t = typename StatsOf<T>::acc>
inline void score_row(const T* row, int64_t V, int64_t label, acc_t& lse, acc_t& logprob,
                      bool& is_argmax) {
  typename StatsOf<T>::type st;
  row_stats_update(row, V, 0, st);
  lse = stats_lse(st);
  logprob = row_logprob(static_cast<acc_t>(row[label]), lse);
  is_argmax = st.argmax == label;
}

// A row whose lse is not finite (NaN, +inf or all -inf logits) has a NaN gradient everywhere.
template <typename T, typename acc_t>
inline bool poisoned_row_grad(T* g, int64_t n, acc_t lse) {
  if (std::isfinite(lse)) return false;
  std::fill(g, g + n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  return true;
}

// g[j] = coef * exp(x[j] - lse) for j in [0, n), then g[label] += a when the label lies in the
// segment (label is relative to the segment; pass -1 or >= n when it does not). g may alias x.
template <typename T>
inline void row_grad(const T* x, T* g, int64_t n, float lse, float coef, int64_t label, float a) {
  if (poisoned_row_grad(g, n, lse)) return;
  constexpr int64_t W = Vec::size();
  const Vec vlse(lse), vcoef(coef);
  // Read the label's logit before an in-place write overwrites it.
  const bool has_label = label >= 0 && label < n;
  const float x_label = has_label ? sload(x + label) : 0.0f;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(g + i, vcoef * (vload(x + i) - vlse).exp_u20());
  for (; i < n; ++i) sstore(g + i, coef * std::exp(sload(x + i) - lse));
  if (has_label) sstore(g + label, a + coef * std::exp(x_label - lse));
}

inline void row_grad(const double* x, double* g, int64_t n, double lse, double coef,
                     int64_t label, double a) {
  if (poisoned_row_grad(g, n, lse)) return;
  const bool has_label = label >= 0 && label < n;
  const double x_label = has_label ? x[label] : 0.0;
  for (int64_t j = 0; j < n; ++j) g[j] = coef * std::exp(x[j] - lse);
  if (has_label) g[label] = a + coef * std::exp(x_label - lse);
}

// ---- The logit map of the fused head -------------------------------------------------------

template <typename acc_t>
struct LogitMap {
  acc_t scale = 1;
  acc_t softcap = 0;  // 0: no soft-capping
  bool identity() const { return scale == acc_t(1) && softcap == acc_t(0); }
};

// z[0, n) = map(x[0, n)) in float32. The tail goes through the same vector code (a partial
// load), so every element gets Sleef's tanh, as torch.tanh's vectorised kernel computes it.
template <typename T>
inline void map_row(const T* x, float* z, int64_t n, const LogitMap<float>& m) {
  constexpr int64_t W = Vec::size();
  const Vec vscale(m.scale), vcap(m.softcap);
  const bool cap = m.softcap > 0.0f;
  auto f = [&](Vec v) {
    v = v * vscale;
    return cap ? (v / vcap).tanh() * vcap : v;
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) f(vload(x + i)).store(z + i);
  if (i < n) {
    alignas(64) float tmp[W];
    for (int64_t k = 0; k < n - i; ++k) tmp[k] = sload(x + i + k);
    f(Vec::loadu(tmp, n - i)).store(tmp, n - i);
    for (int64_t k = 0; k < n - i; ++k) z[i + k] = tmp[k];
  }
}

inline void map_row(const double* x, double* z, int64_t n, const LogitMap<double>& m) {
  const bool cap = m.softcap > 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = x[j] * m.scale;
    z[j] = cap ? std::tanh(v / m.softcap) * m.softcap : v;
  }
}

// dz/dx at a mapped logit z: scale * (1 - t^2), t = z / softcap = tanh(...); scale without cap.
template <typename acc_t>
inline acc_t map_slope(acc_t z, const LogitMap<acc_t>& m) {
  if (!(m.softcap > acc_t(0))) return m.scale;
  const acc_t t = z / m.softcap;
  return m.scale * ((acc_t(1) - t) * (acc_t(1) + t));
}

// Gradient of a mapped row from its mapped logits z (float32 scratch, never aliasing g):
// g[j] = (coef * exp(z[j] - lse) + a * [j == label]) * dz/dx(z[j]).
template <typename T>
inline void row_grad_mapped(const float* z, T* g, int64_t n, float lse, float coef,
                            int64_t label, float a, const LogitMap<float>& m) {
  if (poisoned_row_grad(g, n, lse)) return;
  constexpr int64_t W = Vec::size();
  const Vec vlse(lse), vcoef(coef), vscale(m.scale), vcap(m.softcap), one(1.0f);
  const bool cap = m.softcap > 0.0f;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec vz = Vec::loadu(z + i);
    Vec d = vscale;
    if (cap) {
      const Vec t = vz / vcap;
      d = vscale * ((one - t) * (one + t));
    }
    vstore(g + i, vcoef * (vz - vlse).exp_u20() * d);
  }
  for (; i < n; ++i) sstore(g + i, coef * std::exp(z[i] - lse) * map_slope(z[i], m));
  if (label >= 0 && label < n)
    sstore(g + label, (a + coef * std::exp(z[label] - lse)) * map_slope(z[label], m));
}

inline void row_grad_mapped(const double* z, double* g, int64_t n, double lse, double coef,
                            int64_t label, double a, const LogitMap<double>& m) {
  if (poisoned_row_grad(g, n, lse)) return;
  for (int64_t j = 0; j < n; ++j) g[j] = coef * std::exp(z[j] - lse) * map_slope(z[j], m);
  if (label >= 0 && label < n)
    g[label] = (a + coef * std::exp(z[label] - lse)) * map_slope(z[label], m);
}

// Statistics of map(x[0, n)) merged into st, and the label's mapped logit when the label lies in
// the segment (label relative to the segment). z: scratch of n acc_t, unused for the identity.
template <typename T, typename acc_t, typename stats_t>
inline void mapped_row_stats(const T* x, int64_t n, int64_t offset, int64_t label,
                             const LogitMap<acc_t>& m, acc_t* z, stats_t& st, acc_t& x_label) {
  const bool has_label = label >= 0 && label < n;
  if (m.identity()) {
    row_stats_update(x, n, offset, st);
    if (has_label) x_label = static_cast<acc_t>(x[label]);
    return;
  }
  map_row(x, z, n, m);
  row_stats_update(static_cast<const acc_t*>(z), n, offset, st);
  if (has_label) x_label = z[label];
}

// row_grad of map(x): g may alias x (z holds the mapped logits, so x is read before g is written).
template <typename T, typename acc_t>
inline void mapped_row_grad(const T* x, T* g, int64_t n, acc_t lse, acc_t coef, int64_t label,
                            acc_t a, const LogitMap<acc_t>& m, acc_t* z) {
  if (m.identity()) {
    row_grad(x, g, n, lse, coef, label, a);
    return;
  }
  map_row(x, z, n, m);
  row_grad_mapped(static_cast<const acc_t*>(z), g, n, lse, coef, label, a, m);
}

}  // namespace pyfast::cpu

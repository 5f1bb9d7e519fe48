// The vocabulary-row kernels shared by token_logprobs and linear_token_logprobs (CPU).
//
//   stats:    online (max, sum exp(x - max), first argmax) over a row segment, merged across
//             segments, so a row may arrive whole (token_logprobs) or in vocabulary chunks
//             (linear_token_logprobs) and still be read from memory once.
//   gradient: d/dx of  a * log p(label) + b' * lse  is  a * onehot(label) + (b' - a) * softmax(x),
//             with softmax recomputed from the saved lse (exp(x - lse)); written in x's dtype.
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

// Running statistics of one row: max, sum of exp(x - max), index of the first max.
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

// Horizontal reductions written over a stored array: at::vec's helpers differ per capability.
inline float hmax(const Vec& v) {
  alignas(64) float tmp[Vec::size()];
  v.store(tmp);
  float m = tmp[0];
  for (int i = 1; i < Vec::size(); ++i) m = std::max(m, tmp[i]);
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
    for (; i < len; ++i) bm = std::max(bm, sload(xb + i));
    if (bm > st.max) {  // strictly greater: an earlier equal max keeps the argmax
      int64_t j = 0;
      while (j < len && !(sload(xb + j) == bm)) ++j;
      st.argmax = offset + b + j;
      if (st.max != ninf) st.sum *= std::exp(st.max - bm);
      st.max = bm;
    } else if (std::isnan(bm)) {
      st.max = bm;  // NaN poisons the row, as in log_softmax
    }
    if (st.max == ninf) continue;  // only -inf so far: contributes nothing
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
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const double v = x[j];
    if (v > st.max) {
      if (st.max != ninf) st.sum *= std::exp(st.max - v);
      st.max = v;
      st.argmax = offset + j;
    } else if (std::isnan(v)) {
      st.max = v;
    }
    if (st.max != ninf) st.sum += std::exp(v - st.max);
  }
}

inline float stats_lse(const RowStats& st) { return st.max + std::log(st.sum); }
inline double stats_lse(const RowStatsD& st) { return st.max + std::log(st.sum); }

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
  logprob = static_cast<acc_t>(row[label]) - lse;
  is_argmax = st.argmax == label;
}

// g[j] = coef * exp(x[j] - lse) for j in [0, n), then g[label] += a when the label lies in the
// segment (label is relative to the segment; pass -1 or >= n when it does not). g may alias x.
template <typename T>
inline void row_grad(const T* x, T* g, int64_t n, float lse, float coef, int64_t label, float a) {
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
  const bool has_label = label >= 0 && label < n;
  const double x_label = has_label ? x[label] : 0.0;
  for (int64_t j = 0; j < n; ++j) g[j] = coef * std::exp(x[j] - lse);
  if (has_label) g[label] = a + coef * std::exp(x_label - lse);
}

}  // namespace pyfast::cpu

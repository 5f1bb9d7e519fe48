// rms_norm / rms_norm_backward (CPU): the RMSNorm of Llama-family decoders,
//   rstd = 1 / sqrt(mean_j x_j^2 + eps),   y = w * (x * rstd)            (per row of D features)
// with the rounding order of transformers' LlamaRMSNorm: x * rstd in float32, rounded to the
// input dtype, then multiplied by w (rounded again). The row's sum of squares follows torch's CPU
// sum kernel (squares rounded to float32, its cascade order, for the build's SIMD width), so
// rstd and y have the stock module's bits. Backward, with n = x * rstd, g = dy * w:
//   dx = rstd * (g - n * mean_j(g_j * n_j)),   dw = sum over rows of dy * n.
//
// Reads/writes per element: forward reads x once (the row stays in L1 for the second pass) and
// writes y; backward reads x and dy and writes dx. Fused because the stock module runs ~6 kernels
// (to, pow, mean, add, rsqrt, mul, mul), each a full pass over the activations, and autograd
// keeps x, the normalised x and the rsqrt for backward; here only x and the per-row rstd
// (4 bytes per row) are saved, and dw is reduced in fixed row chunks so the result does not depend
// on the thread count.
//
// rms_norm_offset / rms_norm_offset_backward: the RMSNorm of Gemma-family decoders (Gemma, Gemma-2,
// Gemma-3), whose weight is stored as an offset from `offset` (1.0 there):
//   y = (x * rstd) * (offset + w)
// with the rounding of transformers' GemmaRMSNorm: offset + w and both products in float32,
// rounded to the input dtype once at the end (Llama rounds x * rstd first). The weight may be
// x's dtype or float32 (a float32 Gemma norm under bfloat16 activations). float64 x computes in
// float64 (the stock module computes it in float32; float64 serves gradcheck). Backward as above
// with w replaced by offset + w and dw summing dy * n with n unrounded; same storage (x and one
// float per row), dw in the weight's dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "vec_utils.h"

namespace pyfast {
namespace {

constexpr const char* kOp = "rms_norm";

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w,
                  bool float_weight_ok = false) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              op, ": x must be float32, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() ||
                  (float_weight_ok && w.scalar_type() == at::kFloat &&
                   x.scalar_type() == at::kBFloat16),
              op, ": weight must have x's dtype ", x.scalar_type(),
              float_weight_ok && x.scalar_type() == at::kBFloat16 ? " or float32" : "", ", got ",
              w.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ",
              x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), op, ": weight must have shape [",
              x.size(-1), "] (x's last dimension), got ", w.sizes());
  TORCH_CHECK(x.device() == w.device(), op, ": weight is on ", w.device(), " but x is on ",
              x.device());
}

// torch's CPU sum kernel (cascade_sum) over a contiguous row, reproduced so that rstd has the
// stock modules' bits (`x.float().pow(2).mean(-1)`: the squares rounded to float32, then summed).
// No multiply-add contraction here: torch squares and sums in two kernels, each square rounded.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
inline int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(uint64_t(x - 1)); }

// torch's row_sum: `n` terms as (n / 4, 4) groups through the cascade, the n % 4 leftovers into
// accumulator 0, then the fold.
template <typename A, typename Term>
A row_sum4(const Term& term, int64_t n) {
  constexpr int kLevels = 4;
  const int64_t size = n / 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  A acc[kLevels][4];
  for (auto& lv : acc)
    for (auto& a : lv) a = A(0);
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] = acc[0][k] + term(4 * i + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = A(0);
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] = acc[0][k] + term(4 * i + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  for (int64_t t = size * 4; t < n; ++t) acc[0][0] = acc[0][0] + term(t);
  for (int k = 1; k < 4; ++k) acc[0][0] = acc[0][0] + acc[0][k];
  return acc[0][0];
}

// Sum of squares of one row (float32 / bfloat16 x, float32 math) in torch's order: rows of at
// least one SIMD vector sum whole vectors of squares (row_sum4 over vectors), then the scalar
// tail, then the lanes; shorter rows sum scalars (row_sum4 over elements).
template <typename T>
float row_sumsq(const T* x, int64_t d) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  auto sq = [&](int64_t j) {
    const float v = cpu::sload(x + j);
    return v * v;
  };
  if (d < W) return row_sum4<float>(sq, d);
  const int64_t nvec = d / W;
  const Vec lanes = row_sum4<Vec>(
      [&](int64_t v) {
        const Vec a = cpu::vload(x + v * W);
        return a * a;
      },
      nvec);
  float s = 0.f;
  for (int64_t j = nvec * W; j < d; ++j) s += sq(j);
  float l[W];
  lanes.store(l);
  for (int64_t k = 0; k < W; ++k) s += l[k];
  return s;
}
#pragma GCC pop_options
double row_sumsq(const double* x, int64_t d) {
  double s = 0.0;
  for (int64_t j = 0; j < d; ++j) s += x[j] * x[j];
  return s;
}

// One row of the forward: y = w * (x * rs) with LlamaRMSNorm's two roundings,
// (x * rstd).to(dtype), then weight * that.
template <typename T, typename Acc>
void forward_row(const T* xr, const T* w, T* yr, Acc rs, int64_t d) {
  for (int64_t j = 0; j < d; ++j) {
    const T n = static_cast<T>(static_cast<Acc>(xr[j]) * rs);
    yr[j] = static_cast<T>(static_cast<Acc>(w[j]) * static_cast<Acc>(n));
  }
}
// float32 with SIMD (the hot path of fp32 training and evaluation): the same two products.
void forward_row(const float* xr, const float* w, float* yr, float rs, int64_t d) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  const Vec vr(rs);
  int64_t j = 0;
  for (; j + W <= d; j += W) (Vec::loadu(w + j) * (Vec::loadu(xr + j) * vr)).store(yr + j);
  for (; j < d; ++j) yr[j] = w[j] * (xr[j] * rs);
}
// bfloat16 x with float32 (offset + w): Gemma's rounding, (x * rs) * w in float32, rounded once.
void forward_row(const at::BFloat16* xr, const float* w, at::BFloat16* yr, float rs, int64_t d) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  const Vec vr(rs);
  int64_t j = 0;
  for (; j + W <= d; j += W) cpu::vstore(yr + j, cpu::vload(xr + j) * vr * Vec::loadu(w + j));
  for (; j < d; ++j) yr[j] = at::BFloat16(static_cast<float>(xr[j]) * rs * w[j]);
}

// Wt: the weight's storage type (T, or float for Gemma's float32 offset + w under bfloat16 x).
template <typename T, typename Wt, typename Acc>
void forward_rows(const T* x, const Wt* w, T* y, Acc* rstd, int64_t rows, int64_t d, double eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / d), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Acc ms = static_cast<Acc>(row_sumsq(x + r * d, d)) / static_cast<Acc>(d);
      rstd[r] = Acc(1) / std::sqrt(ms + static_cast<Acc>(eps));
      forward_row(x + r * d, w, y + r * d, rstd[r], d);
    }
  });
}

// One row of the backward: adds dy * n to the chunk's dw partial sums and writes dx.
// `g` is scratch of d entries (the generic path keeps dy * w between its two passes).
template <typename T, typename Wt, typename Acc>
void backward_row(const T* dyr, const T* xr, const Wt* w, Acc rs, T* dxr, Acc* part, Acc* g,
                  int64_t d) {
  // Llama's forward rounds n to T before the weight; Gemma's (float32 weights) does not.
  constexpr bool kRoundN = std::is_same_v<T, Wt>;
  Acc dot = 0;
  for (int64_t j = 0; j < d; ++j) {
    const Acc n = static_cast<Acc>(xr[j]) * rs;
    const Acc gy = static_cast<Acc>(dyr[j]);
    // dw sees the normalised x as the forward multiplied it.
    part[j] += gy * (kRoundN ? static_cast<Acc>(static_cast<T>(n)) : n);
    g[j] = gy * static_cast<Acc>(w[j]);
    dot += g[j] * n;
  }
  const Acc k = dot / static_cast<Acc>(d);
  for (int64_t j = 0; j < d; ++j)
    dxr[j] = static_cast<T>(rs * (g[j] - static_cast<Acc>(xr[j]) * rs * k));
}
// float32 with SIMD: recomputes dy * w in the second pass instead of keeping it.
void backward_row(const float* dyr, const float* xr, const float* w, float rs, float* dxr,
                  float* part, float* /*g*/, int64_t d) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  const Vec vr(rs);
  Vec vdot(0.f);
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    const Vec n = Vec::loadu(xr + j) * vr;
    const Vec gy = Vec::loadu(dyr + j);
    at::vec::fmadd(gy, n, Vec::loadu(part + j)).store(part + j);
    vdot = at::vec::fmadd(gy * Vec::loadu(w + j), n, vdot);
  }
  float dot = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vdot);
  for (int64_t jj = j; jj < d; ++jj) {
    const float n = xr[jj] * rs;
    part[jj] += dyr[jj] * n;
    dot += dyr[jj] * w[jj] * n;
  }
  const float k = dot / static_cast<float>(d);
  const Vec vk(k);
  for (j = 0; j + W <= d; j += W) {
    const Vec n = Vec::loadu(xr + j) * vr;
    const Vec g = Vec::loadu(dyr + j) * Vec::loadu(w + j);
    (vr * (g - n * vk)).store(dxr + j);
  }
  for (; j < d; ++j) dxr[j] = rs * (dyr[j] * w[j] - xr[j] * rs * k);
}

// Rows per chunk of the weight-gradient reduction: fixed by the shape only.
int64_t dw_chunk(int64_t rows) { return std::max<int64_t>(16, (rows + 255) / 256); }

template <typename T, typename Wt, typename Acc>
void backward_rows(const T* dy, const T* x, const Wt* w, const Acc* rstd, T* dx, Acc* dw_parts,
                   int64_t rows, int64_t d) {
  const int64_t chunk = dw_chunk(rows);
  const int64_t nchunks = (rows + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<Acc> g(d);
    for (int64_t c = cb; c < ce; ++c) {
      Acc* part = dw_parts + c * d;
      std::fill(part, part + d, Acc(0));
      const int64_t r1 = std::min(rows, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < r1; ++r)
        backward_row(dy + r * d, x + r * d, w, rstd[r], dx + r * d, part, g.data(), d);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                double eps) {
  check_inputs(kOp, x_in, w_in);
  TORCH_CHECK(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t d = x.size(-1), rows = x.numel() / d;
  at::Tensor y = at::empty_like(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lead = x.sizes().vec();
  lead.pop_back();
  at::Tensor rstd = at::empty(lead, x.options().dtype(acc));
  if (rows == 0) return {y, rstd};
  if (x.scalar_type() == at::kFloat) {
    forward_rows<float, float, float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(),
                               rstd.data_ptr<float>(), rows, d, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    forward_rows<at::BFloat16, at::BFloat16, float>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
                                      y.data_ptr<at::BFloat16>(), rstd.data_ptr<float>(), rows, d,
                                      eps);
  } else {
    forward_rows<double, double, double>(x.data_ptr<double>(), w.data_ptr<double>(), y.data_ptr<double>(),
                                 rstd.data_ptr<double>(), rows, d, eps);
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& dy_in,
                                                         const at::Tensor& x_in,
                                                         const at::Tensor& w_in,
                                                         const at::Tensor& rstd_in) {
  constexpr const char* op = "rms_norm_backward";
  check_inputs(op, x_in, w_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": grad must have x's shape ", x_in.sizes(), " and dtype ", x_in.scalar_type(),
              ", got ", dy_in.sizes(), " ", dy_in.scalar_type());
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t d = x_in.size(-1), rows = x_in.numel() / d;
  TORCH_CHECK(rstd_in.scalar_type() == acc && rstd_in.numel() == rows, op, ": rstd must be ",
              acc, " with one entry per row (", rows, "), got ", rstd_in.scalar_type(), " with ",
              rstd_in.numel());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(),
                   rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(w)};
  const int64_t nchunks = (rows + dw_chunk(rows) - 1) / dw_chunk(rows);
  at::Tensor parts = at::empty({nchunks, d}, x.options().dtype(acc));
  if (x.scalar_type() == at::kFloat) {
    backward_rows<float, float, float>(dy.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                                rstd.data_ptr<float>(), dx.data_ptr<float>(),
                                parts.data_ptr<float>(), rows, d);
  } else if (x.scalar_type() == at::kBFloat16) {
    backward_rows<at::BFloat16, at::BFloat16, float>(dy.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(),
                                       w.data_ptr<at::BFloat16>(), rstd.data_ptr<float>(),
                                       dx.data_ptr<at::BFloat16>(), parts.data_ptr<float>(), rows,
                                       d);
  } else {
    backward_rows<double, double, double>(dy.data_ptr<double>(), x.data_ptr<double>(),
                                  w.data_ptr<double>(), rstd.data_ptr<double>(),
                                  dx.data_ptr<double>(), parts.data_ptr<double>(), rows, d);
  }
  // Chunks combine in a fixed order: the same dw for any thread count.
  return {dx, parts.sum(0).to(x.scalar_type())};
}

// Gemma's RMSNorm: the weight applied as offset + w, formed once per call in the compute type
// (float32 for float32 / bfloat16 x: the stock module's `1.0 + self.weight.float()`).
static at::Tensor offset_weight(const at::Tensor& x, const at::Tensor& w, double offset) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return w.to(acc).add(offset).contiguous();
}

std::tuple<at::Tensor, at::Tensor> rms_norm_offset_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& w_in, double eps,
                                                       double offset) {
  constexpr const char* op = "rms_norm_offset";
  check_inputs(op, x_in, w_in, /*float_weight_ok=*/true);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous(), wf = offset_weight(x_in, w_in, offset);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  at::Tensor y = at::empty_like(x);
  auto lead = x.sizes().vec();
  lead.pop_back();
  at::Tensor rstd = at::empty(lead, x.options().dtype(wf.scalar_type()));
  if (rows == 0) return {y, rstd};
  if (x.scalar_type() == at::kFloat) {
    forward_rows<float, float, float>(x.data_ptr<float>(), wf.data_ptr<float>(),
                                      y.data_ptr<float>(), rstd.data_ptr<float>(), rows, d, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    forward_rows<at::BFloat16, float, float>(x.data_ptr<at::BFloat16>(), wf.data_ptr<float>(),
                                             y.data_ptr<at::BFloat16>(), rstd.data_ptr<float>(),
                                             rows, d, eps);
  } else {
    forward_rows<double, double, double>(x.data_ptr<double>(), wf.data_ptr<double>(),
                                         y.data_ptr<double>(), rstd.data_ptr<double>(), rows, d,
                                         eps);
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_offset_backward_cpu(const at::Tensor& dy_in,
                                                                const at::Tensor& x_in,
                                                                const at::Tensor& w_in,
                                                                const at::Tensor& rstd_in,
                                                                double offset) {
  constexpr const char* op = "rms_norm_offset_backward";
  check_inputs(op, x_in, w_in, /*float_weight_ok=*/true);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(), op,
              ": grad must have x's shape ", x_in.sizes(), " and dtype ", x_in.scalar_type(),
              ", got ", dy_in.sizes(), " ", dy_in.scalar_type());
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t d = x_in.size(-1), rows = x_in.numel() / d;
  TORCH_CHECK(rstd_in.scalar_type() == acc && rstd_in.numel() == rows, op, ": rstd must be ",
              acc, " with one entry per row (", rows, "), got ", rstd_in.scalar_type(), " with ",
              rstd_in.numel());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(),
                   wf = offset_weight(x_in, w_in, offset), rstd = rstd_in.contiguous();
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(w_in)};
  const int64_t nchunks = (rows + dw_chunk(rows) - 1) / dw_chunk(rows);
  at::Tensor parts = at::empty({nchunks, d}, x.options().dtype(acc));
  if (x.scalar_type() == at::kFloat) {
    backward_rows<float, float, float>(dy.data_ptr<float>(), x.data_ptr<float>(),
                                       wf.data_ptr<float>(), rstd.data_ptr<float>(),
                                       dx.data_ptr<float>(), parts.data_ptr<float>(), rows, d);
  } else if (x.scalar_type() == at::kBFloat16) {
    backward_rows<at::BFloat16, float, float>(
        dy.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), wf.data_ptr<float>(),
        rstd.data_ptr<float>(), dx.data_ptr<at::BFloat16>(), parts.data_ptr<float>(), rows, d);
  } else {
    backward_rows<double, double, double>(dy.data_ptr<double>(), x.data_ptr<double>(),
                                          wf.data_ptr<double>(), rstd.data_ptr<double>(),
                                          dx.data_ptr<double>(), parts.data_ptr<double>(), rows,
                                          d);
  }
  return {dx, parts.sum(0).to(w_in.scalar_type())};
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("rms_norm_offset", &rms_norm_offset_cpu);
  m.impl("rms_norm_offset_backward", &rms_norm_offset_backward_cpu);
}

}  // namespace pyfast

// rms_norm / rms_norm_backward (CPU): the RMSNorm of Llama-family decoders,
//   rstd = 1 / sqrt(mean_j x_j^2 + eps),   y = w * (x * rstd)            (per row of D features)
// with the rounding order of transformers' LlamaRMSNorm: x * rstd in float32, rounded to the
// input dtype, then multiplied by w (rounded again). Backward, with n = x * rstd, g = dy * w:
//   dx = rstd * (g - n * mean_j(g_j * n_j)),   dw = sum over rows of dy * n.
//
// Reads/writes per element: forward reads x once (the row stays in L1 for the second pass) and
// writes y; backward reads x and dy and writes dx. Fused because the stock module runs ~6 kernels
// (to, pow, mean, add, rsqrt, mul, mul), each a full pass over the activations, and autograd
// keeps x, the normalised x and the rsqrt for backward; here only x and the per-row rstd
// (4 bytes per row) are saved, and dw is reduced in fixed row chunks so the result does not depend
// on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "vec_utils.h"

namespace pyfast {
namespace {

constexpr const char* kOp = "rms_norm";

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              op, ": x must be float32, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ",
              x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ",
              x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), op, ": weight must have shape [",
              x.size(-1), "] (x's last dimension), got ", w.sizes());
  TORCH_CHECK(x.device() == w.device(), op, ": weight is on ", w.device(), " but x is on ",
              x.device());
}

// Sum of squares of one row, float32 SIMD lanes for float/bf16, double for double.
template <typename T>
float row_sumsq(const T* x, int64_t d) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  Vec a0(0.f), a1(0.f);
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    const Vec v0 = cpu::vload(x + j), v1 = cpu::vload(x + j + W);
    a0 = at::vec::fmadd(v0, v0, a0);
    a1 = at::vec::fmadd(v1, v1, a1);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, a0 + a1);
  for (; j < d; ++j) {
    const float v = cpu::sload(x + j);
    s += v * v;
  }
  return s;
}
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

template <typename T, typename Acc>
void forward_rows(const T* x, const T* w, T* y, Acc* rstd, int64_t rows, int64_t d, double eps) {
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
template <typename T, typename Acc>
void backward_row(const T* dyr, const T* xr, const T* w, Acc rs, T* dxr, Acc* part, Acc* g,
                  int64_t d) {
  Acc dot = 0;
  for (int64_t j = 0; j < d; ++j) {
    const Acc n = static_cast<Acc>(xr[j]) * rs;
    const Acc gy = static_cast<Acc>(dyr[j]);
    // dw sees the normalised x as the forward rounded it.
    part[j] += gy * static_cast<Acc>(static_cast<T>(n));
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

template <typename T, typename Acc>
void backward_rows(const T* dy, const T* x, const T* w, const Acc* rstd, T* dx, Acc* dw_parts,
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
    forward_rows<float, float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(),
                               rstd.data_ptr<float>(), rows, d, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    forward_rows<at::BFloat16, float>(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(),
                                      y.data_ptr<at::BFloat16>(), rstd.data_ptr<float>(), rows, d,
                                      eps);
  } else {
    forward_rows<double, double>(x.data_ptr<double>(), w.data_ptr<double>(), y.data_ptr<double>(),
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
    backward_rows<float, float>(dy.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(),
                                rstd.data_ptr<float>(), dx.data_ptr<float>(),
                                parts.data_ptr<float>(), rows, d);
  } else if (x.scalar_type() == at::kBFloat16) {
    backward_rows<at::BFloat16, float>(dy.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(),
                                       w.data_ptr<at::BFloat16>(), rstd.data_ptr<float>(),
                                       dx.data_ptr<at::BFloat16>(), parts.data_ptr<float>(), rows,
                                       d);
  } else {
    backward_rows<double, double>(dy.data_ptr<double>(), x.data_ptr<double>(),
                                  w.data_ptr<double>(), rstd.data_ptr<double>(),
                                  dx.data_ptr<double>(), parts.data_ptr<double>(), rows, d);
  }
  // Chunks combine in a fixed order: the same dw for any thread count.
  return {dx, parts.sum(0).to(x.scalar_type())};
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace pyfast

// swiglu / swiglu_backward (CPU): the gated activation of Llama-family MLPs,
//   h = silu(g) * u,   silu(g) = g / (1 + exp(-g))
// with transformers' rounding order (silu(g) rounded to the input dtype, then the product).
// Backward, with s = sigmoid(g):
//   du = dh * silu(g),   dg = dh * u * s * (1 + g * (1 - s)).
//
// Reads/writes per element: forward reads g and u and writes h; backward reads dh, g and u and
// writes dg and du. Fused because the stock MLP runs silu and mul as two passes and autograd
// keeps g, silu(g), u and the product h for backward (four (tokens, intermediate) tensors per
// layer); with this op the MLP needs only g and u (see pyfast/ops/fused_blocks.py: h is
// recomputed from them in backward, here in the same pass that forms dg and du).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "vec_utils.h"

namespace pyfast {
namespace {

void check_pair(const char* op, const char* a, const at::Tensor& x, const char* b,
                const at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              op, ": ", a, " must be float32, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), op, ": ", b,
              " must have ", a, "'s shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              y.sizes(), " ", y.scalar_type());
  TORCH_CHECK(y.device() == x.device(), op, ": ", b, " is on ", y.device(), " but ", a, " is on ",
              x.device());
}

constexpr int64_t kGrain = 1 << 14;

// float32 / bfloat16: SIMD in float32 lanes (as torch's own silu kernel computes bf16).
template <typename T>
void forward_f(const T* g, const T* u, T* h, int64_t n) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + W <= e; i += W) {
      const Vec x = cpu::vload(g + i);
      Vec a = x / (Vec(1.f) + x.neg().exp());
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        // round silu(g) to bf16 first, as F.silu(g) * u does
        at::BFloat16 tmp[W];
        cpu::vstore(tmp, a);
        a = cpu::vload(tmp);
      }
      cpu::vstore(h + i, a * cpu::vload(u + i));
    }
    for (; i < e; ++i) {
      const float x = cpu::sload(g + i);
      const float a = static_cast<float>(static_cast<T>(x / (1.f + std::exp(-x))));
      cpu::sstore(h + i, a * cpu::sload(u + i));
    }
  });
}

template <typename T>
void backward_f(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    const Vec one(1.f);
    for (; i + W <= e; i += W) {
      const Vec x = cpu::vload(g + i), y = cpu::vload(u + i), d = cpu::vload(dh + i);
      const Vec s = one / (one + x.neg().exp());
      Vec a = x * s;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        at::BFloat16 tmp[W];
        cpu::vstore(tmp, a);
        a = cpu::vload(tmp);
      }
      cpu::vstore(du + i, d * a);
      cpu::vstore(dg + i, d * y * s * (one + x * (one - s)));
    }
    for (; i < e; ++i) {
      const float x = cpu::sload(g + i), y = cpu::sload(u + i), d = cpu::sload(dh + i);
      const float s = 1.f / (1.f + std::exp(-x));
      const float a = static_cast<float>(static_cast<T>(x * s));
      cpu::sstore(du + i, d * a);
      cpu::sstore(dg + i, d * y * s * (1.f + x * (1.f - s)));
    }
  });
}

void forward_d(const double* g, const double* u, double* h, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) h[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  });
}

void backward_d(const double* dh, const double* g, const double* u, double* dg, double* du,
                int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double s = 1.0 / (1.0 + std::exp(-g[i]));
      du[i] = dh[i] * g[i] * s;
      dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
  });
}

}  // namespace

// h = silu(g) * u into h (which may be g itself: each element is read before it is written).
static void forward_into(const at::Tensor& g, const at::Tensor& u, at::Tensor& h) {
  const int64_t n = g.numel();
  if (n == 0) return;
  switch (g.scalar_type()) {
    case at::kFloat:
      forward_f(g.data_ptr<float>(), u.data_ptr<float>(), h.data_ptr<float>(), n);
      break;
    case at::kBFloat16:
      forward_f(g.data_ptr<at::BFloat16>(), u.data_ptr<at::BFloat16>(),
                h.data_ptr<at::BFloat16>(), n);
      break;
    default:
      forward_d(g.data_ptr<double>(), u.data_ptr<double>(), h.data_ptr<double>(), n);
  }
}

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_pair("swiglu", "gate", gate_in, "up", up_in);
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor h = at::empty_like(g);
  forward_into(g, u, h);
  return h;
}

// In place over gate (inference: the projection's output is consumed here), which saves the
// output's allocation and the first-touch page faults of a fresh (tokens, intermediate) buffer.
void swiglu_inplace_cpu(at::Tensor& gate, const at::Tensor& up_in) {
  check_pair("swiglu_", "gate", gate, "up", up_in);
  TORCH_CHECK(gate.is_contiguous(), "swiglu_: gate must be contiguous to be written in place");
  forward_into(gate, up_in.contiguous(), gate);
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_in,
                                                       const at::Tensor& gate_in,
                                                       const at::Tensor& up_in) {
  check_pair("swiglu_backward", "gate", gate_in, "up", up_in);
  check_pair("swiglu_backward", "gate", gate_in, "grad", grad_in);
  const at::Tensor d = grad_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  switch (g.scalar_type()) {
    case at::kFloat:
      backward_f(d.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(),
                 dg.data_ptr<float>(), du.data_ptr<float>(), n);
      break;
    case at::kBFloat16:
      backward_f(d.data_ptr<at::BFloat16>(), g.data_ptr<at::BFloat16>(),
                 u.data_ptr<at::BFloat16>(), dg.data_ptr<at::BFloat16>(),
                 du.data_ptr<at::BFloat16>(), n);
      break;
    default:
      backward_d(d.data_ptr<double>(), g.data_ptr<double>(), u.data_ptr<double>(),
                 dg.data_ptr<double>(), du.data_ptr<double>(), n);
  }
  return {dg, du};
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_", &swiglu_inplace_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace pyfast

// geglu / geglu_ / geglu_backward (CPU): the gated activation of Gemma-family MLPs,
//   h = gelu_tanh(g) * u,   gelu_tanh(g) = 0.5 g (1 + tanh(b (g + k g^3))),  b = sqrt(2/pi),
//   k = 0.044715
// with the formula, operation order and tanh of torch's CPU F.gelu(approximate="tanh") SIMD path
// (at::vec's Vectorized tanh, Sleef u10, on every element: also on the last partial vector, which
// runs on zero-padded lanes, so an element's value does not depend on its position or the thread
// count), and transformers' rounding order: gelu_tanh(g) rounded to the input dtype, then the
// product. Backward, t = tanh(b (g + k g^3)), with a = dh * u rounded to the input dtype (what
// autograd hands gelu's backward in the stock module):
//   dg = a * (0.5 (1 + t) + 0.5 g (1 - t^2) b (1 + 3 k g^2)),   du = dh * gelu_tanh(g).
// float32 and float64 compute in their own precision, bfloat16 in float32 lanes (as torch).
//
// Reads/writes per element: forward reads g and u and writes h (geglu_ writes h over g);
// backward reads dh, g and u and writes dg and du. Fused because the stock MLP runs gelu and mul
// as two passes and autograd keeps g, gelu(g) and u for backward; the fused MLP
// (pyfast/ops/fused_blocks.py, gated_mlp) keeps g and u only, and gelu(g) is recomputed here in
// the pass that forms dg and du.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

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

// The compute type of each storage type: float lanes for float32 / bfloat16, double for float64.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using V = at::vec::Vectorized<Acc<T>>;

inline V<float> load(const float* p) { return V<float>::loadu(p); }
inline V<float> load(const at::BFloat16* p) { return cpu::vload(p); }
inline V<double> load(const double* p) { return V<double>::loadu(p); }
inline void store(float* p, const V<float>& v) { v.store(p); }
inline void store(at::BFloat16* p, const V<float>& v) { cpu::vstore(p, v); }
inline void store(double* p, const V<double>& v) { v.store(p); }

// The last n < size() elements, zero-padded, and their store back.
template <typename T>
V<T> load_n(const T* p, int64_t n) {
  Acc<T> tmp[V<T>::size()] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<Acc<T>>(p[i]);
  return V<T>::loadu(tmp);
}
template <typename T>
void store_n(T* p, const V<T>& v, int64_t n) {
  Acc<T> tmp[V<T>::size()];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

// An intermediate rounded to the storage dtype (bfloat16: round to nearest even and back).
template <typename T>
V<T> round_as(const V<T>& v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    at::BFloat16 tmp[V<T>::size()];
    cpu::vstore(tmp, v);
    return cpu::vload(tmp);
  } else {
    return v;
  }
}

// torch's constants: computed in double, rounded once to the compute type.
template <typename S>
struct Consts {
  static constexpr S beta = static_cast<S>(M_SQRT2 * M_2_SQRTPI * 0.5);
  static constexpr S kappa = static_cast<S>(0.044715);
};

// gelu_tanh(x), as torch's vectorized forward writes it.
template <typename S>
at::vec::Vectorized<S> gelu(const at::vec::Vectorized<S>& x) {
  using Vs = at::vec::Vectorized<S>;
  const Vs beta(Consts<S>::beta), kappa(Consts<S>::kappa), one(S(1)), half(S(0.5));
  const Vs cube = x * x * x;
  const Vs inner = beta * (x + kappa * cube);
  return half * x * (one + inner.tanh());
}

// dy * gelu_tanh'(x), as torch's vectorized backward writes it.
template <typename S>
at::vec::Vectorized<S> gelu_grad(const at::vec::Vectorized<S>& dy, const at::vec::Vectorized<S>& x) {
  using Vs = at::vec::Vectorized<S>;
  const Vs beta(Consts<S>::beta), kappa(Consts<S>::kappa), one(S(1)), three(S(3)), half(S(0.5));
  const Vs sq = x * x;
  const Vs cube = x * x * x;
  const Vs inner = beta * (x + kappa * cube);
  const Vs t = inner.tanh();
  const Vs left = half * x;
  const Vs right = one + t;
  const Vs left_d = half * right;
  const Vs tanh_d = one - t * t;
  const Vs inner_d = beta * (one + three * kappa * sq);
  const Vs right_d = left * tanh_d * inner_d;
  return dy * (left_d + right_d);
}

template <typename T>
void forward_span(const T* g, const T* u, T* h, int64_t n) {
  constexpr int64_t W = V<T>::size();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> a = round_as<T>(gelu(load(g + i)));
    store(h + i, a * load(u + i));
  }
  if (i < n) {
    const V<T> a = round_as<T>(gelu(load_n(g + i, n - i)));
    store_n(h + i, a * load_n(u + i, n - i), n - i);
  }
}

template <typename T>
void backward_span(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n) {
  constexpr int64_t W = V<T>::size();
  auto one = [](const V<T>& d, const V<T>& x, const V<T>& y, V<T>& out_g, V<T>& out_u) {
    out_u = d * round_as<T>(gelu(x));
    out_g = gelu_grad(round_as<T>(d * y), x);
  };
  int64_t i = 0;
  V<T> vg, vu;
  for (; i + W <= n; i += W) {
    one(load(dh + i), load(g + i), load(u + i), vg, vu);
    store(du + i, vu);
    store(dg + i, vg);
  }
  if (i < n) {
    const int64_t r = n - i;
    one(load_n(dh + i, r), load_n(g + i, r), load_n(u + i, r), vg, vu);
    store_n(du + i, vu, r);
    store_n(dg + i, vg, r);
  }
}

// h = geglu(g, u) into h (which may be g itself: each element is read before it is written).
template <typename T>
void forward_all(const at::Tensor& g, const at::Tensor& u, at::Tensor& h) {
  const T* gp = g.data_ptr<T>();
  const T* up = u.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
    forward_span(gp + b, up + b, hp + b, e - b);
  });
}

void forward_into(const at::Tensor& g, const at::Tensor& u, at::Tensor& h) {
  if (g.numel() == 0) return;
  switch (g.scalar_type()) {
    case at::kFloat:
      forward_all<float>(g, u, h);
      break;
    case at::kBFloat16:
      forward_all<at::BFloat16>(g, u, h);
      break;
    default:
      forward_all<double>(g, u, h);
  }
}

template <typename T>
void backward_all(const at::Tensor& d, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg,
                  at::Tensor& du) {
  const T* dp = d.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const T* up = u.data_ptr<T>();
  T* dgp = dg.data_ptr<T>();
  T* dup = du.data_ptr<T>();
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) {
    backward_span(dp + b, gp + b, up + b, dgp + b, dup + b, e - b);
  });
}

}  // namespace

at::Tensor geglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_pair("geglu", "gate", gate_in, "up", up_in);
  const at::Tensor g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor h = at::empty_like(g);
  forward_into(g, u, h);
  return h;
}

// In place over gate (inference: the projection's output is consumed here).
void geglu_inplace_cpu(at::Tensor& gate, const at::Tensor& up_in) {
  check_pair("geglu_", "gate", gate, "up", up_in);
  TORCH_CHECK(gate.is_contiguous(), "geglu_: gate must be contiguous to be written in place");
  forward_into(gate, up_in.contiguous(), gate);
}

std::tuple<at::Tensor, at::Tensor> geglu_backward_cpu(const at::Tensor& grad_in,
                                                      const at::Tensor& gate_in,
                                                      const at::Tensor& up_in) {
  check_pair("geglu_backward", "gate", gate_in, "up", up_in);
  check_pair("geglu_backward", "gate", gate_in, "grad", grad_in);
  const at::Tensor d = grad_in.contiguous(), g = gate_in.contiguous(), u = up_in.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  if (g.numel() == 0) return {dg, du};
  switch (g.scalar_type()) {
    case at::kFloat:
      backward_all<float>(d, g, u, dg, du);
      break;
    case at::kBFloat16:
      backward_all<at::BFloat16>(d, g, u, dg, du);
      break;
    default:
      backward_all<double>(d, g, u, dg, du);
  }
  return {dg, du};
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("geglu", &geglu_cpu);
  m.impl("geglu_", &geglu_inplace_cpu);
  m.impl("geglu_backward", &geglu_backward_cpu);
}

}  // namespace pyfast

// rotary / rotary_backward (CPU): the rotary position embedding of Llama-family attention, as
// transformers' apply_rotary_pos_emb computes it for q (B, H, T, D) and k (B, KV, T, D) with
// cos / sin (B or 1, T, D) (broadcast over the heads; a batch of 1 broadcast over B):
//   out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., h:], x[..., :h]), h = D/2
// i.e. per row, for i < h:
//   out[i]     = x[i] * cos[i]         + (-x[i + h]) * sin[i]
//   out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
// Backward is the transpose: dx = g * cos + rotate_half^T(g * sin), rotate_half^T(y) =
// cat(y[..., h:], -y[..., :h]):
//   dx[i]     = g[i] * cos[i]         + g[i + h] * sin[i + h]
//   dx[i + h] = g[i + h] * cos[i + h] + (-g[i]) * sin[i]
// Both are out_lo = a_lo * c_lo + sa * a_hi * s_A, out_hi = a_hi * c_hi + sb * a_lo * s_B, with
// (s_A, s_B) = (sin_lo, sin_hi) and signs (-, +) forward, (sin_hi, sin_lo) and (+, -) backward.
//
// Rounding: the stock ops round each product and then the sum to the tensor's dtype (bfloat16:
// three roundings; float32: two products and a sum, no fused multiply-add); so does this kernel
// in float32 lanes, hence the same bits as the eager ops (checked in tests/ops/test_rotary.py).
// q / k / grads may be strided on the non-last dims (transformers passes transposed views of the
// projection output); the forward outputs are contiguous (B, H, T, D), the backward outputs
// token-major (see out_like). One pass over q and k instead of transformers' mul, slice, neg,
// cat, mul, add (and in backward zero-filled slice gradients, cat, adds).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "vec_utils.h"

namespace pyfast {
namespace {

// Element strides of a (B, N, T, D) input and output (last one 1) and of cos/sin (B or 1, T, D).
struct Layout {
  int64_t B, N, T, D;
  int64_t sb, sn, st;  // input strides
  int64_t ob, on, ot;  // output strides
  int64_t cb, ct;      // cos / sin strides (cb = 0 when broadcast over the batch)
};

at::Tensor last_dim_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_args(const char* op, const char* qn, const at::Tensor& q, const char* kn,
                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", qn,
              " must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(q.dim() == 4, op, ": ", qn, " must be 4-D (batch, heads, tokens, head_dim), got ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": ", kn,
              " must be 4-D (batch, kv_heads, tokens, head_dim), got ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op, ": ",
              kn, " must have ", qn, "'s batch, tokens and head_dim (", q.size(0), ", *, ",
              q.size(2), ", ", q.size(3), "), got ", k.sizes());
  const int64_t D = q.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": head_dim must be even (rotate_half splits it in two), got ", D);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos},
                                std::pair<const char*, const at::Tensor&>{"sin", sin}}) {
    TORCH_CHECK(t.dim() == 3 && (t.size(0) == q.size(0) || t.size(0) == 1) &&
                    t.size(1) == q.size(2) && t.size(2) == D,
                op, ": ", name, " must have shape (", q.size(0), " or 1, ", q.size(2), ", ", D,
                ") (batch, tokens, head_dim), got ", t.sizes());
  }
  TORCH_CHECK(sin.size(0) == cos.size(0), op, ": sin must have cos's shape ", cos.sizes(),
              ", got ", sin.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{kn, k},
                                std::pair<const char*, const at::Tensor&>{"cos", cos},
                                std::pair<const char*, const at::Tensor&>{"sin", sin}}) {
    TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have ", qn, "'s dtype ", dt,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but ", qn,
                " is on ", q.device());
  }
}

Layout layout_of(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos) {
  return {x.size(0),     x.size(1),     x.size(2),
          x.size(3),     x.stride(0),   x.stride(1),
          x.stride(2),   out.stride(0), out.stride(1),
          out.stride(2), cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1)};
}

// A product rounded to T on its own, as the eager mul rounds it before the add: bfloat16 goes
// through memory; a float32 product passes an empty asm barrier so that the compiler cannot fuse
// it with the following sum into one multiply-add (-mfma builds contract a * b + c otherwise).
template <typename T>
inline cpu::Vec round_to(const cpu::Vec& v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    at::BFloat16 tmp[cpu::Vec::size()];
    cpu::vstore(tmp, v);
    return cpu::vload(tmp);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 r = v;
    asm("" : "+v"(r));
    return r;
#elif defined(CPU_CAPABILITY_AVX2)
    __m256 r = v;
    asm("" : "+x"(r));
    return r;
#else
    return v;  // built without -mfma: nothing to contract
#endif
  }
}

template <typename T>
inline float round_to(float v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return static_cast<float>(static_cast<T>(v));
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    asm("" : "+x"(v));
#endif
    return v;
  }
}

inline double unfused(double v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  asm("" : "+x"(v));
#endif
  return v;
}

// One row of D = 2h elements: out = a * c + rot(a) * s (rot: rotate_half, or its transpose).
// One formula, applied to float32 vectors over the row (float / BFloat16 storage, products and
// sum rounded to T as the eager ops do), to single elements for the tail, and to doubles.
template <typename T, bool kTranspose>
inline void row(const T* a, const T* c, const T* s, T* out, int64_t h) {
  const T* s_lo = kTranspose ? s + h : s;  // sine multiplying a_hi (into out_lo)
  const T* s_hi = kTranspose ? s : s + h;  // sine multiplying a_lo (into out_hi)
  const auto step = [&](int64_t i, auto load, auto store, auto round) {
    const auto lo = load(a + i), hi = load(a + h + i);
    const auto p_lo = round(lo * load(c + i)), p_hi = round(hi * load(c + h + i));
    // (-x) * s == -(x * s) exactly, so the sign goes on the rounded product
    const auto r_lo = round(hi * load(s_lo + i)), r_hi = round(lo * load(s_hi + i));
    store(out + i, kTranspose ? p_lo + r_lo : p_lo - r_lo);
    store(out + h + i, kTranspose ? p_hi - r_hi : p_hi + r_hi);
  };
  int64_t i = 0;
  if constexpr (std::is_same_v<T, double>) {
    for (; i < h; ++i) {
      step(i, [](const double* p) { return *p; }, [](double* p, double v) { *p = v; }, unfused);
    }
  } else {
    using cpu::Vec;
    for (; i + Vec::size() <= h; i += Vec::size()) {
      step(
          i, [](const T* p) { return cpu::vload(p); },
          [](T* p, const Vec& v) { cpu::vstore(p, v); }, [](const Vec& v) { return round_to<T>(v); });
    }
    for (; i < h; ++i) {
      step(i, [](const T* p) { return cpu::sload(p); }, [](T* p, float v) { cpu::sstore(p, v); },
           [](float v) { return round_to<T>(v); });
    }
  }
}

// Both tensors' rows in one parallel loop: rows [0, nq) are q's (b, n, t), the rest k's.
template <typename T, bool kTranspose>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
         at::Tensor& oq, at::Tensor& ok) {
  const Layout lq = layout_of(q, oq, cos), lk = layout_of(k, ok, cos);
  const int64_t nq = lq.B * lq.N * lq.T, nk = lk.B * lk.N * lk.T, h = lq.D / 2;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* oqp = oq.data_ptr<T>();
  T* okp = ok.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(lq.D, 1));
  at::parallel_for(0, nq + nk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool is_q = r < nq;
      const Layout& l = is_q ? lq : lk;
      const int64_t idx = is_q ? r : r - nq;  // (b, n, t) in row-major order
      const int64_t t = idx % l.T, n = (idx / l.T) % l.N, b = idx / (l.T * l.N);
      const T* src = (is_q ? qp : kp) + b * l.sb + n * l.sn + t * l.st;
      const int64_t cs = b * l.cb + t * l.ct;
      T* dst = (is_q ? oqp : okp) + b * l.ob + n * l.on + t * l.ot;
      row<T, kTranspose>(src, cp + cs, sp + cs, dst, h);
    }
  });
}

// Forward: contiguous (B, N, T, D), what attention reads best. Backward: (B, N, T, D) laid out as
// (B, T, N, D) (token-major), the layout of transformers' q and k (transposed views of the
// projection outputs (B, T, N * D)), so that autograd's transpose and view backward into the
// projections are free instead of a copy of each gradient.
at::Tensor out_like(const at::Tensor& x, bool token_major) {
  if (!token_major) return at::empty(x.sizes(), x.options());
  return at::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

template <bool kTranspose>
std::tuple<at::Tensor, at::Tensor> rotary_impl(const char* op, const char* qn, const char* kn,
                                               const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& cos_in,
                                               const at::Tensor& sin_in) {
  check_args(op, qn, q_in, kn, k_in, cos_in, sin_in);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in);
  at::Tensor cos = last_dim_dense(cos_in), sin = last_dim_dense(sin_in);
  if (cos.strides() != sin.strides()) {  // one set of offsets serves both
    cos = cos.contiguous();
    sin = sin.contiguous();
  }
  at::Tensor oq = out_like(q, kTranspose), ok = out_like(k, kTranspose);
  if (q.numel() + k.numel() == 0) return {oq, ok};
  switch (q.scalar_type()) {
    case at::kFloat:
      run<float, kTranspose>(q, k, cos, sin, oq, ok);
      break;
    case at::kBFloat16:
      run<at::BFloat16, kTranspose>(q, k, cos, sin, oq, ok);
      break;
    default:
      run<double, kTranspose>(q, k, cos, sin, oq, ok);
  }
  return {oq, ok};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin) {
  return rotary_impl<false>("rotary", "q", "k", q, k, cos, sin);
}

std::tuple<at::Tensor, at::Tensor> rotary_backward_cpu(const at::Tensor& grad_q,
                                                       const at::Tensor& grad_k,
                                                       const at::Tensor& cos,
                                                       const at::Tensor& sin) {
  return rotary_impl<true>("rotary_backward", "grad_q", "grad_k", grad_q, grad_k, cos, sin);
}

TORCH_LIBRARY_IMPL(pyfast, CPU, m) {
  m.impl("rotary", &rotary_cpu);
  m.impl("rotary_backward", &rotary_backward_cpu);
}

}  // namespace pyfast

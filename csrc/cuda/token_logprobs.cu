// token_logprobs and linear_token_logprobs (CUDA): forward, backward and the fused
// forward+gradient pass, in one translation unit to keep compile time down.
//
//   row statistics: one block per row; each thread keeps an online (max, sum exp(x - max), first
//     argmax) over its strided 16-byte vectors of columns (one exp per element, four vectors in
//     flight per thread), merged by warp shuffles and shared memory; chunks of a row (linear
//     version) merge into per-row state in global memory.
//   gradient: dx = a * onehot(label) + (h - a) * exp(x - lse), recomputed from the saved lse and
//     written in the logits' dtype (in place over a logits chunk in the linear version).
//   linear version: logits chunks (row block x vocabulary chunk) from cuBLAS (at::mm) into one
//     reused buffer; grad_hidden += G @ W_c, grad_weight_c += G^T @ H, so no (N, V) tensor.
//     With a logit map (scale != 1 or softcap > 0) the row kernels read z = scale * x, then
//     softcap * tanh(z / softcap), in the accumulation type, and the gradient gains the chain
//     factor scale * (1 - tanh^2); output_mask leaves out the unwanted matmuls and buffers.
//   non-finite logits as log_softmax / logsumexp / argmax: NaN anywhere poisons the row (lse and
//     log p NaN, argmax the first NaN), +inf gives lse +inf and log p NaN, an all -inf row lse
//     -inf, log p NaN, argmax 0; the gradient of a row with a non-finite lse is NaN.
//
// Bytes per element: forward reads each logit once (4 B fp32 / 2 B bf16); backward reads it once
// and writes the gradient once; per row only a few scalars. Fused because log_softmax + gather
// writes and rereads an (N, V) fp32 intermediate, and the linear version also never stores the
// logits or their gradient (one reused buffer of at most 32 MiB in fp32).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../logprob_checks.h"
#include "../ops.h"

namespace pyfast {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kVocabChunk = 8192;
constexpr int64_t kChunkElems = int64_t(4) << 20;     // logits per chunk buffer (16 MiB fp32)
// Whole-row blocks of the fused pass: 64 Mi logits (256 MiB in fp32). Larger than the CPU's 8 Mi:
// the (block rows x D) = (block rows x V) @ (V x D) product of grad_hidden needs enough rows to
// fill the GPU, and the caller takes this path only when N * V is at least two blocks
// (pyfast/ops/token_logprobs.py), so the block stays at most half of the (N, V) logits.
constexpr int64_t kFullRowElems = int64_t(64) << 20;
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename acc_t>
struct Stats {
  acc_t m;
  acc_t s;
  int64_t idx;
};

template <typename acc_t>
__device__ __forceinline__ acc_t dev_exp(acc_t x) {
  return ::exp(x);
}
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return __expf(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
__device__ __forceinline__ bool finite(acc_t x) {
  return isfinite(x);  // false for NaN and +-inf
}

// Merge of two partial statistics (m: max, NaN counting as the largest value; s: sum of
// exp(x - m), meaningful only for a finite m; idx: first column of the max, kNoIndex when the
// partial saw no column). Ties keep the smaller column (torch's argmax), which also lets an empty
// partial (-inf, 0, kNoIndex) lose every merge.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> merge(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  const bool a_nan = isnan(a.m), b_nan = isnan(b.m);
  Stats<acc_t> r;
  if (a_nan || b_nan) {  // NaN poisons the row; the first NaN is the argmax
    r.m = a_nan ? a.m : b.m;
    r.s = 0;
    r.idx = (a_nan && b_nan) ? (a.idx < b.idx ? a.idx : b.idx) : (a_nan ? a.idx : b.idx);
    return r;
  }
  r.m = a.m > b.m ? a.m : b.m;
  r.idx = a.m > b.m ? a.idx : (b.m > a.m ? b.idx : (a.idx < b.idx ? a.idx : b.idx));
  // exp(-inf - m) = 0 takes care of an all -inf side; +inf or all -inf totals need no sum.
  r.s = finite(r.m) ? a.s * dev_exp(a.m - r.m) + b.s * dev_exp(b.m - r.m) : acc_t(0);
  return r;
}

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_down(const Stats<acc_t>& v, int offset) {
  Stats<acc_t> o;
  o.m = __shfl_down_sync(0xffffffffu, v.m, offset);
  o.s = __shfl_down_sync(0xffffffffu, v.s, offset);
  o.idx = __shfl_down_sync(0xffffffffu, static_cast<long long>(v.idx), offset);
  return o;
}

// One element into a thread's running (max, sum exp(x - max), first argmax); columns arrive in
// increasing order per thread, so a strict > keeps the first maximum (and the first NaN, or the
// first column of an all -inf stretch).
template <typename acc_t>
__device__ __forceinline__ void online_update(Stats<acc_t>& st, acc_t v, int64_t col) {
  if (isnan(st.m)) return;  // poisoned
  if (v > st.m || isnan(v)) {
    st.s = finite(st.m) ? st.s * dev_exp(st.m - v) + acc_t(1) : acc_t(1);
    st.m = v;
    st.idx = col;
  } else {
    if (st.idx == kNoIndex) st.idx = col;  // v == m == -inf
    if (finite(st.m)) st.s += dev_exp(v - st.m);
  }
}

// lse of the merged statistics and log p(label) from it, as logsumexp / log_softmax: +inf in the
// row gives lse +inf and log p NaN (inf - inf in log_softmax), NaN gives NaN, an all -inf row
// lse -inf (and log p = -inf - -inf = NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t stats_lse(const Stats<acc_t>& st) {
  return finite(st.m) ? st.m + ::log(st.s) : st.m;
}
template <typename acc_t>
__device__ __forceinline__ acc_t row_logprob(acc_t x_label, acc_t lse) {
  return lse == -neg_inf<acc_t>() ? lse - lse : x_label - lse;
}

// The logit map of the fused head: z = scale * x, then softcap * tanh(z / softcap) when
// softcap > 0; slope = dz/dx = scale * (1 - tanh^2). Identity when not kMapped.
template <typename acc_t>
struct LogitMap {
  acc_t scale;
  acc_t softcap;
};

template <bool kMapped, typename acc_t>
__device__ __forceinline__ acc_t map_logit(const LogitMap<acc_t>& m, acc_t x) {
  if constexpr (!kMapped) {
    return x;
  } else {
    const acc_t z = x * m.scale;
    return m.softcap > acc_t(0) ? ::tanh(z / m.softcap) * m.softcap : z;
  }
}

template <bool kMapped, typename acc_t>
__device__ __forceinline__ acc_t map_slope(const LogitMap<acc_t>& m, acc_t z) {
  if constexpr (!kMapped) {
    return acc_t(1);
  } else {
    if (!(m.softcap > acc_t(0))) return m.scale;
    const acc_t t = z / m.softcap;
    return m.scale * ((acc_t(1) - t) * (acc_t(1) + t));
  }
}

// 16 bytes of T.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kW = 16 / sizeof(T);
  T v[kW];
};

template <typename T>
__device__ __forceinline__ Vec16<T> as_vec(uint4 raw) {
  Vec16<T> out;
  memcpy(&out, &raw, 16);
  return out;
}

// Calls f(x[j], j) for this thread's share of the row x[0, n), each thread's columns in
// increasing order: a scalar head up to 16-byte alignment, then 16-byte vectors, kUnroll of them
// loaded before any is used (several loads in flight per thread: this is what reaches the
// memory bandwidth), then a scalar tail.
template <typename T, typename F>
__device__ __forceinline__ void for_row_elements(const T* __restrict__ x, int64_t n, F&& f) {
  constexpr int kW = Vec16<T>::kW;
  constexpr int kUnroll = 4;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const int64_t mis = (reinterpret_cast<uintptr_t>(x) & 15) / sizeof(T);
  const int64_t head = std::min<int64_t>(n, mis == 0 ? 0 : kW - mis);
  for (int64_t j = tid; j < head; j += nt) f(x[j], j);
  const int64_t nvec = (n - head) / kW;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  for (int64_t k0 = tid; k0 < nvec; k0 += nt * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * nt;
      if (k < nvec) buf[u] = __ldg(xv + k);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * nt;
      if (k < nvec) {
        const Vec16<T> b = as_vec<T>(buf[u]);
#pragma unroll
        for (int e = 0; e < kW; ++e) f(b.v[e], head + k * kW + e);
      }
    }
  }
  for (int64_t j = head + nvec * kW + tid; j < n; j += nt) f(x[j], j);
}

// g[j] = f(x[j], j) over this thread's share of a row, 16 bytes at a time where x and g share
// their alignment. g may alias x (each element is read, then written, by one thread), so these
// are plain loads, not the read-only path.
template <typename T, typename F>
__device__ __forceinline__ void map_row_elements(const T* x, T* g, int64_t n, F&& f) {
  constexpr int kW = Vec16<T>::kW;
  constexpr int kUnroll = 2;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), ga = reinterpret_cast<uintptr_t>(g);
  const int64_t mis = (xa & 15) / sizeof(T);
  const int64_t head = ((xa ^ ga) & 15) != 0 ? n : std::min<int64_t>(n, mis == 0 ? 0 : kW - mis);
  for (int64_t j = tid; j < head; j += nt) g[j] = f(x[j], j);
  const int64_t nvec = (n - head) / kW;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* gv = reinterpret_cast<uint4*>(g + head);
  for (int64_t k0 = tid; k0 < nvec; k0 += nt * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * nt;
      if (k < nvec) buf[u] = xv[k];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * nt;
      if (k < nvec) {
        const Vec16<T> b = as_vec<T>(buf[u]);
        Vec16<T> o;
#pragma unroll
        for (int e = 0; e < kW; ++e) o.v[e] = f(b.v[e], head + k * kW + e);
        // Through a register and one 16-byte store. A memcpy straight to global memory compiled
        // to 16 single-byte stores, and on an H200 those left 1-2% of the bf16 gradients wrong
        // (relative errors up to 0.75 in tests/ops; cause not established, fp32 unaffected).
        uint4 packed;
        memcpy(&packed, &o, 16);
        gv[k] = packed;
      }
    }
  }
  for (int64_t j = head + nvec * kW + tid; j < n; j += nt) g[j] = f(x[j], j);
}

// Block-wide merge; the result is valid in thread 0.
template <typename acc_t>
__device__ Stats<acc_t> block_merge(Stats<acc_t> st) {
  __shared__ Stats<acc_t> warp_stats[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) st = merge(st, shfl_down(st, off));
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    st = lane < nwarps ? warp_stats[lane] : Stats<acc_t>{neg_inf<acc_t>(), 0, kNoIndex};
    for (int off = 16; off > 0; off /= 2) st = merge(st, shfl_down(st, off));
  }
  return st;
}

// One block per row of a (rows, n) chunk whose first column is col0 in the full vocabulary.
// With state == nullptr the chunk is the whole row; otherwise statistics merge into the per-row
// state (first chunk: overwrite), and the last chunk finalises the outputs.
template <typename T, typename acc_t, bool kMapped>
__global__ void row_stats_kernel(const T* __restrict__ x, int64_t ld, int64_t n, int64_t col0,
                                 const int64_t* __restrict__ labels, int64_t ignore_index,
                                 Stats<acc_t>* state, acc_t* state_xl, bool first, bool last,
                                 acc_t* __restrict__ logprobs, bool* __restrict__ is_argmax,
                                 acc_t* __restrict__ lse, LogitMap<acc_t> map) {
  const int64_t row = blockIdx.x;
  const int64_t lab = labels[row];
  if (lab == ignore_index) {
    if (last && threadIdx.x == 0) {
      logprobs[row] = 0;
      is_argmax[row] = false;
      lse[row] = 0;
    }
    return;
  }
  const T* xr = x + row * ld;
  Stats<acc_t> st{neg_inf<acc_t>(), 0, kNoIndex};
  for_row_elements<T>(xr, n, [&](T v, int64_t j) {
    online_update(st, map_logit<kMapped>(map, static_cast<acc_t>(v)), col0 + j);
  });
  st = block_merge(st);
  if (threadIdx.x != 0) return;
  acc_t xl = 0;
  if (state != nullptr && !first) {
    st = merge(state[row], st);
    xl = state_xl[row];
  }
  if (lab >= col0 && lab < col0 + n) {
    xl = map_logit<kMapped>(map, static_cast<acc_t>(xr[lab - col0]));
  }
  if (last) {
    const acc_t l = stats_lse(st);
    lse[row] = l;
    logprobs[row] = row_logprob(xl, l);
    is_argmax[row] = st.idx == lab;
  } else {
    state[row] = st;
    state_xl[row] = xl;
  }
}

// g = (a * onehot + (h - a) * exp(z - lse)) * dz/dx over a (rows, n) chunk starting at column
// col0 (z = x without a map); ignored rows get zeros, rows with a non-finite lse NaN. g may alias
// x (each element is read, then written, by one thread).
template <typename T, typename acc_t, bool kMapped>
__global__ void row_grad_kernel(const T* x, int64_t ldx, T* g, int64_t ldg, int64_t n,
                                int64_t col0, const int64_t* __restrict__ labels,
                                int64_t ignore_index, const acc_t* __restrict__ grad_logprobs,
                                const acc_t* __restrict__ grad_lse, const acc_t* __restrict__ lse,
                                LogitMap<acc_t> map) {
  const int64_t row = blockIdx.x;
  const int64_t lab = labels[row];
  T* gr = g + row * ldg;
  if (lab == ignore_index) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) gr[j] = static_cast<T>(acc_t(0));
    return;
  }
  const acc_t l = lse[row];
  if (!finite(l)) {  // NaN, +inf or all -inf logits: NaN, as autograd through log_softmax
    const T nan = static_cast<T>(l - l);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) gr[j] = nan;
    return;
  }
  const T* xr = x + row * ldx;
  const acc_t a = grad_logprobs[row];
  const acc_t coef = (grad_lse != nullptr ? grad_lse[row] : acc_t(0)) - a;
  const int64_t lc = lab - col0;
  map_row_elements<T>(xr, gr, n, [&](T x, int64_t j) {
    const acc_t z = map_logit<kMapped>(map, static_cast<acc_t>(x));
    acc_t v = coef * dev_exp(z - l);
    if (j == lc) v += a;
    if constexpr (kMapped) v *= map_slope<kMapped>(map, z);
    return static_cast<T>(v);
  });
}

template <typename T>
using acc_of = at::opmath_type<T>;

// scale and softcap of the logit map as the host passes them (identity: 1 and 0).
struct MapArgs {
  double scale = 1.0;
  double softcap = 0.0;
  bool identity() const { return scale == 1.0 && softcap == 0.0; }
};

void launch_stats(const at::Tensor& x, int64_t col0, const at::Tensor& labels, int64_t ii,
                  const at::Tensor& state, const at::Tensor& state_xl, bool first, bool last,
                  const at::Tensor& logprobs, const at::Tensor& is_argmax, const at::Tensor& lse,
                  const MapArgs& map = MapArgs()) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "token_logprobs_stats_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    Stats<acc_t>* st = state.defined() ? reinterpret_cast<Stats<acc_t>*>(state.data_ptr()) : nullptr;
    acc_t* xl = state_xl.defined() ? state_xl.data_ptr<acc_t>() : nullptr;
    const LogitMap<acc_t> m{static_cast<acc_t>(map.scale), static_cast<acc_t>(map.softcap)};
    auto kernel = map.identity() ? row_stats_kernel<scalar_t, acc_t, false>
                                 : row_stats_kernel<scalar_t, acc_t, true>;
    kernel<<<rows, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), x.size(1), col0,
        labels.const_data_ptr<int64_t>(), ii, st, xl, first, last, logprobs.data_ptr<acc_t>(),
        is_argmax.data_ptr<bool>(), lse.data_ptr<acc_t>(), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_grad(const at::Tensor& x, const at::Tensor& g, int64_t col0, const at::Tensor& labels,
                 int64_t ii, const at::Tensor& gl, const at::Tensor& gh, const at::Tensor& lse,
                 const MapArgs& map = MapArgs()) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "token_logprobs_grad_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const LogitMap<acc_t> m{static_cast<acc_t>(map.scale), static_cast<acc_t>(map.softcap)};
    auto kernel = map.identity() ? row_grad_kernel<scalar_t, acc_t, false>
                                 : row_grad_kernel<scalar_t, acc_t, true>;
    kernel<<<rows, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), g.data_ptr<scalar_t>(), g.stride(0), x.size(1),
        col0, labels.const_data_ptr<int64_t>(), ii, gl.const_data_ptr<acc_t>(),
        gh.defined() ? gh.const_data_ptr<acc_t>() : nullptr, lse.const_data_ptr<acc_t>(), m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (rb, vc) logits chunk = h @ w.T (+ b) into a contiguous prefix of `flat`.
at::Tensor chunk_logits(const at::Tensor& flat, const at::Tensor& h, const at::Tensor& w,
                        const at::Tensor& b) {
  at::Tensor out = flat.narrow(0, 0, h.size(0) * w.size(0)).view({h.size(0), w.size(0)});
  if (b.defined()) at::addmm_out(out, b, h, w.t());
  else at::mm_out(out, h, w.t());
  return out;
}

// Per-row merge state: Stats<acc_t> as raw bytes (acc_t m, acc_t s, int64 idx).
at::Tensor stats_state(int64_t n, at::ScalarType acc, const at::TensorOptions& opts) {
  const int64_t bytes = acc == at::kDouble ? 24 : 16;
  return at::empty({n * bytes}, opts.dtype(at::kByte));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                                   const at::Tensor& labels_in,
                                                                   int64_t ignore_index) {
  constexpr const char* op = "token_logprobs";
  const at::Tensor logits = check_logits_labels(op, logits_in, labels_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  check_label_range(op, labels, V, ignore_index);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor logprobs = at::empty({N}, logits.options().dtype(acc));
  at::Tensor is_argmax = at::empty({N}, logits.options().dtype(at::kBool));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc));
  launch_stats(logits, 0, labels, ignore_index, at::Tensor(), at::Tensor(), true, true, logprobs,
               is_argmax, lse);
  return {logprobs, is_argmax, lse};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits_in, const at::Tensor& labels_in,
                                        const at::Tensor& lse_in, int64_t ignore_index) {
  constexpr const char* op = "token_logprobs_backward";
  const at::Tensor logits = check_logits_labels(op, logits_in, labels_in);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  check_label_range(op, labels, V, ignore_index);
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor g = check_row_vector(op, "grad_logprobs", grad_logprobs, N, logits.device(), acc);
  const at::Tensor lse = check_row_vector(op, "lse", lse_in, N, logits.device(), acc);
  const at::Tensor h = (grad_lse.has_value() && grad_lse->defined())
                           ? check_row_vector(op, "grad_lse", *grad_lse, N, logits.device(), acc)
                           : at::Tensor();
  at::Tensor grad = at::empty({N, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  launch_grad(logits, grad, 0, labels, ignore_index, g, h, lse);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, int64_t ignore_index, double scale, double softcap) {
  constexpr const char* op = "linear_token_logprobs";
  check_linear_args(op, hidden, weight, labels_in, bias_in);
  check_logit_map(op, scale, softcap);
  const MapArgs map{scale, softcap};
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_label_range(op, labels, V, ignore_index);
  const auto acc = acc_dtype(hidden.scalar_type());
  at::Tensor logprobs = at::empty({N}, hidden.options().dtype(acc));
  at::Tensor is_argmax = at::empty({N}, hidden.options().dtype(at::kBool));
  at::Tensor lse = at::empty({N}, hidden.options().dtype(acc));
  if (N == 0) return {logprobs, is_argmax, lse};
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::Tensor();
  const int64_t VC = std::min(V, kVocabChunk);
  const int64_t RB = std::max<int64_t>(1, std::min(N, kChunkElems / VC));
  const at::Tensor flat = at::empty({RB * VC}, hidden.options());
  const at::Tensor state = stats_state(N, acc, hidden.options());
  const at::Tensor state_xl = at::zeros({N}, hidden.options().dtype(acc));
  for (int64_t c0 = 0; c0 < V; c0 += VC) {
    const int64_t vc = std::min(VC, V - c0);
    const at::Tensor w = weight.narrow(0, c0, vc);
    const at::Tensor b = bias.defined() ? bias.narrow(0, c0, vc) : at::Tensor();
    for (int64_t r0 = 0; r0 < N; r0 += RB) {
      const int64_t rb = std::min(RB, N - r0);
      const at::Tensor L = chunk_logits(flat, hidden.narrow(0, r0, rb), w, b);
      const int64_t sb = acc == at::kDouble ? 24 : 16;
      launch_stats(L, c0, labels.narrow(0, r0, rb), ignore_index,
                   state.narrow(0, r0 * sb, rb * sb), state_xl.narrow(0, r0, rb), c0 == 0,
                   c0 + vc == V, logprobs.narrow(0, r0, rb), is_argmax.narrow(0, r0, rb),
                   lse.narrow(0, r0, rb), map);
    }
  }
  return {logprobs, is_argmax, lse};
}

LinearGrads linear_token_logprobs_backward_cuda(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& lse_in, int64_t ignore_index,
    double scale, double softcap, std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_token_logprobs_backward";
  check_linear_args(op, hidden, weight, labels_in, bias_in);
  check_logit_map(op, scale, softcap);
  const MapArgs map{scale, softcap};
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  check_label_range(op, labels, V, ignore_index);
  const auto dt = hidden.scalar_type();
  const auto acc = acc_dtype(dt);
  const at::Tensor g = check_row_vector(op, "grad_logprobs", grad_logprobs, N, hidden.device(), acc);
  const at::Tensor lse = check_row_vector(op, "lse", lse_in, N, hidden.device(), acc);
  const at::Tensor hl = (grad_lse.has_value() && grad_lse->defined())
                            ? check_row_vector(op, "grad_lse", *grad_lse, N, hidden.device(), acc)
                            : at::Tensor();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? *bias_in : at::Tensor();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  if (!need_h && !need_w && !need_b) return {std::nullopt, std::nullopt, std::nullopt};
  // Accumulators over chunks in fp32 for bf16 inputs.
  const auto accum_dt = dt == at::kBFloat16 ? acc : dt;
  at::Tensor gh = need_h ? at::zeros({N, D}, hidden.options().dtype(accum_dt)) : at::Tensor();
  at::Tensor gw = need_w ? at::zeros({V, D}, weight.options().dtype(accum_dt)
                                                 .memory_format(at::MemoryFormat::Contiguous))
                         : at::Tensor();
  at::Tensor gb = need_b ? at::zeros({V}, hidden.options().dtype(acc)) : at::Tensor();
  if (N > 0) {
    const int64_t VC = std::min(V, kVocabChunk);
    const int64_t RB = std::max<int64_t>(1, std::min(N, kChunkElems / VC));
    const at::Tensor flat = at::empty({RB * VC}, hidden.options());
    for (int64_t c0 = 0; c0 < V; c0 += VC) {
      const int64_t vc = std::min(VC, V - c0);
      const at::Tensor w = weight.narrow(0, c0, vc);
      const at::Tensor b = has_bias ? bias.narrow(0, c0, vc) : at::Tensor();
      at::Tensor gwc = need_w ? gw.narrow(0, c0, vc) : at::Tensor();
      for (int64_t r0 = 0; r0 < N; r0 += RB) {
        const int64_t rb = std::min(RB, N - r0);
        const at::Tensor hr = hidden.narrow(0, r0, rb);
        at::Tensor G = chunk_logits(flat, hr, w, b);
        launch_grad(G, G, c0, labels.narrow(0, r0, rb), ignore_index, g.narrow(0, r0, rb),
                    hl.defined() ? hl.narrow(0, r0, rb) : at::Tensor(), lse.narrow(0, r0, rb),
                    map);
        if (need_h) {
          at::Tensor ghr = gh.narrow(0, r0, rb);
          if (accum_dt == dt) ghr.addmm_(G, w);
          else ghr.add_(at::mm(G, w));
        }
        if (need_w) {
          if (accum_dt == dt) gwc.addmm_(G.t(), hr);
          else gwc.add_(at::mm(G.t(), hr));
        }
        if (need_b) gb.narrow(0, c0, vc).add_(G.sum(0, false, acc));
      }
    }
  }
  std::optional<at::Tensor> grad_hidden, grad_weight, grad_bias;
  if (need_h) grad_hidden = gh.to(dt);
  if (need_w) grad_weight = gw.to(dt);
  if (need_b) grad_bias = gb.to(dt);
  return {grad_hidden, grad_weight, grad_bias};
}

LinearOutputsWithGrads linear_token_logprobs_with_grad_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, int64_t ignore_index,
    const at::Tensor& grad_logprobs, double scale, double softcap,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_token_logprobs_with_grad";
  check_linear_args(op, hidden, weight, labels_in, bias_in);
  check_logit_map(op, scale, softcap);
  const MapArgs map{scale, softcap};
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = hidden.size(0), V = weight.size(0), D = hidden.size(1);
  check_label_range(op, labels, V, ignore_index);
  const auto dt = hidden.scalar_type();
  const auto acc = acc_dtype(dt);
  const at::Tensor g = check_row_vector(op, "grad_logprobs", grad_logprobs, N, hidden.device(), acc);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? *bias_in : at::Tensor();
  at::Tensor logprobs = at::empty({N}, hidden.options().dtype(acc));
  at::Tensor is_argmax = at::empty({N}, hidden.options().dtype(at::kBool));
  at::Tensor lse = at::empty({N}, hidden.options().dtype(acc));
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && has_bias;
  const bool any_grad = need_h || need_w || need_b;
  at::Tensor gh = need_h ? at::empty({N, D}, hidden.options().memory_format(
                                                 at::MemoryFormat::Contiguous))
                         : at::Tensor();
  const auto accum_dt = dt == at::kBFloat16 ? acc : dt;
  at::Tensor gw = need_w ? at::zeros({V, D}, weight.options().dtype(accum_dt)
                                                 .memory_format(at::MemoryFormat::Contiguous))
                         : at::Tensor();
  at::Tensor gb = need_b ? at::zeros({V}, hidden.options().dtype(acc)) : at::Tensor();
  if (N > 0) {
    const int64_t RB = std::max<int64_t>(1, std::min(N, kFullRowElems / V));
    const at::Tensor flat = at::empty({RB * V}, hidden.options());
    for (int64_t r0 = 0; r0 < N; r0 += RB) {
      const int64_t rb = std::min(RB, N - r0);
      const at::Tensor hr = hidden.narrow(0, r0, rb);
      const at::Tensor lab = labels.narrow(0, r0, rb);
      at::Tensor G = chunk_logits(flat, hr, weight, bias);
      const at::Tensor lse_r = lse.narrow(0, r0, rb);
      launch_stats(G, 0, lab, ignore_index, at::Tensor(), at::Tensor(), true, true,
                   logprobs.narrow(0, r0, rb), is_argmax.narrow(0, r0, rb), lse_r, map);
      if (!any_grad) continue;
      launch_grad(G, G, 0, lab, ignore_index, g.narrow(0, r0, rb), at::Tensor(), lse_r, map);
      if (need_h) {
        at::Tensor ghr = gh.narrow(0, r0, rb);
        at::mm_out(ghr, G, weight);
      }
      if (need_w) {
        if (accum_dt == dt) gw.addmm_(G.t(), hr);
        else gw.add_(at::mm(G.t(), hr));
      }
      if (need_b) gb.add_(G.sum(0, false, acc));
    }
  }
  std::optional<at::Tensor> grad_hidden, grad_weight, grad_bias;
  if (need_h) grad_hidden = gh;
  if (need_w) grad_weight = gw.to(dt);
  if (need_b) grad_bias = gb.to(dt);
  return {logprobs, is_argmax, lse, grad_hidden, grad_weight, grad_bias};
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CUDA, m) {
  m.impl("token_logprobs", &pyfast::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &pyfast::token_logprobs_backward_cuda);
  m.impl("linear_token_logprobs", &pyfast::linear_token_logprobs_cuda);
  m.impl("linear_token_logprobs_backward", &pyfast::linear_token_logprobs_backward_cuda);
  m.impl("linear_token_logprobs_with_grad", &pyfast::linear_token_logprobs_with_grad_cuda);
}

// fused_adamw_ and grad_norm (CUDA): the optimizer step and the gradient norm that clipping
// needs, each over a whole tensor list in a few multi-tensor launches (multi_tensor_apply.cuh).
//
// fused_adamw_, per element (s = grad_scale, read on the device: no host sync in the step):
//   g = grad * s;  p = p * (1 - lr*wd);  m = m + (1 - beta1) * (g - m);
//   v = v * beta2 + (1 - beta2) * g * g;
//   p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// in the CPU kernel's operations and rounding order (cpu/fused_adamw.cpp), in fp32 with IEEE
// add/mul/fma/div/sqrt (explicit PTX, so --use_fast_math neither approximates nor flushes
// denormals), bf16 widened on load and rounded to nearest even on store (NaN -> 0x7FC0, as
// c10::BFloat16). Hence the results should equal the CPU kernel's bit for bit (an AVX2/AVX512
// build, whose fmadd is fused; bf16 NaN payloads aside).
// Reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq: 28 B per element all
// fp32, 20 B with bf16 state, 22 B with bf16 params and fp32 state, 14 B all bf16. Fused because
// the update is memory bound: one pass instead of torch's foreach chain, with the clip
// coefficient folded in (no separate read+write of every gradient), and frozen entries (masks)
// never written; vectors inside frozen rows are not even read.
//
// grad_norm: sqrt(sum of g^2 over the trainable elements of all tensors) as a 0-dim float32
// tensor on the device. Reads each gradient once (4 B fp32, 2 B bf16 per element; frozen rows
// not at all). Fused because clip_grad_norm_ computes one norm per tensor, stacks and reduces
// again. Each thread sums a chunk in fp32 lanes and the chunks in double; blocks reduce in a
// fixed tree into one double per block, and a one-block kernel adds those in a fixed order and
// takes the square root: deterministic for a given device and tensor list, no float atomics,
// no host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_scalars.h"
#include "../checks.h"
#include "multi_tensor_apply.cuh"

namespace pyfast::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// AdamW

// One element, operation for operation as adamw_scalar() in cpu/fused_adamw.cpp.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float graw,
                                              const AdamWScalars& h, float scale) {
  const float g = mul_rn(graw, scale);
  p = mul_rn(p, h.decay);
  m = fma_rn(h.beta1_w, sub_rn(g, m), m);
  v = mul_rn(v, h.beta2);
  v = add_rn(v, mul_rn(mul_rn(h.beta2_c, g), g));
  const float denom = add_rn(div_rn(sqrt_rn(v), h.bc2_sqrt), h.eps);
  p = add_rn(p, div_rn(mul_rn(h.neg_step, m), denom));
}

// P: param/grad storage (float or bf16_bits), S: exp_avg/exp_avg_sq storage. 16-byte accesses
// for the narrowest of them: 4 lanes when all fp32, else 8.
template <typename P, typename S>
struct AdamWBody {
  static constexpr int kW = (sizeof(P) == 2 || sizeof(S) == 2) ? 8 : 4;
  static constexpr bool kBatchLoads = false;  // 4 streams of 16-32 B per thread are in flight
  static constexpr uint32_t kFull = (1u << kW) - 1u;
  AdamWScalars h;
  float scale;
  P* p;
  const P* g;
  S* m;
  S* v;

  template <class Meta>
  __device__ __forceinline__ void begin(const Meta& meta, int t) {
    p = static_cast<P*>(meta.ptr[0][t]);
    g = static_cast<const P*>(meta.ptr[1][t]);
    m = static_cast<S*>(meta.ptr[2][t]);
    v = static_cast<S*>(meta.ptr[3][t]);
  }
  __device__ __forceinline__ void vec(int64_t i, uint32_t act) {
    float pf[kW], gf[kW], mf[kW], vf[kW];
    load_vec<kW>(g + i, gf);
    load_vec<kW>(p + i, pf);
    load_vec<kW>(m + i, mf);
    load_vec<kW>(v + i, vf);
#pragma unroll
    for (int j = 0; j < kW; ++j) adamw_element(pf[j], mf[j], vf[j], gf[j], h, scale);
    if (act == kFull) {
      store_vec<kW>(p + i, pf);
      store_vec<kW>(m + i, mf);
      store_vec<kW>(v + i, vf);
    } else {  // a vector that straddles frozen elements: write the trainable lanes only
      store_lanes<kW>(p + i, pf, act);
      store_lanes<kW>(m + i, mf, act);
      store_lanes<kW>(v + i, vf, act);
    }
  }
  __device__ __forceinline__ void one(int64_t i) {
    float pf = load1(p + i), mf = load1(m + i), vf = load1(v + i);
    adamw_element(pf, mf, vf, load1(g + i), h, scale);
    store1(p + i, pf);
    store1(m + i, mf);
    store1(v + i, vf);
  }
  __device__ __forceinline__ void end_chunk() {}
};

// meta.ptr = {params, grads, exp_avgs, exp_avg_sqs}. The gradient scale is *scale_ptr when given
// (a device scalar, read here), else scale_host.
template <typename P, typename S>
__global__ void __launch_bounds__(kBlock)
    adamw_kernel(const __grid_constant__ TensorListMeta<4> meta, const AdamWScalars h,
                 const float* __restrict__ scale_ptr, const float scale_host) {
  AdamWBody<P, S> body;
  body.h = h;
  body.scale = scale_ptr != nullptr ? *scale_ptr : scale_host;
  mta_run<false>(meta, body);
}

template <typename P, typename S>
void launch_adamw(const std::vector<TensorListMeta<4>>& metas, const AdamWScalars& h,
                  const float* scale_ptr, float scale_host, cudaStream_t stream) {
  const int max_blocks = resident_blocks<adamw_kernel<P, S>>();
  for (const TensorListMeta<4>& meta : metas) {
    adamw_kernel<P, S><<<grid_for(meta, max_blocks), kBlock, 0, stream>>>(meta, h, scale_ptr,
                                                                         scale_host);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// grad_norm

// Sum of x*x in fp32 per lane within a chunk (at most kChunk / kBlock = 32 elements per thread),
// chunks added in double.
template <typename T>
struct SumSqBody {
  static constexpr int kW = 16 / static_cast<int>(sizeof(T));
  static constexpr bool kBatchLoads = true;  // one stream: needs several loads in flight
  const T* x;
  float acc[kW];
  double total;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < kW; ++j) acc[j] = 0.f;
    total = 0.0;
  }
  template <class Meta>
  __device__ __forceinline__ void begin(const Meta& meta, int t) {
    x = static_cast<const T*>(meta.ptr[0][t]);
  }
  __device__ __forceinline__ void vec(int64_t i, uint32_t act) {
    float f[kW];
    load_vec<kW>(x + i, f);
#pragma unroll
    for (int j = 0; j < kW; ++j) {
      const float y = (act >> j) & 1u ? f[j] : 0.f;  // frozen lanes (even NaN/inf) count 0
      acc[j] = fma_rn(y, y, acc[j]);
    }
  }
  __device__ __forceinline__ void one(int64_t i) {
    const float y = load1(x + i);
    acc[0] = fma_rn(y, y, acc[0]);
  }
  __device__ __forceinline__ void end_chunk() {
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < kW; ++j) {
      s += static_cast<double>(acc[j]);
      acc[j] = 0.f;
    }
    total += s;
  }
};

// Sum over the block's threads, in a fixed tree; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[kBlock / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xFFFFFFFFu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.0;
  if (warp == 0) {
    x = lane < kBlock / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xFFFFFFFFu, x, o);
  }
  return x;
}

// One double per block: partials[blockIdx.x].
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sumsq_kernel(const __grid_constant__ TensorListMeta<1> meta, double* __restrict__ partials) {
  SumSqBody<T> body;
  body.init();
  mta_run<false>(meta, body);
  const double s = block_sum(body.total);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// out = sqrt(sum of the n partials), summed in a fixed order by one block.
__global__ void __launch_bounds__(kBlock)
    norm_finish_kernel(const double* __restrict__ partials, int64_t n, float* __restrict__ out) {
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < n; k += kBlock) s += partials[k];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = static_cast<float>(__dsqrt_rn(s));
}

template <typename T>
void launch_sumsq(const std::vector<TensorListMeta<1>>& metas, double*& partials,
                  cudaStream_t stream) {
  if (metas.empty()) return;
  const int max_blocks = resident_blocks<sumsq_kernel<T>>();
  for (const TensorListMeta<1>& meta : metas) {
    const int grid = grid_for(meta, max_blocks);
    sumsq_kernel<T><<<grid, kBlock, 0, stream>>>(meta, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    partials += grid;
  }
}

template <typename T>
int64_t count_blocks(const std::vector<TensorListMeta<1>>& metas) {
  if (metas.empty()) return 0;
  const int max_blocks = resident_blocks<sumsq_kernel<T>>();
  int64_t n = 0;
  for (const TensorListMeta<1>& meta : metas) n += grid_for(meta, max_blocks);
  return n;
}

}  // namespace
}  // namespace pyfast::cuda

namespace pyfast {

void fused_adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                      TensorList exp_avg_sqs, const OptTensorList& masks, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step,
                      const std::optional<at::Tensor>& grad_scale) {
  using namespace cuda;
  constexpr const char* op = "fused_adamw_";
  check_adamw_args(op, params, grads, exp_avgs, exp_avg_sqs, masks);
  check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": params[0] must be a CUDA tensor, got one on ", dev);

  // A device scale is read by the kernel (no sync); a CPU scalar is host memory already.
  const float* scale_ptr = nullptr;
  float scale_host = 1.0f;
  if (grad_scale.has_value() && grad_scale->defined()) {
    const at::Tensor& s = *grad_scale;
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, op,
                ": grad_scale must be a one-element float32 tensor, got ", s.sizes(), " ",
                s.scalar_type());
    if (s.is_cpu()) {
      scale_host = s.item<float>();
    } else {
      TORCH_CHECK(s.device() == dev, op, ": grad_scale is on ", s.device(),
                  " but params[0] is on ", dev);
      scale_ptr = s.const_data_ptr<float>();
    }
  }
  const AdamWScalars h = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);

  std::vector<MtaTensor<4>> ts;
  ts.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;  // as the CPU kernel: nothing to do, mask unchecked
    MtaTensor<4> e;
    e.ptr[0] = params[i].data_ptr();
    e.ptr[1] = const_cast<void*>(grads[i].const_data_ptr());
    e.ptr[2] = exp_avgs[i].data_ptr();
    e.ptr[3] = exp_avg_sqs[i].data_ptr();
    e.numel = params[i].numel();
    set_mask(e, op, i, masks, params[i]);
    ts.push_back(e);
  }
  if (ts.empty()) return;
  const std::vector<TensorListMeta<4>> metas = pack_tensor_lists(ts);

  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool p_bf16 = params[0].scalar_type() == at::kBFloat16;
  const bool s_bf16 = exp_avgs[0].scalar_type() == at::kBFloat16;
  if (!p_bf16 && !s_bf16) launch_adamw<float, float>(metas, h, scale_ptr, scale_host, stream);
  else if (!p_bf16) launch_adamw<float, bf16_bits>(metas, h, scale_ptr, scale_host, stream);
  else if (!s_bf16) launch_adamw<bf16_bits, float>(metas, h, scale_ptr, scale_host, stream);
  else launch_adamw<bf16_bits, bf16_bits>(metas, h, scale_ptr, scale_host, stream);
}

at::Tensor grad_norm_cuda(TensorList tensors, const OptTensorList& masks) {
  using namespace cuda;
  constexpr const char* op = "grad_norm";
  check_list_len(op, "masks", masks.size(), tensors.size(), true);
  if (tensors.empty()) {
    return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  }
  const at::Device dev = tensors[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": tensors[0] must be a CUDA tensor, got one on ", dev);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_float_dtype(op, "tensors", i, tensors[i]);
    check_same_device(op, "tensors", i, tensors[i], dev);
    check_contiguous(op, "tensors", i, tensors[i]);
  }
  // One launch set per dtype; all of them write into one array of block partials.
  std::vector<MtaTensor<1>> f32, b16;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) continue;
    MtaTensor<1> e;
    e.ptr[0] = const_cast<void*>(tensors[i].const_data_ptr());
    e.numel = tensors[i].numel();
    set_mask(e, op, i, masks, tensors[i]);
    (tensors[i].scalar_type() == at::kBFloat16 ? b16 : f32).push_back(e);
  }

  c10::cuda::CUDAGuard guard(dev);
  const at::TensorOptions opts = tensors[0].options();
  at::Tensor out = at::empty({}, opts.dtype(at::kFloat));
  const std::vector<TensorListMeta<1>> mf = pack_tensor_lists(f32), mb = pack_tensor_lists(b16);
  const int64_t nparts = count_blocks<float>(mf) + count_blocks<bf16_bits>(mb);
  if (nparts == 0) return out.zero_();
  at::Tensor partials = at::empty({nparts}, opts.dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  double* next = partials.data_ptr<double>();
  launch_sumsq<float>(mf, next, stream);
  launch_sumsq<bf16_bits>(mb, next, stream);
  TORCH_INTERNAL_ASSERT(next == partials.data_ptr<double>() + nparts);
  norm_finish_kernel<<<1, kBlock, 0, stream>>>(partials.data_ptr<double>(), nparts,
                                               out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CUDA, m) {
  m.impl("fused_adamw_", &pyfast::fused_adamw_cuda);
  m.impl("grad_norm", &pyfast::grad_norm_cuda);
}

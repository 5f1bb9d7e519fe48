// grad_mask_ (CUDA): zero, in place, the gradient of every frozen element (per-element masks) or
// frozen row (per-row masks of dim 0, e.g. embedding rows of tokens that are not trained):
//   g[i] = 0 where mask[i] (or mask[row(i)]) is false; every other element is left untouched.
//
// Never reads the gradient: per-row masks read one flag byte per row and write zeros over the
// frozen rows only (2-4 B per frozen element, 16-byte stores); per-element masks read the mask
// byte and write the frozen elements (1 B + 2-4 B per frozen element, 1 B per trainable one).
// Tensors whose mask is None are not launched over at all. Fused because a model's masked
// tensors are few but the step is per-parameter in Python: one multi-tensor launch per dtype
// (multi_tensor_apply.cuh) replaces a masked_fill_ kernel (and a broadcast mask) per tensor.
// For users who keep their own optimizer: after grad_mask_ any optimizer sees zero gradients on
// frozen entries (AdamW still decays them; pyfast's FusedAdamW takes the masks itself).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "multi_tensor_apply.cuh"

namespace pyfast::cuda {
namespace {

// Writes +0 over the lanes it is given; walked with kOnFrozen, so those are the frozen lanes.
template <typename T>
struct ZeroBody {
  static constexpr int kW = 16 / static_cast<int>(sizeof(T));
  static constexpr uint32_t kFull = (1u << kW) - 1u;
  static constexpr bool kBatchLoads = false;  // stores only
  T* x;

  template <class Meta>
  __device__ __forceinline__ void begin(const Meta& meta, int t) {
    x = static_cast<T*>(meta.ptr[0][t]);
  }
  __device__ __forceinline__ void vec(int64_t i, uint32_t act) {
    float z[kW];
#pragma unroll
    for (int j = 0; j < kW; ++j) z[j] = 0.f;
    if (act == kFull) {
      store_vec<kW>(x + i, z);
    } else {
      store_lanes<kW>(x + i, z, act);
    }
  }
  __device__ __forceinline__ void one(int64_t i) { store1(x + i, 0.f); }
  __device__ __forceinline__ void end_chunk() {}
};

template <typename T>
__global__ void __launch_bounds__(kBlock)
    grad_mask_kernel(const __grid_constant__ TensorListMeta<1> meta) {
  ZeroBody<T> body;
  mta_run<true>(meta, body);
}

template <typename T>
void launch_grad_mask(const std::vector<MtaTensor<1>>& ts, cudaStream_t stream) {
  if (ts.empty()) return;
  const int max_blocks = resident_blocks<grad_mask_kernel<T>>();
  for (const TensorListMeta<1>& meta : pack_tensor_lists(ts)) {
    grad_mask_kernel<T><<<grid_for(meta, max_blocks), kBlock, 0, stream>>>(meta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace pyfast::cuda

namespace pyfast {

void grad_mask_cuda(TensorList grads, const OptTensorList& masks) {
  using namespace cuda;
  constexpr const char* op = "grad_mask_";
  check_list_len(op, "masks", masks.size(), grads.size(), false);
  if (grads.empty()) return;
  const at::Device dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), op, ": grads[0] must be a CUDA tensor, got one on ", dev);
  std::vector<MtaTensor<1>> f32, b16;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    check_float_dtype(op, "grads", i, g);
    check_same_device(op, "grads", i, g, dev);
    check_contiguous(op, "grads", i, g);
    MtaTensor<1> e;
    e.ptr[0] = g.data_ptr();
    e.numel = g.numel();
    set_mask(e, op, i, masks, g);  // validates the mask, as the CPU kernel does, even if empty
    if (e.kind == MaskKind::kNone || e.numel == 0) continue;
    (g.scalar_type() == at::kBFloat16 ? b16 : f32).push_back(e);
  }
  if (f32.empty() && b16.empty()) return;
  c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_grad_mask<float>(f32, stream);
  launch_grad_mask<bf16_bits>(b16, stream);
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CUDA, m) { m.impl("grad_mask_", &pyfast::grad_mask_cuda); }

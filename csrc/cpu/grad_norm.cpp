// grad_norm (CPU): the global L2 norm sqrt(sum_i sum_j g_ij^2) over a tensor list, in one pass.
// With masks, only trainable elements count (frozen rows are never read), which is the norm the
// gradients would have after grad_mask_.
//
// Bytes per element: one read of the gradient (4 B fp32, 2 B bf16). Fused because the stock path
// (torch.nn.utils.clip_grad_norm_) computes one norm per tensor, stacks them and reduces again.
// Each work item accumulates in float32 SIMD lanes over at most 64K elements, items combine in
// double in a fixed order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_utils.h"

namespace pyfast {
namespace {

template <typename T>
double sumsq_range(const T* g, int64_t b, int64_t e, const uint8_t* emask) {
  using cpu::Vec;
  constexpr int64_t W = Vec::size();
  Vec acc0(0.f), acc1(0.f);
  int64_t i = b;
  for (; i + 2 * W <= e; i += 2 * W) {
    Vec x0 = cpu::vload(g + i), x1 = cpu::vload(g + i + W);
    if (emask != nullptr) {
      x0 = x0 & cpu::lane_mask(emask + i);
      x1 = x1 & cpu::lane_mask(emask + i + W);
    }
    acc0 = at::vec::fmadd(x0, x0, acc0);
    acc1 = at::vec::fmadd(x1, x1, acc1);
  }
  float lanes[W];
  (acc0 + acc1).store(lanes);
  double s = 0.0;
  for (int64_t k = 0; k < W; ++k) s += lanes[k];
  for (; i < e; ++i) {
    if (emask != nullptr && emask[i] == 0) continue;
    const double x = cpu::sload(g + i);
    s += x * x;
  }
  return s;
}

}  // namespace

at::Tensor grad_norm_cpu(at::TensorList tensors, const OptTensorList& masks) {
  constexpr const char* op = "grad_norm";
  check_list_len(op, "masks", masks.size(), tensors.size(), true);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_float_dtype(op, "tensors", i, tensors[i]);
    check_same_device(op, "tensors", i, tensors[i], tensors[0].device());
    check_contiguous(op, "tensors", i, tensors[i]);
  }
  const std::vector<cpu::WorkItem> items = cpu::plan_work(op, tensors, masks);
  std::vector<double> partial(items.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const cpu::WorkItem& w = items[k];
      const at::Tensor& t = tensors[w.t];
      partial[k] = t.scalar_type() == at::kBFloat16
                       ? sumsq_range(t.const_data_ptr<at::BFloat16>(), w.begin, w.end, w.emask)
                       : sumsq_range(t.const_data_ptr<float>(), w.begin, w.end, w.emask);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CPU, m) { m.impl("grad_norm", &pyfast::grad_norm_cpu); }

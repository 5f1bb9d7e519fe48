// grad_mask_ (CPU): zero, in place, the gradient of every frozen element (per-element masks) or
// frozen row (per-row masks, e.g. embedding rows of tokens that are not trained).
//
// Bytes per element: per-row masks write only the frozen rows (a memset); per-element masks read
// the mask byte and read+write the gradient. For users who keep their own optimizer: after
// grad_mask_ any optimizer sees zero gradients on frozen entries (note that AdamW still decays
// them; pyfast.optim.FusedAdamW takes the masks itself and leaves frozen entries untouched).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "vec_utils.h"

namespace pyfast {
namespace {

template <typename T>
void mask_tensor(T* g, int64_t n, const uint8_t* mask, MaskKind kind, int64_t nrows) {
  if (kind == MaskKind::kRow) {
    const int64_t row = n / nrows;
    at::parallel_for(0, nrows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row, 1)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t r = b; r < e; ++r)
                         if (!mask[r]) std::memset(g + r * row, 0, sizeof(T) * row);
                     });
    return;
  }
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (!mask[i]) g[i] = T(0.f);
  });
}

}  // namespace

void grad_mask_cpu(at::TensorList grads, const OptTensorList& masks) {
  constexpr const char* op = "grad_mask_";
  check_list_len(op, "masks", masks.size(), grads.size(), false);
  for (size_t i = 0; i < grads.size(); ++i) {
    check_float_dtype(op, "grads", i, grads[i]);
    check_contiguous(op, "grads", i, grads[i]);
    const MaskKind kind = check_mask(op, i, masks.get(i), grads[i]);
    if (kind == MaskKind::kNone || grads[i].numel() == 0) continue;
    const at::Tensor m = *masks.get(i);
    const uint8_t* mp = static_cast<const uint8_t*>(m.data_ptr());
    at::Tensor g = grads[i];
    if (g.scalar_type() == at::kBFloat16)
      mask_tensor(g.data_ptr<at::BFloat16>(), g.numel(), mp, kind, m.size(0));
    else
      mask_tensor(g.data_ptr<float>(), g.numel(), mp, kind, m.size(0));
  }
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CPU, m) { m.impl("grad_mask_", &pyfast::grad_mask_cpu); }

// fused_adamw_ (CPU): AdamW with decoupled weight decay over a whole tensor list in one pass.
//
//   g  = grad * grad_scale                      (grad_scale: the clip coefficient, optional)
//   p  = p * (1 - lr * wd)
//   m  = m + (1 - beta1) * (g - m)               (torch's lerp)
//   v  = v * beta2 + (1 - beta2) * g * g
//   p  = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// The operations and their rounding order follow torch.optim.AdamW's single-tensor path, so fp32
// results agree with it to the last bits (fp32 math throughout; bf16 params/grads/state are
// widened on load and rounded to nearest-even on store).
//
// Bytes per element: reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg,
// exp_avg_sq: 28 B in fp32, 20 B with bf16 state. Fused because the update is memory bound: the
// clip scaling folded in saves the separate read+write of every gradient that clip_grad_norm_
// does, and frozen rows (per-row masks) are never touched, so they cost no bandwidth at all.
// Frozen elements (per-element masks) keep param, exp_avg and exp_avg_sq bit-identical.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../adamw_scalars.h"
#include "vec_utils.h"

namespace pyfast::cpu {
namespace {

template <typename P, typename S>
inline void adamw_scalar(P* p, const P* g, S* m, S* v, const AdamWScalars& h, float scale) {
  const float gf = sload(g) * scale;
  float mf = sload(m), vf = sload(v), pf = sload(p);
  pf = pf * h.decay;
  mf = std::fma(h.beta1_w, gf - mf, mf);
  vf = vf * h.beta2;
  vf = vf + (h.beta2_c * gf) * gf;
  const float denom = std::sqrt(vf) / h.bc2_sqrt + h.eps;
  pf = pf + (h.neg_step * mf) / denom;
  sstore(p, pf);
  sstore(m, mf);
  sstore(v, vf);
}

template <typename P, typename S>
void adamw_range(P* p, const P* g, S* m, S* v, int64_t b, int64_t e, const uint8_t* emask,
                 const AdamWScalars& h, float scale) {
  const Vec beta1_w(h.beta1_w), beta2(h.beta2), beta2_c(h.beta2_c), decay(h.decay),
      neg_step(h.neg_step), bc2_sqrt(h.bc2_sqrt), eps(h.eps), vscale(scale);
  constexpr int64_t W = Vec::size();
  int64_t i = b;
  for (; i + W <= e; i += W) {
    int state = 1;
    if (emask != nullptr) {
      state = mask_block_state(emask + i);
      if (state == 0) continue;
    }
    const Vec gf = vload(g + i) * vscale;
    const Vec p0 = vload(p + i), m0 = vload(m + i), v0 = vload(v + i);
    const Vec mf = at::vec::fmadd(beta1_w, gf - m0, m0);
    const Vec vf = v0 * beta2 + (beta2_c * gf) * gf;
    const Vec denom = vf.sqrt() / bc2_sqrt + eps;
    Vec pf = p0 * decay;
    pf = pf + (neg_step * mf) / denom;
    if (state == 2) {
      const Vec keep = lane_mask(emask + i);
      vstore(p + i, Vec::blendv(p0, pf, keep));
      vstore(m + i, Vec::blendv(m0, mf, keep));
      vstore(v + i, Vec::blendv(v0, vf, keep));
    } else {
      vstore(p + i, pf);
      vstore(m + i, mf);
      vstore(v + i, vf);
    }
  }
  for (; i < e; ++i) {
    if (emask != nullptr && emask[i] == 0) continue;
    adamw_scalar(p + i, g + i, m + i, v + i, h, scale);
  }
}

template <typename P, typename S>
void adamw_item(const WorkItem& w, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const AdamWScalars& h, float scale) {
  adamw_range(params[w.t].data_ptr<P>(), grads[w.t].const_data_ptr<P>(),
              exp_avgs[w.t].data_ptr<S>(), exp_avg_sqs[w.t].data_ptr<S>(), w.begin, w.end,
              w.emask, h, scale);
}

}  // namespace
}  // namespace pyfast::cpu

namespace pyfast {

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, const OptTensorList& masks, double lr,
                     double beta1, double beta2, double eps, double weight_decay, int64_t step,
                     const std::optional<at::Tensor>& grad_scale) {
  using namespace cpu;
  constexpr const char* op = "fused_adamw_";
  check_adamw_args(op, params, grads, exp_avgs, exp_avg_sqs, masks);
  check_adamw_hyper(op, lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;

  float scale = 1.0f;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat, op,
                ": grad_scale must be a one-element float32 tensor, got ", grad_scale->sizes(),
                " ", grad_scale->scalar_type());
    scale = grad_scale->item<float>();
  }
  const AdamWScalars h = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const std::vector<WorkItem> items = plan_work(op, params, masks);
  const bool p_bf16 = params[0].scalar_type() == at::kBFloat16;
  const bool s_bf16 = exp_avgs[0].scalar_type() == at::kBFloat16;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const WorkItem& w = items[k];
      if (!p_bf16 && !s_bf16) adamw_item<float, float>(w, params, grads, exp_avgs, exp_avg_sqs, h, scale);
      else if (!p_bf16) adamw_item<float, BFloat16>(w, params, grads, exp_avgs, exp_avg_sqs, h, scale);
      else if (!s_bf16) adamw_item<BFloat16, float>(w, params, grads, exp_avgs, exp_avg_sqs, h, scale);
      else adamw_item<BFloat16, BFloat16>(w, params, grads, exp_avgs, exp_avg_sqs, h, scale);
    }
  });
}

}  // namespace pyfast

TORCH_LIBRARY_IMPL(pyfast, CPU, m) { m.impl("fused_adamw_", &pyfast::fused_adamw_cpu); }

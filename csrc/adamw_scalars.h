// The per-step scalars of AdamW, formed on the host in double (as torch.optim.AdamW forms them in
// Python) and rounded once to float. Shared by the CPU and CUDA fused_adamw_ kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace pyfast {

struct AdamWScalars {
  float beta1_w;   // 1 - beta1 (the lerp weight of exp_avg towards grad)
  float beta2;     // beta2
  float beta2_c;   // 1 - beta2
  float decay;     // 1 - lr * weight_decay
  float neg_step;  // -lr / (1 - beta1^t)
  float bc2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
};

inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps,
                                  double weight_decay, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<float>(1.0 - beta1),        static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),        static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(-(lr / bc1)),        static_cast<float>(std::sqrt(bc2)),
          static_cast<float>(eps)};
}

}  // namespace pyfast

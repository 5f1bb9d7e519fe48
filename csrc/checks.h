// Argument checks shared by every kernel. Each message names the op and the argument so that a
// user reading it knows what to fix without opening the source.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string>

#include <ATen/core/List.h>

#include "ops.h"

namespace pyfast {

// A tensor list that is either empty (feature unused) or has exactly `n` entries.
inline void check_list_len(const char* op, const char* arg, size_t got, size_t n, bool allow_empty) {
  TORCH_CHECK((allow_empty && got == 0) || got == n, op, ": ", arg, " must have ", n,
              " entries (one per param)", allow_empty ? " or be empty" : "", ", got ", got);
}

inline void check_float_dtype(const char* op, const char* arg, size_t i, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", arg,
              "[", i, "] must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* arg, size_t i, const at::Tensor& t,
                              const at::Device& device) {
  TORCH_CHECK(t.device() == device, op, ": ", arg, "[", i, "] is on ", t.device(),
              " but params[0] is on ", device, "; all tensors must share one device");
}

inline void check_same_numel(const char* op, const char* arg, size_t i, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", arg, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", ref.sizes());
}

inline void check_contiguous(const char* op, const char* arg, size_t i, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, "[", i,
              "] must be contiguous (call .contiguous() on it, or keep optimizer state dense)");
}

// Kind of trainable mask for one tensor: none, one flag per element, or one flag per row
// (dim 0), e.g. embedding / lm_head rows of new tokens.
enum class MaskKind { kNone, kElement, kRow };

// Validates mask `i` against `param` and returns its kind. Masks are bool or uint8, true = trainable.
inline MaskKind check_mask(const char* op, size_t i, const std::optional<at::Tensor>& mask,
                           const at::Tensor& param) {
  if (!mask.has_value() || !mask->defined()) return MaskKind::kNone;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte, op, ": masks[", i,
              "] must be bool or uint8 (true = trainable), got ", m.scalar_type());
  TORCH_CHECK(m.device() == param.device(), op, ": masks[", i, "] is on ", m.device(),
              " but its param is on ", param.device());
  TORCH_CHECK(m.is_contiguous(), op, ": masks[", i, "] must be contiguous");
  if (m.sizes() == param.sizes()) return MaskKind::kElement;
  TORCH_CHECK(param.dim() >= 1 && m.dim() == 1 && m.size(0) == param.size(0), op, ": masks[", i,
              "] must have the param's shape ", param.sizes(), " (per element) or shape [",
              param.dim() >= 1 ? param.size(0) : 0, "] (per row), got ", m.sizes());
  return MaskKind::kRow;
}

// Shared by the CPU and CUDA fused_adamw_: list lengths, dtypes, devices, shapes, layout.
inline void check_adamw_args(const char* op, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      const OptTensorList& masks) {
  const size_t n = params.size();
  check_list_len(op, "grads", grads.size(), n, false);
  check_list_len(op, "exp_avgs", exp_avgs.size(), n, false);
  check_list_len(op, "exp_avg_sqs", exp_avg_sqs.size(), n, false);
  check_list_len(op, "masks", masks.size(), n, true);
  if (n == 0) return;
  const at::Device dev = params[0].device();
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    check_float_dtype(op, "params", i, params[i]);
    check_same_device(op, "params", i, params[i], dev);
    check_same_device(op, "grads", i, grads[i], dev);
    check_same_device(op, "exp_avgs", i, exp_avgs[i], dev);
    check_same_device(op, "exp_avg_sqs", i, exp_avg_sqs[i], dev);
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), op, ": grads[", i,
                "] has dtype ", grads[i].scalar_type(), " but params[", i, "] has dtype ",
                params[i].scalar_type());
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i,
                "] has dtype ", params[i].scalar_type(), " but params[0] has ",
                params[0].scalar_type(), "; call once per dtype");
    check_float_dtype(op, "exp_avgs", i, exp_avgs[i]);
    TORCH_CHECK(exp_avgs[i].scalar_type() == state_dtype &&
                    exp_avg_sqs[i].scalar_type() == state_dtype,
                op, ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must both have dtype ",
                state_dtype, " (the dtype of exp_avgs[0]), got ", exp_avgs[i].scalar_type(),
                " and ", exp_avg_sqs[i].scalar_type());
    check_same_numel(op, "grads", i, grads[i], params[i]);
    check_same_numel(op, "exp_avgs", i, exp_avgs[i], params[i]);
    check_same_numel(op, "exp_avg_sqs", i, exp_avg_sqs[i], params[i]);
    check_contiguous(op, "params", i, params[i]);
    check_contiguous(op, "grads", i, grads[i]);
    check_contiguous(op, "exp_avgs", i, exp_avgs[i]);
    check_contiguous(op, "exp_avg_sqs", i, exp_avg_sqs[i]);
  }
}

inline void check_adamw_hyper(const char* op, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int64_t step) {
  TORCH_CHECK(lr >= 0.0, op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count after this update), got ", step);
}

}  // namespace pyfast

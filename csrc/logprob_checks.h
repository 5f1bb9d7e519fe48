// Argument checks shared by the CPU and CUDA token_logprobs / linear_token_logprobs kernels.
// Every message names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace pyfast {

// The accumulation / output dtype of log-probs and logsumexp for inputs of dtype `dt`.
inline at::ScalarType acc_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// Every label is in [0, V) or equals ignore_index. On CUDA this costs one host synchronisation.
inline void check_label_range(const char* op, const at::Tensor& labels, int64_t V,
                              int64_t ignore_index) {
  if (labels.is_cpu()) {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      const int64_t l = lab[i];
      TORCH_CHECK(l == ignore_index || (l >= 0 && l < V), op, ": labels[", i, "] = ", l,
                  " is out of range for a vocabulary of ", V, " (must be in [0, ", V,
                  ") or equal ignore_index=", ignore_index, ")");
    }
    return;
  }
  const at::Tensor bad = (labels != ignore_index) & ((labels < 0) | (labels >= V));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero().select(1, 0).select(0, 0).item<int64_t>();
  TORCH_CHECK(false, op, ": labels[", i, "] = ", labels.select(0, i).item<int64_t>(),
              " is out of range for a vocabulary of ", V, " (must be in [0, ", V,
              ") or equal ignore_index=", ignore_index, ")");
}

// logits (N, V) float32 / bfloat16 / float64 and labels (N,) int64 on one device; returns logits
// with unit column stride (a copy only when the vocabulary dim is strided).
inline at::Tensor check_logits_labels(const char* op, const at::Tensor& logits,
                                      const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ", logits.sizes(),
              " (pyfast.ops.token_logprobs flattens leading dims)");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": logits must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op,
              ": labels must have shape [", logits.size(0), "] (one per row of logits), got ",
              labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels is on ", labels.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, op,
              ": logits must have a non-empty vocabulary dimension, got shape ", logits.sizes());
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// A per-row float vector argument (grad_logprobs, grad_lse, lse): shape [n], on `device`,
// returned contiguous in the accumulation dtype.
inline at::Tensor check_row_vector(const char* op, const char* arg, const at::Tensor& t,
                                   int64_t n, const at::Device& device, at::ScalarType acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", arg, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), " but the inputs are on ",
              device);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", arg, " must be floating point, got ",
              t.scalar_type());
  return t.to(acc).contiguous();
}

// The logit map of the fused head: z = scale * logits, then softcap * tanh(z / softcap) when
// softcap > 0.
inline void check_logit_map(const char* op, double scale, double softcap) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op,
              ": softcap must be finite and >= 0 (0 turns soft-capping off), got ", softcap);
}

inline void check_linear_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& labels, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be 2-D (N, D), got shape ", hidden.sizes(),
              " (pyfast.ops.linear_token_logprobs flattens leading dims)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (V, D) (the lm_head weight), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight has shape ", weight.sizes(),
              " but hidden has ", hidden.size(1), " features; weight must be (V, ",
              hidden.size(1), ")");
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row (vocabulary entry)");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": hidden must be float32, bfloat16 or float64, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight must have hidden's dtype ", dt, ", got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op,
              ": labels must have shape [", hidden.size(0), "] (one per row of hidden), got ",
              labels.sizes());
  TORCH_CHECK(labels.device() == hidden.device(), op, ": labels is on ", labels.device(),
              " but hidden is on ", hidden.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias must have hidden's dtype ", dt, ", got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), op, ": bias is on ", bias->device(),
                " but hidden is on ", hidden.device());
  }
}

}  // namespace pyfast

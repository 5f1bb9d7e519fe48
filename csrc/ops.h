// Declarations of every kernel entry point. The schemas live in registration.cpp; CPU
// implementations in cpu/<stem>.cpp, CUDA implementations in cuda/<stem>.cu.
#pragma once

#include <torch/types.h>

#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/List.h>

namespace pyfast {

using TensorList = at::TensorList;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

// fused_adamw_: AdamW over a tensor list in one pass (see cpu/fused_adamw.cpp for the math).
void fused_adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, const OptTensorList& masks, double lr, double beta1,
                     double beta2, double eps, double weight_decay, int64_t step,
                     const std::optional<at::Tensor>& grad_scale);
// grad_norm: global L2 norm of a tensor list (trainable elements only when masks are given).
at::Tensor grad_norm_cpu(TensorList tensors, const OptTensorList& masks);
// grad_mask_: zero the frozen elements / rows of each tensor in place.
void grad_mask_cpu(TensorList grads, const OptTensorList& masks);
// token_logprobs: log p(label), is_argmax, lse per row of logits (see cpu/token_logprobs.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits,
                                                                  const at::Tensor& labels,
                                                                  int64_t ignore_index);
at::Tensor token_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                       const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse, int64_t ignore_index);
// linear_token_logprobs: the same from hidden states and the lm_head weight, vocabulary-chunked,
// of the logits mapped by scale and softcap; backward / with_grad compute the grads that
// output_mask (hidden, weight, bias) asks for, the others come back undefined.
using LinearGrads =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>;
using LinearOutputsWithGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>>;
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double scale, double softcap);
LinearGrads linear_token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index,
    double scale, double softcap, std::array<bool, 3> output_mask);
LinearOutputsWithGrads linear_token_logprobs_with_grad_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, const at::Tensor& grad_logprobs,
    double scale, double softcap, std::array<bool, 3> output_mask);
// rms_norm: Llama-family RMSNorm (y, per-row rstd); rms_norm_backward -> (grad_x, grad_weight).
std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd);
// swiglu: silu(gate) * up; swiglu_backward -> (grad_gate, grad_up).
at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up);
// swiglu_: swiglu written over gate (inference).
void swiglu_inplace_cpu(at::Tensor& gate, const at::Tensor& up);
// rms_norm_offset: Gemma-family RMSNorm, (x * rstd) * (offset + weight) rounded once; backward.
std::tuple<at::Tensor, at::Tensor> rms_norm_offset_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       double eps, double offset);
std::tuple<at::Tensor, at::Tensor> rms_norm_offset_backward_cpu(const at::Tensor& grad,
                                                                const at::Tensor& x,
                                                                const at::Tensor& weight,
                                                                const at::Tensor& rstd,
                                                                double offset);
// geglu: gelu_tanh(gate) * up; geglu_ in place over gate; geglu_backward -> (grad_gate, grad_up).
at::Tensor geglu_cpu(const at::Tensor& gate, const at::Tensor& up);
void geglu_inplace_cpu(at::Tensor& gate, const at::Tensor& up);
std::tuple<at::Tensor, at::Tensor> geglu_backward_cpu(const at::Tensor& grad,
                                                      const at::Tensor& gate,
                                                      const at::Tensor& up);
// trie_attention: attention over one row of depth-first prefix tries, query i seeing key j
// exactly when j <= i < end[j]; (1, T, H, D) out.
at::Tensor trie_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& end, double scale);
// rotary: (q_embed, k_embed) = x * cos + rotate_half(x) * sin; rotary_backward: its transpose.
std::tuple<at::Tensor, at::Tensor> rotary_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> rotary_backward_cpu(const at::Tensor& grad_q,
                                                       const at::Tensor& grad_k,
                                                       const at::Tensor& cos,
                                                       const at::Tensor& sin);

#ifdef PYFAST_WITH_CUDA
void fused_adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                      TensorList exp_avg_sqs, const OptTensorList& masks, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step,
                      const std::optional<at::Tensor>& grad_scale);
at::Tensor grad_norm_cuda(TensorList tensors, const OptTensorList& masks);
void grad_mask_cuda(TensorList grads, const OptTensorList& masks);
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits,
                                                                  const at::Tensor& labels,
                                                                  int64_t ignore_index);
at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logprobs,
                                       const std::optional<at::Tensor>& grad_lse,
                                       const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double scale, double softcap);
LinearGrads linear_token_logprobs_backward_cuda(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index,
    double scale, double softcap, std::array<bool, 3> output_mask);
LinearOutputsWithGrads linear_token_logprobs_with_grad_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, const at::Tensor& grad_logprobs,
    double scale, double softcap, std::array<bool, 3> output_mask);
#endif

}  // namespace pyfast

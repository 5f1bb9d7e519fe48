// The one TORCH_LIBRARY of pyfast: every op schema lives here, so this file is the index of the
// extension. Implementations register from cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

#ifndef PYFAST_TORCH_VERSION
#define PYFAST_TORCH_VERSION "unknown"
#endif

// Importing pyfast._C (an ordinary Python extension module) runs the static registrations below.
extern "C" {
// The torch this extension was compiled against, also readable from the file without loading it
// (a _C built against another torch often fails to load at all): pyfast._extension scans for it.
__attribute__((used)) const char pyfast_build_torch[] = "pyfast-build-torch=" PYFAST_TORCH_VERSION;

static struct PyModuleDef pyfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&pyfast_module);
  if (m == nullptr) return nullptr;
#ifdef PYFAST_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  // The SIMD level the CPU kernels were compiled for; pyfast refuses to use them on a CPU
  // that lacks it (instead of dying on an illegal instruction).
  PyModule_AddStringConstant(m, "cpu_capability", PYFAST_CPU_CAPABILITY_NAME);
  PyModule_AddStringConstant(m, "torch_version", PYFAST_TORCH_VERSION);
  return m;
}
}

TORCH_LIBRARY(pyfast, m) {
  // AdamW (decoupled weight decay, bias correction) over lists of params. grad_scale: optional
  // 0-dim float32 tensor multiplied into every gradient (the clip coefficient). masks: empty, or
  // one optional bool/uint8 tensor per param, per element or per row; frozen entries keep
  // param, exp_avg and exp_avg_sq bit-identical.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor?[] masks, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, Tensor? grad_scale=None) -> ()");
  // Global L2 norm over a tensor list, as a 0-dim float32 tensor on the tensors' device.
  m.def("grad_norm(Tensor[] tensors, Tensor?[] masks) -> Tensor");
  // Zero the gradient of frozen elements / rows in place.
  m.def("grad_mask_(Tensor(a!)[] grads, Tensor?[] masks) -> ()");

  // Target-token log-probs over logits (N, V), float32 / bfloat16 / float64 (fp32 accumulation):
  // log p(label) and lse in float32 (float64 for float64 logits), is_argmax as bool. Rows whose
  // label is ignore_index give 0, false, 0. Labels must lie in [0, V) or equal ignore_index.
  m.def(
      "token_logprobs(Tensor logits, Tensor labels, int ignore_index=-100) -> "
      "(Tensor logprobs, Tensor is_argmax, Tensor lse)");
  // d/dlogits of sum(grad_logprobs * logprobs + grad_lse * lse), from the saved lse; in the
  // logits' dtype, zero on ignored rows.
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_lse, Tensor logits, "
      "Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // The same outputs from hidden states (N, D) and the lm_head weight (V, D) (+ bias (V,)),
  // logits = z(hidden @ weight.T + bias), computed in vocabulary x row chunks so that no (N, V)
  // tensor exists in forward or backward. z(x) = scale * x, then softcap * tanh(z / softcap) when
  // softcap > 0 (Gemma-2/3 soft-capping, Granite / Cohere logit scaling), in float32 on the
  // logits as the matmul rounds them; the defaults leave the logits alone.
  m.def(
      "linear_token_logprobs(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias=None, "
      "int ignore_index=-100, float scale=1.0, float softcap=0.0) -> "
      "(Tensor logprobs, Tensor is_argmax, Tensor lse)");
  // output_mask: which of grad_hidden, grad_weight, grad_bias to compute (as ATen's *_backward
  // ops); the others are neither allocated nor computed and come back None.
  m.def(
      "linear_token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_lse, Tensor hidden, "
      "Tensor weight, Tensor labels, Tensor? bias, Tensor lse, int ignore_index, "
      "float scale=1.0, float softcap=0.0, bool[3] output_mask=[True, True, True]) -> "
      "(Tensor? grad_hidden, Tensor? grad_weight, Tensor? grad_bias)");
  // Forward outputs plus the gradient of sum(grad_logprobs * logprobs) in the same pass, for
  // callers that know the per-row weights up front (a mean loss): no recomputation later.
  m.def(
      "linear_token_logprobs_with_grad(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, "
      "int ignore_index, Tensor grad_logprobs, float scale=1.0, float softcap=0.0, "
      "bool[3] output_mask=[True, True, True]) -> (Tensor logprobs, Tensor is_argmax, "
      "Tensor lse, Tensor? grad_hidden, Tensor? grad_weight, Tensor? grad_bias)");

  // RMSNorm of Llama-family decoders over the last dimension: y = weight * (x * rstd), rstd =
  // 1 / sqrt(mean(x^2) + eps) per row (float32; float64 for float64 x), rounded as transformers'
  // LlamaRMSNorm. float32 / bfloat16 / float64; weight has x's dtype and shape [x.size(-1)].
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> "
      "(Tensor grad_x, Tensor grad_weight)");
  // SwiGLU gate: silu(gate) * up, elementwise (same shape and dtype); backward from gate and up.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_(Tensor(a!) gate, Tensor up) -> ()");  // written into gate (inference)
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  // RMSNorm of Gemma-family decoders: y = (x * rstd) * (offset + weight), in float32 (float64 for
  // float64 x), rounded to x's dtype once, as transformers' GemmaRMSNorm (offset 1.0 there).
  // weight has x's dtype, or float32 for bfloat16 x; grad_weight has the weight's dtype.
  m.def(
      "rms_norm_offset(Tensor x, Tensor weight, float eps, float offset) -> "
      "(Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_offset_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, "
      "float offset) -> (Tensor grad_x, Tensor grad_weight)");
  // GeGLU gate of Gemma-family MLPs: gelu_tanh(gate) * up (torch's F.gelu(approximate="tanh")
  // rounded to the dtype, then the product), elementwise; backward from gate and up.
  m.def("geglu(Tensor gate, Tensor up) -> Tensor");
  m.def("geglu_(Tensor(a!) gate, Tensor up) -> ()");  // written into gate (inference)
  m.def("geglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  // Attention (forward) over one unpadded row of prefix tries in depth-first order: query i sees
  // key j exactly when j <= i < end[j]. query (1, H, T, D), key/value (1, KV, T, D) with H a
  // multiple of KV (grouped-query heads share keys); end int64 (T,). Returns (1, T, H, D).
  m.def(
      "trie_attention(Tensor query, Tensor key, Tensor value, Tensor end, float scale) -> Tensor");
  // Rotary position embedding of Llama-family attention, as transformers' apply_rotary_pos_emb:
  // x * cos + rotate_half(x) * sin for q (B, H, T, D) and k (B, KV, T, D) (strided views allowed),
  // cos / sin (B or 1, T, D); contiguous outputs. Backward: g * cos + rotate_half^T(g * sin), laid
  // out as (B, T, H, D) (q's layout in transformers: the projections' gradients need no copy).
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_embed, Tensor k_embed)");
  m.def(
      "rotary_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> "
      "(Tensor grad_q_in, Tensor grad_k_in)");
}

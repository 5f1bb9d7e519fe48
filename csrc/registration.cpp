// The one TORCH_LIBRARY of pyfast: every op schema lives here, so this file is the index of the
// extension. Implementations register from cpu/*.cpp and cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// Importing pyfast._C (an ordinary Python extension module) runs the static registrations below.
extern "C" {
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
}

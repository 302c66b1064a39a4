// Schemas of the pssr ops, declared once; implementations register per device in cpu/ and cuda/.
// The fake (meta) kernels and the autograd formula are registered from Python
// (pssr/ops/_extension.py), as in pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import pssr._C` loads this library and so runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pssr, m) {
  // grad (B, C, H, W) -> score (B, H, W); float32 for half/bfloat16 gradients.
  m.def("saliency_score(Tensor grad, str reduce) -> Tensor");
  // -> (x_surgered (B, C, H, W), mask bool (B, 1, H, W)); k is used by mode 'topk' only.
  m.def(
      "pixel_surgery(Tensor x, Tensor grad, float alpha, int k, float fill, str mode, str reduce)"
      " -> (Tensor, Tensor)");
}

// td_ops.cpp -- the schemas of backend "native" and the Python module td_kernels._C.
//
// Layout follows pytorch/extension-cpp: every schema in one TORCH_LIBRARY block here, one
// TORCH_LIBRARY_IMPL per device (td_cpu.cpp, td_cuda_binding.cpp), fake (meta) kernels in
// Python (td_kernels/native.py). The namespace is td_kernels_native because td_kernels itself
// already holds the public Python custom ops of the same names, which call these.
// Autograd is the public ops' business (td_kernels/ops.py); these ops are plain kernels.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing td_kernels._C loads this library, whose static initializers
// register the ops below with the dispatcher. WITH_CUDA says whether CUDA kernels were built.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "td_kernels native kernels: torch.ops.td_kernels_native.*",
      -1,    // no per-interpreter state
      NULL,  // methods: none, the ops are reached through torch.ops
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == NULL) return NULL;
#ifdef TD_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
}

// The argument names and order match the registry's launchers (td_kernels/_registry.py);
// k, seed and drop_threshold are int64 (drop_threshold reaches 2**32).
TORCH_LIBRARY(td_kernels_native, m) {
  m.def("weight_dropout(Tensor w, int seed, int k, int drop_threshold) -> (Tensor, Tensor)");
  m.def("weight_dropout_backward(Tensor grad, Tensor w, Tensor limit, int seed, int drop_threshold) -> Tensor");
  m.def("unit_dropout(Tensor w, int seed, int k, int drop_threshold) -> (Tensor, Tensor)");
  m.def("unit_dropout_backward(Tensor grad, Tensor keep) -> Tensor");
}

// td_ops.cpp -- the schemas of backend "native" and the Python module td_kernels._C.
//
// Layout follows pytorch/extension-cpp: every schema in one TORCH_LIBRARY block here, one
// TORCH_LIBRARY_IMPL per device (td_cpu.cpp, td_cuda_binding.cpp), fake (meta) kernels in
// Python (td_kernels/backends/native.py). The namespace is td_kernels_native because td_kernels itself
// already holds the public Python custom ops of the same names, which call these.
// Autograd is the public ops' business (td_kernels/ops.py); these ops are plain kernels.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/td_cpu_philox.h"  // TD_HAVE_AVX2_PATH, best_simd

namespace {
// _C.BUILD_INFO: what this build holds, for `td-kernels info`. setup.py passes the CUDA part as
// plain integers (TD_CUDA_SMS=80090 TD_CUDA_PTX=90 TD_NVCC_MAJOR=13 TD_NVCC_MINOR=0): macro
// values with spaces or quotes do not survive the build's shell, and nvcc splits a -D value at
// its commas (TD_CUDA_SMS=80,90 would define a macro named 90).
std::string build_info() {
  std::string s = "cpu: ";
#if defined(__x86_64__)
  s += "x86-64";
#elif defined(__aarch64__)
  s += "arm64";
#else
  s += "generic";
#endif
#if defined(__clang__)
  s += " (clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__) + ")";
#elif defined(__GNUC__)
  s += " (gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + ")";
#endif
#if TD_HAVE_AVX2_PATH
  s += ", AVX2 and AVX-512 loops (Philox, selection, apply) dispatched at run time (this CPU: ";
  const td::Simd simd = td::best_simd();
  s += simd == td::Simd::kAvx512 ? "AVX-512)" : simd == td::Simd::kAvx2 ? "AVX2)" : "portable loops)";
#else
  s += ", portable loops";
#endif
#ifdef TD_WITH_CUDA
  // TD_CUDA_SMS holds the architectures three decimal digits each (80090: sm_80, sm_90)
  std::string sms;
  for (long long v = TD_CUDA_SMS; v > 0; v /= 1000) sms = ", sm_" + std::to_string(v % 1000) + sms;
  s += "; cuda: " + sms.substr(2);
  s += " (+compute_" + std::to_string(TD_CUDA_PTX) + " PTX), nvcc " + std::to_string(TD_NVCC_MAJOR) + "." +
       std::to_string(TD_NVCC_MINOR);
#else
  s += "; cuda: not built";
#endif
  return s;
}
}  // namespace

extern "C" {
// A module without functions: importing td_kernels._C loads this library, whose static
// initializers register the ops below with the dispatcher. WITH_CUDA says whether CUDA kernels
// were built, BUILD_INFO describes the build.
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
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "BUILD_INFO", build_info().c_str()) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
}

// The argument names and order match the registry's launchers (td_kernels/_registry.py);
// k, seed and drop_threshold are int64 (drop_threshold reaches 2**32). (origin, row_stride) is
// the window (SPEC section 12; (0, F) for a whole weight). Without bits, "bits" outputs are
// empty int32 tensors; with bits, int32 [U, ceil(F/32)] (reference.pack_bits). A limit given
// to weight_dropout replaces the selection (k is then unused) and comes back as a copy. dseed,
// when given, is the graph-safe seed (SPEC section 9): a 0-dim int64 tensor on w's device that
// the kernels read instead of `seed` (td_checks.h, check_dseed). `fused` picks the CUDA weight
// forward that selects and applies in one kernel (td_cuda.h, WeightForward; the CPU ignores it).
TORCH_LIBRARY(td_kernels_native, m) {
  m.def("weight_dropout(Tensor w, int seed, int k, int drop_threshold, int origin, int row_stride, "
        "Tensor? limit, bool bits, Tensor? dseed=None, bool fused=False) -> (Tensor, Tensor, Tensor)");
  m.def("weight_dropout_backward(Tensor grad, Tensor? w, Tensor? limit, int seed, int drop_threshold, "
        "int origin, int row_stride, Tensor? bits, Tensor? dseed=None) -> Tensor");
  m.def("nm_dropout(Tensor w, int seed, int n, int m, int drop_threshold, int origin, int row_stride, "
        "bool bits, Tensor? dseed=None) -> (Tensor, Tensor)");
  m.def("nm_dropout_backward(Tensor grad, Tensor? w, int seed, int n, int m, int drop_threshold, "
        "int origin, int row_stride, Tensor? bits, Tensor? dseed=None) -> Tensor");
  m.def("unit_dropout(Tensor w, int seed, int k, int drop_threshold, Tensor? dseed=None) -> (Tensor, Tensor)");
  m.def("unit_dropout_backward(Tensor grad, Tensor keep) -> Tensor");
}

// td_cuda_binding.cpp -- tensors -> the torch-free CUDA launchers of td_cuda.cu, registered
// as the CUDA implementation of the td_kernels_native ops (schemas in td_ops.cpp). Checks
// the arguments (td_checks.h), runs on the tensor's device and current stream, and checks
// each launcher's launches (C10_CUDA_CHECK on the returned error, then
// C10_CUDA_KERNEL_LAUNCH_CHECK).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../td_checks.h"
#include "td_cuda.h"

namespace td_native {
namespace {

td_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return td_cuda::DType::kFloat32;
    case at::kHalf: return td_cuda::DType::kFloat16;
    case at::kBFloat16: return td_cuda::DType::kBFloat16;
    case at::kDouble: return td_cuda::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
}

#define TD_CUDA_RUN(call)           \
  do {                              \
    C10_CUDA_CHECK(call);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK(); \
  } while (0)

inline td::Window window_of(int64_t origin, int64_t row_stride) {
  return td::Window{(uint64_t)origin, (uint64_t)row_stride};
}
// the device seed (check_dseed) as the launchers take it: a device pointer, or null
inline const int64_t* seed_ptr(const std::optional<at::Tensor>& dseed, const at::Tensor& w) {
  check_dseed(dseed, w);
  return dseed.has_value() ? dseed->data_ptr<int64_t>() : nullptr;
}
inline uint32_t* words(const at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }
inline const uint32_t* words_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const uint32_t*>(t->data_ptr<int32_t>()) : nullptr;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_dropout_cuda(const at::Tensor& w, int64_t seed, int64_t k,
                                                                   int64_t drop_threshold, int64_t origin,
                                                                   int64_t row_stride,
                                                                   const std::optional<at::Tensor>& limit,
                                                                   bool bits, const std::optional<at::Tensor>& dseed,
                                                                   bool fused) {
  check_weight_dropout(w, seed, k, drop_threshold, origin, row_stride, limit, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty_like(w);
  // a given limit is copied (an op's output may not alias its input), then used as is
  at::Tensor lim = limit.has_value() ? limit->clone() : at::empty({w.size(0)}, w.options().dtype(at::kInt));
  at::Tensor bt = new_bits(w, bits);
  if (w.numel() == 0) {
    if (!limit.has_value()) lim.fill_(-1);  // F = 0: k = 0
    return {out, lim, bt};
  }
  TD_CUDA_RUN(td_cuda::weight_dropout(dtype_of(w), w.data_ptr(), out.data_ptr(), lim.data_ptr<int32_t>(),
                                      limit.has_value(), bits ? words(bt) : nullptr, w.size(0), w.size(1), k,
                                      (uint64_t)seed, seed_ptr(dseed, w), (uint64_t)drop_threshold,
                                      window_of(origin, row_stride),
                                      fused ? td_cuda::WeightForward::kFused : td_cuda::WeightForward::kTwoPass,
                                      c10::cuda::getCurrentCUDAStream()));
  return {out, lim, bt};
}

at::Tensor weight_dropout_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& w,
                                        const std::optional<at::Tensor>& limit, int64_t seed, int64_t drop_threshold,
                                        int64_t origin, int64_t row_stride, const std::optional<at::Tensor>& bits,
                                        const std::optional<at::Tensor>& dseed) {
  check_weight_dropout_backward(grad, w, limit, bits, seed, drop_threshold, origin, row_stride, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  const bool use_bits = bits.has_value();
  TD_CUDA_RUN(td_cuda::weight_dropout_backward(
      dtype_of(grad), grad.data_ptr(), use_bits ? nullptr : w->data_ptr(),
      use_bits ? nullptr : limit->data_ptr<int32_t>(), words_or_null(bits), out.data_ptr(), grad.size(0),
      grad.size(1), (uint64_t)seed, seed_ptr(dseed, grad), (uint64_t)drop_threshold, window_of(origin, row_stride),
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> nm_dropout_cuda(const at::Tensor& w, int64_t seed, int64_t n, int64_t m,
                                                   int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                                   bool bits, const std::optional<at::Tensor>& dseed) {
  check_nm_dropout(w, seed, n, m, drop_threshold, origin, row_stride, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty_like(w);
  at::Tensor bt = new_bits(w, bits);
  if (w.numel() == 0) return {out, bt};
  TD_CUDA_RUN(td_cuda::nm_dropout(dtype_of(w), w.data_ptr(), out.data_ptr(), bits ? words(bt) : nullptr, w.size(0),
                                  w.size(1), (int)n, (int)m, (uint64_t)seed, seed_ptr(dseed, w), (uint64_t)drop_threshold,
                                  window_of(origin, row_stride), c10::cuda::getCurrentCUDAStream()));
  return {out, bt};
}

at::Tensor nm_dropout_backward_cuda(const at::Tensor& grad, const std::optional<at::Tensor>& w, int64_t seed,
                                    int64_t n, int64_t m, int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                    const std::optional<at::Tensor>& bits, const std::optional<at::Tensor>& dseed) {
  check_nm_dropout_backward(grad, w, bits, seed, n, m, drop_threshold, origin, row_stride, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  TD_CUDA_RUN(td_cuda::nm_dropout_backward(dtype_of(grad), grad.data_ptr(), bits.has_value() ? nullptr : w->data_ptr(),
                                           words_or_null(bits), out.data_ptr(), grad.size(0), grad.size(1), (int)n,
                                           (int)m, (uint64_t)seed, seed_ptr(dseed, grad), (uint64_t)drop_threshold,
                                           window_of(origin, row_stride), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> unit_dropout_cuda(const at::Tensor& w, int64_t seed, int64_t k,
                                                     int64_t drop_threshold, const std::optional<at::Tensor>& dseed) {
  check_unit_dropout(w, seed, k, drop_threshold, c10::kCUDA);
  const int64_t U = w.size(0);
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor out = at::empty_like(w);
  at::Tensor keep = at::empty({U}, w.options().dtype(at::kBool));
  // the norms: float32 (squares summed in float64, rounded once), float64 for float64 weights
  at::Tensor norms = at::empty({U}, w.options().dtype(w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  TD_CUDA_RUN(td_cuda::unit_dropout(dtype_of(w), w.data_ptr(), out.data_ptr(), keep.data_ptr<bool>(),
                                    norms.data_ptr(), U, w.size(1), k, (uint64_t)seed, seed_ptr(dseed, w),
                                    (uint64_t)drop_threshold,
                                    c10::cuda::getCurrentCUDAStream()));
  return {out, keep};
}

at::Tensor unit_dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& keep) {
  check_unit_dropout_backward(grad, keep, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  TD_CUDA_RUN(td_cuda::unit_dropout_backward(dtype_of(grad), grad.data_ptr(), keep.data_ptr<bool>(),
                                             out.data_ptr(), grad.size(0), grad.size(1),
                                             c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(td_kernels_native, CUDA, m) {
  m.impl("weight_dropout", &weight_dropout_cuda);
  m.impl("weight_dropout_backward", &weight_dropout_backward_cuda);
  m.impl("nm_dropout", &nm_dropout_cuda);
  m.impl("nm_dropout_backward", &nm_dropout_backward_cuda);
  m.impl("unit_dropout", &unit_dropout_cuda);
  m.impl("unit_dropout_backward", &unit_dropout_backward_cuda);
}

}  // namespace td_native

// td_checks.h -- argument checks shared by the CPU and CUDA bindings. Each names the argument
// (as flash-attention's CHECK_DEVICE / CHECK_SHAPE do) and raises ValueError or TypeError in
// Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), never a bare RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#define TD_CHECK_DEVICE(x, dev_type)                                                        \
  TORCH_CHECK_VALUE((x).device().type() == (dev_type), #x " must be a ", (dev_type),      \
                    " tensor, got one on ", (x).device())
#define TD_CHECK_SAME_DEVICE(x, y)                                                          \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " and " #y " must be on one device, got ", \
                    (x).device(), " and ", (y).device())
#define TD_CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define TD_CHECK_DIM(x, n) \
  TORCH_CHECK_VALUE((x).dim() == (n), #x " must have ", (n), " dimensions, got shape ", (x).sizes())
#define TD_CHECK_SHAPE(x, ...)                                                              \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (", \
                    #__VA_ARGS__, "), got ", (x).sizes())
#define TD_CHECK_DTYPE(x, dt) \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), #x " must be ", (dt), ", got ", (x).scalar_type())
#define TD_CHECK_FLOAT(x)                                                                   \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||     \
                       (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
                   #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
#define TD_CHECK_RANGE(v, lo, hi)                                                           \
  TORCH_CHECK_VALUE((v) >= (lo) && (v) <= (hi), #v " must be in [", (lo), ", ", (hi), "], got ", (v))

namespace td_native {

constexpr int64_t kDropThresholdMax = int64_t(1) << 32;  // D = floor(drop_rate * 2**32)

// The checks every entry point runs on (w2d, seed, drop_threshold): the 2-D weight view.
inline void check_weight_2d(const at::Tensor& w, c10::DeviceType dev) {
  TD_CHECK_DEVICE(w, dev);
  TD_CHECK_DIM(w, 2);
  TD_CHECK_CONTIGUOUS(w);
  TD_CHECK_FLOAT(w);
}

inline void check_seed_and_threshold(int64_t seed, int64_t drop_threshold) {
  // the schema's int is int64, so seed < 2**63 holds already
  TD_CHECK_RANGE(seed, int64_t(0), INT64_MAX);
  TD_CHECK_RANGE(drop_threshold, int64_t(0), kDropThresholdMax);
}

// (grad, w) pairs of the backward: same shape, dtype and device, both contiguous 2-D.
inline void check_grad_like(const at::Tensor& grad, const at::Tensor& w, c10::DeviceType dev) {
  TD_CHECK_DEVICE(grad, dev);
  TD_CHECK_DIM(grad, 2);
  TD_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes(), "grad must have w's shape ", w.sizes(), ", got ",
                    grad.sizes());
  TD_CHECK_DTYPE(grad, w.scalar_type());
}

}  // namespace td_native

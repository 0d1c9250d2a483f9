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
// Both devices' radix selects count in uint32 (CPU histograms, CUDA shared-memory bins and
// rank k): a row (weight targeting) or the set of units (unit targeting) must hold fewer than
// 2**32 values. One limit for both devices, so an input fails or runs alike on either.
constexpr int64_t kMaxSelect = int64_t(1) << 32;

// The 2-D weight view every entry point takes.
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
  TD_CHECK_SAME_DEVICE(grad, w);
  TD_CHECK_DIM(grad, 2);
  TD_CHECK_CONTIGUOUS(grad);
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes(), "grad must have w's shape ", w.sizes(), ", got ",
                    grad.sizes());
  TD_CHECK_DTYPE(grad, w.scalar_type());
}

// ---- one check per op, shared by the CPU and CUDA bindings (dev: the binding's device) ----
// The forwards: k counts targeted elements per unit (F = w.size(1), the selection runs over a
// row) or targeted units (U = w.size(0), over the units' norms).
inline void check_forward(const at::Tensor& w, int64_t seed, int64_t k, int64_t drop_threshold,
                          c10::DeviceType dev, bool per_unit) {
  check_weight_2d(w, dev);
  check_seed_and_threshold(seed, drop_threshold);
  const int64_t n = w.size(per_unit ? 1 : 0);
  const char* what = per_unit ? "elements per unit" : "units";
  TORCH_CHECK_VALUE(n < kMaxSelect, "w must have fewer than 2**32 ", what, ", got ", n);
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, ", per_unit ? "F" : "U", " = ", n, "], got ", k);
}

inline void check_weight_dropout(const at::Tensor& w, int64_t seed, int64_t k, int64_t drop_threshold,
                                 c10::DeviceType dev) {
  check_forward(w, seed, k, drop_threshold, dev, /*per_unit=*/true);
}

inline void check_weight_dropout_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& limit,
                                          int64_t seed, int64_t drop_threshold, c10::DeviceType dev) {
  check_weight_2d(w, dev);
  check_grad_like(grad, w, dev);
  TD_CHECK_DEVICE(limit, dev);
  TD_CHECK_SAME_DEVICE(limit, w);
  TD_CHECK_DTYPE(limit, at::kInt);
  TD_CHECK_SHAPE(limit, w.size(0));
  TD_CHECK_CONTIGUOUS(limit);
  check_seed_and_threshold(seed, drop_threshold);
}

inline void check_unit_dropout(const at::Tensor& w, int64_t seed, int64_t k, int64_t drop_threshold,
                               c10::DeviceType dev) {
  check_forward(w, seed, k, drop_threshold, dev, /*per_unit=*/false);
}

inline void check_unit_dropout_backward(const at::Tensor& grad, const at::Tensor& keep, c10::DeviceType dev) {
  TD_CHECK_DEVICE(grad, dev);
  TD_CHECK_DIM(grad, 2);
  TD_CHECK_CONTIGUOUS(grad);
  TD_CHECK_FLOAT(grad);
  TD_CHECK_DEVICE(keep, dev);
  TD_CHECK_SAME_DEVICE(keep, grad);
  TD_CHECK_DTYPE(keep, at::kBool);
  TD_CHECK_SHAPE(keep, grad.size(0));
  TD_CHECK_CONTIGUOUS(keep);
}

}  // namespace td_native

// td_checks.h -- argument checks (and the bits output) shared by the CPU and CUDA bindings.
// Each check names the argument (as flash-attention's CHECK_DEVICE / CHECK_SHAPE do) and
// raises ValueError or TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), never a
// bare RuntimeError.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <optional>
#include <c10/util/Exception.h>

#include <algorithm>
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

// The graph-safe seed (SPEC section 9), when given: a 0-dim int64 tensor on w's device holding
// the seed, which the kernels read (CUDA: on the device, so a captured graph reads each replay's
// value); the int seed is then unused.
inline void check_dseed(const std::optional<at::Tensor>& dseed, const at::Tensor& w) {
  if (!dseed.has_value()) return;
  TORCH_CHECK_TYPE(dseed->scalar_type() == at::kLong, "dseed must be int64, got ", dseed->scalar_type());
  TORCH_CHECK_VALUE(dseed->dim() == 0, "dseed must be 0-dim, got shape ", dseed->sizes());
  TORCH_CHECK_VALUE(dseed->device() == w.device(), "dseed must be on ", w.device(), ", got ", dseed->device());
}

// The seed of a CPU call: dseed's value when given (a CPU tensor: no synchronization).
inline int64_t cpu_seed(int64_t seed, const std::optional<at::Tensor>& dseed, const at::Tensor& w) {
  check_dseed(dseed, w);
  if (!dseed.has_value()) return seed;
  const int64_t s = *dseed->data_ptr<int64_t>();
  TORCH_CHECK_VALUE(s >= 0, "dseed must hold a seed in [0, 2**63), got ", s);
  return s;
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
// A window (origin, row_stride) of a global weight (SPEC section 12), as reference.check_window:
// local rows must fit in global rows and every stream position stays below 2**62.
inline void check_window(int64_t origin, int64_t row_stride, int64_t U, int64_t F) {
  TORCH_CHECK_VALUE(origin >= 0, "window origin must be >= 0, got ", origin);
  TORCH_CHECK_VALUE(row_stride >= F && (row_stride == 0 || origin % row_stride + F <= row_stride),
                    "window (origin=", origin, ", row_stride=", row_stride, ") cannot hold rows of F=", F,
                    " elements: origin % row_stride + F must be <= row_stride");
  const int64_t lim = int64_t(1) << 62, rows = std::max<int64_t>(U, 1), stride = std::max<int64_t>(row_stride, 1);
  TORCH_CHECK_VALUE(origin < lim && rows <= (lim - origin) / stride && origin + rows * stride < lim, "window (origin=",
                    origin, ", row_stride=", row_stride, ") reaches past 2**62 positions");
}

// An int32 [U] tensor on the weight's device (a limit, given or saved by the forward).
inline void check_limit(const at::Tensor& limit, const at::Tensor& w, c10::DeviceType dev) {
  TD_CHECK_DEVICE(limit, dev);
  TD_CHECK_SAME_DEVICE(limit, w);
  TD_CHECK_DTYPE(limit, at::kInt);
  TD_CHECK_SHAPE(limit, w.size(0));
  TD_CHECK_CONTIGUOUS(limit);
}

// A bit-packed keep mask for grad [U, F]: int32 [U, ceil(F / 32)] on grad's device.
inline void check_bits(const at::Tensor& bits, const at::Tensor& grad, c10::DeviceType dev) {
  TD_CHECK_DEVICE(bits, dev);
  TD_CHECK_SAME_DEVICE(bits, grad);
  TD_CHECK_DTYPE(bits, at::kInt);
  TD_CHECK_SHAPE(bits, grad.size(0), (grad.size(1) + 31) / 32);
  TD_CHECK_CONTIGUOUS(bits);
}

// N:M (SPEC section 11): 1 <= n < m <= 16 and m divides F.
inline void check_nm(int64_t n, int64_t m, int64_t F) {
  TORCH_CHECK_VALUE(1 <= n && n < m && m <= 16, "N:M targeting needs 1 <= n < m <= 16, got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(F % m == 0, "m=", m, " must divide the fan-in F=", F,
                    " (N:M groups are m consecutive weights of a unit)");
}

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

// weight targeting forward; a given limit replaces the selection (k is then unused)
inline void check_weight_dropout(const at::Tensor& w, int64_t seed, int64_t k, int64_t drop_threshold,
                                 int64_t origin, int64_t row_stride, const std::optional<at::Tensor>& limit,
                                 c10::DeviceType dev) {
  check_forward(w, seed, limit.has_value() ? 0 : k, drop_threshold, dev, /*per_unit=*/true);
  check_window(origin, row_stride, w.size(0), w.size(1));
  if (limit.has_value()) check_limit(*limit, w, dev);
}

// The backwards of weight and N:M targeting: grad (float, 2-D, contiguous) and either the bit
// mask (then w is not needed) or w (same shape and dtype as grad) to recompute the mask from.
inline void check_masked_backward(const at::Tensor& grad, const std::optional<at::Tensor>& w,
                                  const std::optional<at::Tensor>& bits, int64_t seed, int64_t drop_threshold,
                                  int64_t origin, int64_t row_stride, c10::DeviceType dev) {
  TD_CHECK_DEVICE(grad, dev);
  TD_CHECK_DIM(grad, 2);
  TD_CHECK_CONTIGUOUS(grad);
  TD_CHECK_FLOAT(grad);
  check_seed_and_threshold(seed, drop_threshold);
  check_window(origin, row_stride, grad.size(0), grad.size(1));
  if (bits.has_value()) {
    check_bits(*bits, grad, dev);
    return;
  }
  TORCH_CHECK_VALUE(w.has_value(), "w must be given when bits is None (the backward recomputes the mask from w)");
  check_weight_2d(*w, dev);
  check_grad_like(grad, *w, dev);
}

inline void check_weight_dropout_backward(const at::Tensor& grad, const std::optional<at::Tensor>& w,
                                          const std::optional<at::Tensor>& limit,
                                          const std::optional<at::Tensor>& bits, int64_t seed,
                                          int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                          c10::DeviceType dev) {
  check_masked_backward(grad, w, bits, seed, drop_threshold, origin, row_stride, dev);
  if (bits.has_value()) return;
  TORCH_CHECK_VALUE(limit.has_value(), "limit must be given when bits is None (the backward recomputes the mask)");
  check_limit(*limit, *w, dev);
}

inline void check_nm_dropout(const at::Tensor& w, int64_t seed, int64_t n, int64_t m, int64_t drop_threshold,
                             int64_t origin, int64_t row_stride, c10::DeviceType dev) {
  check_weight_2d(w, dev);
  check_seed_and_threshold(seed, drop_threshold);
  check_nm(n, m, w.size(1));
  check_window(origin, row_stride, w.size(0), w.size(1));
}

inline void check_nm_dropout_backward(const at::Tensor& grad, const std::optional<at::Tensor>& w,
                                      const std::optional<at::Tensor>& bits, int64_t seed, int64_t n, int64_t m,
                                      int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                      c10::DeviceType dev) {
  check_masked_backward(grad, w, bits, seed, drop_threshold, origin, row_stride, dev);
  check_nm(n, m, grad.size(1));
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

// The "bits" output of the forwards (shared by both bindings): int32 [U, ceil(F/32)] when
// asked for (every word is written by the kernels), else an empty int32 tensor.
inline at::Tensor new_bits(const at::Tensor& w, bool want) {
  const int64_t U = w.size(0), words = (w.size(1) + 31) / 32;
  return at::empty(want ? at::IntArrayRef{U, words} : at::IntArrayRef{0}, w.options().dtype(at::kInt));
}

}  // namespace td_native

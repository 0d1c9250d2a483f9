// td_cuda.h -- the torch-free interface of the CUDA kernels (td_cuda.cu): raw pointers, sizes
// and a stream. td_cuda_binding.cpp turns tensors into these calls. Every function launches
// its kernels on `stream` and returns the first launch error (cudaSuccess otherwise); it
// never synchronizes. `win` places the rows in the global Philox stream (td_core.h, Window);
// `bits` arrays are uint32 [U, ceil(F/32)] keep masks (reference.pack_bits). `seed_ptr`, when not
// null, points at the seed on the device (the graph-safe seed of SPEC section 9, an int64 that
// torch's generator wrote there): every kernel reads it there and `seed` is unused, so a
// captured CUDA graph uses each replay's value.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../td_core.h"

namespace td_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// How the weight forward selects: kTwoPass = _weight_select then _apply (w read twice, the
// second mostly from L2), kFused = _weight_fused, select and apply in one kernel with the row in
// shared memory (w read once; rows up to 32 KB, others take kTwoPass). Same bits either way.
enum class WeightForward : int { kTwoPass = 0, kFused = 1 };

// out, limit[U] (int32) from w [U, F]; k in [0, F]; D in [0, 2**32]. limit_given: limit
// already holds the limits (no selection, k unused). bits: keep mask to write, or null.
cudaError_t weight_dropout(DType dt, const void* w, void* out, int32_t* limit, bool limit_given, uint32_t* bits,
                           int64_t U, int64_t F, int64_t k, uint64_t seed, const int64_t* seed_ptr, uint64_t D,
                           td::Window win, WeightForward variant, cudaStream_t stream);
// grad_w = where(keep, grad, +0): keep read from bits when not null (w, limit unused), else
// recomputed from w's keys, limit and the seed
cudaError_t weight_dropout_backward(DType dt, const void* grad, const void* w, const int32_t* limit,
                                    const uint32_t* bits, void* out, int64_t U, int64_t F, uint64_t seed,
                                    const int64_t* seed_ptr, uint64_t D, td::Window win, cudaStream_t stream);
// N:M targeting (1 <= n < m <= 16, m divides F)
cudaError_t nm_dropout(DType dt, const void* w, void* out, uint32_t* bits, int64_t U, int64_t F, int n, int m,
                       uint64_t seed, const int64_t* seed_ptr, uint64_t D, td::Window win, cudaStream_t stream);
cudaError_t nm_dropout_backward(DType dt, const void* grad, const void* w, const uint32_t* bits, void* out,
                                int64_t U, int64_t F, int n, int m, uint64_t seed, const int64_t* seed_ptr,
                                uint64_t D, td::Window win, cudaStream_t stream);
// norms: a workspace of U floats (U doubles for float64), filled here
cudaError_t unit_dropout(DType dt, const void* w, void* out, bool* keep, void* norms, int64_t U, int64_t F,
                         int64_t k, uint64_t seed, const int64_t* seed_ptr, uint64_t D, cudaStream_t stream);
cudaError_t unit_dropout_backward(DType dt, const void* grad, const bool* keep, void* out, int64_t U,
                                  int64_t F, cudaStream_t stream);

}  // namespace td_cuda

// td_cuda.cu -- the CUDA kernels of backend "native" (SPEC.md sections 4-7), torch-free: raw
// pointers and a stream (interface in td_cuda.h; td_cuda_binding.cpp adapts tensors).
//
// Weight targeting forward = two kernels:
//   _weight_select  one 256-thread block per unit: a shared-memory radix select over the
//                   row's rank values (11-bit digits, 2048 shared counters, one shared-atomic
//                   count per survivor and pass; 3 passes for 31-bit keys, 2 for 16-bit types)
//                   -> limit[u] = t - 1. Reads the row once per pass (L2-resident after the
//                   first): ~1 DRAM read of w per element.
//   _apply          flat over all U*F elements (so a long row gets many blocks): each thread
//                   owns a chunk of 4 or 8 elements at a multiple-of-4 flat position, reads it
//                   with 16-byte vector loads, draws Philox once per 4 elements, writes the
//                   chunk with 16-byte stores. 1 read + 1 write of w per element, 4 bytes per
//                   unit (limit). The backward is the same kernel with grad as the values:
//                   2 reads + 1 write per element.
// Unit targeting: _unit_norms (one block per unit, reads the row once: squares summed in
// float64, the norm rounded once to float32, float64 norms for float64 weights), _unit_select
// (one block: radix select over the U norm keys, one coin per unit), then _apply in row mode
// (copy or zero each row).
// All indexing of elements is int64.
#include <cuda_runtime.h>
#include <stdint.h>

#include "td_core.h"
#include "td_cuda.h"

namespace td_cuda {
namespace {

constexpr int kThreads = 256;                         // every kernel's block size
constexpr int kBinsPerThread = td::kRadixBins / kThreads;  // 8
static_assert(kBinsPerThread * kThreads == td::kRadixBins, "bins must split evenly");

using td::FamBF16;  // dtype families (td_core.h): storage word, rank value, key, magnitude
using td::FamF16;
using td::FamF32;
using td::FamF64;

// Elements per thread chunk in _apply: one 16-byte vector, and at least one Philox block.
template <class S>
struct Chunk {
  static constexpr int kVec = 16 / (int)sizeof(S);          // elements per 16-byte access
  static constexpr int kN = kVec > 4 ? kVec : 4;             // 8 (16-bit), 4 (f32, f64)
  static constexpr int kLoads = kN / kVec;                   // 1, or 2 for float64
};

// ---- block-wide radix select (shared memory) -----------------------------------------------
struct SelectSmem {
  uint32_t hist[td::kRadixBins];
  uint32_t warp_sum[kThreads / 32];
  uint32_t bin, k;
};

// Which bin holds rank k: each thread sums its 8 bins, a block-wide exclusive scan of those
// sums finds the thread whose range holds k, and that thread scans its own 8 bins.
__device__ void block_pick_bin(SelectSmem& sm, uint32_t k) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  uint32_t c[kBinsPerThread], sum = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerThread; ++i) {
    c[i] = sm.hist[t * kBinsPerThread + i];
    sum += c[i];
  }
  uint32_t incl = sum;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_up_sync(0xFFFFFFFFu, incl, d);
    if (lane >= d) incl += y;
  }
  if (lane == 31) sm.warp_sum[warp] = incl;
  __syncthreads();
  uint32_t before = incl - sum;
  for (int w = 0; w < warp; ++w) before += sm.warp_sum[w];
  if (k >= before && k < before + sum) {  // exactly one thread: k < the survivors' count
#pragma unroll
    for (int i = 0; i < kBinsPerThread; ++i) {
      if (k < before + c[i]) {
        sm.bin = (uint32_t)(t * kBinsPerThread + i);
        sm.k = k - before;
        break;
      }
      before += c[i];
    }
  }
}

// The value at 0-based rank k among the values for_each(f) hands to f on each thread
// (every thread of the block calls this). K holds values of kBits bits.
template <int kBits, typename K, typename ForEach>
__device__ K block_radix_select(uint32_t k, ForEach for_each, SelectSmem& sm) {
  K prefix = 0;      // the bits fixed so far: survivors have (v >> prev) == prefix
  int prev = kBits;  // v >> kBits == 0 for every value: all survive the first pass
  for (int shift = td::radix_first_shift(kBits); shift >= 0; shift = td::radix_next_shift(shift)) {
    for (int i = threadIdx.x; i < td::kRadixBins; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    for_each([&](K v) {
      if ((v >> prev) == prefix) atomicAdd(&sm.hist[td::radix_digit(v, shift)], 1u);
    });
    __syncthreads();
    block_pick_bin(sm, k);
    __syncthreads();
    const int fixed = prev - shift;  // new bits fixed by this pass (the digit may overlap)
    prefix = (prefix << fixed) | (K)(sm.bin & ((1u << fixed) - 1u));
    k = sm.k;
    prev = shift;
  }
  return prefix;
}

// 16 bytes <-> 16/sizeof(S) elements, by shifts (no address-taken locals: those would go to
// local memory and count as spills).
template <class S>
__device__ __forceinline__ void unpack16(const uint4& x, S* e) {
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (sizeof(S) == 4) e[i] = (S)w[i];
    if (sizeof(S) == 2) {
      e[2 * i] = (S)(w[i] & 0xFFFFu);
      e[2 * i + 1] = (S)(w[i] >> 16);
    }
    if (sizeof(S) == 8 && i % 2 == 0) e[i / 2] = (S)((uint64_t)w[i] | ((uint64_t)w[i + 1] << 32));
  }
}
template <class S>
__device__ __forceinline__ uint4 pack16(const S* e) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (sizeof(S) == 4) w[i] = (uint32_t)e[i];
    if (sizeof(S) == 2) w[i] = (uint32_t)e[2 * i] | ((uint32_t)e[2 * i + 1] << 16);
    if (sizeof(S) == 8) w[i] = (uint32_t)((uint64_t)e[i / 2] >> (32 * (i % 2)));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Calls f(v) for each element of row[0, F) this thread owns, 16-byte loads where aligned.
template <class S, class F_>
__device__ __forceinline__ void row_for_each(const S* row, int64_t F, bool aligned, F_ f) {
  constexpr int V = 16 / (int)sizeof(S);
  if (aligned) {  // row start 16-byte aligned and F a multiple of V
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
    // not unrolled: with 4 vectors in flight ptxas spilled registers in _unit_norms
#pragma unroll 1
    for (int64_t j = threadIdx.x; j < F / V; j += kThreads) {
      S e[V];
      unpack16(__ldg(r4 + j), e);
#pragma unroll
      for (int i = 0; i < V; ++i) f(e[i]);
    }
  } else {
    for (int64_t j = threadIdx.x; j < F; j += kThreads) f(row[j]);
  }
}

// limit[u] = key(t_u) - 1 with t_u the rank-k value of row u (0 < k < F)
template <class Fm>
__global__ void __launch_bounds__(kThreads) _weight_select(const typename Fm::S* __restrict__ w,
                                                            int32_t* __restrict__ limit, int64_t U, int64_t F,
                                                            uint32_t k, bool aligned) {
  __shared__ SelectSmem sm;
  for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
    const typename Fm::S* row = w + u * F;
    const uint32_t t = block_radix_select<Fm::kBits, uint32_t>(
        k, [&](auto g) { row_for_each(row, F, aligned, [&](typename Fm::S x) { g(Fm::rv(x)); }); }, sm);
    if (threadIdx.x == 0) limit[u] = td::limit_from_threshold_key(Fm::key_from_rv(t));
    __syncthreads();  // sm is reused by the next row
  }
}

// ---- the element-wise apply (forward, backward, unit rows) ---------------------------------
enum class Mode { kWeight, kRows };

// out[p] = val[p], or +0 where dropped. kWeight: dropped iff key(wk[p]) <= limit[row] and
// word(p) < D. kRows: dropped iff !keep[row]. Thread chunks of kN elements at flat positions
// multiple of kN (so each chunk's words are whole Philox blocks).
template <class Fm, Mode M, bool kAligned>
__global__ void __launch_bounds__(kThreads) _apply(const typename Fm::S* __restrict__ wk,
                                                    const typename Fm::S* __restrict__ val,
                                                    typename Fm::S* __restrict__ out,
                                                    const int32_t* __restrict__ limit,
                                                    const bool* __restrict__ keep, int64_t total, int64_t F,
                                                    uint64_t seed, uint64_t D) {
  using S = typename Fm::S;
  using C = Chunk<S>;
  const int64_t nchunks = (total + C::kN - 1) / C::kN;
  for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < nchunks; c += (int64_t)gridDim.x * kThreads) {
    const int64_t p0 = c * C::kN;
    const bool full = kAligned && p0 + C::kN <= total;
    S v[C::kN], kv[C::kN];
    if (full) {
#pragma unroll
      for (int l = 0; l < C::kLoads; ++l) {
        unpack16(__ldg(reinterpret_cast<const uint4*>(val + p0) + l), &v[l * C::kVec]);
        if (M == Mode::kWeight) {
          if (wk == val) {
#pragma unroll
            for (int i = 0; i < C::kVec; ++i) kv[l * C::kVec + i] = v[l * C::kVec + i];
          } else {
            unpack16(__ldg(reinterpret_cast<const uint4*>(wk + p0) + l), &kv[l * C::kVec]);
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < C::kN; ++i) {
        const bool in = p0 + i < total;
        v[i] = in ? val[p0 + i] : S(0);
        if (M == Mode::kWeight) kv[i] = in ? wk[p0 + i] : S(0);
      }
    }
    int64_t u = p0 / F, row_end = (u + 1) * F;
    if (M == Mode::kWeight) {
      td::Words4 r[C::kN / 4];
      const bool draw = D > 0 && D < (uint64_t(1) << 32);  // else every word decides alike
#pragma unroll
      for (int b = 0; b < C::kN / 4; ++b)
        r[b] = draw ? td::philox_block(seed, (uint64_t)(p0 >> 2) + b) : td::Words4{0u, 0u, 0u, 0u};
      int32_t lim = limit[u];
#pragma unroll
      for (int i = 0; i < C::kN; ++i) {
        if (p0 + i >= total) break;
        while (p0 + i >= row_end) {  // a chunk may span rows when F is small or not aligned
          ++u;
          row_end += F;
          lim = limit[u];
        }
        if (td::dropped(Fm::key(kv[i]), lim, td::lane(r[i >> 2], i & 3), D)) v[i] = S(0);
      }
    } else {
      bool kp = keep[u];
#pragma unroll
      for (int i = 0; i < C::kN; ++i) {
        if (p0 + i >= total) break;
        while (p0 + i >= row_end) {
          ++u;
          row_end += F;
          kp = keep[u];
        }
        if (!kp) v[i] = S(0);
      }
    }
    if (full) {
#pragma unroll
      for (int l = 0; l < C::kLoads; ++l)
        reinterpret_cast<uint4*>(out + p0)[l] = pack16(&v[l * C::kVec]);
    } else {
#pragma unroll
      for (int i = 0; i < C::kN; ++i)
        if (p0 + i < total) out[p0 + i] = v[i];
    }
  }
}

// ---- unit targeting ---------------------------------------------------------------------
// norms[u] = Norm(sqrt(sum of |x|**2)) with the squares summed in float64 (exact squares, per
// thread then a float64 warp-shuffle and block reduction), sqrt in float64 and one rounding to
// Norm (float32; float64 for float64 weights): reference.unit_norms to within the float64 sum's
// rounding, so CPU, CUDA and Triton rank the same units. Reads the row once (16-byte loads).
template <class Fm>
__global__ void __launch_bounds__(kThreads) _unit_norms(const typename Fm::S* __restrict__ w,
                                                         typename Fm::Norm* __restrict__ norms, int64_t U,
                                                         int64_t F, bool aligned) {
  __shared__ double warp_sum[kThreads / 32];
  for (int64_t u = blockIdx.x; u < U; u += gridDim.x) {
    double acc = 0;
    row_for_each(w + u * F, F, aligned, [&](typename Fm::S x) {
      const double m = Fm::mag(x);
      acc += m * m;
    });
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, d);
    if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double s = 0;
      for (int i = 0; i < kThreads / 32; ++i) s += warp_sum[i];
      norms[u] = td::norm_from_sum<typename Fm::Norm>(s);  // IEEE sqrt (no fast math), one rounding
    }
    __syncthreads();
  }
}

// keep[u] = not (norm key below the rank-k key, and word(u) < D); one block.
template <class Norm>
__global__ void __launch_bounds__(kThreads) _unit_select(const Norm* __restrict__ norms, bool* __restrict__ keep,
                                                          int64_t U, int64_t k, uint64_t seed, uint64_t D) {
  using K = decltype(td::norm_key(Norm(0)));
  constexpr int kBits = sizeof(K) == 4 ? 31 : 63;
  __shared__ SelectSmem sm;
  K t = 0;
  if (k > 0 && k < U)
    t = block_radix_select<kBits, K>(
        (uint32_t)k,
        [&](auto g) {
          for (int64_t u = threadIdx.x; u < U; u += kThreads) g(td::norm_key(norms[u]));
        },
        sm);
  for (int64_t u = threadIdx.x; u < U; u += kThreads) {
    const bool candidate = k == U || (k > 0 && td::norm_key(norms[u]) < t);
    keep[u] = !(candidate && td::drops(td::philox_word(seed, (uint64_t)u), D));
  }
}

// ---- launchers ------------------------------------------------------------------------------
#define TD_LAUNCH_CHECK()                                   \
  do {                                                      \
    const cudaError_t e_ = cudaGetLastError();              \
    if (e_ != cudaSuccess) return e_;                       \
  } while (0)

inline bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

int grid_for(int64_t work_items) {  // blocks for a grid-stride loop over work_items threads
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return (int)(blocks < 1 ? 1 : blocks > (1 << 20) ? (1 << 20) : blocks);
}

int grid_rows(int64_t U) { return (int)(U > (1 << 20) ? (1 << 20) : (U < 1 ? 1 : U)); }

template <class Fm, Mode M>
cudaError_t launch_apply(const void* wk, const void* val, void* out, const int32_t* limit, const bool* keep,
                         int64_t U, int64_t F, uint64_t seed, uint64_t D, cudaStream_t stream) {
  using S = typename Fm::S;
  const int64_t total = U * F;
  const int grid = grid_for((total + Chunk<S>::kN - 1) / Chunk<S>::kN);
  const bool al = aligned16(val) && aligned16(out) && (M == Mode::kRows || aligned16(wk));
  if (al)
    _apply<Fm, M, true><<<grid, kThreads, 0, stream>>>((const S*)wk, (const S*)val, (S*)out, limit, keep, total, F,
                                                       seed, D);
  else
    _apply<Fm, M, false><<<grid, kThreads, 0, stream>>>((const S*)wk, (const S*)val, (S*)out, limit, keep, total,
                                                        F, seed, D);
  TD_LAUNCH_CHECK();
  return cudaSuccess;
}

__global__ void _fill_i32(int32_t* p, int64_t n, int32_t v) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = v;
}

template <class Fm>
cudaError_t weight_dropout_t(const void* w, void* out, int32_t* limit, int64_t U, int64_t F, int64_t k,
                             uint64_t seed, uint64_t D, cudaStream_t stream) {
  if (k == 0 || k == F) {  // SPEC: no candidate / every element: no selection
    _fill_i32<<<grid_for(U), kThreads, 0, stream>>>(limit, U, k == 0 ? -1 : (int32_t)td::kKeyMax);
  } else {
    constexpr int V = 16 / (int)sizeof(typename Fm::S);
    const bool al = aligned16(w) && F % V == 0;
    _weight_select<Fm><<<grid_rows(U), kThreads, 0, stream>>>((const typename Fm::S*)w, limit, U, F, (uint32_t)k, al);
  }
  TD_LAUNCH_CHECK();
  return launch_apply<Fm, Mode::kWeight>(w, w, out, limit, nullptr, U, F, seed, D, stream);
}

template <class Fm>
cudaError_t unit_dropout_t(const void* w, void* out, bool* keep, void* norms, int64_t U, int64_t F, int64_t k,
                           uint64_t seed, uint64_t D, cudaStream_t stream) {
  using Norm = typename Fm::Norm;
  constexpr int V = 16 / (int)sizeof(typename Fm::S);
  _unit_norms<Fm><<<grid_rows(U), kThreads, 0, stream>>>((const typename Fm::S*)w, (Norm*)norms, U, F,
                                                          aligned16(w) && F % V == 0);
  TD_LAUNCH_CHECK();
  _unit_select<Norm><<<1, kThreads, 0, stream>>>((const Norm*)norms, keep, U, k, seed, D);
  TD_LAUNCH_CHECK();
  return launch_apply<Fm, Mode::kRows>(w, w, out, nullptr, keep, U, F, seed, D, stream);
}

template <class Fn>
cudaError_t dispatch(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: return fn(FamF32{});
    case DType::kFloat16: return fn(FamF16{});
    case DType::kBFloat16: return fn(FamBF16{});
    case DType::kFloat64: return fn(FamF64{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t weight_dropout(DType dt, const void* w, void* out, int32_t* limit, int64_t U, int64_t F, int64_t k,
                           uint64_t seed, uint64_t D, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return weight_dropout_t<decltype(fam)>(w, out, limit, U, F, k, seed, D, stream);
  });
}

cudaError_t weight_dropout_backward(DType dt, const void* grad, const void* w, const int32_t* limit, void* out,
                                    int64_t U, int64_t F, uint64_t seed, uint64_t D, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return launch_apply<decltype(fam), Mode::kWeight>(w, grad, out, limit, nullptr, U, F, seed, D, stream);
  });
}

cudaError_t unit_dropout(DType dt, const void* w, void* out, bool* keep, void* norms, int64_t U, int64_t F,
                         int64_t k, uint64_t seed, uint64_t D, cudaStream_t stream) {
  if (U == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return unit_dropout_t<decltype(fam)>(w, out, keep, norms, U, F, k, seed, D, stream);
  });
}

cudaError_t unit_dropout_backward(DType dt, const void* grad, const bool* keep, void* out, int64_t U, int64_t F,
                                  cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return launch_apply<decltype(fam), Mode::kRows>(grad, grad, out, nullptr, keep, U, F, 0, 0, stream);
  });
}

}  // namespace td_cuda

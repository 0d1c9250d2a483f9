// td_cuda.cu -- the CUDA kernels of backend "native" (SPEC.md sections 4-7, 11, 12), torch-free:
// raw pointers and a stream (interface in td_cuda.h; td_cuda_binding.cpp adapts tensors). The
// arithmetic (Philox, keys, drop decision, N:M ranks, window positions, mask words) is td_core.h's,
// which the host unit test exercises on the CPU.
//
// Weight targeting forward = two kernels:
//   _weight_select  one 256-thread block per unit: a shared-memory radix select over the
//                   row's rank values (11-bit digits, 2048 shared counters, one shared-atomic
//                   count per survivor and pass; 3 passes for 31-bit keys, 2 for 16-bit types)
//                   -> limit[u] = t - 1. Reads the row once per pass (L2-resident after the
//                   first): ~1 DRAM read of w per element. Skipped when the limits are given.
//   _apply<kKeys>   per row, a warp per 32 x 16 bytes of columns (see _apply): 1 read + 1 write
//                   of w per element, 4 bytes per unit (limit), + 1 bit per element with bits.
// Backward: _apply<kKeys> with grad as the values (2 reads + 1 write), or _apply<kBits> (grad
// and 1 bit read, 1 write). N:M: _apply<kNM> forward and recompute backward (no selection).
// Unit targeting: _unit_norms (one block per unit, reads the row once: squares summed in
// float64, the norm rounded once to float32, float64 norms for float64 weights), _unit_select
// (one block: radix select over the U norm keys, one coin per unit), then _apply<kRows>.
// All indexing of elements is int64. Compiled for sm_80/sm_90 here; never run on a GPU yet.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../td_core.h"
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
      if (td::radix_survives(v, prefix, prev)) atomicAdd(&sm.hist[td::radix_digit(v, shift)], 1u);
    });
    __syncthreads();
    block_pick_bin(sm, k);
    __syncthreads();
    prefix = td::radix_extend_prefix(prefix, prev, shift, sm.bin);  // the digit may overlap
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

// ---- the element-wise apply (forwards, backwards, unit rows) --------------------------------
// Where a column's drop decision comes from:
//   kKeys  weight targeting: candidate iff key(wk) <= limit[row], dropped iff also word(pos) < D
//   kNM    N:M targeting: candidate iff its rank in its group of m (td::nm_rank, keys read
//          through L1) < m - n, dropped iff also word(pos) < D
//   kBits  the backward from the bit mask: dropped iff its keep bit is 0 (no W, no Philox)
//   kRows  unit targeting: the whole row dropped iff !keep[row]
enum class Src { kKeys, kNM, kBits, kRows };

struct ApplyArgs {
  const void* wk;          // the weight (kKeys, kNM), else unused
  const void* val;         // the values passed through: w (forwards) or grad (backwards)
  void* out;
  uint32_t* bits_out;      // keep bits [U, ceil(F/32)] to write, or null
  const uint32_t* bits_in; // kBits: the keep bits to read
  const int32_t* limit;    // kKeys
  const bool* keep;        // kRows
  int64_t U, F;
  td::Window win;
  uint64_t seed, D;
  const int64_t* seed_ptr;  // the seed on the device (graph-safe seed), or null: use `seed`
  int n, m;                // kNM
};

// The seed a kernel uses: read on the device when the launch got a pointer to it.
__device__ __forceinline__ uint64_t seed_of(uint64_t seed, const int64_t* seed_ptr) {
  return seed_ptr != nullptr ? (uint64_t)__ldg(seed_ptr) : seed;
}

// The V = 16 / sizeof(S) columns [j, j + V) of a row (nvalid of them inside it): one 16-byte
// access when the whole vector is inside and aligned, else element by element.
template <class S>
__device__ __forceinline__ void load_cols(const S* row, int64_t j, int nvalid, bool aligned, S* v) {
  constexpr int V = 16 / (int)sizeof(S);
  if (aligned && nvalid == V) {
    unpack16(__ldg(reinterpret_cast<const uint4*>(row + j)), v);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = i < nvalid ? row[j + i] : S(0);
  }
}
template <class S>
__device__ __forceinline__ void store_cols(S* row, int64_t j, int nvalid, bool aligned, const S* v) {
  constexpr int V = 16 / (int)sizeof(S);
  if (aligned && nvalid == V) {
    *reinterpret_cast<uint4*>(row + j) = pack16(v);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < nvalid) row[j + i] = v[i];
  }
}

// out = keep ? val : +0, per row. A warp handles 32 * V consecutive columns of one row per
// step (lane l: columns j .. j+V-1, j = step start + l * V, one 16-byte vector), so loads
// and stores are coalesced and every index is int64. A lane draws the Philox blocks of its
// own V positions (td::below_bits: 1 block per 4 columns when the row's stream start is a
// multiple of 4, one more when not: positions are global, windows may start anywhere).
// Mask words: the 32 / V lanes covering one word OR their bits together with shuffles and
// the first of them writes it, so each word has exactly one writer (no atomics, no races).
// Traffic per element: kKeys and kNM read val (and w when it is another tensor: the
// recompute backward) and write out; kBits reads grad and 1 bit, writes out; + 1 bit out
// with bits_out. kNM re-reads each group's m keys from L1 per column (m <= 16).
template <class Fm, Src M>
__global__ void __launch_bounds__(kThreads) _apply(ApplyArgs a, bool aligned) {
  using S = typename Fm::S;
  constexpr int V = 16 / (int)sizeof(S);  // columns per lane: 8 (16-bit), 4 (f32), 2 (f64)
  constexpr int kSpan = 32 * V;           // columns per warp step
  constexpr int G = 32 / V;               // lanes per mask word
  const int lane = threadIdx.x & 31;
  const int64_t F = a.F, W = td::bits_words(F);
  const int64_t steps = (F + kSpan - 1) / kSpan, items = a.U * steps;
  const int64_t nwarps = ((int64_t)gridDim.x * kThreads) >> 5;
  const S* val = static_cast<const S*>(a.val);
  const S* wk = static_cast<const S*>(a.wk);
  S* out = static_cast<S*>(a.out);
  for (int64_t it = (((int64_t)blockIdx.x * kThreads) >> 5) + (threadIdx.x >> 5); it < items; it += nwarps) {
    const int64_t u = it / steps;  // warp-uniform: every lane takes part in the shuffles below
    const int64_t j = (it - u * steps) * kSpan + (int64_t)lane * V;
    const int64_t base = u * F;
    const int nvalid = F - j >= V ? V : (F > j ? (int)(F - j) : 0);
    const uint32_t valid = (1u << nvalid) - 1u;
    uint32_t drop = 0;  // bit i: column j + i is dropped
    if (nvalid > 0) {
      S v[V];
      load_cols(val + base, j, nvalid, aligned, v);
      if (M == Src::kBits) {
        drop = ~(a.bits_in[u * W + (j >> 5)] >> (j & 31)) & valid;  // V divides 32: one word
      } else if (M == Src::kRows) {
        drop = a.keep[u] ? 0u : valid;
      } else {
        uint32_t cand = 0;
        if (M == Src::kKeys) {
          S kv[V];
          if (wk == val) {
#pragma unroll
            for (int i = 0; i < V; ++i) kv[i] = v[i];
          } else {
            load_cols(wk + base, j, nvalid, aligned, kv);
          }
          const int64_t lim = a.limit[u];
#pragma unroll
          for (int i = 0; i < V; ++i) cand |= (uint32_t)((int64_t)Fm::key(kv[i]) <= lim) << i;
        } else {  // kNM
          const S* row = wk + base;
#pragma unroll 1  // unrolled, the 8 columns' rank loops of 16-bit types spill on sm_80
          for (int i = 0; i < V; ++i) {
            if (i < nvalid) {
              const int64_t col = j + i, g0 = col - col % a.m;
              const int r = td::nm_rank([&](int l) { return Fm::key(__ldg(row + g0 + l)); }, a.m, (int)(col - g0));
              cand |= (uint32_t)td::nm_candidate(r, a.n, a.m) << i;
            }
          }
        }
        cand &= valid;
        uint32_t lt = a.D >= (uint64_t(1) << 32) ? ~0u : 0u;  // D = 2**32: every word is below D
        if (cand != 0 && a.D > 0 && a.D < (uint64_t(1) << 32))
          // the seed read where it is used (an L1 hit after the first): hoisted out of the
          // loop it held two more registers and _apply<FamF16, kNM> spilled on sm_90
          lt = td::below_bits(seed_of(a.seed, a.seed_ptr), td::row_start(a.win, u) + (uint64_t)j, V, a.D);
        drop = cand & lt;
      }
#pragma unroll
      for (int i = 0; i < V; ++i)
        if ((drop >> i) & 1u) v[i] = S(0);  // all-zero bits: +0.0
      store_cols(out + base, j, nvalid, aligned, v);
    }
    if (a.bits_out != nullptr) {  // uniform: a kernel argument
      uint32_t word = (~drop & valid) << (j & 31);
#pragma unroll
      for (int o = 1; o < G; o <<= 1) word |= __shfl_xor_sync(0xFFFFFFFFu, word, o);
      if (lane % G == 0 && j < F) a.bits_out[u * W + (j >> 5)] = word;
    }
  }
}

// ---- weight forward, fused: select and apply in one kernel, the row in shared memory --------
// One 256-thread block per row (grid-stride over rows), for rows of at most kFusedRowBytes:
//   1. the row is read from global memory ONCE (16-byte loads where aligned) into shared memory;
//   2. block_radix_select runs its passes (3 for 31-bit rank values, 2 for 15-bit) over the
//      row in shared memory -> limit[u] = key(t) - 1;
//   3. each warp applies 32 * V columns per step from shared memory (keys <= limit, Philox
//      words below D, as _apply<kKeys>), writing out (16-byte stores where aligned) and the
//      mask words (one writer per word, as _apply).
// Traffic per element: 1 read + 1 write of w (+ 1 bit with bits), against _weight_select +
// _apply's 2 reads (the second mostly from L2) + 1 write. Fewer blocks in flight per SM (the
// row's shared memory) is the price; which is faster is the GPU's to measure
// (td_cuda::WeightForward, the benchmark's "native:fused").
constexpr int64_t kFusedRowBytes = 32 * 1024;  // + SelectSmem (8.2 KB): under the 48 KB default

template <class Fm>
__global__ void __launch_bounds__(kThreads) _weight_fused(ApplyArgs a, int32_t* __restrict__ limit, uint32_t k,
                                                           bool aligned) {
  using S = typename Fm::S;
  constexpr int V = 16 / (int)sizeof(S);
  extern __shared__ uint4 srow4[];  // the row, ceil(F / V) 16-byte vectors
  __shared__ SelectSmem sm;
  const S* srow = reinterpret_cast<const S*>(srow4);
  const int64_t F = a.F, W = td::bits_words(F);
  const int lane = threadIdx.x & 31;
  constexpr int G = 32 / V;  // lanes per mask word
  for (int64_t u = blockIdx.x; u < a.U; u += gridDim.x) {
    const S* row = static_cast<const S*>(a.val) + u * F;
    if (aligned) {
      const uint4* r4 = reinterpret_cast<const uint4*>(row);
      for (int64_t i = threadIdx.x; i < F / V; i += kThreads) srow4[i] = __ldg(r4 + i);
    } else {
      S* dst = reinterpret_cast<S*>(srow4);
      for (int64_t i = threadIdx.x; i < F; i += kThreads) dst[i] = row[i];
    }
    __syncthreads();
    const uint32_t t = block_radix_select<Fm::kBits, uint32_t>(
        k, [&](auto g) { for (int64_t i = threadIdx.x; i < F; i += kThreads) g(Fm::rv(srow[i])); }, sm);
    const int64_t lim = td::limit_from_threshold_key(Fm::key_from_rv(t));
    if (threadIdx.x == 0) limit[u] = (int32_t)lim;
    S* orow = static_cast<S*>(a.out) + u * F;
    for (int64_t j = (int64_t)(threadIdx.x >> 5) * 32 * V + (int64_t)lane * V; j - lane * V < F;
         j += (int64_t)kThreads * V) {  // warp-uniform bound: every lane takes part in the shuffles
      const int nvalid = F - j >= V ? V : (F > j ? (int)(F - j) : 0);
      const uint32_t valid = (1u << nvalid) - 1u;
      uint32_t drop = 0;
      if (nvalid > 0) {
        S v[V];
        if (nvalid == V) {
          unpack16(srow4[j / V], v);  // j is a multiple of V: an aligned shared-memory vector
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) v[i] = i < nvalid ? srow[j + i] : S(0);
        }
        uint32_t cand = 0;
#pragma unroll
        for (int i = 0; i < V; ++i) cand |= (uint32_t)((int64_t)Fm::key(v[i]) <= lim) << i;
        cand &= valid;
        uint32_t lt = a.D >= (uint64_t(1) << 32) ? ~0u : 0u;
        if (cand != 0 && a.D > 0 && a.D < (uint64_t(1) << 32))
          lt = td::below_bits(seed_of(a.seed, a.seed_ptr), td::row_start(a.win, u) + (uint64_t)j, V, a.D);
        drop = cand & lt;
#pragma unroll
        for (int i = 0; i < V; ++i)
          if ((drop >> i) & 1u) v[i] = S(0);
        store_cols(orow, j, nvalid, aligned, v);
      }
      if (a.bits_out != nullptr) {
        uint32_t word = (~drop & valid) << (j & 31);
#pragma unroll
        for (int o = 1; o < G; o <<= 1) word |= __shfl_xor_sync(0xFFFFFFFFu, word, o);
        if (lane % G == 0 && j < F) a.bits_out[u * W + (j >> 5)] = word;
      }
    }
    __syncthreads();  // the row and sm are reused by the next row
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
                                                          int64_t U, int64_t k, uint64_t seed,
                                                          const int64_t* __restrict__ seed_ptr, uint64_t D) {
  seed = seed_of(seed, seed_ptr);
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

template <class Fm, Src M>
cudaError_t launch_apply(const ApplyArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / (int)sizeof(typename Fm::S);
  const int64_t warps = a.U * ((a.F + 32 * V - 1) / (32 * V));
  const bool reads_w = M == Src::kKeys || M == Src::kNM;
  const bool al = a.F % V == 0 && aligned16(a.val) && aligned16(a.out) && (!reads_w || aligned16(a.wk));
  _apply<Fm, M><<<grid_for(warps * 32), kThreads, 0, stream>>>(a, al);
  TD_LAUNCH_CHECK();
  return cudaSuccess;
}

__global__ void _fill_i32(int32_t* p, int64_t n, int32_t v) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = v;
}

ApplyArgs args(const void* wk, const void* val, void* out, int64_t U, int64_t F, uint64_t seed,
               const int64_t* seed_ptr, uint64_t D, td::Window win) {
  ApplyArgs a{};
  a.wk = wk;
  a.val = val;
  a.out = out;
  a.U = U;
  a.F = F;
  a.seed = seed;
  a.seed_ptr = seed_ptr;
  a.D = D;
  a.win = win;
  return a;
}

template <class Fm>
cudaError_t weight_dropout_t(const void* w, void* out, int32_t* limit, bool limit_given, uint32_t* bits, int64_t U,
                             int64_t F, int64_t k, uint64_t seed, const int64_t* seed_ptr, uint64_t D, td::Window win,
                             WeightForward variant, cudaStream_t stream) {
  if (!limit_given && (k == 0 || k == F)) {  // SPEC: no candidate / every element: no selection
    _fill_i32<<<grid_for(U), kThreads, 0, stream>>>(limit, U, k == 0 ? -1 : (int32_t)td::kKeyMax);
  }
  constexpr int V = 16 / (int)sizeof(typename Fm::S);
  ApplyArgs a = args(w, w, out, U, F, seed, seed_ptr, D, win);
  a.limit = limit;
  a.bits_out = bits;
  const int64_t row_bytes = (F + V - 1) / V * 16;
  if (!limit_given && k > 0 && k < F && variant == WeightForward::kFused && row_bytes <= kFusedRowBytes) {
    const bool al = aligned16(w) && aligned16(out) && F % V == 0;
    _weight_fused<Fm><<<grid_rows(U), kThreads, (size_t)row_bytes, stream>>>(a, limit, (uint32_t)k, al);
    TD_LAUNCH_CHECK();
    return cudaSuccess;
  }
  if (!limit_given && k > 0 && k < F) {
    const bool al = aligned16(w) && F % V == 0;
    _weight_select<Fm><<<grid_rows(U), kThreads, 0, stream>>>((const typename Fm::S*)w, limit, U, F, (uint32_t)k, al);
  }
  TD_LAUNCH_CHECK();
  return launch_apply<Fm, Src::kKeys>(a, stream);
}

template <class Fm>
cudaError_t unit_dropout_t(const void* w, void* out, bool* keep, void* norms, int64_t U, int64_t F, int64_t k,
                           uint64_t seed, const int64_t* seed_ptr, uint64_t D, cudaStream_t stream) {
  using Norm = typename Fm::Norm;
  constexpr int V = 16 / (int)sizeof(typename Fm::S);
  _unit_norms<Fm><<<grid_rows(U), kThreads, 0, stream>>>((const typename Fm::S*)w, (Norm*)norms, U, F,
                                                          aligned16(w) && F % V == 0);
  TD_LAUNCH_CHECK();
  _unit_select<Norm><<<1, kThreads, 0, stream>>>((const Norm*)norms, keep, U, k, seed, seed_ptr, D);
  TD_LAUNCH_CHECK();
  if (U * F == 0) return cudaSuccess;
  ApplyArgs a = args(w, w, out, U, F, 0, nullptr, 0, td::Window{0, (uint64_t)F});
  a.keep = keep;
  return launch_apply<Fm, Src::kRows>(a, stream);
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

cudaError_t weight_dropout(DType dt, const void* w, void* out, int32_t* limit, bool limit_given, uint32_t* bits,
                           int64_t U, int64_t F, int64_t k, uint64_t seed, const int64_t* seed_ptr, uint64_t D,
                           td::Window win, WeightForward variant, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return weight_dropout_t<decltype(fam)>(w, out, limit, limit_given, bits, U, F, k, seed, seed_ptr, D, win,
                                           variant, stream);
  });
}

cudaError_t weight_dropout_backward(DType dt, const void* grad, const void* w, const int32_t* limit,
                                    const uint32_t* bits, void* out, int64_t U, int64_t F, uint64_t seed,
                                    const int64_t* seed_ptr, uint64_t D, td::Window win, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    using Fm = decltype(fam);
    ApplyArgs a = args(w, grad, out, U, F, seed, seed_ptr, D, win);
    a.limit = limit;
    a.bits_in = bits;
    return bits ? launch_apply<Fm, Src::kBits>(a, stream) : launch_apply<Fm, Src::kKeys>(a, stream);
  });
}

cudaError_t nm_dropout(DType dt, const void* w, void* out, uint32_t* bits, int64_t U, int64_t F, int n, int m,
                       uint64_t seed, const int64_t* seed_ptr, uint64_t D, td::Window win, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    ApplyArgs a = args(w, w, out, U, F, seed, seed_ptr, D, win);
    a.bits_out = bits;
    a.n = n;
    a.m = m;
    return launch_apply<decltype(fam), Src::kNM>(a, stream);
  });
}

cudaError_t nm_dropout_backward(DType dt, const void* grad, const void* w, const uint32_t* bits, void* out,
                                int64_t U, int64_t F, int n, int m, uint64_t seed, const int64_t* seed_ptr,
                                uint64_t D, td::Window win, cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    using Fm = decltype(fam);
    ApplyArgs a = args(w, grad, out, U, F, seed, seed_ptr, D, win);
    a.bits_in = bits;
    a.n = n;
    a.m = m;
    return bits ? launch_apply<Fm, Src::kBits>(a, stream) : launch_apply<Fm, Src::kNM>(a, stream);
  });
}

cudaError_t unit_dropout(DType dt, const void* w, void* out, bool* keep, void* norms, int64_t U, int64_t F,
                         int64_t k, uint64_t seed, const int64_t* seed_ptr, uint64_t D, cudaStream_t stream) {
  if (U == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    return unit_dropout_t<decltype(fam)>(w, out, keep, norms, U, F, k, seed, seed_ptr, D, stream);
  });
}

cudaError_t unit_dropout_backward(DType dt, const void* grad, const bool* keep, void* out, int64_t U, int64_t F,
                                  cudaStream_t stream) {
  if (U * F == 0) return cudaSuccess;
  return dispatch(dt, [&](auto fam) {
    ApplyArgs a = args(grad, grad, out, U, F, 0, nullptr, 0, td::Window{0, (uint64_t)F});
    a.keep = keep;
    return launch_apply<decltype(fam), Src::kRows>(a, stream);
  });
}

}  // namespace td_cuda

// td_select.h -- host-side selection of a row's threshold rank value (torch-free, so the host
// unit test exercises exactly the code the CPU kernels run).
//
// Two exact algorithms; both return the value at rank k, whatever the data:
//   select_rank          radix select (11-bit digits from the top), the fallback;
//   select_rank_sampled  sample-bracketed selection, the fast path of the CPU forward.
#pragma once

#include <algorithm>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../td_core.h"
#include "td_cpu_philox.h"  // TD_HAVE_AVX2_PATH, cpu_has_avx2

namespace td {

// Below this many survivors a radix pass (2048-bin histogram) costs more than finishing with
// std::nth_element (introselect) on the survivors themselves.
constexpr int64_t kSelectSmall = 192;

// The value at 0-based rank k (0 <= k < n) of rv[0..n) in ascending order, for values of
// `bits` bits. `hist` (kRadixBins counters) must already hold the histogram of the digit at
// radix_first_shift(bits) over rv[0..n) (the caller fuses that count into the pass that
// computes rv from the weights). rv[] is clobbered (survivors are compacted to the front).
//
// Cost: per radix pass one read of the survivors to count and one read+write to compact;
// the first pass keeps ~1/2048 .. 1/8 of a typical row, so a row costs ~2F reads of rv plus
// O(kRadixBins) per pass; worst case (all values in one bin) 3 passes, O(F) all the same.
template <typename H>
inline uint32_t select_rank_counted(uint32_t* rv, int64_t n, int64_t k, H* hist, int bits) {
  for (int shift = radix_first_shift(bits);; shift = radix_next_shift(shift)) {
    uint64_t k_in_bin;
    const uint32_t bin = radix_pick_bin(hist, (uint64_t)k, &k_in_bin);
    const int64_t m = (int64_t)hist[bin];
    k = (int64_t)k_in_bin;
    if (m == 1 || radix_next_shift(shift) < 0) {  // one survivor, or all survivors equal
      for (int64_t i = 0;; ++i)
        if (radix_digit(rv[i], shift) == bin) return rv[i];
    }
    int64_t w = 0;  // branch-free compaction of the chosen bin's values
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t v = rv[i];
      rv[w] = v;
      w += radix_digit(v, shift) == bin;
    }
    n = m;
    if (n <= kSelectSmall) {
      std::nth_element(rv, rv + k, rv + n);
      return rv[k];
    }
    const int next = radix_next_shift(shift);
    memset(hist, 0, sizeof(H) * kRadixBins);
    for (int64_t i = 0; i < n; ++i) ++hist[radix_digit(rv[i], next)];
  }
}

// Convenience form: counts the first digit itself (used by the tests and small callers).
template <typename H>
inline uint32_t select_rank(uint32_t* rv, int64_t n, int64_t k, H* hist, int bits) {
  if (n <= kSelectSmall) {
    std::nth_element(rv, rv + k, rv + n);
    return rv[k];
  }
  memset(hist, 0, sizeof(H) * kRadixBins);
  const int shift = radix_first_shift(bits);
  for (int64_t i = 0; i < n; ++i) ++hist[radix_digit(rv[i], shift)];
  return select_rank_counted(rv, n, k, hist, bits);
}

// ---- sample-bracketed selection -------------------------------------------------------------
// Radix select pays one scattered histogram increment per element (2.3-4 ns per element on a
// 4096-long float32 row on the dev VM, most of the old forward). This selection narrows the set with
// passes that vectorize: per level, sort a strided sample of 64 values, take two sample values
// lo <= hi bracketing rank k, and in ONE pass over the set count the values >= lo, > lo, >= hi,
// > hi and compact the values strictly between lo and hi. The counts say where rank k lies:
// below lo, at lo, strictly between, at hi, or above hi. "At lo/hi" answers at once (ties);
// "between" continues on the compacted band (~1/3 of the set); "below"/"above" (rare: the
// sample misjudged) compacts that side in a second pass. Every step excludes at least the
// value lo or hi, so the set shrinks strictly; a level that keeps more than 3/4 of the set
// hands over to the radix select. Values are < 2**31 (rank values), compared as int32.
// A 4096-long row takes ~4 levels (4096 -> ~1300 -> ~400 -> ~130 -> ~40, then one sort):
// 0.8-0.9 ns per element with AVX2/AVX-512 on the dev VM (row in cache), 3x less than radix.

// The values of a level: the row itself (level 1, converted by Fm::rv on the fly) or a buffer.
template <class Fm>
struct RowSource {
  const typename Fm::S* p;
  uint32_t at(int64_t i) const { return Fm::rv(p[i]); }
};
struct BufSource {
  const uint32_t* p;
  uint32_t at(int64_t i) const { return p[i]; }
};

// counts[t] += #(x > thr[t]) for 4 thresholds over the values from position i on; the x with
// thr[1] < x <= thr[2] go to dst from position nb on, in order; returns the new nb.
// Thresholds lie in [-1, 2**31 - 1]. The portable pass, and the vector passes' tails.
template <class Src>
inline int64_t band_tail(const Src& src, int64_t i, int64_t n, const int32_t thr[4], int64_t counts[4],
                         uint32_t* __restrict dst, int64_t nb) {
  for (; i < n; ++i) {
    const int32_t x = (int32_t)src.at(i);
    counts[0] += x > thr[0];
    counts[1] += x > thr[1];
    counts[2] += x > thr[2];
    counts[3] += x > thr[3];
    dst[nb] = (uint32_t)x;  // branch-free compaction
    nb += (x > thr[1]) & (x <= thr[2]);
  }
  return nb;
}

#if TD_HAVE_AVX2_PATH
// The rank values of 8 (AVX2) or 16 (AVX-512) consecutive values of a source from position i,
// as int32 lanes: float32 rows with the sign bit cleared, 16-bit rows widened and cleared
// (Fm::rv), buffers as they are. float64 rows never get here (converted to a buffer first).
template <class Src>
struct Lanes;
template <class Fm>
struct Lanes<RowSource<Fm>> {
  static constexpr bool k16 = sizeof(typename Fm::S) == 2;
  static_assert(k16 || sizeof(typename Fm::S) == 4, "32- or 16-bit family");
  __attribute__((target("avx2"))) static __m256i at8(const RowSource<Fm>& s, int64_t i) {
    if constexpr (k16)
      return _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.p + i))),
                              _mm256_set1_epi32(0x7FFF));
    else
      return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.p + i)),
                              _mm256_set1_epi32(0x7FFFFFFF));
  }
  __attribute__((target("avx512f"))) static __m512i at16(const RowSource<Fm>& s, int64_t i) {
    if constexpr (k16)
      return _mm512_and_si512(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.p + i))),
                              _mm512_set1_epi32(0x7FFF));
    else
      return _mm512_and_si512(_mm512_loadu_si512(s.p + i), _mm512_set1_epi32(0x7FFFFFFF));
  }
};
template <>
struct Lanes<BufSource> {
  __attribute__((target("avx2"))) static __m256i at8(const BufSource& s, int64_t i) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.p + i));
  }
  __attribute__((target("avx512f"))) static __m512i at16(const BufSource& s, int64_t i) {
    return _mm512_loadu_si512(s.p + i);
  }
};

// Lane indices of the set bits of an 8-bit mask, packed as nibbles (lane order kept).
struct CompactTable {
  uint32_t idx[256];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      uint32_t v = 0;
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) v |= (uint32_t)l << (4 * n++);
      idx[m] = v;
    }
  }
};
inline const CompactTable& compact_table() {
  static const CompactTable t;
  return t;
}

template <class Src>
__attribute__((target("avx2"))) int64_t band_pass_avx2(const Src& src, int64_t n, const int32_t thr[4],
                                                       int64_t counts[4], uint32_t* __restrict dst) {
  const uint32_t* table = compact_table().idx;
  const __m256i t0 = _mm256_set1_epi32(thr[0]), t1 = _mm256_set1_epi32(thr[1]);
  const __m256i t2 = _mm256_set1_epi32(thr[2]), t3 = _mm256_set1_epi32(thr[3]);
  const __m256i nib = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), fifteen = _mm256_set1_epi32(15);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;  // per-lane counts, negated
  int64_t nb = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i x = Lanes<Src>::at8(src, i);
    const __m256i g1 = _mm256_cmpgt_epi32(x, t1), g2 = _mm256_cmpgt_epi32(x, t2);
    a0 = _mm256_add_epi32(a0, _mm256_cmpgt_epi32(x, t0));
    a1 = _mm256_add_epi32(a1, g1);
    a2 = _mm256_add_epi32(a2, g2);
    a3 = _mm256_add_epi32(a3, _mm256_cmpgt_epi32(x, t3));
    const unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(g2, g1)));
    if (m) {  // a band of ~1/3 of the set: most groups of 8 hold one
      const __m256i perm = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)table[m]), nib), fifteen);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + nb), _mm256_permutevar8x32_epi32(x, perm));
      nb += __builtin_popcount(m);
    }
  }
  alignas(32) int32_t l[4][8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l[0]), a0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(l[1]), a1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(l[2]), a2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(l[3]), a3);
  for (int t = 0; t < 4; ++t) {
    int64_t c = 0;
    for (int j = 0; j < 8; ++j) c -= l[t][j];  // lanes hold -count (cmpgt gives -1)
    counts[t] = c;
  }
  return band_tail(src, i, n, thr, counts, dst, nb);
}
#endif

#if TD_HAVE_AVX2_PATH
// AVX-512F: 16 lanes, compares into mask registers and vpcompressd instead of the table
// (~1 instruction per value against ~3 for AVX2).
template <class Src>
__attribute__((target("avx512f"))) int64_t band_pass_avx512(const Src& src, int64_t n, const int32_t thr[4],
                                                            int64_t counts[4], uint32_t* __restrict dst) {
  const __m512i t0 = _mm512_set1_epi32(thr[0]), t1 = _mm512_set1_epi32(thr[1]);
  const __m512i t2 = _mm512_set1_epi32(thr[2]), t3 = _mm512_set1_epi32(thr[3]), one = _mm512_set1_epi32(1);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;  // per-lane counts
  int64_t nb = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i x = Lanes<Src>::at16(src, i);
    const __mmask16 g1 = _mm512_cmpgt_epi32_mask(x, t1), g2 = _mm512_cmpgt_epi32_mask(x, t2);
    a0 = _mm512_mask_add_epi32(a0, _mm512_cmpgt_epi32_mask(x, t0), a0, one);
    a1 = _mm512_mask_add_epi32(a1, g1, a1, one);
    a2 = _mm512_mask_add_epi32(a2, g2, a2, one);
    a3 = _mm512_mask_add_epi32(a3, _mm512_cmpgt_epi32_mask(x, t3), a3, one);
    const __mmask16 band = _mm512_kandn(g2, g1);
    _mm512_storeu_si512(dst + nb, _mm512_maskz_compress_epi32(band, x));
    nb += __builtin_popcount((unsigned)band);
  }
  counts[0] = _mm512_reduce_add_epi32(a0);
  counts[1] = _mm512_reduce_add_epi32(a1);
  counts[2] = _mm512_reduce_add_epi32(a2);
  counts[3] = _mm512_reduce_add_epi32(a3);
  return band_tail(src, i, n, thr, counts, dst, nb);
}
#endif

// The pass of one level, vectorized where this CPU allows. dst needs n + 16 slots (the
// vector compactions store whole vectors). Per-lane counts are int32: n < 2**31 * 8.
template <class Src>
inline int64_t band_pass(const Src& src, int64_t n, const int32_t thr[4], int64_t counts[4], uint32_t* dst,
                         Simd simd) {
#if TD_HAVE_AVX2_PATH
  if (simd == Simd::kAvx512) return band_pass_avx512(src, n, thr, counts, dst);
  if (simd == Simd::kAvx2) return band_pass_avx2(src, n, thr, counts, dst);
#endif
  (void)simd;
  for (int t = 0; t < 4; ++t) counts[t] = 0;
  return band_tail(src, 0, n, thr, counts, dst, 0);
}

// ---- sorting 64 values without branches ----------------------------------------------------
// The samples (64 values) and the last <= 64 survivors are sorted with a bitonic network in 8
// AVX2 registers (~400 vector ops, no branch to mispredict; std::sort spends ~1 us on 64
// values here, mostly in mispredicted branches). Values are int32 in [0, 2**31); pads are
// 0x7FFFFFFF, which sort last. Without AVX2: std::sort.
constexpr int kSortN = 64;

#if TD_HAVE_AVX2_PATH
struct Sort64 {
  // compare-exchange: a = min, b = max, lane by lane
  __attribute__((target("avx2"), always_inline)) static inline void ce(__m256i& a, __m256i& b) {
    const __m256i lo = _mm256_min_epi32(a, b);
    b = _mm256_max_epi32(a, b);
    a = lo;
  }
  // a bitonic register -> ascending: half-cleaners at lane distances 4, 2, 1
  __attribute__((target("avx2"), always_inline)) static inline __m256i bitonic8(__m256i v) {
    __m256i t = _mm256_permute2x128_si256(v, v, 1);
    v = _mm256_blend_epi32(_mm256_min_epi32(v, t), _mm256_max_epi32(v, t), 0xF0);
    t = _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2));
    v = _mm256_blend_epi32(_mm256_min_epi32(v, t), _mm256_max_epi32(v, t), 0xCC);
    t = _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1));
    return _mm256_blend_epi32(_mm256_min_epi32(v, t), _mm256_max_epi32(v, t), 0xAA);
  }
  // a bitonic sequence in n registers -> ascending
  __attribute__((target("avx2"), always_inline)) static inline void bitonic(__m256i* v, int n) {
    for (int d = n / 2; d >= 1; d /= 2)
      for (int i = 0; i < n; ++i)
        if ((i & d) == 0) ce(v[i], v[i + d]);
    for (int i = 0; i < n; ++i) v[i] = bitonic8(v[i]);
  }
  // two ascending runs of n registers each (a, then b) -> one ascending run of 2n registers
  __attribute__((target("avx2"), always_inline)) static inline void merge(__m256i* a, int n) {
    __m256i* b = a + n;
    const __m256i rev = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    for (int i = 0; i < n / 2; ++i) std::swap(b[i], b[n - 1 - i]);  // b reversed: a ++ b is bitonic
    for (int i = 0; i < n; ++i) {
      b[i] = _mm256_permutevar8x32_epi32(b[i], rev);
      ce(a[i], b[i]);  // every low lane now <= every high lane, both halves bitonic
    }
    bitonic(a, n);
    bitonic(b, n);
  }
  __attribute__((target("avx2"))) static void sort(uint32_t* x) {
    __m256i r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * i));
    // 1. each lane's 8 values (one per register) sorted by the optimal 19-comparator network
    static constexpr int net[19][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}, {0, 4}, {1, 5}, {2, 6}, {3, 7}, {0, 1}, {2, 3},
                                       {4, 5}, {6, 7}, {2, 4}, {3, 5}, {1, 4}, {3, 6}, {1, 2}, {3, 4}, {5, 6}};
    for (const auto& c : net) ce(r[c[0]], r[c[1]]);
    // 2. transpose 8 x 8: register i = lane i's sorted run
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
    // 3. merge runs: 8 x 8 -> 4 x 16 -> 2 x 32 -> 64
    for (int i = 0; i < 8; i += 2) merge(r + i, 1);
    merge(r, 2);
    merge(r + 4, 2);
    merge(r, 4);
    for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * i), r[i]);
  }
};
#endif

// x[0 .. 64) ascending (values < 2**31; fill unused slots with 0x7FFFFFFF)
inline void sort64(uint32_t* x, Simd simd) {
#if TD_HAVE_AVX2_PATH
  if (simd != Simd::kNone) return Sort64::sort(x);
#endif
  (void)simd;
  std::sort(x, x + kSortN);
}

// The value at rank k of x[0 .. n), n <= 64 (x has room for 64)
inline uint32_t small_select(uint32_t* x, int64_t n, int64_t k, Simd simd) {
  for (int64_t i = n; i < kSortN; ++i) x[i] = 0x7FFFFFFFu;
  sort64(x, simd);
  return x[k];
}

// Up to this many values, small_select finishes.
constexpr int64_t kSampledSmall = kSortN;

// Scratch words select_rank_sampled needs per buffer for a set of n values.
inline int64_t select_scratch_size(int64_t n) { return std::max<int64_t>(n, kSortN) + 16; }

// The value at 0-based rank k (0 <= k < n) of the rank values of `row` (n of them, kBits bits).
// buf0 and buf1: scratch of select_scratch_size(n) uint32 each; simd: which vector loops to use.
// Exact for every input; how fast depends only on how well the samples bracket rank k.
template <class Fm>
inline uint32_t select_rank_sampled(const typename Fm::S* row, int64_t n, int64_t k, uint32_t* buf0,
                                    uint32_t* buf1, uint32_t* hist, Simd simd) {
#if TD_HAVE_AVX2_PATH
  constexpr bool kRowSimd = sizeof(typename Fm::S) <= 4;  // float64 keys are converted first
#else
  constexpr bool kRowSimd = false;
#endif
  if (!kRowSimd || n <= kSampledSmall) {  // rank values into buf0, then the buffer levels
    for (int64_t i = 0; i < n; ++i) buf0[i] = Fm::rv(row[i]);
  }
  uint32_t* cur = kRowSimd && n > kSampledSmall ? nullptr : buf0;  // nullptr: still the row itself
  uint32_t* spare = cur ? buf1 : buf0;
  auto at = [&](int64_t i) { return cur ? cur[i] : Fm::rv(row[i]); };
  auto pass = [&](const int32_t thr[4], int64_t counts[4], uint32_t* dst) {
    if constexpr (kRowSimd)
      if (!cur) return band_pass(RowSource<Fm>{row}, n, thr, counts, dst, simd);
    return band_pass(BufSource{cur}, n, thr, counts, dst, simd);
  };
  for (;;) {
    if (n <= kSampledSmall) return small_select(cur, n, k, simd);
    // a strided sample; lo, hi ~2 sigma (+2) either side of where rank k falls in it
    uint32_t sample[kSortN];
    const int s = kSortN;
    for (int i = 0; i < s; ++i) sample[i] = at((int64_t)((2 * (uint64_t)i + 1) * (uint64_t)n / (2 * (uint64_t)s)));
    sort64(sample, simd);
    const double p = (double)k / (double)n;
    const int r = (int)(p * s), d = (int)(2.0 * sqrt(s * p * (1 - p))) + 2;
    const int32_t lo = (int32_t)sample[std::max(0, r - d)], hi = (int32_t)sample[std::min(s - 1, r + d)];
    const int32_t thr[4] = {lo - 1, lo, hi - 1, hi};  // > lo-1: >= lo; (lo, hi-1]: the open band
    int64_t gt[4];
    int64_t m = pass(thr, gt, spare);
    const int64_t lt_lo = n - gt[0], le_lo = n - gt[1], lt_hi = n - gt[2], le_hi = n - gt[3];
    if (k >= le_lo && k < lt_hi) {
      k -= le_lo;  // the band, already in spare
    } else if (k >= lt_lo && k < le_lo) {
      return (uint32_t)lo;
    } else if (k >= lt_hi && k < le_hi) {
      return (uint32_t)hi;
    } else {  // the sample misjudged: compact the side that holds rank k
      const bool below = k < lt_lo;
      const int32_t side[4] = {-1, below ? -1 : hi, below ? lo - 1 : 0x7FFFFFFF, 0x7FFFFFFF};
      int64_t unused[4];
      m = pass(side, unused, spare);
      if (!below) k -= le_hi;
    }
    if (m > n - n / 4)  // a poor split (adversarial order): radix select on what is left
      return select_rank(spare, m, k, hist, Fm::kBits);
    n = m;
    uint32_t* next_spare = cur ? cur : (spare == buf0 ? buf1 : buf0);
    cur = spare;
    spare = next_spare;
  }
}

}  // namespace td

// td_core.h -- the arithmetic of SPEC.md shared by the CPU and CUDA kernels.
//
// Torch-free and dependency-free on purpose: the same functions compile with g++ (the CPU
// kernels and the host unit test csrc/tests/test_core.cpp) and with nvcc (device code), so
// the random stream, the rank keys, the drop decision and the dtype families are written
// exactly once.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define TD_HD __host__ __device__ __forceinline__
#else
#define TD_HD inline
#endif

namespace td {

// ---- SPEC section 5: Philox4x32-10 ----------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct Words4 {  // four 32-bit words: Philox's counter or output (named lanes stay in registers)
  uint32_t x, y, z, w;
};

TD_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11; Random123): 10 rounds, key bumped between rounds.
TD_HD Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    c = Words4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kPhiloxW0;  // the bump after the last round is unused, which is harmless
    k1 += kPhiloxW1;
  }
  return c;
}

// The four words at stream positions 4q .. 4q+3 for seed s: counter (q lo, q hi, 0, 0),
// key (s lo, s hi).
TD_HD Words4 philox_block(uint64_t seed, uint64_t q) {
  return philox4x32_10(Words4{(uint32_t)q, (uint32_t)(q >> 32), 0u, 0u}, (uint32_t)seed,
                       (uint32_t)(seed >> 32));
}

TD_HD uint32_t lane(const Words4& v, unsigned i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// word(p) of SPEC section 5. Kernels call philox_block once per 4 positions instead.
TD_HD uint32_t philox_word(uint64_t seed, uint64_t p) {
  return lane(philox_block(seed, p >> 2), (unsigned)(p & 3));
}

// ---- SPEC section 6: the drop decision ------------------------------------------------------
// D = floor(drop_rate * 2**32) lies in [0, 2**32], so it needs 64 bits: D = 2**32 drops all.
TD_HD bool drops(uint32_t word, uint64_t D) { return (uint64_t)word < D; }

// ---- SPEC section 12: where a local element sits in the global stream ----------------------
// A local [U, F] block is a window of a global weight: element (u, j) has the stream position
// origin + u * row_stride + j (origin 0, row_stride F for a whole weight). Each row is a run
// of consecutive positions starting at row_start(u); its Philox blocks of 4 are anchored on
// GLOBAL positions (block q holds positions 4q .. 4q+3), so a row whose start is not a multiple
// of 4 begins and ends inside a block. The launchers keep every position below 2**62.
struct Window {
  uint64_t origin, row_stride;
};
TD_HD uint64_t row_start(const Window& win, int64_t u) { return win.origin + (uint64_t)u * win.row_stride; }

// Bit i of the result: word(p0 + i) < D, for i in [0, n), n <= 28 (blocks p0/4 .. (p0+n-1)/4).
// The drop bits of a short run of positions whose start need not be block-aligned.
TD_HD uint32_t below_bits(uint64_t seed, uint64_t p0, int n, uint64_t D) {
  const unsigned off = (unsigned)(p0 & 3);
  const uint64_t q0 = p0 >> 2;
  uint32_t acc = 0;
  for (unsigned b = 0; 4 * b < off + (unsigned)n; ++b) {
    const Words4 r = philox_block(seed, q0 + b);
    acc |= (uint32_t)(((uint64_t)r.x < D) | (((uint64_t)r.y < D) << 1) | (((uint64_t)r.z < D) << 2) |
                      (((uint64_t)r.w < D) << 3)) << (4 * b);
  }
  acc >>= off;
  return n >= 32 ? acc : acc & ((1u << n) - 1u);
}

// ---- SPEC section 7: the bit-packed keep mask ------------------------------------------------
// int32 [U, bits_words(F)]: bit j % 32 of word [u, j / 32] is keep(u, j), padding bits 0
// (reference.pack_bits). Words are handled as uint32.
TD_HD int64_t bits_words(int64_t F) { return (F + 31) / 32; }
TD_HD bool bit_at(const uint32_t* row_bits, int64_t j) { return (row_bits[j >> 5] >> (j & 31)) & 1u; }
// The 32 bits of columns j .. j+31 (bits past the row's last word read as 0): nwords = the
// row's word count.
TD_HD uint32_t bits32_at(const uint32_t* row_bits, int64_t j, int64_t nwords) {
  const int64_t w = j >> 5;
  const unsigned s = (unsigned)(j & 31);
  const uint32_t lo = row_bits[w] >> s;
  return s == 0 || w + 1 >= nwords ? lo : lo | (row_bits[w + 1] << (32 - s));
}
// OR the 32 bits `b` (bit i = column j + i) into a row's words; b must be 0 at columns >= the
// row's end, so nothing is written past its last word.
TD_HD void or_bits32(uint32_t* row_bits, int64_t j, uint32_t b) {
  const unsigned s = (unsigned)(j & 31);
  row_bits[j >> 5] |= b << s;
  if (s != 0 && (b >> (32 - s)) != 0) row_bits[(j >> 5) + 1] |= b >> (32 - s);
}

// ---- SPEC section 11: N:M targeting --------------------------------------------------------
// Within a group of m elements (keys key_at(0 .. m-1)), the rank of element i in (key, j)
// order: how many elements come before it (a smaller key, or an equal key at a lower index).
// Element i is a candidate iff its rank < m - n. O(m) per element, m <= 16.
template <class KeyAt>
TD_HD int nm_rank(KeyAt key_at, int m, int i) {
  const uint32_t ki = key_at(i);
  int r = 0;
  for (int l = 0; l < m; ++l) {
    const uint32_t kl = key_at(l);
    r += (int)(kl < ki) | (int)(kl == ki && l < i);
  }
  return r;
}
TD_HD bool nm_candidate(int rank, int n, int m) { return rank < m - n; }
// Bit i set iff element i of the group (keys[0 .. m-1]) is a candidate. The same ranks as
// nm_rank, one comparison per pair (l < i): l comes first iff key_l <= key_i. Branch-free.
TD_HD uint32_t nm_group_candidates(const uint32_t* keys, int n, int m) {
  int r[16] = {0};
  for (int i = 1; i < m; ++i)
    for (int l = 0; l < i; ++l) {
      const int first = keys[l] <= keys[i];
      r[i] += first;
      r[l] += 1 - first;
    }
  uint32_t c = 0;
  for (int i = 0; i < m; ++i) c |= (uint32_t)nm_candidate(r[i], n, m) << i;
  return c;
}

// ---- SPEC section 2: rank keys --------------------------------------------------------------
// key(x) = bits(|float32(x)|), in [0, 2**31); NaN keys lie above +inf's 0x7F800000.
constexpr uint32_t kKeyMax = 0x7FFFFFFFu;

// bit casts: CUDA's intrinsics on the device, memcpy (which compilers turn into a move) on the host
#if defined(__CUDA_ARCH__)
TD_HD uint32_t f32_bits(float x) { return __float_as_uint(x); }
TD_HD float f32_from_bits(uint32_t b) { return __uint_as_float(b); }
TD_HD uint64_t f64_bits(double x) { return (uint64_t)__double_as_longlong(x); }
TD_HD double f64_from_bits(uint64_t b) { return __longlong_as_double((long long)b); }
#else
template <typename To, typename From>
inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}
TD_HD uint32_t f32_bits(float x) { return bits_as<uint32_t>(x); }
TD_HD float f32_from_bits(uint32_t b) { return bits_as<float>(b); }
TD_HD uint64_t f64_bits(double x) { return bits_as<uint64_t>(x); }
TD_HD double f64_from_bits(uint64_t b) { return bits_as<double>(b); }
#endif

TD_HD uint32_t key_f32(float x) { return f32_bits(x) & kKeyMax; }
// float64 rounds to float32 (nearest even) for the key only. A NaN is spelled out as x86/ARM
// convert it (quiet bit set, top 23 payload bits kept) because CUDA's cvt returns the
// canonical NaN instead: CPU and GPU keys stay equal.
TD_HD uint32_t key_f64(double x) {
  const uint32_t key = f32_bits((float)x) & kKeyMax;
  const uint32_t nan_key = 0x7FC00000u | ((uint32_t)(f64_bits(x) >> 29) & 0x7FFFFFu);
  return key > 0x7F800000u ? nan_key : key;  // a select, not a branch: loops vectorize
}
// bfloat16 is the top half of a float32.
TD_HD uint32_t key_bf16(uint16_t h) { return ((uint32_t)h << 16) & kKeyMax; }
// float16 widens exactly: normal and subnormal halves are exact floats; inf and NaN keep
// their payload (shifted up 13 bits, no quieting), so key_f16 is strictly increasing in the
// 15-bit magnitude h & 0x7FFF (the kernels rank halves by that and convert only thresholds).
TD_HD uint32_t key_f16(uint16_t h) {
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return 0x7F800000u | (m << 13);
  if (e == 0) return f32_bits((float)m * 5.9604644775390625e-08f);  // m * 2**-24, exact
  return ((e + 112u) << 23) | (m << 13);
}

// ---- rank values: what the selection sorts --------------------------------------------------
// A rank value rv is an unsigned integer that orders like key(x) and maps to it one to one:
// the key itself for float32/float64 (31 bits), the magnitude bits for float16/bfloat16 (15
// bits, so a radix select there needs 2 passes, not 3). The kernels select the threshold rv,
// then report limit = key(threshold) - 1 in the registry's key space.
// float32 / float64 call these with the value itself; 16-bit types with the raw bits.
TD_HD uint32_t rv_f32(float x) { return key_f32(x); }
TD_HD uint32_t rv_f64(double x) { return key_f64(x); }
TD_HD uint32_t rv_half(uint16_t h) { return h & 0x7FFFu; }

// rv -> key, per family
TD_HD uint32_t key_from_rv_f16(uint32_t rv) { return key_f16((uint16_t)rv); }
TD_HD uint32_t key_from_rv_bf16(uint32_t rv) { return rv << 16; }

// The largest rv whose key is <= limit (limit in [-1, 0x7FFFFFFF]), -1 when there is none:
// turns a limit from the forward (in key space) into the rv space the backward compares in.
TD_HD int32_t rv_limit_bf16(int32_t limit) { return limit < 0 ? -1 : (limit >> 16); }
TD_HD int32_t rv_limit_f16(int32_t limit) {
  // key_f16 increases strictly over [0, 0x7FFF]: binary search, 15 steps.
  int32_t lo = -1, hi = 0x7FFF;  // invariant: answer in [lo, hi]
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if ((int64_t)key_f16((uint16_t)mid) <= (int64_t)limit) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ---- SPEC section 4: the radix-select step --------------------------------------------------
// The k-th smallest rank value (k 0-based) is found digit by digit from the top, 11 bits at a
// time: count the digit of every survivor into kRadixBins bins, pick the bin holding position
// k, keep only that bin's values, and repeat with the next lower digit. 31-bit keys take 3
// passes (digits at bits 20, 9, 0), 15-bit keys 2, 63-bit keys (float64 norms) 6.
constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

// shift of the first digit for keys of `bits` bits, then of each following one (-1 = done)
TD_HD int radix_first_shift(int bits) { return bits > kRadixBits ? bits - kRadixBits : 0; }
TD_HD int radix_next_shift(int shift) {
  return shift == 0 ? -1 : (shift > kRadixBits ? shift - kRadixBits : 0);
}
template <typename K>
TD_HD uint32_t radix_digit(K key, int shift) {
  return (uint32_t)(key >> shift) & (kRadixBins - 1);
}

// The CUDA block select's digit step (td_cuda.cu, block_radix_select: _weight_select,
// _weight_fused, _unit_select). The values still in the running after the passes so far are
// those with (v >> prev) == prefix (prev = kBits before the first pass: all of them). A pass at
// `shift` picks `bin`; its digit may overlap bits already fixed (31-bit keys: digits at 20, 9,
// then 0, whose top 2 bits were fixed at 9), so only the prev - shift new bits are appended.
template <typename K>
TD_HD bool radix_survives(K v, K prefix, int prev) { return (v >> prev) == prefix; }
template <typename K>
TD_HD K radix_extend_prefix(K prefix, int prev, int shift, uint32_t bin) {
  const int fixed = prev - shift;
  return (prefix << fixed) | (K)(bin & ((1u << fixed) - 1u));
}

// Given the histogram of one pass and the 0-based rank k among its values, return the bin
// holding rank k and set *k_in_bin to k's rank inside that bin. Two levels: whole groups of
// 64 bins are summed first (a loop the compiler vectorizes), then one group is scanned bin by
// bin, ~100 steps instead of up to 2048. The CPU kernels use it; the CUDA kernels scan the
// same bins with a block-wide prefix sum. C is the counter type (the sum of all bins fits).
template <typename C>
TD_HD uint32_t radix_pick_bin(const C* hist, uint64_t k, uint64_t* k_in_bin) {
  constexpr uint32_t kGroup = 64;
  uint64_t below = 0;
  uint32_t b = 0;
  for (; b + kGroup < (uint32_t)kRadixBins; b += kGroup) {
    C s = 0;
    for (uint32_t i = 0; i < kGroup; ++i) s += hist[b + i];
    if (below + (uint64_t)s > k) break;
    below += (uint64_t)s;
  }
  for (const uint32_t end = b + kGroup - 1; b < end; ++b) {
    if (below + (uint64_t)hist[b] > k) break;
    below += (uint64_t)hist[b];
  }
  *k_in_bin = k - below;
  return b;
}

// The forward's limit for a row: -1 when k == 0 (no candidate), 0x7FFFFFFF when k == F
// (every element), otherwise t - 1 with t = the key at rank k (strict comparison).
TD_HD int32_t limit_from_threshold_key(uint32_t t) { return (int32_t)t - 1; }

// SPEC section 4 + 6 for one element: candidate (key <= limit) and its word below D.
TD_HD bool dropped(uint32_t key, int32_t limit, uint32_t word, uint64_t D) {
  return (int64_t)key <= (int64_t)limit && drops(word, D);
}

// ---- dtype families: what every kernel needs to know about a weight dtype -----------------
// Kernels move raw bits (S = uint16/32/64_t): a dropped element is all-zero bits (+0.0) and a
// kept one is copied bit for bit, so the apply loops are integer masks that vectorize.
//   rv(b)           rank value (what the selection sorts), kBits bits
//   key(b)          SPEC key (what the apply compares with the limit)
//   key_from_rv(r)  the key of a rank value;  rv_limit(limit): limit (key space) -> rv space
//   mag(b)          |x| widened exactly to float64: its square is exact for the 16/32-bit
//                   types (<= 48 significant bits), so a norm's sum rounds only in the adds
//   Norm            the norm's type: float32, float64 for float64 weights (reference.unit_norms)
struct FamF32 {
  using S = uint32_t;
  using Norm = float;
  static constexpr int kBits = 31;
  static TD_HD uint32_t rv(S b) { return b & kKeyMax; }  // == key_f32
  static TD_HD uint32_t key(S b) { return b & kKeyMax; }
  static TD_HD uint32_t key_from_rv(uint32_t r) { return r; }
  static TD_HD int32_t rv_limit(int32_t lim) { return lim; }
  static TD_HD double mag(S b) { return (double)f32_from_bits(b & kKeyMax); }
};
struct FamF64 {  // ranked by the key of float32(x)
  using S = uint64_t;
  using Norm = double;
  static constexpr int kBits = 31;
  static TD_HD uint32_t rv(S b) { return key_f64(f64_from_bits(b)); }
  static TD_HD uint32_t key(S b) { return rv(b); }
  static TD_HD uint32_t key_from_rv(uint32_t r) { return r; }
  static TD_HD int32_t rv_limit(int32_t lim) { return lim; }
  static TD_HD double mag(S b) { return f64_from_bits(b & 0x7FFFFFFFFFFFFFFFull); }
};
struct FamF16 {  // ranked by the 15-bit magnitude, which orders like key_f16
  using S = uint16_t;
  using Norm = float;
  static constexpr int kBits = 15;
  static TD_HD uint32_t rv(S h) { return rv_half(h); }
  static TD_HD uint32_t key(S h) { return key_f16(h); }
  static TD_HD uint32_t key_from_rv(uint32_t r) { return key_from_rv_f16(r); }
  static TD_HD int32_t rv_limit(int32_t lim) { return rv_limit_f16(lim); }
  static TD_HD double mag(S h) { return (double)f32_from_bits(key_f16(h)); }  // |x|, exact
};
struct FamBF16 {
  using S = uint16_t;
  using Norm = float;
  static constexpr int kBits = 15;
  static TD_HD uint32_t rv(S h) { return rv_half(h); }
  static TD_HD uint32_t key(S h) { return key_bf16(h); }
  static TD_HD uint32_t key_from_rv(uint32_t r) { return key_from_rv_bf16(r); }
  static TD_HD int32_t rv_limit(int32_t lim) { return rv_limit_bf16(lim); }
  static TD_HD double mag(S h) { return (double)f32_from_bits(key_bf16(h)); }
};

// ---- unit targeting: the norm from its float64 sum of squares -------------------------------
// sqrt in float64, rounded once to Norm (float32, or float64 for float64 weights). A NaN sum
// (a row holding a NaN) gives the canonical quiet NaN: which NaN payload a sum propagates
// depends on the summation order, so every NaN norm is made the same one (they tie, above +inf).
TD_HD float canonical_nan(float) { return f32_from_bits(0x7FC00000u); }
TD_HD double canonical_nan(double) { return f64_from_bits(0x7FF8000000000000ull); }
template <typename Norm>
TD_HD Norm norm_from_sum(double sum_sq) {
  return sum_sq != sum_sq ? canonical_nan(Norm(0)) : (Norm)sqrt(sum_sq);
}

// ---- unit targeting: norm keys --------------------------------------------------------------
// Norms are >= 0 or NaN; clearing the sign bit orders them with NaN above +inf (a NaN may
// carry a sign). float32 norms give 31-bit keys, float64 norms 63-bit keys.
TD_HD uint32_t norm_key(float n) { return f32_bits(n) & 0x7FFFFFFFu; }
TD_HD uint64_t norm_key(double n) { return f64_bits(n) & 0x7FFFFFFFFFFFFFFFull; }

}  // namespace td

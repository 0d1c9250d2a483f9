// td_cpu_philox.h -- Philox4x32-10 (td_core.h) over runs of consecutive blocks on the CPU.
//
// The CPU kernels draw words for every position of a row, so the random stream is their
// largest compute cost. These versions write the same words as td::philox_block:
//   philox_blocks_portable  16 blocks at a time in struct-of-arrays form, which compilers
//                           vectorize at the baseline ISA (SSE2 on x86-64, NEON on arm64);
//   philox_blocks_avx2      8 blocks per 256-bit register with explicit intrinsics, 3 such
//                           groups interleaved so the multiplies of one overlap the others'
//                           latency, compiled for AVX2 with a target attribute and picked at
//                           run time only where the CPU has AVX2 (0.89 ns/word, one core of
//                           the 2-core Xeon dev VM);
//   philox8_avx512          the same words with AVX-512F (0.50 ns/word there).
// The cores philox8_avx2 / philox8_avx512 return the words in registers; the apply loops
// (td_cpu_tiles.inc) call them directly (no word buffer). Torch-free: csrc/tests/test_core.cpp
// checks the batch versions against td::philox_block and the apply loops on every path.
#pragma once

#include <stdint.h>
#include <stdlib.h>

#include "../td_core.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TD_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define TD_HAVE_AVX2_PATH 0
#endif

namespace td {

// out[4 i + lane] = lane of philox_block(seed, q0 + i), for i in [0, nq)
inline void philox_blocks_portable(uint64_t seed, uint64_t q0, int64_t nq, uint32_t* __restrict out) {
  constexpr int L = 16;
  int64_t i = 0;
  for (; i + L <= nq; i += L) {
    uint32_t c0[L], c1[L], c2[L], c3[L];
    for (int l = 0; l < L; ++l) {
      const uint64_t q = q0 + (uint64_t)(i + l);
      c0[l] = (uint32_t)q;
      c1[l] = (uint32_t)(q >> 32);
      c2[l] = 0;
      c3[l] = 0;
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < L; ++l) {
        const uint64_t p0 = (uint64_t)kPhiloxM0 * c0[l], p1 = (uint64_t)kPhiloxM1 * c2[l];
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = (uint32_t)p1;
        c3[l] = (uint32_t)p0;
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int l = 0; l < L; ++l) {
      uint32_t* o = out + 4 * (i + l);
      o[0] = c0[l];
      o[1] = c1[l];
      o[2] = c2[l];
      o[3] = c3[l];
    }
  }
  for (; i < nq; ++i) {
    const Words4 r = philox_block(seed, q0 + (uint64_t)i);
    uint32_t* o = out + 4 * i;
    o[0] = r.x;
    o[1] = r.y;
    o[2] = r.z;
    o[3] = r.w;
  }
}

#if TD_HAVE_AVX2_PATH
// The 32 words of the 8 blocks q .. q+7 in stream order, 2 blocks per register: r[j] holds
// blocks q+2j and q+2j+1 (words 8j .. 8j+7 after position 4q). Inlined into its AVX2 callers
// (philox_blocks_avx2 and the fused apply loop in td_cpu.cpp), so the words can stay in registers.
// The 10 round keys of a seed, broadcast, computed once per run of tiles (the rounds then
// read them from L1 instead of adding the Weyl constants each time).
struct PhiloxKeys8 {
  __m256i k0[10], k1[10];
};

__attribute__((target("avx2"))) inline void philox_keys8(uint64_t seed, PhiloxKeys8& keys) {
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    keys.k0[r] = _mm256_set1_epi32((int)k0);
    keys.k1[r] = _mm256_set1_epi32((int)k1);
  }
}

// N interleaved groups (N independent dependency chains, so the multiplier latency overlaps):
// r[4 g + j] holds blocks q + 8 g + 2 j and q + 8 g + 2 j + 1.
template <int N>
__attribute__((target("avx2"), always_inline)) inline void philox8_avx2(const PhiloxKeys8& keys, uint64_t q,
                                                                       __m256i* r) {
  const __m256i M0 = _mm256_set1_epi64x(kPhiloxM0), M1 = _mm256_set1_epi64x(kPhiloxM1);
  // Rounds 2-10 split each 64-bit product into its low and high words with one shufps per
  // pair of registers, which leaves the lanes of each 128-bit half in the order 0 2 1 3. That
  // swap is its own inverse: after its 9 rounds the counters, started in the order 0 2 1 3,
  // are back in stream order.
  const __m256i iota = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  __m256i c0[N], c1[N], c2[N], c3[N];
  for (int g = 0; g < N; ++g) {
    // counters q + 8g .. q + 8g + 7: low words, plus a carry into the high word where the low one wraps
    const uint64_t qg = q + 8 * (uint64_t)g;
    const __m256i qlo = _mm256_set1_epi32((int)(uint32_t)qg);
    c0[g] = _mm256_add_epi32(qlo, iota);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(qlo, sign), _mm256_xor_si256(c0[g], sign));
    c1[g] = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(qg >> 32)), wrapped);
    // round 1: c2 = c3 = 0, so the M1 product is 0; lanes stay in place (blends)
    const __m256i pe0 = _mm256_mul_epu32(c0[g], M0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[g], 32), M0);
    c3[g] = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
    c2[g] = _mm256_xor_si256(_mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA), keys.k1[0]);
    c0[g] = _mm256_xor_si256(c1[g], keys.k0[0]);
    c1[g] = _mm256_setzero_si256();
  }
  for (int rnd = 1; rnd < 10; ++rnd) {
    for (int g = 0; g < N; ++g) {
      // 32x32 -> 64 products of the even lanes, then of the odd lanes shifted down; shufps
      // gathers the low (high) words as lanes 0 2 1 3 of each half
      const __m256i pe0 = _mm256_mul_epu32(c0[g], M0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0[g], 32), M0);
      const __m256i pe1 = _mm256_mul_epu32(c2[g], M1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2[g], 32), M1);
      const __m256 fe0 = _mm256_castsi256_ps(pe0), fo0 = _mm256_castsi256_ps(po0);
      const __m256 fe1 = _mm256_castsi256_ps(pe1), fo1 = _mm256_castsi256_ps(po1);
      const __m256i lo0 = _mm256_castps_si256(_mm256_shuffle_ps(fe0, fo0, 0x88));
      const __m256i hi0 = _mm256_castps_si256(_mm256_shuffle_ps(fe0, fo0, 0xDD));
      const __m256i lo1 = _mm256_castps_si256(_mm256_shuffle_ps(fe1, fo1, 0x88));
      const __m256i hi1 = _mm256_castps_si256(_mm256_shuffle_ps(fe1, fo1, 0xDD));
      // c1, c3 permuted the same way as the products: swap their lanes 1 and 2 of each half
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, _mm256_shuffle_epi32(c1[g], 0xD8)), keys.k0[rnd]);
      c1[g] = lo1;
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, _mm256_shuffle_epi32(c3[g], 0xD8)), keys.k1[rnd]);
      c3[g] = lo0;
    }
  }
  for (int g = 0; g < N; ++g) {  // transpose the 4 x 8 words into 8 blocks of 4
    const __m256i t0 = _mm256_unpacklo_epi32(c0[g], c1[g]), t1 = _mm256_unpackhi_epi32(c0[g], c1[g]);
    const __m256i t2 = _mm256_unpacklo_epi32(c2[g], c3[g]), t3 = _mm256_unpackhi_epi32(c2[g], c3[g]);
    const __m256i b04 = _mm256_unpacklo_epi64(t0, t2), b15 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i b26 = _mm256_unpacklo_epi64(t1, t3), b37 = _mm256_unpackhi_epi64(t1, t3);
    r[4 * g + 0] = _mm256_permute2x128_si256(b04, b15, 0x20);
    r[4 * g + 1] = _mm256_permute2x128_si256(b26, b37, 0x20);
    r[4 * g + 2] = _mm256_permute2x128_si256(b04, b15, 0x31);
    r[4 * g + 3] = _mm256_permute2x128_si256(b26, b37, 0x31);
  }
}

__attribute__((target("avx2"))) inline void philox_blocks_avx2(uint64_t seed, uint64_t q0, int64_t nq,
                                                               uint32_t* __restrict out) {
  PhiloxKeys8 keys;
  philox_keys8(seed, keys);
  int64_t i = 0;
  for (; i + 24 <= nq; i += 24) {  // 3 interleaved groups, as the fused apply loop in td_cpu.cpp
    __m256i r[12];
    philox8_avx2<3>(keys, q0 + (uint64_t)i, r);
    __m256i* o = reinterpret_cast<__m256i*>(out + 4 * i);
    for (int j = 0; j < 12; ++j) _mm256_storeu_si256(o + j, r[j]);
  }
  for (; i + 8 <= nq; i += 8) {
    __m256i r[4];
    philox8_avx2<1>(keys, q0 + (uint64_t)i, r);
    __m256i* o = reinterpret_cast<__m256i*>(out + 4 * i);
    for (int j = 0; j < 4; ++j) _mm256_storeu_si256(o + j, r[j]);
  }
  if (i < nq) philox_blocks_portable(seed, q0 + (uint64_t)i, nq - i, out + 4 * i);
}

// AVX-512F: the same words as philox8_avx2 (same output layout), 8 blocks per 512-bit register
// with each 32-bit state word in a 64-bit lane: vpmuludq then yields the whole 64-bit product
// (no shuffles to split it), and a 3-way XOR is one vpternlogd. 0.50 ns/word against 0.89 for
// philox8_avx2 on the 2-core Xeon (Cascade Lake) dev VM, 3 groups interleaved.
struct PhiloxKeys16 {
  __m512i k0[10], k1[10];
};

__attribute__((target("avx512f"))) inline void philox_keys16(uint64_t seed, PhiloxKeys16& keys) {
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    keys.k0[r] = _mm512_set1_epi32((int)k0);  // both halves of each 64-bit lane: the high
    keys.k1[r] = _mm512_set1_epi32((int)k1);  // halves hold don't-care bits anyway
  }
}

// r[4 g + j] = words 8j .. 8j+7 after position 4 (q + 8 g), as philox8_avx2. The high 32 bits
// of every 64-bit lane are don't-care (vpmuludq reads only the low 32) until the end.
template <int N>
__attribute__((target("avx512f"), always_inline)) inline void philox8_avx512(const PhiloxKeys16& keys, uint64_t q,
                                                                            __m256i* r) {
  const __m512i M0 = _mm512_set1_epi64(kPhiloxM0), M1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[N], c1[N], c2[N], c3[N];
  for (int g = 0; g < N; ++g) {  // round 1: counter (q lo, q hi, 0, 0), so the M1 product is 0
    const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64((long long)(q + 8 * (uint64_t)g)), iota);
    const __m512i p0 = _mm512_mul_epu32(ctr, M0);
    c0[g] = _mm512_xor_si512(_mm512_srli_epi64(ctr, 32), keys.k0[0]);
    c1[g] = _mm512_setzero_si512();
    c2[g] = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), keys.k1[0]);
    c3[g] = p0;
  }
  for (int rnd = 1; rnd < 10; ++rnd)
    for (int g = 0; g < N; ++g) {
      const __m512i p0 = _mm512_mul_epu32(c0[g], M0), p1 = _mm512_mul_epu32(c2[g], M1);
      c0[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c1[g], keys.k0[rnd], 0x96);  // a ^ b ^ c
      c2[g] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c3[g], keys.k1[rnd], 0x96);
      c1[g] = p1;
      c3[g] = p0;
    }
  const __m512i lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int g = 0; g < N; ++g) {  // lanes (x, y) and (z, w) of each block, then blocks in order
    const __m512i xy = _mm512_mask_blend_epi32(0xAAAA, c0[g], _mm512_slli_epi64(c1[g], 32));
    const __m512i zw = _mm512_mask_blend_epi32(0xAAAA, c2[g], _mm512_slli_epi64(c3[g], 32));
    const __m512i a = _mm512_permutex2var_epi64(xy, lo, zw), b = _mm512_permutex2var_epi64(xy, hi, zw);
    r[4 * g + 0] = _mm512_castsi512_si256(a);
    r[4 * g + 1] = _mm512_extracti64x4_epi64(a, 1);
    r[4 * g + 2] = _mm512_castsi512_si256(b);
    r[4 * g + 3] = _mm512_extracti64x4_epi64(b, 1);
  }
}

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();  // safe to call again; needed if we run before libgcc's constructor
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
// AVX-512F and AVX2 (the tile loops use both), unless TD_KERNELS_AVX512=0
inline bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    const char* e = getenv("TD_KERNELS_AVX512");
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") != 0 && !(e && e[0] == '0' && e[1] == 0);
  }();
  return has;
}
#endif

// The vector loops this CPU runs: AVX-512 (F, with AVX2) > AVX2 > portable.
enum class Simd { kNone, kAvx2, kAvx512 };
inline Simd best_simd() {
#if TD_HAVE_AVX2_PATH
  return cpu_has_avx512() ? Simd::kAvx512 : cpu_has_avx2() ? Simd::kAvx2 : Simd::kNone;
#else
  return Simd::kNone;
#endif
}

inline void philox_blocks(uint64_t seed, uint64_t q0, int64_t nq, uint32_t* __restrict out) {
#if TD_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return philox_blocks_avx2(seed, q0, nq, out);
#endif
  philox_blocks_portable(seed, q0, nq, out);
}

}  // namespace td

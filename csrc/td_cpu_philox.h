// td_cpu_philox.h -- Philox4x32-10 (td_core.h) over runs of consecutive blocks on the CPU.
//
// The CPU kernels draw words for every position of a row, so the random stream is their
// largest compute cost. Two versions write the same words as td::philox_block:
//   philox_blocks_portable  16 blocks at a time in struct-of-arrays form, which compilers
//                           vectorize at the baseline ISA (SSE2 on x86-64, NEON on arm64);
//   philox_blocks_avx2      8 blocks per 256-bit register with explicit intrinsics (2x the
//                           portable one here), compiled for AVX2 with a target attribute and
//                           picked at run time only where the CPU has AVX2.
// Torch-free: csrc/tests/test_core.cpp checks both against td::philox_block.
#pragma once

#include <stdint.h>

#include "td_core.h"

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
__attribute__((target("avx2"))) inline void philox_blocks_avx2(uint64_t seed, uint64_t q0, int64_t nq,
                                                               uint32_t* __restrict out) {
  const __m256i M0 = _mm256_set1_epi64x(kPhiloxM0), M1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i W0 = _mm256_set1_epi32((int)kPhiloxW0), W1 = _mm256_set1_epi32((int)kPhiloxW1);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  int64_t i = 0;
  for (; i + 8 <= nq; i += 8) {
    const uint64_t q = q0 + (uint64_t)i;
    // counters q .. q+7: low words, plus a carry into the high word where the low one wraps
    const __m256i qlo = _mm256_set1_epi32((int)(uint32_t)q);
    __m256i c0 = _mm256_add_epi32(qlo, iota);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(qlo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(q >> 32)), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    __m256i k0 = _mm256_set1_epi32((int)(uint32_t)seed), k1 = _mm256_set1_epi32((int)(uint32_t)(seed >> 32));
    for (int r = 0; r < 10; ++r) {
      // 32x32 -> 64 products of the even lanes, then of the odd lanes shifted down
      const __m256i pe0 = _mm256_mul_epu32(c0, M0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), M0);
      const __m256i pe1 = _mm256_mul_epu32(c2, M1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), M1);
      const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
      c3 = lo0;
      k0 = _mm256_add_epi32(k0, W0);
      k1 = _mm256_add_epi32(k1, W1);
    }
    // transpose the 4 x 8 words into 8 blocks of 4
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i b04 = _mm256_unpacklo_epi64(t0, t2), b15 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i b26 = _mm256_unpacklo_epi64(t1, t3), b37 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* o = reinterpret_cast<__m256i*>(out + 4 * i);
    _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(b04, b15, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(b26, b37, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(b04, b15, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(b26, b37, 0x31));
  }
  if (i < nq) philox_blocks_portable(seed, q0 + (uint64_t)i, nq - i, out + 4 * i);
}

inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();  // safe to call again; needed if we run before libgcc's constructor
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}
#endif

inline void philox_blocks(uint64_t seed, uint64_t q0, int64_t nq, uint32_t* __restrict out) {
#if TD_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return philox_blocks_avx2(seed, q0, nq, out);
#endif
  philox_blocks_portable(seed, q0, nq, out);
}

}  // namespace td

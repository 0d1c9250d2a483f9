// td_cpu_kernels.h -- the CPU kernels' row loops, torch-free (raw pointers, no ATen), so the
// host unit test csrc/tests/test_core.cpp runs exactly the loops td_cpu.cpp runs; td_cpu.cpp
// only allocates tensors and splits the work into pieces across threads.
//
// A piece is the columns [j0, j1) of one row u, j0 a multiple of 32 (so a piece owns whole
// words of the bit-packed mask, and threads never share a word). Column j sits at the stream
// position pos0 + j, pos0 = origin + u * row_stride (td_core.h, Window).
//
//   apply_row       out = keep ? val : +0 with keep = !(candidate && word(pos) < D); optionally
//                   also writes keep bits. The candidates come from W's rank values and the
//                   row's limit (weight targeting, CandKeys) or from a bit array (N:M targeting,
//                   CandBits, filled by nm_candidates). Philox4x32-10 once per 4 positions.
//                   With AVX2 (32- and 16-bit types) the words of 96 positions at a time stay in
//                   registers and are used at once (apply_tiles in td_cpu_tiles.inc, built for
//                   AVX2 and for AVX-512, whose Philox is 1.8x faster); otherwise, and for the
//                   few positions before the first block boundary and after the last whole
//                   tile, 1024 words at a time go through a 4 KiB buffer in L1. No words at all
//                   when D is 0 or 2**32 or the row has no candidate.
//   apply_bits_row  out = keep ? val : +0 with keep read from the bit mask (the backward that
//                   reads only grad and bits: no W, no Philox).
//   nm_candidates   the N:M candidate bits of a piece: per group of m, the m - n first in
//                   (key, j) order (td::nm_group_candidates: m (m - 1) / 2 compares per
//                   group; with AVX2, 8 groups at a time, one per lane).
//   row_threshold   weight targeting's per-row threshold (td_select.h).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../td_core.h"
#include "td_cpu_philox.h"
#include "td_select.h"

namespace td {

constexpr uint64_t kDropAll = uint64_t(1) << 32;  // D = 2**32: every candidate drops
constexpr int64_t kWordsChunk = 1024;             // words per Philox batch: 4 KiB, stays in L1

// Weight targeting: column j is a candidate iff rv(wk[j]) <= lim (lim in rank-value space,
// Fm::rv_limit of the row's limit; -1 = no candidate).
struct CandKeys {
  int32_t lim;
};
// N:M targeting: column j is a candidate iff bit (j - col0) of `bits` is set (nwords words).
struct CandBits {
  const uint32_t* bits;
  int64_t col0, nwords;
};

template <class Fm>
inline bool is_candidate(const CandKeys& c, const typename Fm::S* wk, int64_t j) {
  return (int32_t)Fm::rv(wk[j]) <= c.lim;
}
template <class Fm>
inline bool is_candidate(const CandBits& c, const typename Fm::S*, int64_t j) {
  return bit_at(c.bits, j - c.col0);
}

// Keep bits of the columns [j0, j1) of a row all set (j0 a multiple of 32, words zeroed).
inline void set_keep_bits(uint32_t* bits, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 32) bits[j >> 5] = j1 - j >= 32 ? ~0u : (1u << (j1 - j)) - 1u;
}

// The general loop over columns [a, b) (any alignment): words through an L1 buffer (none when
// kAll: D = 2**32), keep bits OR-ed into `bits` (zeroed by the caller) when given.
template <class Fm, class Cand, bool kAll>
void apply_scalar(const typename Fm::S* __restrict wk, const typename Fm::S* __restrict val,
                  typename Fm::S* __restrict out, int64_t a, int64_t b, uint64_t pos0, const Cand& cand,
                  uint64_t seed, uint32_t D32, uint32_t* bits) {
  using S = typename Fm::S;
  alignas(64) uint32_t words[kWordsChunk + 8];
  uint32_t acc = 0;  // keep bits of the current word, flushed at each word's last column
  while (a < b) {
    const int64_t n = std::min(kWordsChunk, b - a);
    const uint64_t p = pos0 + (uint64_t)a;
    if (!kAll) philox_blocks(seed, p >> 2, (int64_t)(((p + n - 1) >> 2) - (p >> 2) + 1), words);
    const uint32_t* wd = words + (p & 3);
    for (int64_t i = 0; i < n; ++i) {  // branch-free: drops are random, branches would miss
      const int64_t j = a + i;
      const uint32_t drop = (uint32_t)is_candidate<Fm>(cand, wk, j) & (kAll ? 1u : (uint32_t)(wd[i] < D32));
      out[j] = val[j] & (S)((S)drop - S(1));
      if (bits) {
        acc |= (drop ^ 1u) << (j & 31);
        if ((j & 31) == 31 || j == b - 1) {
          bits[j >> 5] |= acc;
          acc = 0;
        }
      }
    }
    a += n;
  }
}

#if TD_HAVE_AVX2_PATH
constexpr int kTileGroups = 3;  // Philox groups of 8 blocks interleaved per step (ILP)

#define TD_TILE_NS tiles_avx2
#define TD_TILE_ATTR __attribute__((target("avx2")))
#define TD_TILE_KEYS PhiloxKeys8
#define TD_TILE_PHILOX philox8_avx2
#include "td_cpu_tiles.inc"
#undef TD_TILE_NS
#undef TD_TILE_ATTR
#undef TD_TILE_KEYS
#undef TD_TILE_PHILOX
#define TD_TILE_NS tiles_avx512
#define TD_TILE_ATTR __attribute__((target("avx2,avx512f")))
#define TD_TILE_KEYS PhiloxKeys16
#define TD_TILE_PHILOX philox8_avx512
#include "td_cpu_tiles.inc"
#undef TD_TILE_NS
#undef TD_TILE_ATTR
#undef TD_TILE_KEYS
#undef TD_TILE_PHILOX
#endif

// Per-thread state of apply_row: which tile loops this CPU runs, and their Philox round keys
// (computed once per seed).
struct ApplyCtx {
  Simd simd = Simd::kNone;  // kNone for families without tiles (float64)
#if TD_HAVE_AVX2_PATH
  uint64_t seed8 = 0, seed16 = 0;
  bool have8 = false, have16 = false;
  PhiloxKeys8 keys8;
  PhiloxKeys16 keys16;
  const PhiloxKeys8& keys_avx2(uint64_t s) {
    if (!have8 || s != seed8) philox_keys8(s, keys8);
    have8 = true;
    seed8 = s;
    return keys8;
  }
  const PhiloxKeys16& keys_avx512(uint64_t s) {
    if (!have16 || s != seed16) philox_keys16(s, keys16);
    have16 = true;
    seed16 = s;
    return keys16;
  }
#endif
};

template <class Fm, class Cand, bool kAll>
void apply_general(const typename Fm::S* wk, const typename Fm::S* val, typename Fm::S* out, int64_t j0,
                   int64_t j1, uint64_t pos0, const Cand& cand, uint64_t seed, uint32_t D32, uint32_t* bits,
                   ApplyCtx& ctx) {
  int64_t j = j0;
#if TD_HAVE_AVX2_PATH
  if constexpr (sizeof(typename Fm::S) <= 4) {
    if (ctx.simd != Simd::kNone && j1 - j0 >= 35) {  // up to the next block boundary, then tiles
      const int64_t head = std::min(j1, j0 + (int64_t)((4 - ((pos0 + (uint64_t)j0) & 3)) & 3));
      apply_scalar<Fm, Cand, kAll>(wk, val, out, j0, head, pos0, cand, seed, D32, bits);
      if (ctx.simd == Simd::kAvx512)
        j = tiles_avx512::apply_tiles<Fm, Cand, kAll>(wk, val, out, head, j1, pos0, cand,
                                                      kAll ? ctx.keys16 : ctx.keys_avx512(seed), D32, bits);
      else
        j = tiles_avx2::apply_tiles<Fm, Cand, kAll>(wk, val, out, head, j1, pos0, cand,
                                                    kAll ? ctx.keys8 : ctx.keys_avx2(seed), D32, bits);
    }
  }
#endif
  apply_scalar<Fm, Cand, kAll>(wk, val, out, j, j1, pos0, cand, seed, D32, bits);  // the rest
}

// out[j] = val[j], or +0 where column j of this row is dropped, for j in [j0, j1) (j0 a
// multiple of 32); keep bits into bits[j / 32] when bits is not null (the row's words).
// wk and val are one array in the forward (w, w) and two in the backward (w, grad).
template <class Fm, class Cand>
void apply_row(const typename Fm::S* wk, const typename Fm::S* val, typename Fm::S* out, int64_t j0, int64_t j1,
               uint64_t pos0, const Cand& cand, uint64_t seed, uint64_t D, uint32_t* bits, ApplyCtx& ctx) {
  using S = typename Fm::S;
  if (j0 >= j1) return;
  if (bits) memset(bits + (j0 >> 5), 0, sizeof(uint32_t) * (size_t)(((j1 + 31) >> 5) - (j0 >> 5)));
  bool none = D == 0, all = false;  // no drop at all / every column drops
  if constexpr (std::is_same<Cand, CandKeys>::value) {
    none = none || cand.lim < 0;
    all = D == kDropAll && cand.lim >= (int32_t)((1u << Fm::kBits) - 1);
  }
  if (none) {
    memcpy(out + j0, val + j0, sizeof(S) * (size_t)(j1 - j0));
    if (bits) set_keep_bits(bits, j0, j1);
  } else if (all) {
    memset(out + j0, 0, sizeof(S) * (size_t)(j1 - j0));  // all-zero bits are +0.0; keep bits stay 0
  } else if (D == kDropAll) {  // every candidate drops: no random words needed (pruning)
    apply_general<Fm, Cand, true>(wk, val, out, j0, j1, pos0, cand, seed, 0, bits, ctx);
  } else {
    apply_general<Fm, Cand, false>(wk, val, out, j0, j1, pos0, cand, seed, (uint32_t)D, bits, ctx);
  }
}

// Ask for the next row while this one is selected and applied (it is read first by the
// selection's strided sample, whose scattered misses the hardware prefetchers do not cover:
// ~10% of the forward on the dev VM, 4096 x 4096, DRAM-resident).
inline void prefetch_row(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 0, 3);
}

// ---- weight targeting: a row's threshold ------------------------------------------------------
// Scratch of one thread for row_threshold (rows of up to F elements).
struct SelectScratch {
  std::vector<uint32_t> buf0, buf1;
  uint32_t hist[kRadixBins];
  explicit SelectScratch(int64_t F) : buf0(select_scratch_size(F)), buf1(select_scratch_size(F)) {}
};

// The rank value at 0-based position k (0 < k < F) of one row: its threshold t (candidates:
// rv < t). With AVX2 or AVX-512: the sample-bracketed selection (td_select.h), ~4x faster than
// radix on the dev VM. Without: radix select (its portable sample sorts would be 2x slower),
// the rank values and the first digit's histogram counted in one pass.
template <class Fm>
uint32_t row_threshold(const typename Fm::S* row, int64_t F, int64_t k, SelectScratch& s, Simd simd) {
  if (simd != Simd::kNone) return select_rank_sampled<Fm>(row, F, k, s.buf0.data(), s.buf1.data(), s.hist, simd);
  uint32_t* rv = s.buf0.data();
  memset(s.hist, 0, sizeof(s.hist));
  const int shift = radix_first_shift(Fm::kBits);
  for (int64_t j = 0; j < F; ++j) {
    rv[j] = Fm::rv(row[j]);
    ++s.hist[radix_digit(rv[j], shift)];
  }
  return select_rank_counted(rv, F, k, s.hist, Fm::kBits);
}

// ---- the backward from the bit mask ---------------------------------------------------------
// out[j] = keep(j) ? val[j] : +0 for j in [j0, j1), j0 a multiple of 32; reads val and the
// row's bit words only. With AVX2, 32 columns per word: the word's bits widened to lane masks.
template <class S>
inline void apply_bits_scalar(const S* __restrict val, S* __restrict out, const uint32_t* bits, int64_t j0,
                              int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) out[j] = val[j] & (S)(S(0) - (S)((bits[j >> 5] >> (j & 31)) & 1u));
}

#if TD_HAVE_AVX2_PATH
template <class S>
__attribute__((target("avx2"))) int64_t apply_bits_avx2(const S* __restrict val, S* __restrict out,
                                                        const uint32_t* bits, int64_t j, int64_t j1) {
  static_assert(sizeof(S) == 4 || sizeof(S) == 2, "32- or 16-bit type");
  const __m256i sel32 = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i sel16 = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          -32768);
  for (; j + 32 <= j1; j += 32) {
    const uint32_t b = bits[j >> 5];
    if constexpr (sizeof(S) == 4) {
      for (int v = 0; v < 4; ++v) {
        const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(b >> (8 * v))), sel32), sel32);
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(val + j + 8 * v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 8 * v), _mm256_and_si256(keep, x));
      }
    } else {
      for (int v = 0; v < 2; ++v) {
        const __m256i keep =
            _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(b >> (16 * v))), sel16), sel16);
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(val + j + 16 * v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 16 * v), _mm256_and_si256(keep, x));
      }
    }
  }
  return j;
}
#endif

template <class S>
void apply_bits_row(const S* val, S* out, const uint32_t* bits, int64_t j0, int64_t j1, Simd simd) {
  int64_t j = j0;
#if TD_HAVE_AVX2_PATH
  if constexpr (sizeof(S) <= 4)
    if (simd != Simd::kNone) j = apply_bits_avx2<S>(val, out, bits, j0, j1);
#endif
  (void)simd;
  apply_bits_scalar<S>(val, out, bits, j, j1);
}

// ---- N:M candidates -------------------------------------------------------------------------
// Candidate bits of the columns [j0, j1) of a row (both multiples of m, j0 of 32) into
// cbits[0 ..): bit (j - j0). cbits needs (j1 - j0 + 31) / 32 words; all are written.
// Groups are ranked by rank value, which orders exactly like the SPEC key (td_core.h).

// Appends runs of bits to consecutive words (a register buffer, each word stored once: OR-ing
// each group into memory chained every group through store-to-load forwarding).
struct BitWriter {
  uint32_t* words;
  uint64_t buf = 0;
  int nbuf = 0;
  explicit BitWriter(uint32_t* w) : words(w) {}
  void put(uint32_t bits, int count) {  // count <= 32, bits above count are 0
    buf |= (uint64_t)bits << nbuf;
    nbuf += count;
    if (nbuf >= 32) {
      *words++ = (uint32_t)buf;
      buf >>= 32;
      nbuf -= 32;
    }
  }
  void flush() {
    if (nbuf > 0) *words++ = (uint32_t)buf;
    buf = 0;
    nbuf = 0;
  }
};
#if TD_HAVE_AVX2_PATH
// 8 groups at a time, one per lane: element l of the 8 groups transposed into k[l] (through a
// 1 KiB L1 buffer: scalar loads beat AVX2 gathers here), then one compare per pair (l < i) as
// in td::nm_group_candidates: m (m - 1) / 2 compares per 8 groups. Returns where it stopped.
template <class Fm, int kM>  // kM: m known at compile time (the common 2, 4, 8, 16), or 0
__attribute__((target("avx2"))) int64_t nm_candidates_avx2(const typename Fm::S* row, int64_t j0, int64_t j1, int n,
                                                           int m_, BitWriter& out) {
  const int m = kM ? kM : m_;
  const __m256i one = _mm256_set1_epi32(1), quota = _mm256_set1_epi32(m - n);  // candidates: rank < m - n
  alignas(32) uint32_t soa[16 * 8];
  int64_t g = j0;
  for (; g + 8 * (int64_t)m <= j1; g += 8 * (int64_t)m) {
    for (int q = 0; q < 8; ++q)
      for (int l = 0; l < m; ++l) soa[8 * l + q] = Fm::rv(row[g + q * m + l]);
    __m256i k[16], r[16];
    for (int l = 0; l < m; ++l) {
      k[l] = _mm256_load_si256(reinterpret_cast<const __m256i*>(soa + 8 * l));
      r[l] = _mm256_setzero_si256();
    }
    for (int i = 1; i < m; ++i)
      for (int l = 0; l < i; ++l) {
        const __m256i later = _mm256_cmpgt_epi32(k[l], k[i]);  // -1: i comes before l
        r[i] = _mm256_add_epi32(r[i], _mm256_add_epi32(later, one));
        r[l] = _mm256_sub_epi32(r[l], later);
      }
    __m256i acc = _mm256_setzero_si256();
    for (int i = 0; i < m; ++i)
      acc = _mm256_or_si256(acc, _mm256_and_si256(_mm256_cmpgt_epi32(quota, r[i]), _mm256_set1_epi32(1 << i)));
    alignas(32) uint32_t c[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), acc);
    for (int q = 0; q < 8; ++q) out.put(c[q], m);
  }
  return g;
}
#endif

template <class Fm>
void nm_candidates(const typename Fm::S* row, int64_t j0, int64_t j1, int n, int m, uint32_t* cbits, Simd simd) {
  BitWriter out(cbits);
  int64_t g = j0;
#if TD_HAVE_AVX2_PATH
  if constexpr (sizeof(typename Fm::S) <= 4)
    if (simd != Simd::kNone) {
      switch (m) {
        case 2: g = nm_candidates_avx2<Fm, 2>(row, j0, j1, n, m, out); break;
        case 4: g = nm_candidates_avx2<Fm, 4>(row, j0, j1, n, m, out); break;
        case 8: g = nm_candidates_avx2<Fm, 8>(row, j0, j1, n, m, out); break;
        case 16: g = nm_candidates_avx2<Fm, 16>(row, j0, j1, n, m, out); break;
        default: g = nm_candidates_avx2<Fm, 0>(row, j0, j1, n, m, out);
      }
    }
#endif
  (void)simd;
  uint32_t keys[16];
  for (; g < j1; g += m) {
    for (int l = 0; l < m; ++l) keys[l] = Fm::rv(row[g + l]);
    out.put(nm_group_candidates(keys, n, m), m);
  }
  out.flush();
}

}  // namespace td

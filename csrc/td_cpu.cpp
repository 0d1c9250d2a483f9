// td_cpu.cpp -- the CPU kernels of backend "native" (SPEC.md sections 4-7), registered as the
// CPU implementation of the td_kernels_native ops (schemas in td_ops.cpp).
//
// Weight targeting, per unit (row) of F elements:
//   select  one pass reads the row, writes its rank values rv and counts their top 11-bit
//           digit; a radix select (td_select.h) then narrows to the rank-k value on the
//           survivors only (typically < 5% of the row): O(F), ~F reads + F 4-byte writes.
//   apply   Philox4x32-10 once per 4 stream positions, then a branch-free select
//           out = (rv <= limit && word < D) ? +0 : w: reads w once more (from L1/L2: rows
//           are selected and applied back to back) and writes out once. With AVX2 (32-
//           and 16-bit dtypes) the words of 96 positions at a time stay in registers and
//           are used at once (apply_tiles_avx2); otherwise, and for the few positions at
//           a row's ends, 1024 words at a time go through a 4 KiB buffer in L1.
//           No words at all when D is 0 or 2**32 or the row has no candidate.
// Memory traffic per element: one DRAM read of w, one DRAM write of out (sizeof(T) each);
// the rv buffer and the words stay in cache. The backward reads w (keys) and grad, writes
// grad_w: 3 * sizeof(T) per element, 4 bytes per unit (limit); Philox is its only compute
// (~0.55 ns per element per core with AVX2), which the memory streams mostly hide on large
// weights.
// Unit targeting: one read of w for the norms (squares summed in float64, the norm rounded
// once to float32; float64 weights keep a float64 norm), a selection over the U norm keys,
// then a row copy or a row of zeros: 2 reads + 1 write.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "td_checks.h"
#include "td_core.h"
#include "td_cpu_philox.h"
#include "td_select.h"

namespace td_native {
namespace {

using td::FamBF16;
using td::FamF16;
using td::FamF32;
using td::FamF64;

template <class Fn>
void dispatch_family(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(FamF32{}); break;
    case at::kDouble: fn(FamF64{}); break;
    case at::kHalf: fn(FamF16{}); break;
    case at::kBFloat16: fn(FamBF16{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

template <class Fm>
typename Fm::S* ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Fm::S*>(t.data_ptr());
}

constexpr uint64_t kDropAll = uint64_t(1) << 32;
constexpr int64_t kChunk = 1024;        // words per Philox batch: 4 KiB, stays in L1
constexpr int64_t kGrainElems = 32768;  // elements per parallel task (amortizes the fork)

// The general case of apply_range on positions [p, e) of one row (limit lim >= 0, 0 < D < 2**32):
// Philox words for 1024 positions at a time into an L1 buffer, then a branch-free select.
template <class Fm>
void apply_words(const typename Fm::S* __restrict wk, const typename Fm::S* __restrict val,
                 typename Fm::S* __restrict out, int64_t p, int64_t e, int32_t lim, uint64_t seed,
                 uint32_t D32) {
  using S = typename Fm::S;
  alignas(64) uint32_t words[kChunk + 8];
  while (p < e) {
    const int64_t n = std::min(kChunk, e - p);
    const uint64_t q0 = (uint64_t)p >> 2, q1 = (uint64_t)(p + n - 1) >> 2;
    td::philox_blocks(seed, q0, (int64_t)(q1 - q0 + 1), words);
    const uint32_t* wd = words + (p & 3);
    const S* wkp = wk + p;
    const S* vp = val + p;
    S* op = out + p;
    for (int64_t i = 0; i < n; ++i) {  // branch-free: drops are random, branches would miss
      const uint32_t drop = (uint32_t)((int32_t)Fm::rv(wkp[i]) <= lim) & (uint32_t)(wd[i] < D32);
      op[i] = vp[i] & (S)((S)drop - S(1));
    }
    p += n;
  }
}

#if TD_HAVE_AVX2_PATH
constexpr int kTileGroups = 3;  // Philox groups of 8 blocks interleaved per tile (ILP)

// Positions p .. p+31 (p a multiple of 4) given their 32 words r[0..3] in stream order.
template <class Fm>
__attribute__((target("avx2"), always_inline)) inline void tile32(const typename Fm::S* __restrict wk,
                                                                  const typename Fm::S* __restrict val,
                                                                  typename Fm::S* __restrict out, int64_t p,
                                                                  const __m256i* r, int32_t lim, uint32_t D32) {
  using S = typename Fm::S;
  static_assert(sizeof(S) == 4 || sizeof(S) == 2, "32- or 16-bit family");
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i Dx = _mm256_set1_epi32((int)(D32 ^ 0x80000000u));  // word < D: signed compare after ^ sign
  __m256i lt[4];  // all ones where the word is below D
  for (int j = 0; j < 4; ++j) lt[j] = _mm256_cmpgt_epi32(Dx, _mm256_xor_si256(r[j], sign));
  if constexpr (sizeof(S) == 4) {  // rv = bits & 0x7FFFFFFF, compared as int32 with lim
    const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF), limv = _mm256_set1_epi32(lim);
    for (int j = 0; j < 4; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + p + 8 * j));
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(val + p + 8 * j));
      const __m256i noncand = _mm256_cmpgt_epi32(_mm256_and_si256(w, mag), limv);
      const __m256i drop = _mm256_andnot_si256(noncand, lt[j]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p + 8 * j), _mm256_andnot_si256(drop, v));
    }
  } else {  // rv = bits & 0x7FFF <= 0x7FFF: int16 compare with lim clamped to 0x7FFF
    const __m256i mag = _mm256_set1_epi16(0x7FFF);
    const __m256i limv = _mm256_set1_epi16((short)std::min<int32_t>(lim, 0x7FFF));
    for (int j = 0; j < 2; ++j) {
      // 16-bit masks of 16 words; packs works per 128-bit lane, permute4x64 restores the order
      const __m256i lt16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(lt[2 * j], lt[2 * j + 1]), 0xD8);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + p + 16 * j));
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(val + p + 16 * j));
      const __m256i noncand = _mm256_cmpgt_epi16(_mm256_and_si256(w, mag), limv);
      const __m256i drop = _mm256_andnot_si256(noncand, lt16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p + 16 * j), _mm256_andnot_si256(drop, v));
    }
  }
}

// The same as apply_words for 32- and 16-bit families, fused: each 32-position tile (8 Philox
// blocks, p a multiple of 4) gets its words in registers (td::philox8_avx2, kTileGroups tiles
// interleaved: 96 positions per step, 1.4x faster than one tile at a time here) and is
// selected right away, so no word buffer is written or read and the Philox arithmetic
// overlaps the loads of w and val. Handles whole tiles from p on (then single tiles);
// returns the first position not done.
template <class Fm>
__attribute__((target("avx2"))) int64_t apply_tiles_avx2(const typename Fm::S* __restrict wk,
                                                         const typename Fm::S* __restrict val,
                                                         typename Fm::S* __restrict out, int64_t p, int64_t e,
                                                         int32_t lim, const td::PhiloxKeys8& keys, uint32_t D32) {
  for (; p + 32 * kTileGroups <= e; p += 32 * kTileGroups) {
    __m256i r[4 * kTileGroups];
    td::philox8_avx2<kTileGroups>(keys, (uint64_t)p >> 2, r);
    for (int g = 0; g < kTileGroups; ++g) tile32<Fm>(wk, val, out, p + 32 * g, r + 4 * g, lim, D32);
  }
  for (; p + 32 <= e; p += 32) {
    __m256i r[4];
    td::philox8_avx2<1>(keys, (uint64_t)p >> 2, r);
    tile32<Fm>(wk, val, out, p, r, lim, D32);
  }
  return p;
}
#endif

// out[p] = val[p], or +0 where element p (a candidate, rv(wk[p]) <= lim_rv[row]) draws a word
// below D; flat positions p in [a, b) of a U x F matrix. wk and val are one tensor in the
// forward (w, w) and two in the backward (w for the keys, grad for the values).
template <class Fm>
void apply_range(const typename Fm::S* __restrict wk, const typename Fm::S* __restrict val,
                 typename Fm::S* __restrict out, int64_t F, const int32_t* lim_rv, int64_t a,
                 int64_t b, uint64_t seed, uint64_t D) {
  using S = typename Fm::S;
#if TD_HAVE_AVX2_PATH
  constexpr bool kFused = sizeof(S) <= 4;
  const bool fused = kFused && td::cpu_has_avx2();
  td::PhiloxKeys8 keys;  // computed on first use: rows shorter than a tile never need them
  bool have_keys = false;
#endif
  for (int64_t p = a; p < b;) {
    const int64_t u = p / F, row_end = std::min(b, (u + 1) * F);
    const int32_t lim = lim_rv[u];
    if (lim < 0 || D == 0) {  // no candidate in this row, or nothing drops
      std::memcpy(out + p, val + p, sizeof(S) * (row_end - p));
      p = row_end;
      continue;
    }
    if (D == kDropAll && lim >= (int32_t)((1u << Fm::kBits) - 1)) {  // every element drops
      std::memset(out + p, 0, sizeof(S) * (row_end - p));                // (+0), nothing read
      p = row_end;
      continue;
    }
    if (D == kDropAll) {  // every candidate drops: no random words needed (pruning)
      for (int64_t i = p; i < row_end; ++i) {
        const S keep = (S)((int32_t)Fm::rv(wk[i]) <= lim) - S(1);  // all ones or 0
        out[i] = val[i] & keep;
      }
      p = row_end;
      continue;
    }
    const uint32_t D32 = (uint32_t)D;
#if TD_HAVE_AVX2_PATH
    if constexpr (kFused) {
      if (fused && row_end - p >= 35) {  // up to the next block boundary, then whole tiles fused
        if (!have_keys) td::philox_keys8(seed, keys);
        have_keys = true;
        const int64_t head = (p + 3) & ~int64_t(3);
        apply_words<Fm>(wk, val, out, p, head, lim, seed, D32);
        p = apply_tiles_avx2<Fm>(wk, val, out, head, row_end, lim, keys, D32);
      }
    }
#endif
    apply_words<Fm>(wk, val, out, p, row_end, lim, seed, D32);  // what is left (all, without AVX2)
    p = row_end;
  }
}

// The rank value at 0-based position k (0 < k < F) of one row: its threshold t.
template <class Fm>
uint32_t row_threshold(const typename Fm::S* row, int64_t F, int64_t k, uint32_t* rv, uint32_t* hist) {
  if (F <= td::kSelectSmall) {
    for (int64_t j = 0; j < F; ++j) rv[j] = Fm::rv(row[j]);
    std::nth_element(rv, rv + k, rv + F);
    return rv[k];
  }
  std::memset(hist, 0, sizeof(uint32_t) * td::kRadixBins);
  const int shift = td::radix_first_shift(Fm::kBits);
  for (int64_t j = 0; j < F; ++j) {  // fused: rank values + first-digit histogram
    const uint32_t v = Fm::rv(row[j]);
    rv[j] = v;
    ++hist[td::radix_digit(v, shift)];
  }
  return td::select_rank_counted(rv, F, k, hist, Fm::kBits);
}

template <class Fm>
void weight_forward(const at::Tensor& w, at::Tensor& out, at::Tensor& limit, int64_t k, uint64_t seed,
                    uint64_t D) {
  const int64_t U = w.size(0), F = w.size(1);
  const auto* wp = ptr<Fm>(w);
  auto* op = ptr<Fm>(out);
  int32_t* lp = limit.data_ptr<int32_t>();
  std::vector<int32_t> lim_rv(U);
  if (k == 0 || k == F) {  // SPEC: no candidate / every element, no selection
    std::fill(lp, lp + U, k == 0 ? -1 : (int32_t)td::kKeyMax);
    std::fill(lim_rv.begin(), lim_rv.end(), k == 0 ? -1 : (int32_t)td::kKeyMax);
    at::parallel_for(0, U * F, kGrainElems, [&](int64_t a, int64_t b) {
      apply_range<Fm>(wp, wp, op, F, lim_rv.data(), a, b, seed, D);
    });
    return;
  }
  auto select_row = [&](int64_t u, uint32_t* rv, uint32_t* hist) {
    const uint32_t t = row_threshold<Fm>(wp + u * F, F, k, rv, hist);
    lp[u] = td::limit_from_threshold_key(Fm::key_from_rv(t));
    lim_rv[u] = (int32_t)t - 1;  // strict: rv < t  <=>  rv <= t - 1
  };
  const int64_t nthreads = at::get_num_threads();
  if (U >= 2 * nthreads || U * F < 4 * kGrainElems) {
    // enough rows to share out: select and apply each row while it is in cache
    at::parallel_for(0, U, std::max<int64_t>(1, kGrainElems / F), [&](int64_t a, int64_t b) {
      std::vector<uint32_t> rv(F);
      uint32_t hist[td::kRadixBins];
      for (int64_t u = a; u < b; ++u) {
        select_row(u, rv.data(), hist);
        apply_range<Fm>(wp, wp, op, F, lim_rv.data(), u * F, (u + 1) * F, seed, D);
      }
    });
  } else {
    // few long rows: select per row, then apply over the flat range with every thread
    at::parallel_for(0, U, 1, [&](int64_t a, int64_t b) {
      std::vector<uint32_t> rv(F);
      uint32_t hist[td::kRadixBins];
      for (int64_t u = a; u < b; ++u) select_row(u, rv.data(), hist);
    });
    at::parallel_for(0, U * F, kGrainElems, [&](int64_t a, int64_t b) {
      apply_range<Fm>(wp, wp, op, F, lim_rv.data(), a, b, seed, D);
    });
  }
}

template <class Fm>
void weight_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& limit,
                     at::Tensor& out, uint64_t seed, uint64_t D) {
  const int64_t U = w.size(0), F = w.size(1);
  const int32_t* lp = limit.data_ptr<int32_t>();
  std::vector<int32_t> lim_rv(U);
  for (int64_t u = 0; u < U; ++u) lim_rv[u] = Fm::rv_limit(lp[u]);
  const auto* wp = ptr<Fm>(w);
  const auto* gp = ptr<Fm>(grad);
  auto* op = ptr<Fm>(out);
  at::parallel_for(0, U * F, kGrainElems, [&](int64_t a, int64_t b) {
    apply_range<Fm>(wp, gp, op, F, lim_rv.data(), a, b, seed, D);
  });
}

// L2 norm of each row as reference.unit_norms: squares summed in float64, sqrt in float64,
// rounded once to Fm::Norm (float32; float64 weights keep the float64 norm). The squares of
// 16/32-bit values are exact in float64 and the sum's rounding error (~F * 2**-53 relative)
// is far below float32's, so every summation order gives the same float32 norm except when
// the sum lies that close to a float32 rounding boundary; nor does it overflow or underflow
// for any float32 row. 8 float64 partial sums let the loop vectorize without reassociating
// a single sum. A row holding a NaN gets the canonical NaN (td::norm_from_sum). Reads w once.
template <class Fm>
void unit_norms(const typename Fm::S* w, int64_t U, int64_t F, typename Fm::Norm* norms) {
  at::parallel_for(0, U, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(F, 1)), [&](int64_t a, int64_t b) {
    for (int64_t u = a; u < b; ++u) {
      const auto* row = w + u * F;
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 8 <= F; j += 8)
        for (int l = 0; l < 8; ++l) {
          const double x = Fm::mag(row[j + l]);
          acc[l] += x * x;
        }
      for (; j < F; ++j) {
        const double x = Fm::mag(row[j]);
        acc[0] += x * x;
      }
      const double sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      norms[u] = td::norm_from_sum<typename Fm::Norm>(sum);
    }
  });
}

// keep[u] = not (candidate and word(u) < D); candidates rank strictly below the norm key at
// position k (NaN above +inf). The selection is std::nth_element over U keys: O(U).
template <class Norm>
void unit_keep(const Norm* norms, int64_t U, int64_t k, uint64_t seed, uint64_t D, bool* keep) {
  using Key = decltype(td::norm_key(Norm(0)));
  std::vector<Key> keys(U);
  for (int64_t u = 0; u < U; ++u) keys[u] = td::norm_key(norms[u]);
  Key t = 0;
  if (k > 0 && k < U) {
    std::vector<Key> work(keys);
    std::nth_element(work.begin(), work.begin() + k, work.end());
    t = work[k];
  }
  for (int64_t u = 0; u < U; u += 4) {
    const td::Words4 r = td::philox_block(seed, (uint64_t)u >> 2);  // p = u
    for (int64_t i = u; i < std::min(U, u + 4); ++i) {
      const bool candidate = k == U || (k > 0 && keys[i] < t);
      keep[i] = !(candidate && td::drops(td::lane(r, (unsigned)(i & 3)), D));
    }
  }
}

// out row u = keep[u] ? src row u : +0 row
void apply_rows(const at::Tensor& src, const bool* keep, at::Tensor& out) {
  const int64_t U = src.size(0), F = src.size(1);
  const size_t row_bytes = (size_t)F * src.element_size();
  const auto* sp = static_cast<const char*>(src.data_ptr());
  auto* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, U, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(F, 1)), [&](int64_t a, int64_t b) {
    for (int64_t u = a; u < b; ++u) {
      if (keep[u]) std::memcpy(op + u * row_bytes, sp + u * row_bytes, row_bytes);
      else std::memset(op + u * row_bytes, 0, row_bytes);  // all-zero bits are +0.0
    }
  });
}

// ---- the op implementations (schemas in td_ops.cpp) ------------------------------------------
std::tuple<at::Tensor, at::Tensor> weight_dropout_cpu(const at::Tensor& w, int64_t seed, int64_t k,
                                                      int64_t drop_threshold) {
  check_weight_dropout(w, seed, k, drop_threshold, c10::kCPU);
  at::Tensor out = at::empty_like(w);
  at::Tensor limit = at::empty({w.size(0)}, w.options().dtype(at::kInt));
  if (w.numel() == 0) {
    limit.fill_(k == 0 ? -1 : (int64_t)td::kKeyMax);
    return {out, limit};
  }
  dispatch_family(w.scalar_type(), [&](auto fam) {
    weight_forward<decltype(fam)>(w, out, limit, k, (uint64_t)seed, (uint64_t)drop_threshold);
  });
  return {out, limit};
}

at::Tensor weight_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& limit,
                                       int64_t seed, int64_t drop_threshold) {
  check_weight_dropout_backward(grad, w, limit, seed, drop_threshold, c10::kCPU);
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() == 0) return out;
  dispatch_family(w.scalar_type(), [&](auto fam) {
    weight_backward<decltype(fam)>(grad, w, limit, out, (uint64_t)seed, (uint64_t)drop_threshold);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unit_dropout_cpu(const at::Tensor& w, int64_t seed, int64_t k,
                                                    int64_t drop_threshold) {
  check_unit_dropout(w, seed, k, drop_threshold, c10::kCPU);
  const int64_t U = w.size(0), F = w.size(1);
  at::Tensor out = at::empty_like(w);
  at::Tensor keep = at::empty({U}, w.options().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  dispatch_family(w.scalar_type(), [&](auto fam) {
    using Fm = decltype(fam);
    std::vector<typename Fm::Norm> norms(U);
    unit_norms<Fm>(ptr<Fm>(w), U, F, norms.data());
    unit_keep(norms.data(), U, k, (uint64_t)seed, (uint64_t)drop_threshold, kp);
  });
  if (w.numel() > 0) apply_rows(w, kp, out);
  return {out, keep};
}

at::Tensor unit_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& keep) {
  check_unit_dropout_backward(grad, keep, c10::kCPU);
  at::Tensor out = at::empty_like(grad);
  if (grad.numel() > 0) apply_rows(grad, keep.data_ptr<bool>(), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(td_kernels_native, CPU, m) {
  m.impl("weight_dropout", &weight_dropout_cpu);
  m.impl("weight_dropout_backward", &weight_dropout_backward_cpu);
  m.impl("unit_dropout", &unit_dropout_cpu);
  m.impl("unit_dropout_backward", &unit_dropout_backward_cpu);
}

}  // namespace td_native

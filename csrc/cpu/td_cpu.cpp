// td_cpu.cpp -- the CPU kernels of backend "native" (SPEC.md sections 4-7, 11, 12), registered
// as the CPU implementation of the td_kernels_native ops (schemas in td_ops.cpp). The loops
// live in td_cpu_kernels.h (torch-free, run by the host unit test too); this file allocates
// the outputs and splits the work across threads.
//
// Work is split into pieces: columns [j0, j1) of one row, j0 a multiple of 32 (32 * m for
// N:M, so pieces hold whole groups), rows longer than kGrainElems cut into several pieces.
// A piece owns whole words of the bit mask: no two threads write one word. Which thread runs
// which piece never changes a bit of any output.
//
// Memory traffic per element (T = sizeof(dtype); "DRAM" = traffic of weights past the caches):
//   weight forward       w read once from DRAM (the selection's passes and the apply re-read
//                        the row from L1/L2: rows are selected and applied back to back when
//                        there are enough rows), out written once: 2T; + 1/8 byte with bits.
//   weight backward      recompute: grad and w read, grad_w written: 3T (+ 4 bytes per unit).
//                        bits: grad read, grad_w written, bits read: 2T + 1/8 byte.
//   N:M forward          as the weight forward (candidates from W's keys per group, no
//                        selection): 2T (+ 1/8 byte with bits); backward 3T or 2T + 1/8.
//   unit forward         one read of w for the norms, then a row copy or a row of zeros:
//                        2 reads + 1 write (3T); backward: grad read, grad_w written: 2T.
// Fresh outputs of 4 MiB and more are advised onto transparent huge pages (see new_output).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../td_checks.h"
#include "../td_core.h"
#include "td_cpu_kernels.h"

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
inline uint32_t* words_ptr(const at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

constexpr int64_t kGrainElems = 32768;  // elements per parallel task (amortizes the fork)

// ---- fresh outputs ------------------------------------------------------------------------
// A fresh 64 MiB tensor comes from mmap, and its first write faults in each of its 16384 4 KiB
// pages (the kernel zeroes each one): on the 2-core VM that costs about as much as copying the
// data. Every fresh output pays it (a clone too). With 2 MiB pages the same memory takes 32
// faults. madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a fresh output asks for them
// (transparent huge pages in "madvise" mode, the common default; it is advice: where THP is off
// nothing changes). torch does the same for all its CPU allocations under THP_MEM_ALLOC_ENABLE=1.
// TD_KERNELS_HUGEPAGES=0 turns it off (for comparisons).
bool huge_pages_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("TD_KERNELS_HUGEPAGES");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  return on;
}

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t n = t.nbytes();
  if (n < 2 * kHuge || !huge_pages_enabled()) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + n) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure is harmless
#else
  (void)t;
#endif
}

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  return out;
}


inline td::Window window_of(int64_t origin, int64_t row_stride) {
  return td::Window{(uint64_t)origin, (uint64_t)row_stride};
}

// ---- splitting the work -------------------------------------------------------------------
// fn(u, j0, j1, ctx) for every piece of a U x F matrix; pieces hold `align` columns or a
// multiple (the last of a row: what is left), rows up to kGrainElems are one piece.
template <class Fn>
void run_pieces(int64_t U, int64_t F, int64_t align, td::Simd simd, Fn&& fn) {
  const int64_t len = F <= kGrainElems ? F : std::max(align, kGrainElems / align * align);
  const int64_t per_row = (F + len - 1) / len;
  at::parallel_for(0, U * per_row, std::max<int64_t>(1, kGrainElems / len), [&](int64_t a, int64_t b) {
    td::ApplyCtx ctx;
    ctx.simd = simd;
    for (int64_t i = a; i < b; ++i) {
      const int64_t u = i / per_row, j0 = (i % per_row) * len;
      fn(u, j0, std::min(F, j0 + len), ctx);
    }
  });
}

// the tile loops apply_row may use for this family (none for float64)
template <class Fm>
td::Simd simd_for() {
  return sizeof(typename Fm::S) <= 4 ? td::best_simd() : td::Simd::kNone;
}

// ---- weight targeting -----------------------------------------------------------------------
// lim_rv[u]: the limit in rank-value space (what apply_row compares); lp: the output limit.
template <class Fm>
void weight_forward(const at::Tensor& w, at::Tensor& out, int32_t* lp, const int32_t* given, int64_t k,
                    uint64_t seed, uint64_t D, td::Window win, uint32_t* bits) {
  const int64_t U = w.size(0), F = w.size(1), W = td::bits_words(F);
  const auto* wp = ptr<Fm>(w);
  auto* op = ptr<Fm>(out);
  std::vector<int32_t> lim_rv(U);
  const td::Simd simd = simd_for<Fm>();
  auto apply = [&](int64_t u, int64_t j0, int64_t j1, td::ApplyCtx& ctx) {
    td::apply_row<Fm>(wp + u * F, wp + u * F, op + u * F, j0, j1, td::row_start(win, u), td::CandKeys{lim_rv[u]},
                      seed, D, bits ? bits + u * W : nullptr, ctx);
  };
  if (given != nullptr || k == 0 || k == F) {  // no selection: the given limits, or SPEC's k = 0 / F
    for (int64_t u = 0; u < U; ++u) {
      lp[u] = given ? given[u] : k == 0 ? -1 : (int32_t)td::kKeyMax;
      lim_rv[u] = Fm::rv_limit(lp[u]);
    }
    run_pieces(U, F, 32, simd, apply);
    return;
  }
  auto select_row = [&](int64_t u, td::SelectScratch& s) {
    const uint32_t t = td::row_threshold<Fm>(wp + u * F, F, k, s, td::best_simd());
    lp[u] = td::limit_from_threshold_key(Fm::key_from_rv(t));
    lim_rv[u] = (int32_t)t - 1;  // strict: rv < t  <=>  rv <= t - 1
  };
  const int64_t nthreads = at::get_num_threads();
  if (U >= 2 * nthreads || U * F < 4 * kGrainElems) {
    // enough rows to share out: select and apply each row while it is in cache
    at::parallel_for(0, U, std::max<int64_t>(1, kGrainElems / F), [&](int64_t a, int64_t b) {
      td::SelectScratch s(F);
      td::ApplyCtx ctx;
      ctx.simd = simd;
      for (int64_t u = a; u < b; ++u) {
        if (u + 1 < b) td::prefetch_row(wp + (u + 1) * F, sizeof(*wp) * (size_t)F);
        select_row(u, s);
        apply(u, 0, F, ctx);
      }
    });
  } else {
    // few long rows: select per row, then apply the pieces with every thread
    at::parallel_for(0, U, 1, [&](int64_t a, int64_t b) {
      td::SelectScratch s(F);
      for (int64_t u = a; u < b; ++u) select_row(u, s);
    });
    run_pieces(U, F, 32, simd, apply);
  }
}

// grad_w = keep ? grad : +0 with keep recomputed from w's keys, the limits and the seed
template <class Fm>
void weight_backward(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& limit, at::Tensor& out,
                     uint64_t seed, uint64_t D, td::Window win) {
  const int64_t U = w.size(0), F = w.size(1);
  const int32_t* lp = limit.data_ptr<int32_t>();
  std::vector<int32_t> lim_rv(U);
  for (int64_t u = 0; u < U; ++u) lim_rv[u] = Fm::rv_limit(lp[u]);
  const auto* wp = ptr<Fm>(w);
  const auto* gp = ptr<Fm>(grad);
  auto* op = ptr<Fm>(out);
  run_pieces(U, F, 32, simd_for<Fm>(), [&](int64_t u, int64_t j0, int64_t j1, td::ApplyCtx& ctx) {
    td::apply_row<Fm>(wp + u * F, gp + u * F, op + u * F, j0, j1, td::row_start(win, u), td::CandKeys{lim_rv[u]},
                      seed, D, nullptr, ctx);
  });
}

// grad_w = keep ? grad : +0 with keep read from the bit mask (weight and N:M targeting alike)
template <class Fm>
void bits_backward(const at::Tensor& grad, const at::Tensor& bits, at::Tensor& out) {
  const int64_t U = grad.size(0), F = grad.size(1), W = td::bits_words(F);
  const auto* gp = ptr<Fm>(grad);
  const uint32_t* bp = words_ptr(bits);
  auto* op = ptr<Fm>(out);
  run_pieces(U, F, 32, simd_for<Fm>(), [&](int64_t u, int64_t j0, int64_t j1, td::ApplyCtx& ctx) {
    td::apply_bits_row(gp + u * F, op + u * F, bp + u * W, j0, j1, ctx.simd);
  });
}

// ---- N:M targeting --------------------------------------------------------------------------
// Each piece computes its groups' candidate bits into a per-thread buffer, then applies them.
// val = w (forward) or grad (backward); bits: the forward's keep mask, or null.
template <class Fm>
void nm_apply(const at::Tensor& w, const typename Fm::S* val, at::Tensor& out, int64_t n, int64_t m,
              uint64_t seed, uint64_t D, td::Window win, uint32_t* bits) {
  const int64_t U = w.size(0), F = w.size(1), W = td::bits_words(F);
  const auto* wp = ptr<Fm>(w);
  auto* op = ptr<Fm>(out);
  run_pieces(U, F, 32 * m, simd_for<Fm>(), [&](int64_t u, int64_t j0, int64_t j1, td::ApplyCtx& ctx) {
    thread_local std::vector<uint32_t> cbits;
    const int64_t nw = (j1 - j0 + 31) / 32;
    if ((int64_t)cbits.size() < nw) cbits.resize(nw);
    const auto* row = wp + u * F;
    td::nm_candidates<Fm>(row, j0, j1, (int)n, (int)m, cbits.data(), ctx.simd);
    td::apply_row<Fm>(row, val + u * F, op + u * F, j0, j1, td::row_start(win, u),
                      td::CandBits{cbits.data(), j0, nw}, seed, D, bits ? bits + u * W : nullptr, ctx);
  });
}

// ---- unit targeting -----------------------------------------------------------------------
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_dropout_cpu(const at::Tensor& w, int64_t seed, int64_t k,
                                                                  int64_t drop_threshold, int64_t origin,
                                                                  int64_t row_stride,
                                                                  const std::optional<at::Tensor>& limit,
                                                                  bool bits, const std::optional<at::Tensor>& dseed,
                                                                  bool /*fused: a CUDA kernel choice*/) {
  seed = cpu_seed(seed, dseed, w);
  check_weight_dropout(w, seed, k, drop_threshold, origin, row_stride, limit, c10::kCPU);
  at::Tensor out = new_output(w);
  at::Tensor lim = at::empty({w.size(0)}, w.options().dtype(at::kInt));
  at::Tensor bt = new_bits(w, bits);
  const int32_t* given = limit.has_value() ? limit->data_ptr<int32_t>() : nullptr;
  if (w.numel() == 0) {  // F = 0 (k = 0) or U = 0: the limits only
    for (int64_t u = 0; u < w.size(0); ++u) lim.data_ptr<int32_t>()[u] = given ? given[u] : -1;
    return {out, lim, bt};
  }
  dispatch_family(w.scalar_type(), [&](auto fam) {
    weight_forward<decltype(fam)>(w, out, lim.data_ptr<int32_t>(), given, k, (uint64_t)seed,
                                  (uint64_t)drop_threshold, window_of(origin, row_stride),
                                  bits ? words_ptr(bt) : nullptr);
  });
  return {out, lim, bt};
}

at::Tensor weight_dropout_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& w,
                                       const std::optional<at::Tensor>& limit, int64_t seed, int64_t drop_threshold,
                                       int64_t origin, int64_t row_stride, const std::optional<at::Tensor>& bits,
                                       const std::optional<at::Tensor>& dseed) {
  seed = cpu_seed(seed, dseed, grad);
  check_weight_dropout_backward(grad, w, limit, bits, seed, drop_threshold, origin, row_stride, c10::kCPU);
  at::Tensor out = new_output(grad);
  if (grad.numel() == 0) return out;
  dispatch_family(grad.scalar_type(), [&](auto fam) {
    using Fm = decltype(fam);
    if (bits.has_value()) bits_backward<Fm>(grad, *bits, out);
    else weight_backward<Fm>(grad, *w, *limit, out, (uint64_t)seed, (uint64_t)drop_threshold,
                             window_of(origin, row_stride));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> nm_dropout_cpu(const at::Tensor& w, int64_t seed, int64_t n, int64_t m,
                                                  int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                                  bool bits, const std::optional<at::Tensor>& dseed) {
  seed = cpu_seed(seed, dseed, w);
  check_nm_dropout(w, seed, n, m, drop_threshold, origin, row_stride, c10::kCPU);
  at::Tensor out = new_output(w);
  at::Tensor bt = new_bits(w, bits);
  if (w.numel() == 0) return {out, bt};
  dispatch_family(w.scalar_type(), [&](auto fam) {
    using Fm = decltype(fam);
    nm_apply<Fm>(w, ptr<Fm>(w), out, n, m, (uint64_t)seed, (uint64_t)drop_threshold, window_of(origin, row_stride),
                 bits ? words_ptr(bt) : nullptr);
  });
  return {out, bt};
}

at::Tensor nm_dropout_backward_cpu(const at::Tensor& grad, const std::optional<at::Tensor>& w, int64_t seed,
                                   int64_t n, int64_t m, int64_t drop_threshold, int64_t origin, int64_t row_stride,
                                   const std::optional<at::Tensor>& bits, const std::optional<at::Tensor>& dseed) {
  seed = cpu_seed(seed, dseed, grad);
  check_nm_dropout_backward(grad, w, bits, seed, n, m, drop_threshold, origin, row_stride, c10::kCPU);
  at::Tensor out = new_output(grad);
  if (grad.numel() == 0) return out;
  dispatch_family(grad.scalar_type(), [&](auto fam) {
    using Fm = decltype(fam);
    if (bits.has_value()) bits_backward<Fm>(grad, *bits, out);
    else nm_apply<Fm>(*w, ptr<Fm>(grad), out, n, m, (uint64_t)seed, (uint64_t)drop_threshold,
                      window_of(origin, row_stride), nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unit_dropout_cpu(const at::Tensor& w, int64_t seed, int64_t k,
                                                    int64_t drop_threshold, const std::optional<at::Tensor>& dseed) {
  seed = cpu_seed(seed, dseed, w);
  check_unit_dropout(w, seed, k, drop_threshold, c10::kCPU);
  const int64_t U = w.size(0), F = w.size(1);
  at::Tensor out = new_output(w);
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
  at::Tensor out = new_output(grad);
  if (grad.numel() > 0) apply_rows(grad, keep.data_ptr<bool>(), out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(td_kernels_native, CPU, m) {
  m.impl("weight_dropout", &weight_dropout_cpu);
  m.impl("weight_dropout_backward", &weight_dropout_backward_cpu);
  m.impl("nm_dropout", &nm_dropout_cpu);
  m.impl("nm_dropout_backward", &nm_dropout_backward_cpu);
  m.impl("unit_dropout", &unit_dropout_cpu);
  m.impl("unit_dropout_backward", &unit_dropout_backward_cpu);
}

}  // namespace td_native

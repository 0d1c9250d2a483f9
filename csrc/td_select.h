// td_select.h -- host-side selection of a row's threshold rank value (torch-free, so the host
// unit test exercises exactly the code the CPU kernels run).
#pragma once

#include <algorithm>
#include <stdint.h>
#include <string.h>

#include "td_core.h"

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

}  // namespace td

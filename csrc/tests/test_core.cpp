// Host unit test of td_core.h, td_select.h, td_cpu_philox.h and td_cpu_kernels.h (no torch):
// built and run by tests/test_native_core.py with `g++ -std=c++17 -O2`. The row kernels are
// checked against a scalar model written from td_core.h's primitives (themselves checked
// against the SPEC's known answers), on every vector path this CPU has (portable, AVX2,
// AVX-512). Prints one line per failure, exits 1.
// GCC 12's AVX-512 intrinsics (_mm512_undefined_*) trip -W(maybe-)uninitialized (GCC PR105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../td_core.h"
#include "../cpu/td_cpu_kernels.h"
#include "../cpu/td_cpu_philox.h"
#include "../cpu/td_select.h"

static int failures = 0;
#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      ++failures;                                              \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

static void test_philox_known_answers() {
  struct Kat { uint32_t c[4], k[2], out[4]; };
  const Kat kats[] = {  // SPEC section 5 (Random123 kat_vectors)
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const td::Words4 r = td::philox4x32_10(td::Words4{t.c[0], t.c[1], t.c[2], t.c[3]}, t.k[0], t.k[1]);
    for (unsigned i = 0; i < 4; ++i)
      EXPECT(td::lane(r, i) == t.out[i], "lane %u: got %08x want %08x", i, td::lane(r, i), t.out[i]);
  }
}

static void test_stream() {
  const uint32_t want[8] = {0x6e5b28e3, 0x85b7be5b, 0xb3ceb6b8, 0x4be9bf2c,
                            0xfcfff50e, 0x594f0d6a, 0x7012bd01, 0xd17e9724};
  for (uint64_t p = 0; p < 8; ++p)
    EXPECT(td::philox_word(2026, p) == want[p], "word(%llu) = %08x, want %08x",
           (unsigned long long)p, td::philox_word(2026, p), want[p]);
  // the counter's high word and the key's high word are used: q >= 2**32, seed >= 2**32
  const uint64_t seed = 0x123456789abcdefull, q = 0x100000002ull;
  const td::Words4 a = td::philox_block(seed, q);
  const td::Words4 b = td::philox4x32_10(td::Words4{2u, 1u, 0u, 0u}, 0x89abcdefu, 0x01234567u);
  EXPECT(a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w, "philox_block splits q and seed");
  EXPECT(td::philox_word(seed, 4 * q + 3) == b.w, "word(p) is lane p %% 4 of block p / 4");
}

// the batched CPU versions write exactly td::philox_block's words, across the carry from the
// counter's low word into its high word and for lengths that are not multiples of 8 or 16
static void test_philox_batches() {
  const uint64_t starts[] = {0, 5, 0xFFFFFFF0ull, 0xFFFFFFFFull, 0x123456789ull};
  const int64_t lengths[] = {1, 7, 8, 9, 16, 33, 257};
  std::vector<uint32_t> buf(4 * 257);
  for (uint64_t seed : {uint64_t(2026), uint64_t(0xFEDCBA9876543210ull >> 1)})
    for (uint64_t q0 : starts)
      for (int64_t nq : lengths) {
        for (int path = 0; path < 2; ++path) {
#if TD_HAVE_AVX2_PATH
          if (path == 1 && !td::cpu_has_avx2()) continue;
          if (path == 1) td::philox_blocks_avx2(seed, q0, nq, buf.data());
#else
          if (path == 1) continue;
#endif
          if (path == 0) td::philox_blocks_portable(seed, q0, nq, buf.data());
          int bad = 0;
          for (int64_t i = 0; i < 4 * nq; ++i) bad += buf[i] != td::philox_word(seed, 4 * q0 + (uint64_t)i);
          EXPECT(bad == 0, "path %d q0=%llx nq=%lld: %d wrong words", path, (unsigned long long)q0, (long long)nq, bad);
        }
      }
#if TD_HAVE_AVX2_PATH
  std::printf("philox batches checked (avx2 path %s)\n", td::cpu_has_avx2() ? "tested" : "not available here");
#endif
}

static void test_drop_decision() {
  EXPECT(!td::drops(0u, 0), "D = 0 drops nothing");
  EXPECT(td::drops(0xFFFFFFFFu, 1ull << 32), "D = 2**32 drops every word");
  EXPECT(td::drops(9u, 10) && !td::drops(10u, 10), "strict word < D");
  EXPECT(td::dropped(5, 5, 0, 1) && !td::dropped(6, 5, 0, 1), "candidate iff key <= limit");
  EXPECT(!td::dropped(0, -1, 0, 1ull << 32), "limit -1: no candidate");
}

static uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }

static void test_keys() {
  const float inf = INFINITY, nan = NAN;
  // ascending |x|, with -0 == +0
  const float asc[] = {0.0f, 1e-45f, 1e-38f, 0.125f, 1.0f, 1.5f, 3e38f, inf};
  for (size_t i = 0; i + 1 < sizeof(asc) / sizeof(asc[0]); ++i) {
    EXPECT(td::key_f32(asc[i]) < td::key_f32(asc[i + 1]), "key order at %zu", i);
    EXPECT(td::key_f32(-asc[i]) == td::key_f32(asc[i]), "sign ignored at %zu", i);
  }
  EXPECT(td::key_f32(-0.0f) == 0 && td::key_f32(0.0f) == 0, "-0 and +0 tie at key 0");
  EXPECT(td::key_f32(nan) > td::key_f32(inf) && td::key_f32(-nan) > td::key_f32(inf), "NaN above inf");
  EXPECT(td::key_f32(-inf) == 0x7F800000u, "key(-inf)");
  // float64 rounds to float32 for the key
  EXPECT(td::key_f64(1.0 + 1e-12) == td::key_f32(1.0f), "f64 rounds");
  EXPECT(td::key_f64(-1e300) == 0x7F800000u, "f64 overflow is inf");
  EXPECT(td::key_f64(std::nan("")) == 0x7FC00000u, "f64 NaN");
  uint64_t snan_bits = 0x7FF0000020000001ull;
  double snan;
  std::memcpy(&snan, &snan_bits, 8);
  EXPECT(td::key_f64(snan) == 0x7FC00001u, "f64 NaN payload as x86 converts it: %08x", td::key_f64(snan));
  std::mt19937_64 g(1);
  for (int i = 0; i < 100000; ++i) {
    uint64_t b = g();
    double x;
    std::memcpy(&x, &b, 8);
    if (!std::isnan(x))
      EXPECT(td::key_f64(x) == (bits_of((float)x) & 0x7FFFFFFFu), "f64 key of %016llx", (unsigned long long)b);
  }
  // bfloat16: top half of a float32
  for (uint32_t h = 0; h < 65536; ++h)
    EXPECT(td::key_bf16((uint16_t)h) == ((h << 16) & 0x7FFFFFFFu), "bf16 %04x", h);
  // float16: exact widening; strictly increasing in the 15-bit magnitude
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
    const double v = e == 0 ? std::ldexp((double)m, -24) : std::ldexp(1.0 + m / 1024.0, (int)e - 15);
    if (e != 0x1F) EXPECT(td::key_f16((uint16_t)h) == (bits_of((float)v) & 0x7FFFFFFFu), "f16 %04x", h);
    if ((h & 0x7FFF) > 0) EXPECT(td::key_f16((uint16_t)(h & 0x7FFF)) > td::key_f16((uint16_t)((h & 0x7FFF) - 1)), "f16 increasing at %04x", h);
    EXPECT(td::key_f16((uint16_t)h) == td::key_f16((uint16_t)(h & 0x7FFF)), "f16 sign ignored %04x", h);
  }
  EXPECT(td::key_f16(0x7C00) == 0x7F800000u && td::key_f16(0x7E00) == 0x7FC00000u, "f16 inf, NaN");
  // limits map back to rank values: rv <= rv_limit(limit) iff key(rv) <= limit
  const int32_t limits[] = {-1, 0, 1, 0x33800000 - 1, 0x33800000, 0x3F800000 - 1, 0x3F800000,
                            0x477FE000, 0x7F800000 - 1, 0x7F800000, 0x7FC00000, 0x7FFFFFFF};
  for (int32_t lim : limits) {
    const int32_t r16 = td::rv_limit_f16(lim), rb = td::rv_limit_bf16(lim);
    for (uint32_t rv = 0; rv < 0x8000; ++rv) {
      EXPECT(((int32_t)rv <= r16) == ((int64_t)td::key_f16((uint16_t)rv) <= lim), "f16 limit %08x rv %04x", lim, rv);
      EXPECT(((int32_t)rv <= rb) == ((int64_t)td::key_bf16((uint16_t)rv) <= lim), "bf16 limit %08x rv %04x", lim, rv);
    }
  }
  // norm keys
  EXPECT(td::norm_key(NAN) > td::norm_key(INFINITY) && td::norm_key(-NAN) > td::norm_key(INFINITY), "NaN norm top");
  EXPECT(td::norm_key((double)NAN) > td::norm_key((double)INFINITY), "NaN norm top (f64)");
  EXPECT(td::norm_key(1.0) < td::norm_key(1.0000000000000002), "f64 norm keys keep 64 bits");
}

static void test_select() {
  std::mt19937_64 g(7);
  uint32_t hist[td::kRadixBins];
  const int64_t sizes[] = {1, 2, 3, 17, 191, 192, 193, 1000, 4099, 70000};
  for (int64_t n : sizes) {
    for (int trial = 0; trial < 12; ++trial) {
      std::vector<uint32_t> v(n);
      const int mode = trial % 4;  // full range, few distinct values, one value, 15-bit
      for (auto& x : v) {
        const uint64_t r = g();
        x = mode == 0 ? (uint32_t)(r & 0x7FFFFFFF) : mode == 1 ? (uint32_t)(0x3F800000 + (r % 5) * 4097)
          : mode == 2 ? 0x3F800000u : (uint32_t)(r & 0x7FFF);
      }
      const int bits = mode == 3 ? 15 : 31;
      std::vector<uint32_t> sorted = v;
      std::sort(sorted.begin(), sorted.end());
      for (int64_t k : {int64_t(0), n / 3, n / 2, n - 1}) {
        std::vector<uint32_t> work = v;
        const uint32_t got = td::select_rank(work.data(), n, k, hist, bits);
        EXPECT(got == sorted[k], "n=%lld k=%lld mode=%d: %08x vs %08x", (long long)n, (long long)k, mode, got, sorted[k]);
      }
    }
  }
}

// the vector paths this CPU can run, portable first
// The CUDA block select (block_radix_select: _weight_select, _weight_fused, _unit_select) as a
// sequential model: its passes, survivor test and prefix steps are td_core.h's; its bin pick
// is a block-wide scan with radix_pick_bin's result. Against nth_element, 15-, 31- and 63-bit
// values, ties and narrow ranges (several passes that matter, the overlapping last digit).
template <typename K>
static K block_select_model(const std::vector<K>& v, uint64_t k, int bits) {
  K prefix = 0;
  int prev = bits;
  for (int shift = td::radix_first_shift(bits); shift >= 0; shift = td::radix_next_shift(shift)) {
    std::vector<uint32_t> hist(td::kRadixBins, 0);
    for (K x : v)
      if (td::radix_survives(x, prefix, prev)) ++hist[td::radix_digit(x, shift)];
    uint64_t k_in_bin;
    const uint32_t bin = td::radix_pick_bin(hist.data(), k, &k_in_bin);
    prefix = td::radix_extend_prefix(prefix, prev, shift, bin);
    k = k_in_bin;
    prev = shift;
  }
  return prefix;
}

static void test_block_select_model() {
  std::mt19937_64 g(17);
  for (int bits : {15, 31, 63}) {
    for (int style = 0; style < 4; ++style) {
      const int64_t n = 1 + (int64_t)(g() % 3000);
      const uint64_t mask = bits == 63 ? 0x7FFFFFFFFFFFFFFFull : ((uint64_t(1) << bits) - 1);
      std::vector<uint64_t> v(n);
      const uint64_t base = g() & mask;
      for (auto& x : v) {
        const uint64_t r = g();
        x = style == 0 ? r & mask                                   // anywhere
            : style == 1 ? (base & ~uint64_t(0x3FF)) | (r & 0x3FF)  // one narrow range: the low passes decide
            : style == 2 ? (r % 4) * (mask / 3)                     // 4 values, many ties
                         : (base ^ (r & 0x7)) & mask;               // 8 values near the top bits
      }
      for (int t = 0; t < 8; ++t) {
        const uint64_t k = g() % (uint64_t)n;
        std::vector<uint64_t> s = v;
        std::nth_element(s.begin(), s.begin() + (int64_t)k, s.end());
        uint64_t got;
        if (bits == 63) {
          got = block_select_model<uint64_t>(v, k, bits);
        } else {
          std::vector<uint32_t> v32(v.begin(), v.end());
          got = block_select_model<uint32_t>(v32, k, bits);
        }
        EXPECT(got == s[k], "bits %d style %d n %lld k %llu: %llu != %llu\n", bits, style, (long long)n,
               (unsigned long long)k, (unsigned long long)got, (unsigned long long)s[k]);
      }
    }
  }
}

static std::vector<td::Simd> simd_levels() {
  std::vector<td::Simd> v{td::Simd::kNone};
#if TD_HAVE_AVX2_PATH
  if (td::cpu_has_avx2()) v.push_back(td::Simd::kAvx2);
  if (td::cpu_has_avx512()) v.push_back(td::Simd::kAvx512);
#endif
  return v;
}
static const char* simd_name(td::Simd s) {
  return s == td::Simd::kNone ? "portable" : s == td::Simd::kAvx2 ? "avx2" : "avx512";
}

// windows: below_bits over any start (block-aligned or not, across the counter's 2**32 carry)
static void test_below_bits() {
  std::mt19937_64 g(11);
  const uint64_t starts[] = {0, 1, 2, 3, 4, 5, 4ull * 0xFFFFFFFFull - 3, 4ull * 0xFFFFFFFFull + 2, (1ull << 61) + 7};
  const uint64_t Ds[] = {0, 1, 1ull << 31, 0xFFFFFFFFull, 1ull << 32, 0x9E3779B9ull};
  for (uint64_t p0 : starts)
    for (int n = 1; n <= 28; ++n)
      for (uint64_t D : Ds) {
        const uint64_t seed = g() >> 1;
        uint32_t want = 0;
        for (int i = 0; i < n; ++i) want |= (uint32_t)td::drops(td::philox_word(seed, p0 + (uint64_t)i), D) << i;
        const uint32_t got = td::below_bits(seed, p0, n, D);
        EXPECT(got == want, "below_bits p0=%llx n=%d D=%llx: %08x vs %08x", (unsigned long long)p0, n,
               (unsigned long long)D, got, want);
      }
  const td::Window win{1000003, 4099};
  EXPECT(td::row_start(win, 0) == 1000003 && td::row_start(win, 3) == 1000003 + 3 * 4099, "row_start");
}

// mask words: bit j % 32 of word j / 32; OR-ing 32 bits at any column; reading them back
static void test_bit_helpers() {
  std::mt19937_64 g(12);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t F = 1 + (int64_t)(g() % 300), W = td::bits_words(F);
    EXPECT(W == (F + 31) / 32, "bits_words");
    std::vector<uint8_t> keep(F);
    for (auto& k : keep) k = g() & 1;
    std::vector<uint32_t> words(W, 0);
    int64_t j = 0;
    while (j < F) {  // pieces of random length, as the kernels OR tiles at unaligned columns
      const int64_t n = std::min<int64_t>(F - j, 1 + (int64_t)(g() % 32));
      uint32_t b = 0;
      for (int64_t i = 0; i < n; ++i) b |= (uint32_t)keep[j + i] << i;
      td::or_bits32(words.data(), j, b);
      j += n;
    }
    for (int64_t c = 0; c < F; ++c) EXPECT(td::bit_at(words.data(), c) == (keep[c] != 0), "bit %lld", (long long)c);
    EXPECT((words[W - 1] >> (F - 32 * (W - 1)) == 0) || F % 32 == 0, "padding bits are 0");
    for (int64_t c = 0; c < F; c += 1 + (int64_t)(g() % 7)) {
      uint32_t want = 0;
      for (int i = 0; i < 32 && c + i < F; ++i) want |= (uint32_t)keep[c + i] << i;
      EXPECT(td::bits32_at(words.data(), c, W) == want, "bits32_at F=%lld c=%lld", (long long)F, (long long)c);
    }
    std::vector<uint32_t> ones(W, 0);
    td::set_keep_bits(ones.data(), 0, F);
    for (int64_t c = 0; c < 32 * W; ++c)
      EXPECT(((ones[c >> 5] >> (c & 31)) & 1) == (c < F ? 1u : 0u), "set_keep_bits F=%lld c=%lld", (long long)F,
             (long long)c);
  }
}

// N:M: rank in (key, j) order by sorting, against nm_rank / nm_group_candidates, every (n, m)
static void test_nm_ranks() {
  std::mt19937_64 g(13);
  for (int m = 2; m <= 16; ++m)
    for (int trial = 0; trial < 300; ++trial) {
      uint32_t keys[16];
      const int mode = trial % 3;  // distinct-ish, heavy ties, all equal
      for (int i = 0; i < m; ++i)
        keys[i] = mode == 0 ? (uint32_t)(g() & 0x7FFFFFFF) : mode == 1 ? (uint32_t)(g() % 3) : 0x3F800000u;
      int order[16];
      for (int i = 0; i < m; ++i) order[i] = i;
      std::stable_sort(order, order + m, [&](int a, int b) { return keys[a] < keys[b]; });
      int rank[16];
      for (int r = 0; r < m; ++r) rank[order[r]] = r;
      for (int i = 0; i < m; ++i)
        EXPECT(td::nm_rank([&](int l) { return keys[l]; }, m, i) == rank[i], "nm_rank m=%d i=%d", m, i);
      for (int n = 1; n < m; ++n) {
        uint32_t want = 0;
        for (int i = 0; i < m; ++i) want |= (uint32_t)(rank[i] < m - n) << i;
        const uint32_t got = td::nm_group_candidates(keys, n, m);
        EXPECT(got == want, "nm_group_candidates n=%d m=%d: %x vs %x", n, m, got, want);
        EXPECT(__builtin_popcount(got) == m - n, "exactly m - n candidates");
      }
    }
}

static void test_sort64() {
  std::mt19937_64 g(14);
  for (td::Simd simd : simd_levels())
    for (int trial = 0; trial < 3000; ++trial) {
      uint32_t x[64];
      const int n = 1 + (int)(g() % 64);
      for (int i = 0; i < 64; ++i)
        x[i] = i >= n ? 0x7FFFFFFFu : trial % 2 ? (uint32_t)(g() & 0x7FFFFFFF) : (uint32_t)(g() % 4) * 0x1FFFFFFFu;
      std::vector<uint32_t> want(x, x + 64);
      std::sort(want.begin(), want.end());
      td::sort64(x, simd);
      EXPECT(std::equal(x, x + 64, want.begin()), "sort64 %s trial %d", simd_name(simd), trial);
    }
}

// float bits of a few families' storage words
template <class Fm>
static typename Fm::S storage_from(double x) {
  if constexpr (sizeof(typename Fm::S) == 8) {
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return b;
  } else if constexpr (sizeof(typename Fm::S) == 4) {
    return bits_of((float)x);
  } else if constexpr (std::is_same<Fm, td::FamBF16>::value) {
    return (uint16_t)(bits_of((float)x) >> 16);  // truncation is fine: any 16-bit pattern is a weight
  } else {  // float16 by truncation: tiny values flush to +-0, huge ones to +-inf
    const uint32_t b = bits_of((float)x), e = (b >> 23) & 0xFF, sign = (b >> 16) & 0x8000;
    if (e < 113) return (uint16_t)sign;
    if (e > 142) return (uint16_t)(sign | 0x7C00);
    return (uint16_t)(sign | ((e - 112) << 10) | ((b >> 13) & 0x3FF));
  }
}

// rows of several styles: normal, ties with +-0, specials (inf, NaN with payloads), periodic
template <class Fm>
static std::vector<typename Fm::S> make_row(std::mt19937_64& g, int64_t n, int style) {
  using S = typename Fm::S;
  std::normal_distribution<double> nd;
  std::vector<S> r(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (style) {
      case 0: r[i] = storage_from<Fm>(nd(g)); break;
      case 1: r[i] = storage_from<Fm>((double)((int)(g() % 5) - 2) * 0.5); break;           // ties, +-0
      case 2: r[i] = (S)(g() % 2 ? storage_from<Fm>(nd(g)) : (S)g()); break;                 // any bits: NaN, inf
      case 3: r[i] = storage_from<Fm>((double)(i % 7)); break;                              // periodic
      default: r[i] = storage_from<Fm>(g() % 64 == 0 ? nd(g) : 0.0); break;                 // mostly zeros
    }
    if (style != 2 && g() % 2) r[i] ^= (S)((S)1 << (8 * sizeof(S) - 1));                   // either sign
  }
  return r;
}

template <class Fm>
static void test_select_sampled_family(const char* name) {
  std::mt19937_64 g(15);
  uint32_t hist[td::kRadixBins];
  const int64_t sizes[] = {1, 2, 17, 63, 64, 65, 100, 300, 1000, 4096, 4099, 70000};
  for (td::Simd simd : simd_levels())
    for (int64_t n : sizes)
      for (int style = 0; style < 5; ++style) {
        const auto row = make_row<Fm>(g, n, style);
        std::vector<uint32_t> sorted(n);
        for (int64_t i = 0; i < n; ++i) sorted[i] = Fm::rv(row[i]);
        std::sort(sorted.begin(), sorted.end());
        std::vector<uint32_t> b0(td::select_scratch_size(n)), b1(td::select_scratch_size(n));
        td::SelectScratch scratch(n);
        for (int64_t k : {int64_t(0), n / 10, n / 3, n / 2, (9 * n) / 10, n - 1}) {
          const uint32_t got = td::select_rank_sampled<Fm>(row.data(), n, k, b0.data(), b1.data(), hist, simd);
          EXPECT(got == sorted[k], "select_rank_sampled %s %s n=%lld style=%d k=%lld: %x vs %x", name,
                 simd_name(simd), (long long)n, style, (long long)k, got, sorted[k]);
          const uint32_t t = td::row_threshold<Fm>(row.data(), n, k, scratch, simd);  // radix without SIMD
          EXPECT(t == sorted[k], "row_threshold %s %s n=%lld k=%lld", name, simd_name(simd), (long long)n,
                 (long long)k);
        }
      }
}

// The scalar model of one piece of a row: what apply_row must produce, from td_core.h only.
template <class Fm, class CandAt>
static void model_apply(const typename Fm::S* val, typename Fm::S* out, uint32_t* bits, int64_t j0, int64_t j1,
                        uint64_t pos0, uint64_t seed, uint64_t D, CandAt cand_at) {
  for (int64_t j = j0; j < j1; ++j) {
    const bool drop = cand_at(j) && td::drops(td::philox_word(seed, pos0 + (uint64_t)j), D);
    out[j] = drop ? typename Fm::S(0) : val[j];
    if (!drop) bits[j >> 5] |= 1u << (j & 31);
  }
}

template <class Fm>
static void test_apply_family(const char* name) {
  using S = typename Fm::S;
  std::mt19937_64 g(16);
  const uint64_t Ds[] = {0, 1, 0x80000000ull, 0xFFFFFFFFull, 1ull << 32, 0x4F1BBCDCull};
  for (td::Simd simd : simd_levels())
    for (int trial = 0; trial < 160; ++trial) {
      const int64_t F = trial < 40 ? 1 + (int64_t)(g() % 140) : 1 + (int64_t)(g() % 1500);
      const auto wk = make_row<Fm>(g, F, trial % 5), val = make_row<Fm>(g, F, 0);
      const uint64_t pos0 = trial % 3 == 0 ? (uint64_t)F * (g() % 50) : (g() >> 4);  // aligned-ish or anywhere
      const uint64_t seed = g() >> 1, D = Ds[trial % 6];
      // pieces: [0, F) whole, or from a multiple of 32
      const int64_t j0 = trial % 4 == 3 && F > 64 ? 32 * (int64_t)(g() % (F / 32)) : 0;
      const int64_t j1 = trial % 8 == 7 ? j0 + (F - j0) / 2 : F;
      const int64_t W = td::bits_words(F);
      td::ApplyCtx ctx;
      ctx.simd = sizeof(S) <= 4 ? simd : td::Simd::kNone;
      // weight targeting: limit from a random element's rank value (or none / all)
      const int32_t lims[] = {-1, (int32_t)Fm::rv(wk[g() % F]), (int32_t)((1u << Fm::kBits) - 1)};
      for (int32_t lim : lims)
        for (int same = 0; same < 2; ++same) {  // forward (val = wk) and backward (val = grad)
          const S* v = same ? wk.data() : val.data();
          std::vector<S> got(F, (S)0x5A5A), want(F, (S)0x5A5A);
          std::vector<uint32_t> gb(W, 0xDEADBEEF), wb(W, 0);
          td::apply_row<Fm>(wk.data(), v, got.data(), j0, j1, pos0, td::CandKeys{lim}, seed, D, gb.data(), ctx);
          model_apply<Fm>(v, want.data(), wb.data(), j0, j1, pos0, seed, D,
                          [&](int64_t j) { return (int32_t)Fm::rv(wk[j]) <= lim; });
          int bad = 0;
          for (int64_t j = j0; j < j1; ++j) bad += got[j] != want[j];
          for (int64_t w = j0 / 32; w < (j1 + 31) / 32; ++w) bad += gb[w] != wb[w];
          EXPECT(bad == 0, "apply_row %s %s F=%lld [%lld,%lld) pos0=%llx D=%llx lim=%d: %d wrong", name,
                 simd_name(simd), (long long)F, (long long)j0, (long long)j1, (unsigned long long)pos0,
                 (unsigned long long)D, lim, bad);
          // the bits backward reproduces the forward from the words alone
          std::vector<S> gb2(F, (S)0x5A5A);
          td::apply_bits_row<S>(v, gb2.data(), wb.data(), j0, j1, simd);
          bad = 0;
          for (int64_t j = j0; j < j1; ++j) bad += gb2[j] != want[j];
          EXPECT(bad == 0, "apply_bits_row %s %s F=%lld: %d wrong", name, simd_name(simd), (long long)F, bad);
        }
      // N:M targeting on a prefix whose length m divides
      for (int m : {2, 3, 4, 7, 8, 16}) {
        const int n = 1 + (int)(g() % (m - 1));
        const int64_t Fm_ = F / m * m, a = j0 / (32 * m) * (32 * m);
        if (Fm_ <= a) continue;
        std::vector<uint32_t> cb((Fm_ - a + 31) / 32 + 1);
        td::nm_candidates<Fm>(wk.data(), a, Fm_, n, m, cb.data(), ctx.simd);
        auto cand = [&](int64_t j) {  // group of j by sorting (key, j)
          const int64_t g0 = j - j % m;
          uint32_t keys[16];
          for (int l = 0; l < m; ++l) keys[l] = Fm::key(wk[g0 + l]);
          return ((td::nm_group_candidates(keys, n, m) >> (j - g0)) & 1) != 0;
        };
        std::vector<S> got(F, (S)0x5A5A), want(F, (S)0x5A5A);
        std::vector<uint32_t> gbits(W, 0), wbits(W, 0);
        td::apply_row<Fm>(wk.data(), val.data(), got.data(), a, Fm_, pos0,
                          td::CandBits{cb.data(), a, (int64_t)cb.size() - 1}, seed, D, gbits.data(), ctx);
        model_apply<Fm>(val.data(), want.data(), wbits.data(), a, Fm_, pos0, seed, D, cand);
        int bad = 0;
        for (int64_t j = a; j < Fm_; ++j) bad += got[j] != want[j];
        for (int64_t w = a / 32; w < (Fm_ + 31) / 32; ++w) bad += gbits[w] != wbits[w];
        EXPECT(bad == 0, "N:M apply %s %s %d:%d F=%lld: %d wrong", name, simd_name(simd), n, m, (long long)Fm_, bad);
      }
    }
}

int main() {
  test_philox_known_answers();
  test_stream();
  test_philox_batches();
  test_drop_decision();
  test_keys();
  test_select();
  test_block_select_model();
  test_below_bits();
  test_bit_helpers();
  test_nm_ranks();
  test_sort64();
  test_select_sampled_family<td::FamF32>("f32");
  test_select_sampled_family<td::FamBF16>("bf16");
  test_select_sampled_family<td::FamF16>("f16");
  test_select_sampled_family<td::FamF64>("f64");
  test_apply_family<td::FamF32>("f32");
  test_apply_family<td::FamBF16>("bf16");
  test_apply_family<td::FamF16>("f16");
  test_apply_family<td::FamF64>("f64");
  std::printf("vector paths tested:");
  for (td::Simd s : simd_levels()) std::printf(" %s", simd_name(s));
  std::printf("\n");
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("td_core: all checks passed\n");
  return 0;
}

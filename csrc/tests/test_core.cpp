// Host unit test of td_core.h / td_select.h (no torch): built and run by
// tests/test_native_core.py with `g++ -std=c++17 -O2`. Prints one line per failure, exits 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../td_core.h"
#include "../td_cpu_philox.h"
#include "../td_select.h"

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

int main() {
  test_philox_known_answers();
  test_stream();
  test_philox_batches();
  test_drop_decision();
  test_keys();
  test_select();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("td_core: all checks passed\n");
  return 0;
}

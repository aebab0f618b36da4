#pragma once
// FP8 E4M3 (the OCP "E4M3FN" variant, as CUDA's __nv_fp8_e4m3 and torch.float8_e4m3fn):
// 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities.
//   code s.eeee.mmm:  e == 0:            (-1)^s * m/8 * 2^-6        (subnormals, 0, -0)
//                     e in 1..15:         (-1)^s * (1 + m/8) * 2^(e-7)
//                     e == 15, m == 7:    NaN (0x7F, 0xFF)
// Largest finite magnitude 448 (0x7E), smallest normal 2^-6, smallest subnormal 2^-9.
// float -> E4M3 rounds to nearest, ties to even (even mantissa code), and saturates: every
// |x| >= 448 (infinity included) becomes +-448; NaN becomes 0x7F with x's sign bit. This is
// CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3). Every code decodes exactly to
// float. Checked exhaustively against a float64 decoding of the 256 codes and a brute-force
// nearest-value search (tests/test_quant_cache.cpp).
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>

namespace cacheshrink {

inline constexpr float kFp8E4M3Max = 448.0f;

namespace detail {
/// Round to nearest, ties to even, for 0 <= q < 2^23 (exact, independent of the FP rounding mode).
inline float round_half_even_nonneg(float q) {
  const float r = std::floor(q);
  const float d = q - r;  // exact: q and r share the exponent range
  if (d > 0.5f) return r + 1.0f;
  if (d < 0.5f) return r;
  return std::fmod(r, 2.0f) == 0.0f ? r : r + 1.0f;
}

constexpr std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    const int e = (c >> 3) & 0xF, m = c & 7;
    float v;
    if (e == 15 && m == 7) {
      v = __builtin_nanf("");
    } else {
      // e == 0: m * 2^-9; else (8 + m) * 2^(e - 10). Powers of two by repeated scaling (exact).
      v = static_cast<float>(e == 0 ? m : 8 + m);
      const int p = e == 0 ? -9 : e - 10;
      for (int i = 0; i < p; ++i) v *= 2.0f;
      for (int i = 0; i > p; --i) v *= 0.5f;
    }
    t[static_cast<std::size_t>(c)] = (c & 0x80) ? -v : v;
  }
  return t;
}
inline constexpr std::array<float, 256> kE4M3Table = make_e4m3_table();
}  // namespace detail

/// E4M3 code -> float (exact).
inline float fp8_e4m3_to_float(std::uint8_t code) { return detail::kE4M3Table[code]; }

/// float -> E4M3 code: saturating, round to nearest even.
inline std::uint8_t float_to_fp8_e4m3(float x) {
  const std::uint8_t sign = static_cast<std::uint8_t>((std::bit_cast<std::uint32_t>(x) >> 24) & 0x80u);
  if (std::isnan(x)) return static_cast<std::uint8_t>(sign | 0x7Fu);
  const float a = std::fabs(x);
  if (a >= kFp8E4M3Max) return static_cast<std::uint8_t>(sign | 0x7Eu);
  int code;
  if (a < 0.015625f) {  // below 2^-6: subnormal grid m * 2^-9, m in 0..8 (8 is the smallest normal, code 0x08)
    code = static_cast<int>(detail::round_half_even_nonneg(a * 512.0f));  // a * 2^9 exact
  } else {
    int e2 = 0;
    (void)std::frexp(a, &e2);  // a = f * 2^e2, f in [0.5, 1): unbiased exponent E = e2 - 1 in [-6, 8]
    const int E = e2 - 1;
    const float q = std::ldexp(a, 3 - E);  // in [8, 16), exact
    const int m = static_cast<int>(detail::round_half_even_nonneg(q));  // 8..16; 16 carries into the exponent below
    code = ((E + 7) << 3) + (m - 8);      // <= 0x7E because a < 448
  }
  return static_cast<std::uint8_t>(sign | code);
}

}  // namespace cacheshrink

#pragma once
// Quantized KV/latent cache rows (issue 9): int8 with a per-token scale, and FP8 E4M3 with a
// per-token scale. Stacks on dimensional compression: for an MLA layer the rows are the
// latents [c_k | k_rope] and c_v; for a layer kept original they are its K (after k-norm and
// RoPE) and V rows.
//
// Format, per layer, per sequence, separately for the K row and the V row of a token
// (a CUDA kernel mirrors exactly this):
//   width w = the row's width (KvCache::k_width[l] or v_width[l]; joint layers have no V row)
//   codes:  (tokens, w) bytes, row-major: token t, element i at codes[t * w + i]
//   scale:  (tokens) float32, one per token: scale[t]
//   amax   = max_i |x_i| of the float32 row
//   Int8:    scale = amax / 127;  code_i = clamp(rne(x_i / scale), -127, 127) stored as int8
//            (two's complement; -128 never written); x~_i = code_i * scale
//   Fp8E4M3: scale = amax / 448;  code_i = e4m3_satfinite_rne(x_i / scale)     (core/fp8.hpp)
//            x~_i = e4m3_to_float(code_i) * scale
//   amax == 0 (or amax / code_max underflowing to 0): scale = 0, every code 0 (x~ = 0). A
//   non-finite element: scale = NaN, codes 0, so NaN propagates to attention as it would
//   from a float cache.
//   All arithmetic in float32: x_i / scale is an IEEE division (not a multiply by 1/scale),
//   rne = round half to even.
// Bytes per token and layer: (w_k + 4) + (w_v + 4), the V term absent when w_v == 0. The
// CPU cache keeps codes and scales in two arrays per (layer, sequence, K/V); a paged GPU
// layout may place them differently as long as the values above are what it stores.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/fp8.hpp"

namespace cacheshrink::model {

/// Storage of the KV cache rows: float32 (exact), int8 or FP8 E4M3 with a per-token scale.
enum class CacheDtype { F32, Int8, Fp8E4M3 };

inline std::string_view cache_dtype_name(CacheDtype d) {
  switch (d) {
    case CacheDtype::F32: return "f32";
    case CacheDtype::Int8: return "int8";
    case CacheDtype::Fp8E4M3: return "fp8";
  }
  return "?";
}

/// "f32" | "int8" | "fp8" (also "float32", "fp8_e4m3", "e4m3").
inline CacheDtype parse_cache_dtype(std::string_view s) {
  if (s == "f32" || s == "float32" || s == "fp32") return CacheDtype::F32;
  if (s == "int8" || s == "i8") return CacheDtype::Int8;
  if (s == "fp8" || s == "fp8_e4m3" || s == "e4m3") return CacheDtype::Fp8E4M3;
  throw InvalidArgument("cache dtype '" + std::string(s) + "': expected f32, int8 or fp8");
}

/// Largest code magnitude the scale maps amax to.
inline float cache_code_max(CacheDtype d) { return d == CacheDtype::Int8 ? 127.0f : kFp8E4M3Max; }

/// Bytes one cached row of `width` numbers takes (0 for width 0).
inline std::size_t cache_row_bytes(int width, CacheDtype d) {
  if (width <= 0) return 0;
  const auto w = static_cast<std::size_t>(width);
  return d == CacheDtype::F32 ? w * sizeof(float) : w + sizeof(float);
}

/// Quantizes one row x[0..w) into codes[0..w) and returns its scale (format above).
inline float quantize_row(const float* x, int w, CacheDtype d, std::uint8_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < w; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  if (!finite) {
    std::fill(codes, codes + w, std::uint8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (amax == 0.0f) {
    std::fill(codes, codes + w, std::uint8_t{0});
    return 0.0f;
  }
  const float scale = amax / cache_code_max(d);
  if (!(scale > 0.0f)) {  // amax a tiny subnormal: the scale underflows; store zeros
    std::fill(codes, codes + w, std::uint8_t{0});
    return 0.0f;
  }
  if (d == CacheDtype::Int8) {
    for (int i = 0; i < w; ++i) {
      const float y = x[i] / scale;
      float r = cacheshrink::detail::round_half_even_nonneg(std::fabs(y));
      r = std::min(r, 127.0f);
      const auto q = static_cast<std::int8_t>(y < 0 ? -static_cast<int>(r) : static_cast<int>(r));
      codes[i] = static_cast<std::uint8_t>(q);
    }
  } else {
    for (int i = 0; i < w; ++i) codes[i] = float_to_fp8_e4m3(x[i] / scale);
  }
  return scale;
}

/// One stored code back to float, before the scale.
inline float decode_code(std::uint8_t c, CacheDtype d) {
  return d == CacheDtype::Int8 ? static_cast<float>(static_cast<std::int8_t>(c)) : fp8_e4m3_to_float(c);
}

/// Dequantizes one row: out[i] = decode(codes[i]) * scale.
inline void dequantize_row(const std::uint8_t* codes, float scale, int w, CacheDtype d, float* out) {
  if (d == CacheDtype::Int8) {
    for (int i = 0; i < w; ++i) out[i] = static_cast<float>(static_cast<std::int8_t>(codes[i])) * scale;
  } else {
    for (int i = 0; i < w; ++i) out[i] = fp8_e4m3_to_float(codes[i]) * scale;
  }
}

}  // namespace cacheshrink::model

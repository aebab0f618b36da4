#pragma once
// Compression policies: each states its method, its latent width for a compression ratio,
// and its cache width. The conversion code (compression/convert.hpp) is shared; the typed
// entry point convert<Policy>(...) fixes the method at compile time, convert(...) with
// method "auto" picks one at run time (MHA -> Separate, GQA/MQA -> Xkv).
#include <algorithm>
#include <cmath>
#include <concepts>

#include "cacheshrink/core/config.hpp"

namespace cacheshrink {

namespace detail {
inline int clamp_latent(double v, int hi) { return std::clamp(static_cast<int>(std::floor(v + 1e-9)), 1, hi); }
}  // namespace detail

/// Per-layer K and V latents: d_latent = d_kv / r; cache 2*d_latent per token per layer.
struct Separate {
  static constexpr CompressionMethod id = CompressionMethod::Separate;
  static int d_latent(int d_kv, double ratio, int /*d_rope*/ = 0) { return detail::clamp_latent(d_kv / ratio, d_kv); }
  static int cache_width(int d_latent, int /*d_rope*/ = 0) { return 2 * d_latent; }
};

/// Like Separate, but the up-projections are shared by groups of layers (xKV).
struct Xkv {
  static constexpr CompressionMethod id = CompressionMethod::Xkv;
  static int d_latent(int d_kv, double ratio, int /*d_rope*/ = 0) { return detail::clamp_latent(d_kv / ratio, d_kv); }
  static int cache_width(int d_latent, int /*d_rope*/ = 0) { return 2 * d_latent; }
};

/// One latent feeds both K and V: d_latent = 2*d_kv / r (clamped to d_kv); cache d_latent.
struct Joint {
  static constexpr CompressionMethod id = CompressionMethod::Joint;
  static int d_latent(int d_kv, double ratio, int /*d_rope*/ = 0) { return detail::clamp_latent(2.0 * d_kv / ratio, d_kv); }
  static int cache_width(int d_latent, int /*d_rope*/ = 0) { return d_latent; }
};

/// A d_rope slice of K (its first d_rope features) is cached exactly; the other d_kv - d_rope
/// key features and all of V go through latents: d_latent = d_kv / r - d_rope (clamped to
/// [1, d_kv - d_rope]); cache 2*d_latent + d_rope. RoPE and k-norm still apply to the whole
/// reconstructed key, where the original model applies them.
struct DecoupledRope {
  static constexpr CompressionMethod id = CompressionMethod::DecoupledRope;
  static int d_latent(int d_kv, double ratio, int d_rope) { return detail::clamp_latent(d_kv / ratio - d_rope, std::max(1, d_kv - d_rope)); }
  static int cache_width(int d_latent, int d_rope) { return 2 * d_latent + d_rope; }
};

template <class P>
concept CompressionPolicy = requires(int d, double r) {
  { P::id } -> std::convertible_to<CompressionMethod>;
  { P::d_latent(d, r, d) } -> std::convertible_to<int>;
  { P::cache_width(d, d) } -> std::convertible_to<int>;
};

template <class Fn>
decltype(auto) dispatch_compression(CompressionMethod m, Fn&& fn) {
  switch (m) {
    case CompressionMethod::Separate: return fn(Separate{});
    case CompressionMethod::Xkv: return fn(Xkv{});
    case CompressionMethod::Joint: return fn(Joint{});
    case CompressionMethod::DecoupledRope: return fn(DecoupledRope{});
  }
  return fn(Separate{});
}

}  // namespace cacheshrink

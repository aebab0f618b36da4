#pragma once
// KV cache: per layer and per sequence, what attention needs to rebuild its keys and values.
// Standard layers store keys after q/k-norm and RoPE plus values (2 * d_kv floats per
// token); MLA layers store only latents (2 * d_latent, or d_latent for joint) and attention
// reconstructs K and V from them. Widths are per layer so mixed models (xkv with early layers
// kept original) work.
#include <algorithm>
#include <cstddef>
#include <vector>

#include "cacheshrink/core/tensor.hpp"

namespace cacheshrink::model {

struct KvCache {
  std::vector<int> k_width, v_width;     // per layer
  std::vector<std::vector<MatrixRf>> k;  // [layer][seq]: (capacity, k_width[layer])
  std::vector<std::vector<MatrixRf>> v;  // [layer][seq]: (capacity, v_width[layer]); may have 0 columns
  std::vector<int> length;               // tokens cached per sequence

  KvCache() = default;
  /// Uniform standard cache.
  KvCache(int layers, int dkv, int n_seqs) : KvCache(std::vector<int>(layers, dkv), std::vector<int>(layers, dkv), n_seqs) {}
  KvCache(std::vector<int> kw, std::vector<int> vw, int n_seqs) : k_width(std::move(kw)), v_width(std::move(vw)) { reset(n_seqs); }

  int n_layers() const { return static_cast<int>(k_width.size()); }
  int n_seqs() const { return static_cast<int>(length.size()); }

  void reset(int n_seqs) {
    const auto L = k_width.size();
    k.assign(L, std::vector<MatrixRf>(static_cast<std::size_t>(n_seqs)));
    v.assign(L, std::vector<MatrixRf>(static_cast<std::size_t>(n_seqs)));
    for (std::size_t l = 0; l < L; ++l)
      for (auto s = 0; s < n_seqs; ++s) {
        k[l][s].resize(0, k_width[l]);
        v[l][s].resize(0, v_width[l]);
      }
    length.assign(static_cast<std::size_t>(n_seqs), 0);
  }

  /// Makes room for `needed` tokens of sequence s in layer l (amortised doubling).
  void reserve(int l, int s, int needed) {
    auto& K = k[l][s];
    auto& V = v[l][s];
    if (K.rows() >= needed) return;
    const Eigen::Index cap = std::max<Eigen::Index>(needed, std::max<Eigen::Index>(16, 2 * K.rows()));
    K.conservativeResize(cap, k_width[l]);
    V.conservativeResize(cap, v_width[l]);
  }

  /// Numbers stored per token over all layers (the quantity MLA shrinks).
  std::size_t floats_per_token() const {
    std::size_t n = 0;
    for (std::size_t l = 0; l < k_width.size(); ++l) n += static_cast<std::size_t>(k_width[l] + v_width[l]);
    return n;
  }
  /// Bytes of the live cache contents (valid tokens only, float32 storage).
  std::size_t bytes_used() const {
    std::size_t n = 0;
    for (int len : length) n += static_cast<std::size_t>(len) * floats_per_token() * sizeof(float);
    return n;
  }
};

}  // namespace cacheshrink::model

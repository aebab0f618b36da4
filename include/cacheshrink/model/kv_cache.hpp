#pragma once
// Standard (uncompressed) KV cache: per layer and per sequence the keys after q/k-norm and
// RoPE, and the values, exactly what attention reads. 2 * d_kv floats per token per layer.
#include <cstddef>
#include <vector>

#include "cacheshrink/core/tensor.hpp"

namespace cacheshrink::model {

struct KvCache {
  int n_layers = 0;
  int d_kv = 0;
  std::vector<std::vector<MatrixRf>> k;  // [layer][seq]: (capacity, d_kv)
  std::vector<std::vector<MatrixRf>> v;  // [layer][seq]: (capacity, d_kv)
  std::vector<int> length;               // tokens cached per sequence

  KvCache() = default;
  KvCache(int layers, int dkv, int n_seqs) : n_layers(layers), d_kv(dkv) { reset(n_seqs); }

  void reset(int n_seqs) {
    k.assign(static_cast<std::size_t>(n_layers), std::vector<MatrixRf>(static_cast<std::size_t>(n_seqs)));
    v = k;
    length.assign(static_cast<std::size_t>(n_seqs), 0);
  }
  int n_seqs() const { return static_cast<int>(length.size()); }

  /// Makes room for `needed` tokens of sequence s in layer l (amortised doubling).
  void reserve(int l, int s, int needed) {
    auto& K = k[l][s];
    auto& V = v[l][s];
    if (K.rows() >= needed) return;
    const Eigen::Index cap = std::max<Eigen::Index>(needed, std::max<Eigen::Index>(16, 2 * K.rows()));
    K.conservativeResize(cap, d_kv);
    V.conservativeResize(cap, d_kv);
  }

  /// Floats stored per token (all layers); the quantity MLA shrinks.
  std::size_t floats_per_token() const { return static_cast<std::size_t>(2) * d_kv * n_layers; }
};

}  // namespace cacheshrink::model

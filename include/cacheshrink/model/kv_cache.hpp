#pragma once
// KV cache: per layer and per sequence, what attention needs to rebuild its keys and values.
// Standard layers store keys after q/k-norm and RoPE plus values (2 * d_kv numbers per
// token); MLA layers store only latents (2 * d_latent, or d_latent for joint) and attention
// reconstructs K and V from them. Widths are per layer so mixed models (xkv with early layers
// kept original) work.
//
// Storage dtype (CacheDtype, model/kv_quant.hpp): F32 keeps float rows in `k`/`v`; Int8 and
// Fp8E4M3 keep one byte per number plus one float scale per token per K/V row in `qk`/`qv`
// (format and byte layout documented in kv_quant.hpp). Rows are quantized when written
// (write_k/write_v) and dequantized when read (read_k/read_v), so attention only ever sees
// what the cache holds, the current chunk's own rows included.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cacheshrink/core/tensor.hpp"
#include "cacheshrink/model/kv_quant.hpp"

namespace cacheshrink::model {

/// Quantized rows of one (layer, sequence, K or V): codes (capacity, width) row-major and one
/// scale per token.
struct QuantRows {
  std::vector<std::uint8_t> codes;  // capacity * width
  std::vector<float> scale;         // capacity
};

struct KvCache {
  std::vector<int> k_width, v_width;     // per layer
  CacheDtype dtype = CacheDtype::F32;
  std::vector<std::vector<MatrixRf>> k;  // F32: [layer][seq]: (capacity, k_width[layer])
  std::vector<std::vector<MatrixRf>> v;  // F32: [layer][seq]: (capacity, v_width[layer]); may have 0 columns
  std::vector<std::vector<QuantRows>> qk, qv;  // Int8/Fp8E4M3: [layer][seq]
  std::vector<int> length;               // tokens cached per sequence

  KvCache() = default;
  /// Uniform standard cache.
  KvCache(int layers, int dkv, int n_seqs) : KvCache(std::vector<int>(layers, dkv), std::vector<int>(layers, dkv), n_seqs) {}
  KvCache(std::vector<int> kw, std::vector<int> vw, int n_seqs, CacheDtype dt = CacheDtype::F32)
      : k_width(std::move(kw)), v_width(std::move(vw)), dtype(dt) {
    reset(n_seqs);
  }

  int n_layers() const { return static_cast<int>(k_width.size()); }
  int n_seqs() const { return static_cast<int>(length.size()); }
  bool quantized() const { return dtype != CacheDtype::F32; }

  void reset(int n_seqs) {
    const auto L = k_width.size();
    const auto S = static_cast<std::size_t>(n_seqs);
    k.assign(L, std::vector<MatrixRf>(S));
    v.assign(L, std::vector<MatrixRf>(S));
    qk.assign(L, std::vector<QuantRows>(S));
    qv.assign(L, std::vector<QuantRows>(S));
    for (std::size_t l = 0; l < L; ++l)
      for (std::size_t s = 0; s < S; ++s) {
        k[l][s].resize(0, k_width[l]);
        v[l][s].resize(0, v_width[l]);
      }
    length.assign(S, 0);
  }

  /// Tokens sequence s of layer l can hold without growing.
  int capacity(int l, int s) const {
    return quantized() ? static_cast<int>(qk[l][s].scale.size()) : static_cast<int>(k[l][s].rows());
  }

  /// Makes room for `needed` tokens of sequence s in layer l (amortised doubling).
  void reserve(int l, int s, int needed) {
    const int have = capacity(l, s);
    if (have >= needed) return;
    const int cap = std::max(needed, std::max(16, 2 * have));
    if (quantized()) {
      for (auto* q : {&qk[l][s], &qv[l][s]}) {
        const int w = q == &qk[l][s] ? k_width[l] : v_width[l];
        q->codes.resize(static_cast<std::size_t>(cap) * static_cast<std::size_t>(w));
        q->scale.resize(static_cast<std::size_t>(cap));
      }
    } else {
      k[l][s].conservativeResize(cap, k_width[l]);
      v[l][s].conservativeResize(cap, v_width[l]);
    }
  }

  /// Stores rows (n, k_width[l]) as tokens pos..pos+n-1 of sequence s, layer l (quantizing
  /// them when the dtype says so). Grows the storage as needed.
  void write_k(int l, int s, int pos, const Eigen::Ref<const MatrixRf>& rows) { write(l, s, pos, rows, k[l][s], qk[l][s], k_width[l]); }
  void write_v(int l, int s, int pos, const Eigen::Ref<const MatrixRf>& rows) { write(l, s, pos, rows, v[l][s], qv[l][s], v_width[l]); }

  /// Float view of tokens 0..n-1 of layer l, sequence s (at least n rows). F32: the storage
  /// itself; quantized: dequantized into a scratch buffer that the next read_k (read_v)
  /// overwrites.
  const MatrixRf& read_k(int l, int s, int n) { return read(k[l][s], qk[l][s], k_width[l], n, scratch_k_); }
  const MatrixRf& read_v(int l, int s, int n) { return read(v[l][s], qv[l][s], v_width[l], n, scratch_v_); }

  /// Numbers stored per token over all layers (the quantity MLA shrinks).
  std::size_t floats_per_token() const {
    std::size_t n = 0;
    for (std::size_t l = 0; l < k_width.size(); ++l) n += static_cast<std::size_t>(k_width[l] + v_width[l]);
    return n;
  }
  /// Bytes stored per token over all layers in this cache's dtype: F32 4 per number;
  /// Int8/Fp8E4M3 1 per number plus a 4-byte scale per non-empty K and V row per layer.
  std::size_t bytes_per_token() const {
    std::size_t n = 0;
    for (std::size_t l = 0; l < k_width.size(); ++l) n += cache_row_bytes(k_width[l], dtype) + cache_row_bytes(v_width[l], dtype);
    return n;
  }
  /// Bytes of the live cache contents (valid tokens only, in the cache's dtype).
  std::size_t bytes_used() const {
    std::size_t n = 0;
    for (int len : length) n += static_cast<std::size_t>(len) * bytes_per_token();
    return n;
  }

 private:
  void write(int l, int s, int pos, const Eigen::Ref<const MatrixRf>& rows, MatrixRf& f, QuantRows& q, int w) {
    const int n = static_cast<int>(rows.rows());
    reserve(l, s, pos + n);
    if (w == 0) return;
    if (!quantized()) {
      f.middleRows(pos, n) = rows;
      return;
    }
    for (int i = 0; i < n; ++i) {  // row-major Ref: row i starts at data() + i * outerStride(), unit inner stride
      const auto t = static_cast<std::size_t>(pos + i);
      q.scale[t] = quantize_row(rows.data() + static_cast<std::ptrdiff_t>(i) * rows.outerStride(), w, dtype,
                                q.codes.data() + t * static_cast<std::size_t>(w));
    }
  }

  const MatrixRf& read(const MatrixRf& f, const QuantRows& q, int w, int n, MatrixRf& scratch) const {
    if (!quantized()) return f;
    scratch.resize(n, w);
    for (int t = 0; t < n && w > 0; ++t)
      dequantize_row(q.codes.data() + static_cast<std::size_t>(t) * static_cast<std::size_t>(w), q.scale[static_cast<std::size_t>(t)], w,
                     dtype, scratch.row(t).data());
    return scratch;
  }

  MatrixRf scratch_k_, scratch_v_;
};

}  // namespace cacheshrink::model

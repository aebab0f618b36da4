#pragma once
// The CPU transformer forward pass for every supported family, one code path for
// MHA/GQA/MQA (query head h reads KV head Kind::kv_head(h, group)).
//
// Batches are packed: each sequence contributes only its real tokens, stacked into one
// (tokens, hidden) matrix so every projection is one GEMM; attention runs per sequence and
// head against that sequence's cache. Padding therefore never enters the arithmetic; the
// padded-batch front door (forward_padded) packs with the attention mask and scatters back.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "cacheshrink/backend/cpu/cpu.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/model/attention_kind.hpp"
#include "cacheshrink/model/kv_cache.hpp"
#include "cacheshrink/model/layers.hpp"
#include "cacheshrink/model/weights.hpp"

namespace cacheshrink::model {

enum class LogitsFor { All, Last, None };

/// Observation hooks (calibration, tests). Called with packed (tokens, features) matrices.
struct ForwardHooks {
  /// Input of layer l's attention (after its input norm): the calibration signal.
  std::function<void(int layer, const MatrixRf& h)> on_attn_input;
  /// index 0: embedding output; 1..n_layers: output of layer index-1; n_layers+1: after final norm.
  std::function<void(int index, const MatrixRf& x)> on_hidden;
};

struct ForwardOptions {
  LogitsFor logits = LogitsFor::All;
  const ForwardHooks* hooks = nullptr;
  /// >= 0: stop right after on_attn_input of this layer (calibration needs nothing more);
  /// requires no cache and returns an empty matrix.
  int stop_after_attn_input = -1;
};

/// Causal attention of `n` queries (rows of q, positions p0..p0+n-1) over keys/values
/// 0..p0+n-1 of one sequence; `window` > 0 keeps only keys j > i - window.
/// q: (n, n_heads*hd) block, out: (n, n_heads*hd) block. K/V: (>= p0+n, n_kv*hd).
template <AttentionKind Kind, class QBlock, class OBlock>
void causal_attention(const QBlock& q, int p0, const MatrixRf& K, const MatrixRf& V, int n_heads, int n_kv_heads, int hd, int window,
                      OBlock&& out) {
  const int n = static_cast<int>(q.rows());
  const int L = p0 + n;
  const int group = n_heads / n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  MatrixRf scores(n, L);
  for (int h = 0; h < n_heads; ++h) {
    const int kvh = Kind::kv_head(h, group);
    // Keys that any query of this block may see: [lo, L).
    const int lo = window > 0 ? std::max(0, p0 - window + 1) : 0;
    const int span = L - lo;
    auto S = scores.leftCols(span);
    S.noalias() = (q.middleCols(h * hd, hd) * scale) * K.block(lo, kvh * hd, span, hd).transpose();
    for (int i = 0; i < n; ++i) {
      const int pos = p0 + i;
      const int first = window > 0 ? std::max(0, pos - window + 1) : 0;
      auto row = S.row(i);
      const int a = first - lo, b = pos - lo + 1;  // visible: [a, b)
      float m = -std::numeric_limits<float>::infinity();
      for (int j = a; j < b; ++j) m = std::max(m, row[j]);
      float sum = 0.0f;
      for (int j = 0; j < span; ++j) {
        const float e = (j >= a && j < b) ? std::exp(row[j] - m) : 0.0f;
        row[j] = e;
        sum += e;
      }
      row *= 1.0f / sum;
    }
    out.middleCols(h * hd, hd).noalias() = S * V.block(lo, kvh * hd, span, hd);
  }
}

template <AttentionKind Kind, class Backend = Cpu>
class Transformer {
  static_assert(sizeof(Backend) == 0, "Transformer<Kind, Backend>: this backend is not available here; for Backend = Cuda include "
                                      "cacheshrink/cuda.hpp from a .cu translation unit");
};

template <AttentionKind Kind>
class Transformer<Kind, Cpu> {
 public:
  explicit Transformer(const Model& m) : m_(m), c_(m.config), rope_() {
    check_attention_kind<Kind>(c_);
    if (c_.uses_rope()) rope_ = Rope(c_);
  }

  const ModelConfig& config() const { return c_; }
  const Model& model() const { return m_; }
  KvCache make_cache(int n_seqs) const {
    std::vector<int> kw, vw;
    for (const auto& lw : m_.weights.layers) {
      if (lw.mla) {
        kw.push_back(lw.mla->k_cache_width());
        vw.push_back(lw.mla->v_cache_width());
      } else {
        kw.push_back(c_.d_kv());
        vw.push_back(c_.d_kv());
      }
    }
    return KvCache(std::move(kw), std::move(vw), n_seqs, cache_dtype_);
  }

  /// Storage of the caches this transformer makes (make_cache, and the local cache of a
  /// forward without one): F32, or Int8 / Fp8E4M3 with a per-token scale (model/kv_quant.hpp).
  /// Rows are quantized when written and attention reads them back from the cache, the
  /// current chunk's own rows included, so logits do not depend on how a sequence is split
  /// into prefill and decode calls. Applies to every layer's cache (latents of MLA layers,
  /// K/V rows of layers kept original); an explicit cache passed to forward uses its own dtype.
  void set_cache_dtype(CacheDtype d) { cache_dtype_ = d; }
  CacheDtype cache_dtype() const { return cache_dtype_; }

  /// Runs the new tokens of each sequence (appended after `cache` when given, else from
  /// position 0). Returns logits: All -> one row per packed token in order; Last -> one
  /// row per sequence; None -> empty.
  MatrixRf forward(std::span<const std::vector<int>> seqs, KvCache* cache = nullptr, const ForwardOptions& opt = {}) {
    const int B = static_cast<int>(seqs.size());
    if (B == 0) throw InvalidArgument("forward: empty batch");
    if (cache != nullptr && cache->n_seqs() != B)
      throw InvalidArgument("forward: cache holds " + std::to_string(cache->n_seqs()) + " sequences, batch has " + std::to_string(B));
    if (opt.stop_after_attn_input >= 0 && cache != nullptr) throw InvalidArgument("forward: stop_after_attn_input needs cache == nullptr");
    KvCache local;
    if (cache == nullptr) {
      local = make_cache(B);
      cache = &local;
    }
    // Packing: offsets and start positions.
    std::vector<int> off(B + 1, 0), p0(B, 0);
    for (int s = 0; s < B; ++s) {
      const auto& t = seqs[s];
      if (t.empty()) throw InvalidArgument("forward: sequence " + std::to_string(s) + " has no tokens");
      p0[s] = cache->length[s];
      if (p0[s] + static_cast<int>(t.size()) > c_.max_position && c_.family == Family::Gpt2)
        throw InvalidArgument("forward: sequence " + std::to_string(s) + " reaches position " + std::to_string(p0[s] + t.size()) +
                              " but the model has max_position_embeddings " + std::to_string(c_.max_position));
      for (int id : t)
        if (id < 0 || id >= c_.vocab_size)
          throw InvalidArgument("forward: token id " + std::to_string(id) + " in sequence " + std::to_string(s) +
                                " is outside the vocabulary [0, " + std::to_string(c_.vocab_size) + ")");
      off[s + 1] = off[s] + static_cast<int>(t.size());
    }
    const int N = off[B];
    const auto& W = m_.weights;
    const int H = c_.hidden_size, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;

    x_.resize(N, H);
    for (int s = 0; s < B; ++s)
      for (int i = 0; i < off[s + 1] - off[s]; ++i) {
        x_.row(off[s] + i) = W.embed.row(seqs[s][i]);
        if (c_.family == Family::Gpt2) x_.row(off[s] + i) += W.pos_embed.row(p0[s] + i);
      }
    const ForwardHooks* hk = opt.hooks;
    if (hk && hk->on_hidden) hk->on_hidden(0, x_);

    for (int l = 0; l < c_.n_layers; ++l) {
      const auto& lw = W.layers[l];
      apply_norm(c_, x_, lw.norm1_w, lw.norm1_b, h_);
      if (hk && hk->on_attn_input) hk->on_attn_input(l, h_);
      if (l == opt.stop_after_attn_input) return {};
      q_.noalias() = h_ * lw.wq.transpose();
      if (lw.bq.size()) q_.rowwise() += lw.bq.transpose();
      if (lw.q_norm.size()) head_rms_norm(q_, hd, lw.q_norm, static_cast<float>(c_.norm_eps));
      if (c_.uses_rope())
        for (int s = 0; s < B; ++s)
          for (int i = 0; i < off[s + 1] - off[s]; ++i) rope_.apply_row(q_.row(off[s] + i).data(), nh, p0[s] + i);
      attn_.resize(N, nh * hd);
      if (!lw.mla) {
        k_.noalias() = h_ * lw.wk.transpose();
        v_.noalias() = h_ * lw.wv.transpose();
        finish_kv(lw, k_, v_, off, p0);
        for (int s = 0; s < B; ++s) {
          const int n = off[s + 1] - off[s];
          cache->write_k(l, s, p0[s], k_.middleRows(off[s], n));
          cache->write_v(l, s, p0[s], v_.middleRows(off[s], n));
        }
        for (int s = 0; s < B; ++s) {
          const int n = off[s + 1] - off[s];
          causal_attention<Kind>(q_.middleRows(off[s], n), p0[s], cache->read_k(l, s, p0[s] + n), cache->read_v(l, s, p0[s] + n), nh, nkv, hd,
                                 c_.sliding_window, attn_.middleRows(off[s], n));
        }
      } else {
        // MLA: cache the latents only; rebuild K and V of the whole visible cache from them
        // (the original package's decode path; issue 9 replaces it with absorption).
        const MlaLayer& mla = *lw.mla;
        const bool joint = mla.method == CompressionMethod::Joint;
        const int dl = mla.d_latent, dr = mla.d_rope;
        k_.resize(N, dl + dr);  // [c_k | k_rope] (joint: c)
        k_.leftCols(dl).noalias() = h_ * mla.w_down_k.transpose();
        if (dr > 0) k_.rightCols(dr).noalias() = h_ * mla.w_rope_k.transpose();
        if (!joint) v_.noalias() = h_ * mla.w_down_v.transpose();
        for (int s = 0; s < B; ++s) {
          const int n = off[s + 1] - off[s];
          cache->write_k(l, s, p0[s], k_.middleRows(off[s], n));
          if (!joint) cache->write_v(l, s, p0[s], v_.middleRows(off[s], n));
        }
        for (int s = 0; s < B && absorb_; ++s) {
          const int n = off[s + 1] - off[s];
          const MatrixRf& ck = cache->read_k(l, s, p0[s] + n);
          latent_attention(lw, mla, q_.middleRows(off[s], n), p0[s], ck, joint ? ck : cache->read_v(l, s, p0[s] + n),
                           attn_.middleRows(off[s], n));
        }
        for (int s = 0; s < B && !absorb_; ++s) {
          const int n = off[s + 1] - off[s];
          const int Ltot = p0[s] + n;
          const auto& ck = cache->read_k(l, s, Ltot);
          const auto& cv = joint ? ck : cache->read_v(l, s, Ltot);
          kfull_.resize(Ltot, c_.d_kv());
          if (dr > 0) kfull_.leftCols(dr) = ck.block(0, dl, Ltot, dr);
          kfull_.rightCols(c_.d_kv() - dr).noalias() = ck.block(0, 0, Ltot, dl) * mla.w_up_k->transpose();
          vfull_.noalias() = cv.block(0, 0, Ltot, dl) * mla.w_up_v->transpose();
          std::vector<int> off1{0, Ltot}, p01{0};
          finish_kv(lw, kfull_, vfull_, off1, p01);
          causal_attention<Kind>(q_.middleRows(off[s], n), p0[s], kfull_, vfull_, nh, nkv, hd, c_.sliding_window,
                                 attn_.middleRows(off[s], n));
        }
      }
      x_.noalias() += attn_ * lw.wo.transpose();
      if (lw.bo.size()) x_.rowwise() += lw.bo.transpose();

      apply_norm(c_, x_, lw.norm2_w, lw.norm2_b, h_);
      if (c_.family == Family::Gpt2) {
        up_.noalias() = h_ * lw.w_up.transpose();
        up_.rowwise() += lw.b_up.transpose();
        up_ = up_.unaryExpr([](float t) { return gelu_tanh(t); });
      } else {
        gate_.noalias() = h_ * lw.w_gate.transpose();
        up_.noalias() = h_ * lw.w_up.transpose();
        if (lw.b_gate.size()) gate_.rowwise() += lw.b_gate.transpose();
        if (lw.b_up.size()) up_.rowwise() += lw.b_up.transpose();
        up_.array() *= gate_.unaryExpr([](float t) { return silu(t); }).array();
      }
      x_.noalias() += up_ * lw.w_down.transpose();
      if (lw.b_down.size()) x_.rowwise() += lw.b_down.transpose();
      if (hk && hk->on_hidden) hk->on_hidden(l + 1, x_);
    }
    for (int s = 0; s < B; ++s) cache->length[s] = p0[s] + (off[s + 1] - off[s]);

    if (opt.logits == LogitsFor::None) return {};
    if (opt.logits == LogitsFor::Last) {
      MatrixRf last(B, H);
      for (int s = 0; s < B; ++s) last.row(s) = x_.row(off[s + 1] - 1);
      apply_norm(c_, last, W.final_norm_w, W.final_norm_b, h_);
    } else {
      apply_norm(c_, x_, W.final_norm_w, W.final_norm_b, h_);
    }
    if (hk && hk->on_hidden) hk->on_hidden(c_.n_layers + 1, h_);
    MatrixRf logits;
    logits.noalias() = h_ * W.head().transpose();
    return logits;
  }

  /// Convenience: one sequence.
  MatrixRf forward(const std::vector<int>& ids, KvCache* cache = nullptr, const ForwardOptions& opt = {}) {
    return forward(std::span<const std::vector<int>>(&ids, 1), cache, opt);
  }

  /// Padded batch front door: ids (B, T) row-major with attention mask (1 = real token).
  /// Position ids count real tokens (HF's cumsum(mask) - 1), so left and right padding both
  /// work. Returns logits (B*T, vocab) with zero rows at padded positions.
  MatrixRf forward_padded(std::span<const int> ids, std::span<const int> mask, int batch, int T) {
    if (static_cast<int>(ids.size()) != batch * T || static_cast<int>(mask.size()) != batch * T)
      throw InvalidArgument("forward_padded: ids and mask must both hold batch*T entries");
    std::vector<std::vector<int>> seqs(batch);
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < T; ++t)
        if (mask[b * T + t]) seqs[b].push_back(ids[b * T + t]);
    MatrixRf packed = forward(seqs);
    MatrixRf out = MatrixRf::Zero(batch * T, c_.vocab_size);
    int r = 0;
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < T; ++t)
        if (mask[b * T + t]) out.row(b * T + t) = packed.row(r++);
    return out;
  }

  /// Attention on the latent cache (weight absorption) for MLA layers: values are never
  /// rebuilt — attention weights average the value latents, then W_uv maps the average
  /// (sum_j p_j (c_j Wuv^T + bv) = (sum_j p_j c_j) Wuv^T + bv). Keys: where no rotation or norm
  /// sits between W_uk and the query (GPT-2), the query is absorbed instead,
  /// q.k_j = (q Wuk_h).c_j + q.bk_h, the last term constant over j; elsewhere keys are rebuilt
  /// (RoPE at each key's position), but values still are not. Off by default; exact up to
  /// rounding (see tests/test_absorb.cpp).
  void set_absorbed(bool on) { absorb_ = on; }
  bool absorbed() const { return absorb_; }

 private:
  template <class QBlock, class OBlock>
  void latent_attention(const LayerWeights& lw, const MlaLayer& mla, const QBlock& q, int p0, const MatrixRf& ck, const MatrixRf& cv,
                        OBlock&& out) {
    const int n = static_cast<int>(q.rows()), L = p0 + n, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int group = nh / nkv, dl = mla.d_latent, dr = mla.d_rope, window = c_.sliding_window;
    const bool absorb_k = !c_.uses_rope() && lw.k_norm.size() == 0 && dr == 0;
    const int lo = window > 0 ? std::max(0, p0 - window + 1) : 0;
    const int span = L - lo;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    if (!absorb_k) {  // rebuild keys only
      kfull_.resize(L, c_.d_kv());
      if (dr > 0) kfull_.leftCols(dr) = ck.block(0, dl, L, dr);
      kfull_.rightCols(c_.d_kv() - dr).noalias() = ck.block(0, 0, L, dl) * mla.w_up_k->transpose();
      if (lw.bk.size()) kfull_.rowwise() += lw.bk.transpose();
      if (lw.k_norm.size()) head_rms_norm(kfull_, hd, lw.k_norm, static_cast<float>(c_.norm_eps));
      if (c_.uses_rope())
        for (int i = 0; i < L; ++i) rope_.apply_row(kfull_.row(i).data(), nkv, i);
    }
    MatrixRf scores(n, span), qt, avg;
    for (int h = 0; h < nh; ++h) {
      const int kvh = Kind::kv_head(h, group);
      if (absorb_k) {
        qt.noalias() = (q.middleCols(h * hd, hd) * scale) * mla.w_up_k->middleRows(kvh * hd, hd);  // (n, d_latent)
        scores.noalias() = qt * ck.block(lo, 0, span, dl).transpose();
      } else {
        scores.noalias() = (q.middleCols(h * hd, hd) * scale) * kfull_.block(lo, kvh * hd, span, hd).transpose();
      }
      for (int i = 0; i < n; ++i) {
        const int pos = p0 + i;
        const int a = (window > 0 ? std::max(0, pos - window + 1) : 0) - lo, b = pos - lo + 1;
        auto row = scores.row(i);
        float m = -std::numeric_limits<float>::infinity();
        for (int j = a; j < b; ++j) m = std::max(m, row[j]);
        float sum = 0.0f;
        for (int j = 0; j < span; ++j) {
          const float e = (j >= a && j < b) ? std::exp(row[j] - m) : 0.0f;
          row[j] = e;
          sum += e;
        }
        row *= 1.0f / sum;
      }
      avg.noalias() = scores * cv.block(lo, 0, span, dl);                                    // (n, d_latent)
      out.middleCols(h * hd, hd).noalias() = avg * mla.w_up_v->middleRows(kvh * hd, hd).transpose();  // (n, hd)
      if (lw.bv.size()) out.middleCols(h * hd, hd).rowwise() += lw.bv.segment(kvh * hd, hd).transpose();
    }
  }

  /// K/V post-processing shared by the standard and MLA paths: biases, k-norm, RoPE on keys.
  /// Rows of packed sequence s (offsets off) sit at positions p0[s]...
  void finish_kv(const LayerWeights& lw, MatrixRf& k, MatrixRf& v, const std::vector<int>& off,
                 const std::vector<int>& p0) const {
    if (lw.bk.size()) k.rowwise() += lw.bk.transpose();
    if (lw.bv.size()) v.rowwise() += lw.bv.transpose();
    if (lw.k_norm.size()) head_rms_norm(k, c_.head_dim, lw.k_norm, static_cast<float>(c_.norm_eps));
    if (c_.uses_rope())
      for (std::size_t s = 0; s + 1 < off.size(); ++s)
        for (int i = 0; i < off[s + 1] - off[s]; ++i) rope_.apply_row(k.row(off[s] + i).data(), c_.n_kv_heads, p0[s] + i);
  }

  const Model& m_;
  ModelConfig c_;
  Rope rope_;
  // Buffers reused across calls (allocated once per batch shape).
  MatrixRf x_, h_, q_, k_, v_, attn_, gate_, up_, kfull_, vfull_;
  bool absorb_ = false;
  CacheDtype cache_dtype_ = CacheDtype::F32;
};

}  // namespace cacheshrink::model

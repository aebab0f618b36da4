#pragma once
// Plain weight structs for the CPU runtime (float32, row-major, HF (out, in) orientation)
// and the per-family name maps that fill them from safetensors.
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cacheshrink/core/config.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/tensor.hpp"
#include "cacheshrink/io/model_dir.hpp"

namespace cacheshrink::model {

/// MLA replacement of a layer's K/V projections. The cache holds the latents:
///   separate/xkv: c_k = h Wdk^T, c_v = h Wdv^T (2*d_latent per token);
///   joint:        c   = h Wd^T (d_latent per token) feeding both K and V;
///   decoupled_rope: K's first d_rope features k_r = h Wr^T are cached exactly next to c_k,
///                 K~ = [k_r | c_k Wuk^T] + bk with Wuk (d_kv - d_rope, d_latent).

/// K~ = c_k Wuk^T + bk, V~ = c_v Wuv^T + bv; q/k-norm and RoPE then apply to K~ exactly
/// where the original model applies them to K. Wuk, Wuv: (d_kv, d_latent), orthonormal
/// columns (for joint, [Wuk; Wuv] jointly). xkv layers of a group share the same Wu objects.
struct MlaLayer {
  CompressionMethod method = CompressionMethod::Separate;
  int d_latent = 0;
  int group = -1;                              // xkv group index, -1 otherwise
  int d_rope = 0;                              // decoupled_rope: exact key features
  MatrixRf w_rope_k;                           // (d_rope, hidden): the first d_rope rows of Wk
  MatrixRf w_down_k;                           // (d_latent, hidden); joint: the shared down-projection
  MatrixRf w_down_v;                           // (d_latent, hidden); empty for joint
  std::shared_ptr<MatrixRf> w_up_k, w_up_v;    // (d_kv, d_latent)
  int cache_width() const { return method == CompressionMethod::Joint ? d_latent : 2 * d_latent + d_rope; }
  int k_cache_width() const { return d_latent + d_rope; }
  int v_cache_width() const { return method == CompressionMethod::Joint ? 0 : d_latent; }
};

struct LayerWeights {
  // Norms: LayerNorm has weight and bias, RMSNorm weight only (bias empty).
  VectorXf norm1_w, norm1_b, norm2_w, norm2_b;
  MatrixRf wq;  // (n_heads*head_dim, hidden)
  MatrixRf wk;  // (d_kv, hidden)
  MatrixRf wv;  // (d_kv, hidden)
  MatrixRf wo;  // (hidden, n_heads*head_dim)
  VectorXf bq, bk, bv, bo;  // empty when absent
  VectorXf q_norm, k_norm;  // (head_dim) for qk-norm families, else empty
  MatrixRf w_gate;          // (inter, hidden); empty for GPT-2
  MatrixRf w_up;            // (inter, hidden)  (GPT-2: c_fc transposed)
  MatrixRf w_down;          // (hidden, inter)  (GPT-2: c_proj transposed)
  VectorXf b_gate, b_up, b_down;
  std::optional<MlaLayer> mla;  // set when the layer is converted to MLA
};

struct ModelWeights {
  MatrixRf embed;      // (vocab, hidden)
  MatrixRf pos_embed;  // (max_position, hidden); GPT-2 only
  std::vector<LayerWeights> layers;
  VectorXf final_norm_w, final_norm_b;
  MatrixRf lm_head;  // (vocab, hidden); empty when tied to embed
  const MatrixRf& head() const { return lm_head.size() ? lm_head : embed; }
};

/// A loaded model: its config, weights, where it came from and HF's parameter count.
struct Model {
  ModelConfig config;
  ModelWeights weights;
  std::filesystem::path dir;
  std::string stored_dtype;  // dtype of the first weight tensor
};

namespace detail {

class Loader {
 public:
  Loader(const io::TensorStore& s, std::string label) : s_(s), label_(std::move(label)) {}

  MatrixRf matrix(const std::string& name, std::int64_t rows, std::int64_t cols) const {
    check(name, {rows, cols});
    auto v = s_.to_float(name);
    return Eigen::Map<MatrixRf>(v.data(), rows, cols);
  }
  /// GPT-2 Conv1D stores [in, out]; return (out, in).
  MatrixRf conv1d(const std::string& name, std::int64_t in, std::int64_t out) const {
    check(name, {in, out});
    auto v = s_.to_float(name);
    return Eigen::Map<MatrixRf>(v.data(), in, out).transpose();
  }
  VectorXf vector(const std::string& name, std::int64_t n) const {
    check(name, {n});
    auto v = s_.to_float(name);
    return Eigen::Map<VectorXf>(v.data(), n);
  }
  bool has(const std::string& name) const { return s_.contains(name); }

 private:
  void check(const std::string& name, const std::vector<std::int64_t>& shape) const {
    if (!s_.contains(name)) throw TensorError(label_ + ": missing tensor '" + name + "'");
    s_.file_of(name).expect_shape(name, shape);
  }
  const io::TensorStore& s_;
  std::string label_;
};

inline void load_gpt2(const ModelConfig& c, const Loader& L, ModelWeights& w) {
  const std::int64_t H = c.hidden_size, I = c.intermediate_size;
  w.embed = L.matrix("transformer.wte.weight", c.vocab_size, H);
  w.pos_embed = L.matrix("transformer.wpe.weight", c.max_position, H);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.norm1_w = L.vector(p + "ln_1.weight", H);
    lw.norm1_b = L.vector(p + "ln_1.bias", H);
    lw.norm2_w = L.vector(p + "ln_2.weight", H);
    lw.norm2_b = L.vector(p + "ln_2.bias", H);
    // c_attn: [H, 3H] Conv1D = [q | k | v] along the output axis.
    MatrixRf qkv = L.conv1d(p + "attn.c_attn.weight", H, 3 * H);
    VectorXf qkv_b = L.vector(p + "attn.c_attn.bias", 3 * H);
    lw.wq = qkv.topRows(H);
    lw.wk = qkv.middleRows(H, H);
    lw.wv = qkv.bottomRows(H);
    lw.bq = qkv_b.segment(0, H);
    lw.bk = qkv_b.segment(H, H);
    lw.bv = qkv_b.segment(2 * H, H);
    lw.wo = L.conv1d(p + "attn.c_proj.weight", H, H);
    lw.bo = L.vector(p + "attn.c_proj.bias", H);
    lw.w_up = L.conv1d(p + "mlp.c_fc.weight", H, I);
    lw.b_up = L.vector(p + "mlp.c_fc.bias", I);
    lw.w_down = L.conv1d(p + "mlp.c_proj.weight", I, H);
    lw.b_down = L.vector(p + "mlp.c_proj.bias", H);
    w.layers.push_back(std::move(lw));
  }
  w.final_norm_w = L.vector("transformer.ln_f.weight", H);
  w.final_norm_b = L.vector("transformer.ln_f.bias", H);
  if (!c.tie_word_embeddings) w.lm_head = L.matrix("lm_head.weight", c.vocab_size, H);
}

inline void load_llama(const ModelConfig& c, const Loader& L, ModelWeights& w, bool kv_optional) {
  const std::int64_t H = c.hidden_size, I = c.intermediate_size, Dq = c.d_q(), Dkv = c.d_kv(), hd = c.head_dim;
  w.embed = L.matrix("model.embed_tokens.weight", c.vocab_size, H);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.norm1_w = L.vector(p + "input_layernorm.weight", H);
    lw.norm2_w = L.vector(p + "post_attention_layernorm.weight", H);
    lw.wq = L.matrix(p + "self_attn.q_proj.weight", Dq, H);
    // A saved MLA model may omit the original K/V projections (kv_optional).
    if (!kv_optional || L.has(p + "self_attn.k_proj.weight")) lw.wk = L.matrix(p + "self_attn.k_proj.weight", Dkv, H);
    if (!kv_optional || L.has(p + "self_attn.v_proj.weight")) lw.wv = L.matrix(p + "self_attn.v_proj.weight", Dkv, H);
    lw.wo = L.matrix(p + "self_attn.o_proj.weight", H, Dq);
    if (c.qkv_bias) {
      lw.bq = L.vector(p + "self_attn.q_proj.bias", Dq);
      lw.bk = L.vector(p + "self_attn.k_proj.bias", Dkv);
      lw.bv = L.vector(p + "self_attn.v_proj.bias", Dkv);
    }
    if (c.o_bias) lw.bo = L.vector(p + "self_attn.o_proj.bias", H);
    if (c.qk_norm) {
      lw.q_norm = L.vector(p + "self_attn.q_norm.weight", hd);
      lw.k_norm = L.vector(p + "self_attn.k_norm.weight", hd);
    }
    lw.w_gate = L.matrix(p + "mlp.gate_proj.weight", I, H);
    lw.w_up = L.matrix(p + "mlp.up_proj.weight", I, H);
    lw.w_down = L.matrix(p + "mlp.down_proj.weight", H, I);
    if (c.mlp_bias) {
      lw.b_gate = L.vector(p + "mlp.gate_proj.bias", I);
      lw.b_up = L.vector(p + "mlp.up_proj.bias", I);
      lw.b_down = L.vector(p + "mlp.down_proj.bias", H);
    }
    w.layers.push_back(std::move(lw));
  }
  w.final_norm_w = L.vector("model.norm.weight", H);
  // Tied checkpoints may also store lm_head (a copy of the embedding); the runtime uses the embedding.
  if (!c.tie_word_embeddings) w.lm_head = L.matrix("lm_head.weight", c.vocab_size, H);
}

}  // namespace detail

/// Loads config.json and the weights of a HF model directory, checking every tensor's
/// name and shape. Throws IoError/ConfigError/TensorError/FormatError naming the file.
/// `kv_optional`: original K/V projections may be absent (saved MLA models; use
/// pipeline::load_any, which also attaches the MLA weights).
inline Model load_model(const std::filesystem::path& dir, bool kv_optional = false) {
  if (!std::filesystem::is_directory(dir)) throw IoError(dir.string() + ": model directory does not exist");
  Model m;
  m.dir = dir;
  m.config = io::load_model_config(dir / "config.json");
  auto store = io::TensorStore::open_dir(dir);
  detail::Loader L(store, store.label());
  if (m.config.family == Family::Gpt2) detail::load_gpt2(m.config, L, m.weights);
  else detail::load_llama(m.config, L, m.weights, kv_optional);
  const auto names = store.names();
  if (!names.empty()) m.stored_dtype = std::string(dtype_name(store.info(names.front()).dtype));
  return m;
}

/// Parameter count as HF's num_parameters() reports it (tied head counted once).
inline std::int64_t parameter_count(const ModelWeights& w) {
  std::int64_t n = w.embed.size() + w.pos_embed.size() + w.final_norm_w.size() + w.final_norm_b.size() + w.lm_head.size();
  for (const auto& l : w.layers) {
    for (const auto* v : {&l.norm1_w, &l.norm1_b, &l.norm2_w, &l.norm2_b, &l.bq, &l.bk, &l.bv, &l.bo, &l.q_norm, &l.k_norm, &l.b_gate,
                          &l.b_up, &l.b_down})
      n += v->size();
    for (const auto* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) n += m->size();
  }
  return n;
}

}  // namespace cacheshrink::model

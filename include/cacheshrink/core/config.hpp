#pragma once
// Model configuration: the subset of a HuggingFace config.json that the runtime needs,
// normalised across families (GPT-2 and the LLaMA-like families).
#include <string>
#include <vector>

namespace cacheshrink {

/// Weight layout / block structure. Llama covers llama, mistral, qwen2, qwen3 and
/// llama-like configs recognised by their fields.
enum class Family { Gpt2, Llama };

/// How query heads map to KV heads (derived from n_heads / n_kv_heads).
enum class AttentionKindId { Mha, Gqa, Mqa };

enum class Activation { GeluTanh, Silu };

/// MLA compression methods (see compression/policies.hpp for the typed policies).
enum class CompressionMethod { Separate, Xkv, Joint, DecoupledRope };

inline const char* compression_method_name(CompressionMethod m) {
  switch (m) {
    case CompressionMethod::Separate: return "separate";
    case CompressionMethod::Xkv: return "xkv";
    case CompressionMethod::Joint: return "joint";
    case CompressionMethod::DecoupledRope: return "decoupled_rope";
  }
  return "?";
}

struct RopeScaling {
  std::string type = "default";  // default | linear | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3
  double high_freq_factor = 4.0;  // llama3
  int original_max_position = 8192;
};

struct ModelConfig {
  std::string model_type;  // as in config.json
  std::string source;      // file it was read from (for messages)
  Family family = Family::Llama;
  int vocab_size = 0;
  int hidden_size = 0;
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int intermediate_size = 0;
  int max_position = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int sliding_window = 0;  // 0: full causal attention
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool qk_norm = false;
  bool tie_word_embeddings = false;
  Activation activation = Activation::Silu;
  int bos_token_id = -1;
  int eos_token_id = -1;

  int d_kv() const { return n_kv_heads * head_dim; }
  int d_q() const { return n_heads * head_dim; }
  int group_size() const { return n_heads / n_kv_heads; }
  AttentionKindId attention_kind() const {
    if (n_kv_heads == n_heads) return AttentionKindId::Mha;
    if (n_kv_heads == 1) return AttentionKindId::Mqa;
    return AttentionKindId::Gqa;
  }
  bool uses_rope() const { return family == Family::Llama; }
};

inline const char* attention_kind_name(AttentionKindId k) {
  switch (k) {
    case AttentionKindId::Mha: return "MHA";
    case AttentionKindId::Gqa: return "GQA";
    case AttentionKindId::Mqa: return "MQA";
  }
  return "?";
}

}  // namespace cacheshrink

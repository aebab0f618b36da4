#pragma once
// HF config.json -> ModelConfig, with strict consistency checks.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "cacheshrink/core/config.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/file.hpp"

namespace cacheshrink::io {

namespace detail {

inline std::string json_where(const std::string& src, const std::string& key) { return src + ": field '" + key + "'"; }

inline int get_int(const nlohmann::json& j, const std::string& src, const std::string& key, int fallback, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw ConfigError(json_where(src, key) + " is missing");
    return fallback;
  }
  if (!it->is_number_integer()) throw ConfigError(json_where(src, key) + " must be an integer");
  const auto v = it->get<long long>();
  if (v < 0 || v > (1LL << 31) - 1) throw ConfigError(json_where(src, key) + " = " + std::to_string(v) + " is out of range");
  return static_cast<int>(v);
}

inline double get_double(const nlohmann::json& j, const std::string& src, const std::string& key, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw ConfigError(json_where(src, key) + " must be a number");
  return it->get<double>();
}

inline std::string get_string(const nlohmann::json& j, const std::string& src, const std::string& key, const std::string& fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) throw ConfigError(json_where(src, key) + " must be a string");
  return it->get<std::string>();
}

inline bool get_bool(const nlohmann::json& j, const std::string& key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_boolean()) return fallback;
  return it->get<bool>();
}

inline int first_int(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return -1;
  if (it->is_number_integer()) return it->get<int>();
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) return (*it)[0].get<int>();
  return -1;
}

inline void parse_rope(const nlohmann::json& j, const std::string& src, ModelConfig& c) {
  // transformers >= 5 nests theta and scaling in rope_parameters; older configs use
  // rope_theta + rope_scaling.
  const nlohmann::json* rs = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    c.rope_theta = get_double(*it, src, "rope_theta", get_double(j, src, "rope_theta", 10000.0));
    rs = &*it;
  } else {
    c.rope_theta = get_double(j, src, "rope_theta", 10000.0);
    if (auto it2 = j.find("rope_scaling"); it2 != j.end() && it2->is_object()) rs = &*it2;
  }
  if (rs == nullptr) return;
  std::string type = "default";
  if (auto t = rs->find("rope_type"); t != rs->end() && t->is_string()) type = t->get<std::string>();
  else if (auto t2 = rs->find("type"); t2 != rs->end() && t2->is_string()) type = t2->get<std::string>();
  if (type != "default" && type != "linear" && type != "llama3")
    throw ConfigError(src + ": rope scaling type '" + type + "' is not supported (supported: default, linear, llama3)");
  c.rope_scaling.type = type;
  c.rope_scaling.factor = get_double(*rs, src, "factor", 1.0);
  c.rope_scaling.low_freq_factor = get_double(*rs, src, "low_freq_factor", 1.0);
  c.rope_scaling.high_freq_factor = get_double(*rs, src, "high_freq_factor", 4.0);
  c.rope_scaling.original_max_position = get_int(*rs, src, "original_max_position_embeddings", 8192, false);
  if (c.rope_scaling.factor <= 0) throw ConfigError(src + ": rope scaling factor must be positive");
}

}  // namespace detail

/// Parses a HF config (already loaded as JSON). `src` names the file in messages.
inline ModelConfig parse_model_config(const nlohmann::json& j, const std::string& src) {
  using namespace detail;
  if (!j.is_object()) throw ConfigError(src + ": config is not a JSON object");
  ModelConfig c;
  c.source = src;
  c.model_type = get_string(j, src, "model_type", std::string{});
  if (j.contains("kv_lora_rank") || c.model_type.rfind("deepseek", 0) == 0)
    throw ConfigError(src + ": model_type '" + c.model_type +
                      "' already uses latent attention (kv_lora_rank); converting it to MLA again is not supported");

  if (c.model_type == "gpt2") {
    c.family = Family::Gpt2;
    c.vocab_size = get_int(j, src, "vocab_size", 0, true);
    c.hidden_size = get_int(j, src, "n_embd", 0, true);
    c.n_layers = get_int(j, src, "n_layer", 0, true);
    c.n_heads = get_int(j, src, "n_head", 0, true);
    c.n_kv_heads = c.n_heads;
    if (c.hidden_size > (1 << 28)) throw ConfigError(json_where(src, "n_embd") + " = " + std::to_string(c.hidden_size) + " is out of range");
    c.intermediate_size = get_int(j, src, "n_inner", 4 * c.hidden_size, false);
    c.max_position = get_int(j, src, "n_positions", 1024, false);
    c.norm_eps = get_double(j, src, "layer_norm_epsilon", 1e-5);
    c.qkv_bias = c.o_bias = c.mlp_bias = true;
    c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", true);
    const std::string act = get_string(j, src, "activation_function", "gelu_new");
    if (act != "gelu_new" && act != "gelu_pytorch_tanh" && act != "gelu_fast")
      throw ConfigError(src + ": GPT-2 activation_function '" + act + "' is not supported (gelu_new / gelu_pytorch_tanh)");
    c.activation = Activation::GeluTanh;
    if (get_bool(j, "scale_attn_by_inverse_layer_idx", false) || get_bool(j, "reorder_and_upcast_attn", false))
      throw ConfigError(src + ": scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported");
  } else {
    // Llama-like: llama, mistral, qwen2, qwen3 and any config carrying the llama fields
    // (like the original's GenericHandler).
    static const char* known[] = {"llama", "mistral", "qwen2", "qwen3"};
    bool is_known = false;
    for (auto* k : known) is_known |= (c.model_type == k);
    if (!is_known && !(j.contains("hidden_size") && j.contains("num_attention_heads") && j.contains("num_hidden_layers") &&
                       j.contains("intermediate_size")))
      throw ConfigError(src + ": unknown architecture (model_type '" + c.model_type +
                        "'); supported: gpt2, llama, mistral, qwen2, qwen3 and llama-like configs with hidden_size, "
                        "num_attention_heads, num_hidden_layers, intermediate_size");
    c.family = Family::Llama;
    c.vocab_size = get_int(j, src, "vocab_size", 0, true);
    c.hidden_size = get_int(j, src, "hidden_size", 0, true);
    c.n_layers = get_int(j, src, "num_hidden_layers", 0, true);
    c.n_heads = get_int(j, src, "num_attention_heads", 0, true);
    c.n_kv_heads = get_int(j, src, "num_key_value_heads", c.n_heads, false);
    c.intermediate_size = get_int(j, src, "intermediate_size", 0, true);
    c.max_position = get_int(j, src, "max_position_embeddings", 2048, false);
    c.norm_eps = get_double(j, src, "rms_norm_eps", 1e-6);
    parse_rope(j, src, c);
    const std::string act = get_string(j, src, "hidden_act", "silu");
    if (act != "silu" && act != "swish") throw ConfigError(src + ": hidden_act '" + act + "' is not supported (silu)");
    c.activation = Activation::Silu;
    c.qkv_bias = c.model_type == "qwen2" ? true : get_bool(j, "attention_bias", false);
    c.o_bias = c.model_type == "qwen2" ? false : get_bool(j, "attention_bias", false);
    c.mlp_bias = get_bool(j, "mlp_bias", false);
    c.qk_norm = c.model_type == "qwen3";
    c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", false);
    // Sliding window: Mistral always; Qwen2/3 only with use_sliding_window (then per layer
    // types, which the tiny fixtures do not use: reject rather than guess).
    if (c.model_type == "mistral") {
      c.sliding_window = get_int(j, src, "sliding_window", 0, false);
    } else if (get_bool(j, "use_sliding_window", false)) {
      throw ConfigError(src + ": use_sliding_window=true (per-layer sliding windows) is not supported for '" + c.model_type + "'");
    }
    if (c.model_type != "mistral" && c.model_type != "qwen2" && c.model_type != "qwen3" && j.contains("sliding_window") &&
        !j["sliding_window"].is_null())
      c.sliding_window = get_int(j, src, "sliding_window", 0, false);
    const int hd_default = c.n_heads > 0 ? c.hidden_size / c.n_heads : 0;
    c.head_dim = get_int(j, src, "head_dim", hd_default, false);
  }
  if (c.family == Family::Gpt2) c.head_dim = c.n_heads > 0 ? c.hidden_size / c.n_heads : 0;
  c.bos_token_id = first_int(j, "bos_token_id");
  c.eos_token_id = first_int(j, "eos_token_id");

  // ---- consistency ----
  auto need_pos = [&](int v, const char* what) {
    if (v <= 0) throw ConfigError(src + ": " + what + " must be positive (got " + std::to_string(v) + ")");
  };
  need_pos(c.vocab_size, "vocab_size");
  need_pos(c.hidden_size, "hidden size");
  need_pos(c.n_layers, "number of layers");
  need_pos(c.n_heads, "number of attention heads");
  need_pos(c.n_kv_heads, "number of key/value heads");
  need_pos(c.intermediate_size, "intermediate size");
  need_pos(c.max_position, "max position embeddings");
  if (c.family == Family::Gpt2 && c.hidden_size % c.n_heads != 0)
    throw ConfigError(src + ": hidden size " + std::to_string(c.hidden_size) + " is not divisible by n_head " + std::to_string(c.n_heads));
  if (c.family == Family::Llama && !j.contains("head_dim") && c.hidden_size % c.n_heads != 0)
    throw ConfigError(src + ": hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                      std::to_string(c.n_heads) + " and no head_dim is given");
  need_pos(c.head_dim, "head_dim");
  if (c.n_heads % c.n_kv_heads != 0)
    throw ConfigError(src + ": num_key_value_heads " + std::to_string(c.n_kv_heads) + " does not divide num_attention_heads " +
                      std::to_string(c.n_heads));
  if (static_cast<long long>(c.n_heads) * c.head_dim > (1LL << 31) - 1)
    throw ConfigError(src + ": num_attention_heads x head_dim = " + std::to_string(static_cast<long long>(c.n_heads) * c.head_dim) +
                      " is out of range");
  if (c.uses_rope() && c.head_dim % 2 != 0) throw ConfigError(src + ": head_dim must be even for RoPE");
  if (!(c.norm_eps > 0)) throw ConfigError(src + ": norm epsilon must be positive");
  if (!(c.rope_theta > 0)) throw ConfigError(src + ": rope_theta must be positive");
  return c;
}

inline ModelConfig load_model_config(const std::filesystem::path& config_json) {
  const std::string src = config_json.string();
  if (!std::filesystem::exists(config_json)) throw IoError(src + ": file not found (a HF model directory needs config.json)");
  auto text = read_text_file(config_json);
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) throw FormatError(src + ": not valid JSON");
  return parse_model_config(j, src);
}

}  // namespace cacheshrink::io

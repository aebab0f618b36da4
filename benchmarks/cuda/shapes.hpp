#pragma once
// The 7B model shapes the GPU benchmarks use (random weights; no checkpoint needed):
// LLaMA-2-7B (32 layers, hidden 4096, 32 heads, MHA) and Qwen2.5-7B (28 layers, hidden 3584,
// 28 query / 4 KV heads, qkv biases, untied head).
#include <cacheshrink/core/config.hpp>

namespace cacheshrink::bench {

inline ModelConfig llama2_7b(int max_position = 4096) {
  ModelConfig c;
  c.model_type = "llama";
  c.source = "random LLaMA-2-7B shapes";
  c.family = Family::Llama;
  c.vocab_size = 32000;
  c.hidden_size = 4096;
  c.n_layers = 32;
  c.n_heads = 32;
  c.n_kv_heads = 32;
  c.head_dim = 128;
  c.intermediate_size = 11008;
  c.max_position = max_position;
  c.norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

inline ModelConfig qwen25_7b(int max_position = 32768) {
  ModelConfig c;
  c.model_type = "qwen2";
  c.source = "random Qwen2.5-7B shapes";
  c.family = Family::Llama;
  c.vocab_size = 152064;
  c.hidden_size = 3584;
  c.n_layers = 28;
  c.n_heads = 28;
  c.n_kv_heads = 4;
  c.head_dim = 128;
  c.intermediate_size = 18944;
  c.max_position = max_position;
  c.norm_eps = 1e-6;
  c.rope_theta = 1000000.0;
  c.qkv_bias = true;
  return c;
}

}  // namespace cacheshrink::bench

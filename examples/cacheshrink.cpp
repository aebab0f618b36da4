// The `cacheshrink` command-line program: inspect, evaluate and generate with HF models
// (and, as the library grows, convert them to MLA and fine-tune).
#include <CLI/CLI.hpp>
#include <cacheshrink/cacheshrink.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#ifndef CACHESHRINK_DEFAULT_MODEL
#define CACHESHRINK_DEFAULT_MODEL "tests/fixtures/models/tiny-llama3"
#endif
#ifndef CACHESHRINK_DEFAULT_IDS
#define CACHESHRINK_DEFAULT_IDS "tests/fixtures/data/wikitext2_test.ids.u16"
#endif

using namespace cacheshrink;

namespace {

std::vector<int> parse_id_list(const std::string& s) {
  std::vector<int> ids;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      std::size_t used = 0;
      const long v = std::stol(tok, &used);
      if (tok.find_first_not_of(" \t", used) != std::string::npos) throw std::invalid_argument(tok);
      ids.push_back(static_cast<int>(v));
    } catch (const std::exception&) {
      throw InvalidArgument("--prompt-ids: '" + tok + "' is not an integer token id (expected e.g. 1,2,3)");
    }
  }
  if (ids.empty()) throw InvalidArgument("--prompt-ids: no token ids given");
  return ids;
}

nlohmann::json model_summary(const model::Model& m) {
  const auto& c = m.config;
  nlohmann::json j;
  j["model"] = m.dir.string();
  j["model_type"] = c.model_type;
  j["stored_dtype"] = m.stored_dtype;
  j["layers"] = c.n_layers;
  j["hidden_size"] = c.hidden_size;
  j["heads"] = c.n_heads;
  j["kv_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["attention"] = attention_kind_name(c.attention_kind());
  j["d_kv"] = c.d_kv();
  j["intermediate_size"] = c.intermediate_size;
  j["vocab_size"] = c.vocab_size;
  j["max_position"] = c.max_position;
  j["rope_theta"] = c.uses_rope() ? c.rope_theta : 0.0;
  j["sliding_window"] = c.sliding_window;
  j["qk_norm"] = c.qk_norm;
  j["qkv_bias"] = c.qkv_bias;
  j["tied_embeddings"] = c.tie_word_embeddings;
  j["parameters"] = model::parameter_count(m.weights);
  j["kv_cache_floats_per_token"] = 2LL * c.d_kv() * c.n_layers;
  j["kv_cache_bytes_per_token_bf16"] = 2LL * 2 * c.d_kv() * c.n_layers;
  return j;
}

void print_summary(const nlohmann::json& j) {
  std::printf("model:        %s (%s, stored %s)\n", j["model"].get<std::string>().c_str(), j["model_type"].get<std::string>().c_str(),
              j["stored_dtype"].get<std::string>().c_str());
  std::printf("layers:       %d, hidden %d, intermediate %d, vocab %d, max positions %d\n", j["layers"].get<int>(),
              j["hidden_size"].get<int>(), j["intermediate_size"].get<int>(), j["vocab_size"].get<int>(), j["max_position"].get<int>());
  std::printf("attention:    %s, %d query heads, %d KV heads x %d (d_kv %d)%s%s%s\n", j["attention"].get<std::string>().c_str(),
              j["heads"].get<int>(), j["kv_heads"].get<int>(), j["head_dim"].get<int>(), j["d_kv"].get<int>(),
              j["sliding_window"].get<int>() ? (", sliding window " + std::to_string(j["sliding_window"].get<int>())).c_str() : "",
              j["qk_norm"].get<bool>() ? ", q/k norm" : "", j["qkv_bias"].get<bool>() ? ", q/k/v bias" : "");
  std::printf("parameters:   %lld\n", j["parameters"].get<long long>());
  std::printf("KV cache:     %lld numbers per token (%lld bytes in bf16)\n", j["kv_cache_floats_per_token"].get<long long>(),
              j["kv_cache_bytes_per_token_bf16"].get<long long>());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cacheshrink: shrink transformer KV caches with Multi-Head Latent Attention"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "cacheshrink 0.1.0");

  std::string model_dir = CACHESHRINK_DEFAULT_MODEL;
  bool json = false;

  auto* info = app.add_subcommand("info", "Load a HF model directory and print its summary");
  info->add_option("--model", model_dir, "HF model directory (config.json + model.safetensors)")->capture_default_str();
  info->add_flag("--json", json, "Print JSON instead of text");

  std::string ids_file, text_file;
  pipeline::PerplexityOptions po;
  auto* eval = app.add_subcommand("eval", "Perplexity on token ids or text (non-overlapping windows, or sliding with --stride)");
  eval->add_option("--model", model_dir, "HF model directory")->capture_default_str();
  auto* ids_opt = eval->add_option("--ids", ids_file, "Little-endian uint16 token ids (default: the embedded WikiText-2 test ids)");
  eval->add_option("--text", text_file, "UTF-8 text file, encoded with the model's tokenizer.json")->excludes(ids_opt);
  eval->add_option("--windows", po.max_windows, "Evaluate only the first N windows (0: all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  eval->add_option("--window", po.window, "Tokens per window")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  eval->add_option("--stride", po.stride, "Sliding-window stride (0: non-overlapping windows)")->capture_default_str()->check(CLI::NonNegativeNumber);
  eval->add_option("--batch", po.batch, "Windows per forward call")->capture_default_str()->check(CLI::PositiveNumber);
  eval->add_flag("--json", json, "Print a JSON object before the final perplexity line");

  std::string prompt_ids, prompt_text;
  model::SamplingOptions so;
  bool sample = false, no_cache = false;
  auto* gen = app.add_subcommand("generate", "Generate a continuation of a prompt");
  gen->add_option("--model", model_dir, "HF model directory")->capture_default_str();
  auto* pid = gen->add_option("--prompt-ids", prompt_ids, "Comma-separated prompt token ids");
  gen->add_option("--prompt", prompt_text, "Prompt text (encoded with the model's tokenizer.json)")->excludes(pid);
  gen->add_option("--max-new-tokens", so.max_new_tokens, "Tokens to generate")->capture_default_str()->check(CLI::NonNegativeNumber);
  gen->add_flag("--sample", sample, "Sample instead of greedy decoding");
  gen->add_option("--temperature", so.temperature, "Sampling temperature")->capture_default_str();
  gen->add_option("--top-k", so.top_k, "Keep the k most likely tokens (0: off)")->capture_default_str();
  gen->add_option("--top-p", so.top_p, "Nucleus sampling mass (1: off)")->capture_default_str();
  gen->add_option("--seed", so.seed, "Random seed")->capture_default_str();
  gen->add_flag("--no-cache", no_cache, "Recompute the whole sequence every step instead of using the KV cache");
  gen->add_flag("--json", json, "Print JSON");

  CLI11_PARSE(app, argc, argv);

  try {
    if (*info) {
      auto m = model::load_model(model_dir);
      auto j = model_summary(m);
      if (json) std::cout << j.dump(2) << "\n";
      else print_summary(j);
    } else if (*eval) {
      auto m = model::load_model(model_dir);
      std::vector<int> ids;
      std::string source;
      if (!text_file.empty()) {
        auto tok = tokenizer::Tokenizer::from_directory(model_dir);
        ids = tok.encode(io::read_text_file(text_file), /*allow_special=*/false);
        source = text_file;
      } else {
        source = ids_file.empty() ? std::string(CACHESHRINK_DEFAULT_IDS) : ids_file;
        ids = io::read_ids_u16(source);
      }
      po.progress = true;
      auto r = dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        return pipeline::perplexity(tf, ids, po);
      });
      if (json) {
        nlohmann::json j{{"model", model_dir},       {"source", source},           {"window", po.window},
                         {"stride", po.stride},      {"windows", r.windows},       {"predicted_tokens", r.predicted_tokens},
                         {"mean_nll", r.mean_nll},   {"perplexity", r.perplexity}, {"seconds", r.seconds},
                         {"tokens_per_second", r.tokens_per_second}};
        std::cout << j.dump(2) << "\n";
      } else {
        std::printf("windows: %ld, predicted tokens: %lld, %.2f s, %.0f tokens/s\n", r.windows, r.predicted_tokens, r.seconds,
                    r.tokens_per_second);
      }
      std::printf("perplexity: %.4f\n", r.perplexity);
    } else if (*gen) {
      auto m = model::load_model(model_dir);
      std::optional<tokenizer::Tokenizer> tok;
      std::vector<int> prompt;
      if (!prompt_text.empty()) {
        tok = tokenizer::Tokenizer::from_directory(model_dir);
        prompt = tok->encode(prompt_text);
      } else if (!prompt_ids.empty()) {
        prompt = parse_id_list(prompt_ids);
      } else {
        throw InvalidArgument("generate: give --prompt TEXT or --prompt-ids 1,2,3");
      }
      so.greedy = !sample;
      so.use_cache = !no_cache;
      so.eos_token_id = -1;
      auto out = dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        return model::generate(tf, prompt, so);
      });
      if (!tok) {
        std::error_code ec;
        if (std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json", ec)) tok = tokenizer::Tokenizer::from_directory(model_dir);
      }
      if (json) {
        nlohmann::json j{{"prompt_ids", prompt}, {"generated_ids", out}};
        if (tok) j["text"] = tok->decode(out);
        std::cout << j.dump(2) << "\n";
      } else {
        std::printf("generated ids:");
        for (int t : out) std::printf(" %d", t);
        std::printf("\n");
        if (tok) std::printf("text: %s%s\n", tok->decode(prompt).c_str(), tok->decode(out).c_str());
      }
    }
  } catch (const cacheshrink::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  return 0;
}

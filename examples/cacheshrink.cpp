// The `cacheshrink` command-line program: inspect, evaluate and generate with HF models
// (and, as the library grows, convert them to MLA and fine-tune).
#include <CLI/CLI.hpp>
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/pipeline/energy_plot.hpp>
#include <cacheshrink/pipeline/save_load.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_cuda.hpp"
#include "cli_train.hpp"

#ifndef CACHESHRINK_DEFAULT_MODEL
#define CACHESHRINK_DEFAULT_MODEL "tests/fixtures/models/tiny-llama3"
#endif
#ifndef CACHESHRINK_DEFAULT_CALIBRATION
#define CACHESHRINK_DEFAULT_CALIBRATION "tests/fixtures/data/wikitext2_valid.txt"
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

void print_conversion(const compression::ConversionReport& r) {
  std::printf("method: %s, d_kv %d -> d_latent %d, %s init", compression_method_name(r.method), r.d_kv, r.d_latent,
              r.calibrated ? "calibrated" : "weight-SVD");
  if (r.calibrated) std::printf(" (%lld calibration tokens, %.2f s)", r.calibration_tokens, r.calibration_seconds);
  std::printf("\n%-6s %-9s %-6s %9s %9s %9s %9s\n", "layer", "kind", "group", "energy_K", "energy_V", "relerr_K", "relerr_V");
  for (const auto& l : r.layers) {
    if (l.kind == "original") {
      std::printf("%-6d %-9s %-6s %9s %9s %9s %9s\n", l.layer, "original", "-", "-", "-", "-", "-");
      continue;
    }
    std::printf("%-6d %-9s %-6s %8.2f%% %8.2f%% %9.4f %9.4f\n", l.layer, "mla", l.group >= 0 ? std::to_string(l.group).c_str() : "-",
                100 * l.energy_k, 100 * l.energy_v, l.rel_err_k, l.rel_err_v);
  }
  const double ratio = static_cast<double>(r.cache_floats_per_token_original) / static_cast<double>(r.cache_floats_per_token_mla);
  std::printf("KV cache per token: %zu -> %zu numbers (%.2fx smaller); conversion %.2f s\n", r.cache_floats_per_token_original,
              r.cache_floats_per_token_mla, ratio, r.seconds);
  for (const auto& w : r.warnings) std::printf("warning: %s\n", w.c_str());
}

nlohmann::json conversion_json(const compression::ConversionReport& r) {
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : r.layers)
    layers.push_back({{"layer", l.layer}, {"kind", l.kind}, {"group", l.group}, {"energy_k", l.energy_k}, {"energy_v", l.energy_v},
                      {"rel_err_k", l.rel_err_k}, {"rel_err_v", l.rel_err_v}});
  return {{"method", compression_method_name(r.method)}, {"d_kv", r.d_kv}, {"d_latent", r.d_latent}, {"calibrated", r.calibrated},
          {"calibration_tokens", r.calibration_tokens}, {"seconds", r.seconds},
          {"cache_floats_per_token_original", r.cache_floats_per_token_original},
          {"cache_floats_per_token_mla", r.cache_floats_per_token_mla}, {"layers", layers}, {"warnings", r.warnings}};
}

// --device / --precision of eval and convert: the GPU only with a CUDA build and a visible device,
// --precision bf16 only on the GPU (checked before any work).
struct DeviceChoice {
  std::string device = "cpu", precision = "f32";
  bool gpu() const { return device == "cuda"; }
  bool bf16() const { return precision == "bf16"; }
  void check(const char* cmd) const {
    if (bf16() && !gpu()) throw InvalidArgument(std::string(cmd) + ": --precision bf16 applies to --device cuda");
    if (gpu()) {
      if (cli::comm().size() > 1) throw InvalidArgument(std::string(cmd) + " --device cuda runs in one process on one GPU; run it without mpirun");
      cli::require_gpu();
    }
  }
};
void add_device_options(CLI::App* cmd, DeviceChoice& d) {
  cmd->add_option("--device", d.device, "cpu | cuda (one GPU)")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--precision", d.precision, "--device cuda: f32 (float32 throughout) or bf16 (bf16 weights and activations, float32 accumulation)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
}

pipeline::PerplexityResult eval_model(const model::Model& m, const std::vector<int>& ids, const pipeline::PerplexityOptions& po,
                                      const DeviceChoice& dev = {}) {
  if (dev.gpu()) return cli::eval_on_gpu(m, ids, po, dev.bf16(), nullptr);
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    return pipeline::perplexity(tf, ids, po);
  });
}

}  // namespace

int main(int argc, char** argv) {
  cli::MpiLaunch mpi_launch(&argc, &argv);  // under mpirun (MPI builds): cli::comm() spans the ranks
  CLI::App app{"cacheshrink: shrink transformer KV caches with Multi-Head Latent Attention"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "cacheshrink 0.1.0");
  app.footer("Run 'cacheshrink SUBCOMMAND --help' for its options. --model accepts HF directories and saved MLA models (convert and\n"
             "demo need an original HF model). Progress and ETAs go to stderr; errors print 'error: ...' and exit with status 2.");

  std::string model_dir = CACHESHRINK_DEFAULT_MODEL;
  bool json = false;

  auto* info = app.add_subcommand("info", "Load a HF model directory and print its summary");
  info->add_option("--model", model_dir, "HF model directory (config.json + model.safetensors) or a saved MLA model")->capture_default_str();
  info->add_flag("--json", json, "Print JSON instead of text");

  std::string ids_file, text_file;
  pipeline::PerplexityOptions po;
  auto* eval = app.add_subcommand("eval", "Perplexity on token ids or text (non-overlapping windows, or sliding with --stride)");
  eval->add_option("--model", model_dir, "HF model directory or a saved MLA model")->capture_default_str();
  auto* ids_opt = eval->add_option("--ids", ids_file, "Little-endian uint16 token ids (default: the embedded WikiText-2 test ids)");
  eval->add_option("--text", text_file, "UTF-8 text file, encoded with the model's tokenizer.json")->excludes(ids_opt);
  eval->add_option("--windows", po.max_windows, "Evaluate only the first N windows (0: all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  eval->add_option("--window", po.window, "Tokens per window")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  eval->add_option("--stride", po.stride, "Sliding-window stride (0: non-overlapping windows)")->capture_default_str()->check(CLI::NonNegativeNumber);
  eval->add_option("--batch", po.batch, "Windows per forward call")->capture_default_str()->check(CLI::PositiveNumber);
  eval->add_flag("--json", json, "Print a JSON object before the final perplexity line");
  std::string cache_dtype = "f32";
  eval->add_option("--cache-dtype", cache_dtype, "KV/latent cache storage: f32, int8 or fp8 (E4M3), per-token scales; read back quantized")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "int8", "fp8"}));
  DeviceChoice eval_dev, conv_dev;
  add_device_options(eval, eval_dev);

  std::string prompt_ids, prompt_text;
  model::SamplingOptions so;
  bool sample = false, no_cache = false;
  auto* gen = app.add_subcommand("generate", "Generate a continuation of a prompt (greedy unless --sample; never stops early at EOS)");
  gen->add_option("--model", model_dir, "HF model directory or a saved MLA model")->capture_default_str();
  auto* pid = gen->add_option("--prompt-ids", prompt_ids, "Comma-separated prompt token ids");
  gen->add_option("--prompt", prompt_text, "Prompt text (encoded with the model's tokenizer.json)")->excludes(pid);
  gen->add_option("--max-new-tokens", so.max_new_tokens, "Tokens to generate")->capture_default_str()->check(CLI::NonNegativeNumber);
  gen->add_flag("--sample", sample, "Sample instead of greedy decoding");
  gen->add_option("--temperature", so.temperature, "Sampling temperature (with --sample)")->capture_default_str();
  gen->add_option("--top-k", so.top_k, "With --sample: keep the k most likely tokens (0: off)")->capture_default_str();
  gen->add_option("--top-p", so.top_p, "With --sample: nucleus sampling mass (1: off)")->capture_default_str();
  gen->add_option("--seed", so.seed, "Random seed for --sample")->capture_default_str();
  gen->add_flag("--no-cache", no_cache, "Recompute the whole sequence every step instead of using the KV cache");
  gen->add_flag("--json", json, "Print JSON (prompt_ids, generated_ids, text when a tokenizer exists)");
  gen->add_option("--cache-dtype", cache_dtype, "KV/latent cache storage: f32, int8 or fp8 (E4M3), per-token scales")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "int8", "fp8"}));
  DeviceChoice gen_dev;
  add_device_options(gen, gen_dev);

  compression::ConvertOptions co;
  std::string out_dir, calib_file = CACHESHRINK_DEFAULT_CALIBRATION;
  int n_calib = 128, calib_len = 512, group_size = 4, skip_early = 0;
  bool no_calib = false, do_eval = false, overwrite = false;
  long eval_windows = 0;
  auto* conv = app.add_subcommand("convert", "Convert a HF model to Multi-Head Latent Attention (and optionally evaluate it)");
  conv->add_option("--model", model_dir, "HF model directory (an original model)")->capture_default_str();
  conv->add_option("--ratio", co.compression_ratio, "KV compression ratio (>= 1)")->capture_default_str();
  conv->add_option("--method", co.method, "separate | xkv | joint | decoupled_rope | auto (MHA -> separate, GQA/MQA -> xkv)")
      ->capture_default_str()->check(CLI::IsMember({"separate", "xkv", "joint", "decoupled_rope", "auto"}));
  conv->add_option("--d-latent", co.d_latent, "Latent width (overrides --ratio)")->check(CLI::PositiveNumber);
  conv->add_option("--d-rope", co.d_rope, "decoupled_rope: key features cached exactly")->capture_default_str()->check(CLI::PositiveNumber);
  auto* gs = conv->add_option("--group-size", group_size, "xkv: layers sharing one basis")->capture_default_str();
  auto* sk = conv->add_option("--skip-early-layers", skip_early, "xkv: first K layers get per-layer bases (or stay original)")->capture_default_str();
  auto* keep = conv->add_flag("--keep-early-original", co.keep_early_layers_original, "xkv: leave the skipped early layers uncompressed");
  conv->add_flag("--store-original-weights", co.store_original_weights, "Keep the original K/V projections in the saved model");
  conv->add_option("--calibration", calib_file, "Calibration text file (paragraphs = lines longer than 100 characters, not starting with '=')")->capture_default_str();
  conv->add_option("--calibration-samples", n_calib, "Number of calibration paragraphs (the first N)")->capture_default_str()->check(CLI::PositiveNumber);
  conv->add_option("--calibration-length", calib_len, "Tokens per calibration paragraph (max)")->capture_default_str()->check(CLI::PositiveNumber);
  conv->add_flag("--no-calibration", no_calib, "Initialise from the weights alone (SVD) instead of calibration activations");
  conv->add_option("--out", out_dir, "Write the converted model to this directory");
  conv->add_flag("--overwrite", overwrite, "Replace --out if it exists");
  conv->add_flag("--eval", do_eval, "Perplexity of the original and the converted model (embedded WikiText-2 test ids)");
  conv->add_option("--eval-windows", eval_windows, "Windows of 256 tokens for --eval (0: all 1682)")->capture_default_str();
  std::string plot_energy;
  conv->add_option("--plot-energy", plot_energy, "Write the per-layer energy curves (captured energy vs rank, K and V) to this SVG file");
  conv->add_flag("--json", json, "Print a JSON report");
  add_device_options(conv, conv_dev);

  auto* demo = app.add_subcommand("demo", "The main job on the embedded model: summary, convert (auto, 2x), evaluate, generate");
  demo->add_option("--model", model_dir, "HF model directory")->capture_default_str();
  demo->add_option("--windows", eval_windows, "Perplexity windows of 256 tokens (0: 64)")->capture_default_str();

  cli::add_train_command(app);  // `train` runs from its own callback (examples/cli_train.hpp)
  cli::add_plot_loss_command(app);  // `plot-loss STATS.json --out FILE.svg` (examples/cli_train.hpp)
  CLI11_PARSE(app, argc, argv);
  if (*conv) {
    if (gs->count()) co.cross_layer_group_size = group_size;
    if (sk->count()) co.xkv_skip_early_layers = skip_early;
    (void)keep;
  }

  try {
    if (!*conv && cli::comm().rank() != 0) return 0;  // mpirun: only convert and train are distributed
    if (*conv || *demo) {
      const bool is_demo = demo->parsed();
      if (is_demo) {
        co.compression_ratio = 2.0;
        co.method = "auto";
        do_eval = true;
        if (eval_windows == 0) eval_windows = 64;
      }
      if (!is_demo) conv_dev.check("convert");
      auto m = model::load_model(model_dir);
      if (is_demo) {
        print_summary(model_summary(m));
        std::printf("\n");
      }
      std::vector<std::vector<int>> calib;
      co.use_calibration = !no_calib;
      co.verbose = true;
      if (co.use_calibration) {
        auto tok = tokenizer::Tokenizer::from_directory(model_dir);
        auto paras = compression::paragraphs(io::read_text_file(calib_file), static_cast<std::size_t>(n_calib));
        if (paras.empty()) throw InvalidArgument("--calibration " + calib_file + ": no paragraph longer than 100 characters");
        calib = compression::encode_calibration(tok, paras, calib_len);
      }
      compression::ConversionReport rep;
      auto mm = conv_dev.gpu() ? cli::convert_on_gpu(m, co, calib, &rep, conv_dev.bf16())
                               : compression::convert(m, co, calib, &rep, is_demo ? dist::AnyComm{} : cli::comm());
      if (cli::comm().rank() != 0) return 0;  // mpirun: rank 0 reports, saves and evaluates
      nlohmann::json j{{"model", model_dir}, {"conversion", conversion_json(rep)}};
      if (!json) print_conversion(rep);
      if (!plot_energy.empty()) {
        try {  // a report without spectra (e.g. decoupled_rope for now) must not cost the conversion
          pipeline::write_energy_plot(rep, plot_energy, std::filesystem::path(model_dir).filename().string());
          if (!json) std::printf("energy plot: %s\n", plot_energy.c_str());
          j["energy_plot"] = plot_energy;
        } catch (const InvalidArgument& e) {
          std::fprintf(stderr, "warning: --plot-energy: %s\n", e.what());
        }
      }
      nlohmann::json mem = nlohmann::json::array();
      for (const auto& r : pipeline::cache_memory(mm, {512, 2048, 8192, 32768})) {
        mem.push_back({{"seq_len", r.seq_len}, {"standard_bytes_bf16", r.standard_bytes}, {"mla_bytes_bf16", r.mla_bytes}});
        if (!json)
          std::printf("cache for %6d tokens (bf16): standard %9.2f MiB, MLA %9.2f MiB (%.2fx)\n", r.seq_len, r.standard_bytes / 1048576.0,
                      r.mla_bytes / 1048576.0, r.ratio);
      }
      j["cache_memory"] = mem;
      if (!out_dir.empty()) {
        pipeline::SaveOptions so2;
        so2.store_original_weights = co.store_original_weights;
        so2.overwrite = overwrite;
        so2.compression_ratio = co.compression_ratio;
        pipeline::save_mla_model(mm, out_dir, so2);
        if (!json) std::printf("saved: %s\n", out_dir.c_str());
        j["out"] = out_dir;
      }
      if (do_eval) {
        auto ids = io::read_ids_u16(CACHESHRINK_DEFAULT_IDS);
        pipeline::PerplexityOptions epo;
        epo.max_windows = eval_windows;
        epo.progress = true;
        auto r0 = eval_model(m, ids, epo, conv_dev);
        auto r1 = eval_model(mm, ids, epo, conv_dev);
        j["perplexity_original"] = r0.perplexity;
        j["perplexity_converted"] = r1.perplexity;
        j["eval_windows"] = r1.windows;
        if (!json)
          std::printf("perplexity (%ld windows of %d): original %.4f -> MLA %.4f (%+.2f%%)\n", r1.windows, epo.window, r0.perplexity,
                      r1.perplexity, 100.0 * (r1.perplexity / r0.perplexity - 1.0));
      }
      if (is_demo) {
        auto tok = tokenizer::Tokenizer::from_directory(model_dir);
        const std::string prompt = "The history of the city";
        model::SamplingOptions gso;
        gso.max_new_tokens = 24;
        auto ptoks = tok.encode(prompt);
        auto out = dispatch_attention_kind(mm.config, [&](auto kind) {
          model::Transformer<decltype(kind)> tf(mm);
          return model::generate(tf, ptoks, gso);
        });
        std::printf("MLA greedy generation: %s%s\n", prompt.c_str(), tok.decode(out).c_str());
      }
      if (json) std::cout << j.dump(2) << "\n";
    } else if (*info) {
      auto m = pipeline::load_any(model_dir);
      auto j = model_summary(m);
      if (json) std::cout << j.dump(2) << "\n";
      else print_summary(j);
    } else if (*eval) {
      eval_dev.check("eval");
      if (eval_dev.gpu() && cache_dtype != "f32")
        throw InvalidArgument("eval --device cuda: --cache-dtype " + cache_dtype + " is a CPU cache format (the GPU evaluates with f32)");
      auto m = pipeline::load_any(model_dir);
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
      std::size_t kv_bytes = 0;
      auto r = eval_dev.gpu() ? cli::eval_on_gpu(m, ids, po, eval_dev.bf16(), &kv_bytes) : dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        tf.set_cache_dtype(model::parse_cache_dtype(cache_dtype));
        kv_bytes = tf.make_cache(1).bytes_per_token();
        return pipeline::perplexity(tf, ids, po);
      });
      if (eval_dev.gpu()) cache_dtype = eval_dev.bf16() ? "bf16 (device)" : "f32 (device)";
      if (json) {
        nlohmann::json j{{"model", model_dir},       {"source", source},           {"window", po.window},
                         {"stride", po.stride},      {"windows", r.windows},       {"predicted_tokens", r.predicted_tokens},
                         {"mean_nll", r.mean_nll},   {"perplexity", r.perplexity}, {"seconds", r.seconds},
                         {"tokens_per_second", r.tokens_per_second}, {"cache_dtype", cache_dtype}, {"kv_bytes_per_token", kv_bytes}};
        std::cout << j.dump(2) << "\n";
      } else {
        std::printf("windows: %ld, predicted tokens: %lld, %.2f s, %.0f tokens/s\n", r.windows, r.predicted_tokens, r.seconds,
                    r.tokens_per_second);
        std::printf("cache: %s, %zu bytes per token\n", cache_dtype.c_str(), kv_bytes);
      }
      std::printf("perplexity: %.4f\n", r.perplexity);
    } else if (*gen) {
      gen_dev.check("generate");
      if (gen_dev.gpu() && cache_dtype != "f32")
        throw InvalidArgument("generate --device cuda: --cache-dtype " + cache_dtype + " is a CPU cache format");
      if (gen_dev.gpu() && no_cache) throw InvalidArgument("generate --device cuda: --no-cache (full recomputation) is a CPU option");
      auto m = pipeline::load_any(model_dir);
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
      auto out = gen_dev.gpu() ? cli::generate_on_gpu(m, prompt, so, gen_dev.bf16()) : dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        tf.set_cache_dtype(model::parse_cache_dtype(cache_dtype));
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
    cli::abort_other_ranks(2);
    return 2;
  }
  return 0;
}

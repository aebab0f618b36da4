// Example: a templated experiment. The compression policies (Separate, Xkv, Joint) and the
// ratios are template arguments; one fold expression instantiates convert<Policy> for every
// (policy, ratio) pair at compile time, and the program prints a table of perplexity (a few
// windows) and KV-cache size.
//
//   sweep_policies [MODEL_DIR] [WINDOWS]
//
// Each row's cache size is computed twice: from the policy's compile-time formulas
// (Policy::d_latent, Policy::cache_width) and from the converted model's runtime cache; the
// program exits non-zero if they ever disagree.
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cmath>
#include <cstdio>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

template <class... Ts>
struct TypeList {};
template <double... Rs>  // C++20: floating-point non-type template parameters
struct Ratios {};

struct Experiment {
  const model::Model& original;
  const std::vector<std::vector<int>>& calibration;
  const std::vector<int>& eval_ids;
  long windows;
  bool ok = true;

  double perplexity(const model::Model& m) const {
    return dispatch_attention_kind(m.config, [&](auto kind) {
      model::Transformer<decltype(kind)> tf(m);
      return pipeline::perplexity(tf, eval_ids, pipeline::PerplexityOptions{.max_windows = windows}).perplexity;
    });
  }

  // One cell of the sweep: policy P at ratio R.
  template <CompressionPolicy P, double R>
  void run() {
    const ModelConfig& c = original.config;
    // The policy's own formulas, no model needed.
    const int d_latent = P::d_latent(c.d_kv(), R);
    const std::size_t predicted = static_cast<std::size_t>(P::cache_width(d_latent)) * c.n_layers;

    compression::ConvertOptions opt;
    opt.compression_ratio = R;
    compression::ConversionReport rep;
    model::Model mla = compression::convert<P>(original, opt, calibration, &rep);  // method fixed by P

    const double ppl = perplexity(mla);
    const auto mem = pipeline::cache_memory(mla, {4096}).front();  // bf16, batch 1
    double min_energy = 1.0;
    for (const auto& l : rep.layers) min_energy = std::min({min_energy, l.energy_k, l.energy_v});
    std::printf("%-9s %5.1f %9d %12zu %11.2f %8.2fx %10.3f %9.1f%%\n", compression_method_name(P::id), R, d_latent, predicted,
                mem.mla_bytes / 1048576.0, mem.ratio, ppl, 100 * min_energy);
    ok = ok && predicted == rep.cache_floats_per_token_mla && rep.d_latent == d_latent && std::isfinite(ppl);
  }

  // Every ratio for one policy...
  template <CompressionPolicy P, double... Rs>
  void run_policy(Ratios<Rs...>) {
    (run<P, Rs>(), ...);
  }
  // ...for every policy: two nested folds expand to |policies| x |ratios| instantiations.
  template <CompressionPolicy... Ps, double... Rs>
  void sweep(TypeList<Ps...>, Ratios<Rs...> ratios) {
    (run_policy<Ps>(ratios), ...);
  }
};

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const long windows = argc > 2 ? std::stol(argv[2]) : 4;

  auto original = model::load_model(model_dir);
  auto tok = tokenizer::Tokenizer::from_directory(model_dir);
  auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(fixtures + "/data/wikitext2_valid.txt"), 16), 128);
  const auto ids = io::read_ids_u16(fixtures + "/data/wikitext2_test.ids.u16");

  Experiment e{original, calib, ids, windows};
  const auto base = pipeline::cache_memory(original, {4096}).front();
  std::printf("%s: %d layers, d_kv %d; perplexity over %ld windows of 256 tokens; cache at 4096 tokens, bf16\n", model_dir.c_str(),
              original.config.n_layers, original.config.d_kv(), windows);
  std::printf("%-9s %5s %9s %12s %11s %9s %10s %10s\n", "policy", "ratio", "d_latent", "floats/tok", "cache MiB", "smaller", "ppl",
              "min energy");
  std::printf("%-9s %5s %9d %12zu %11.2f %8.2fx %10.3f %10s\n", "original", "-", original.config.d_kv(),
              static_cast<std::size_t>(2 * original.config.d_kv() * original.config.n_layers), base.standard_bytes / 1048576.0, 1.0,
              e.perplexity(original), "-");
  e.sweep(TypeList<Separate, Xkv, Joint>{}, Ratios<2.0, 4.0>{});
  std::printf("%s\n", e.ok ? "compile-time cache formulas match the converted models" : "MISMATCH between policy formulas and models");
  return e.ok ? 0 : 1;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

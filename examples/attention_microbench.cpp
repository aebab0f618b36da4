// Example: microbenchmark of one compressed attention layer against the standard one.
//
//   attention_microbench [MODEL_DIR] [RATIO] [DECODE_STEPS]
//
// Takes the first layer of the model, converts it to MLA, and times decode steps (one new token
// against a cache of T tokens) through model::Transformer for several context lengths T. The
// one-layer models still run the embedding and the MLP, identical in both, so the difference is
// the attention: the standard layer reads cached K/V; the MLA layer caches only latents and
// rebuilds K = C_k Wuk^T, V = C_v Wuv^T (plus RoPE) for the whole context at every step
// (the original package's decode path), trading time for memory until absorption lands.
//
// Simple std::chrono timing, best of 3 repetitions, printed as a ratio measured in the same run;
// for real measurements use benchmarks/ (Google Benchmark). The program fails only if the MLA
// layer's output drifts far from the standard layer's (a correctness check, not a timing gate).
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

/// A copy of `m` with only its first layer.
model::Model first_layer_only(const model::Model& m) {
  model::Model one = m;
  one.weights.layers.resize(1);
  one.config.n_layers = 1;
  return one;
}

/// Seconds per decode step (best of `reps`): prefill `prefix` (not timed), then feed the
/// `decode` tokens one at a time. `out` receives layer 0's output at the last step.
template <class Kind>
double time_decode(const model::Model& m, const std::vector<int>& prefix, const std::vector<int>& decode, int reps, MatrixRf* out) {
  model::Transformer<Kind> tf(m);
  model::ForwardOptions none;
  none.logits = model::LogitsFor::None;  // skip the LM head: we time the layer, not the vocabulary
  model::ForwardHooks hooks;
  hooks.on_hidden = [&](int index, const MatrixRf& x) {
    if (index == 1) *out = x;  // output of layer 0 (residual stream)
  };
  model::ForwardOptions last = none;
  last.hooks = &hooks;
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    model::KvCache cache = tf.make_cache(1);
    tf.forward(prefix, &cache, none);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t s = 0; s < decode.size(); ++s) tf.forward(std::vector<int>{decode[s]}, &cache, s + 1 == decode.size() ? last : none);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(decode.size()));
  }
  return best;
}

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const double ratio = argc > 2 ? std::stod(argv[2]) : 2.0;
  const int steps = argc > 3 ? std::stoi(argv[3]) : 16;

  const model::Model full = model::load_model(model_dir);
  auto tok = tokenizer::Tokenizer::from_directory(model_dir);
  auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(fixtures + "/data/wikitext2_valid.txt"), 16), 128);
  compression::ConvertOptions opt;
  opt.compression_ratio = ratio;
  const model::Model standard = first_layer_only(full);
  const model::Model mla = first_layer_only(compression::convert(full, opt, calib));
  const auto& c = full.config;
  const auto& a = *mla.weights.layers[0].mla;
  std::printf("%s layer 0: %s, %d query heads, %d KV heads x %d (d_kv %d) -> %s d_latent %d\n", model_dir.c_str(),
              attention_kind_name(c.attention_kind()), c.n_heads, c.n_kv_heads, c.head_dim, c.d_kv(), compression_method_name(a.method),
              a.d_latent);
  std::printf("cache per token: standard %d numbers, MLA %d (%.2fx smaller)\n\n", 2 * c.d_kv(), a.cache_width(),
              2.0 * c.d_kv() / a.cache_width());

  // Context: real text ids (WikiText-2 test), long enough for the largest T plus the decode steps.
  const auto ids = io::read_ids_u16(fixtures + "/data/wikitext2_test.ids.u16");
  std::printf("%8s %16s %16s %12s %14s\n", "context", "standard us/tok", "MLA us/tok", "MLA/standard", "rel. diff out");
  double worst = 0;
  for (int T : {128, 512, 2048}) {
    const std::vector<int> prefix(ids.begin(), ids.begin() + T);
    const std::vector<int> decode(ids.begin() + T, ids.begin() + T + steps);  // the real continuation
    MatrixRf ys, ym;
    double ts = 0, tm = 0;
    dispatch_attention_kind(c, [&](auto kind) {
      ts = time_decode<decltype(kind)>(standard, prefix, decode, 3, &ys);
      tm = time_decode<decltype(kind)>(mla, prefix, decode, 3, &ym);
    });
    const double diff = (ym - ys).norm() / ys.norm();
    worst = std::max(worst, diff);
    std::printf("%8d %16.1f %16.1f %11.2fx %14.4f\n", T, 1e6 * ts, 1e6 * tm, tm / ts, diff);
  }
  std::printf("\n(one thread; timings vary with machine load, the ratio within a run is the figure to read)\n");
  // The converted layer keeps >= ~87% of the activation energy on this model; its output should
  // stay well within 50% of the standard layer's (residual stream included).
  if (worst >= 0.5) std::printf("FAILED: the MLA layer's output differs from the standard layer's by %.2f (relative)\n", worst);
  return worst < 0.5 ? 0 : 1;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

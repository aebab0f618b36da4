// Example: perplexity before and after conversion, and the KV cache memory it saves.
//
//   evaluate_cache_memory [MODEL_DIR] [RATIO] [WINDOWS]
//
// Defaults: the embedded tiny LLaMA-3, ratio 2, 8 windows of 256 tokens of the WikiText-2 test
// ids. Exits non-zero if the measured cache (the runtime's KvCache) does not match
// pipeline::cache_memory's prediction.
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

// Perplexity of any model: the attention kind is a template policy, chosen here at run time.
pipeline::PerplexityResult evaluate(const model::Model& m, const std::vector<int>& ids, long windows) {
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    pipeline::PerplexityOptions po;  // window 256, non-overlapping (stride 0), batch 8
    po.max_windows = windows;
    return pipeline::perplexity(tf, ids, po);
  });
}

// Numbers stored per token by the runtime's cache for this model (all layers, K and V).
std::size_t cached_floats_per_token(const model::Model& m) {
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    return tf.make_cache(1).floats_per_token();
  });
}

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const double ratio = argc > 2 ? std::stod(argv[2]) : 2.0;
  const long windows = argc > 3 ? std::stol(argv[3]) : 8;

  auto original = model::load_model(model_dir);
  auto tok = tokenizer::Tokenizer::from_directory(model_dir);
  auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(fixtures + "/data/wikitext2_valid.txt"), 32), 128);
  compression::ConvertOptions opt;
  opt.compression_ratio = ratio;
  auto mla = compression::convert(original, opt, calib);

  // Perplexity on the same windows, before and after.
  const auto ids = io::read_ids_u16(fixtures + "/data/wikitext2_test.ids.u16");
  const auto p0 = evaluate(original, ids, windows);
  const auto p1 = evaluate(mla, ids, windows);
  std::printf("perplexity over %ld windows of 256 tokens: original %.3f, MLA %.3f (%+.2f%%)\n", p1.windows, p0.perplexity, p1.perplexity,
              100.0 * (p1.perplexity / p0.perplexity - 1.0));

  // Cache memory, batch 1, bf16 (2 bytes per number), for a few context lengths.
  std::printf("\n%10s %16s %16s %8s\n", "tokens", "standard (MiB)", "MLA (MiB)", "ratio");
  for (const auto& r : pipeline::cache_memory(mla, {1024, 4096, 16384, 131072}))
    std::printf("%10d %16.2f %16.2f %7.2fx\n", r.seq_len, r.standard_bytes / 1048576.0, r.mla_bytes / 1048576.0, r.ratio);

  // The prediction must match what the runtime actually allocates per token.
  const auto predicted = pipeline::cache_memory(mla, {1}, /*bytes_per_number=*/1).front();
  const std::size_t std_floats = cached_floats_per_token(original), mla_floats = cached_floats_per_token(mla);
  std::printf("\nruntime cache per token: %zu numbers (standard) -> %zu (MLA)\n", std_floats, mla_floats);
  const bool ok = predicted.standard_bytes == std_floats && predicted.mla_bytes == mla_floats && std::isfinite(p1.perplexity);
  std::printf("cache_memory prediction %s the runtime cache\n", ok ? "matches" : "DOES NOT MATCH");
  return ok ? 0 : 1;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

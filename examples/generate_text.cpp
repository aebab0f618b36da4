// Example: text prompt -> greedy and sampled continuations, decoded from the latent KV cache.
//
//   generate_text [MODEL_DIR] [PROMPT] [MAX_NEW_TOKENS]
//
// MODEL_DIR may be an original HF model (it is converted to MLA at ratio 2 first) or a model
// saved by `cacheshrink convert --out`. Exits non-zero if greedy decoding with the cache differs
// from decoding by full recomputation (the cache must not change the result).
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/pipeline/save_load.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const std::string prompt = argc > 2 ? argv[2] : "The history of the city";
  const int max_new = argc > 3 ? std::stoi(argv[3]) : 24;

  auto tok = tokenizer::Tokenizer::from_directory(model_dir);
  model::Model m = pipeline::load_any(model_dir);
  const bool already_mla = std::any_of(m.weights.layers.begin(), m.weights.layers.end(), [](const auto& l) { return l.mla.has_value(); });
  if (!already_mla) {
    auto calib = compression::encode_calibration(
        tok, compression::paragraphs(io::read_text_file(fixtures + "/data/wikitext2_valid.txt"), 32), 128);
    compression::ConvertOptions opt;
    opt.compression_ratio = 2.0;
    m = compression::convert(m, opt, calib);
  }

  const std::vector<int> ids = tok.encode(prompt);
  dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    // What the cache holds per token: latents (2 * d_latent per MLA layer; d_latent for joint).
    const auto cache = tf.make_cache(1);
    std::printf("prompt: %zu tokens; cache per token: %zu numbers over %d layers (standard: %d)\n", ids.size(), cache.floats_per_token(),
                m.config.n_layers, 2 * m.config.d_kv() * m.config.n_layers);

    model::SamplingOptions greedy;  // greedy, with the KV cache, no EOS stop
    greedy.max_new_tokens = max_new;
    const auto g = model::generate(tf, ids, greedy);
    std::printf("greedy:  %s%s\n", prompt.c_str(), tok.decode(g).c_str());

    model::SamplingOptions sampled = greedy;  // temperature -> top-k -> top-p, like HF
    sampled.greedy = false;
    sampled.temperature = 0.8f;
    sampled.top_k = 40;
    sampled.top_p = 0.95f;
    sampled.seed = 1;
    const auto s = model::generate(tf, ids, sampled);
    std::printf("sampled: %s%s\n", prompt.c_str(), tok.decode(s).c_str());

    model::SamplingOptions recompute = greedy;
    recompute.use_cache = false;
    if (model::generate(tf, ids, recompute) != g) {
      std::printf("greedy decoding from the cache DIFFERS from full recomputation\n");
      std::exit(1);
    }
    std::printf("greedy decoding from the latent cache equals full recomputation\n");
  });
  return 0;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

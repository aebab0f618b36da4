// CPU decode step on long contexts: (a) the original model with a standard KV cache, (b) the
// MLA model rebuilding K and V from the latent cache each step (the original package's way),
// (c) the MLA model attending on the latent cache (absorbed values; absorbed queries for
// GPT-2). One decode token per iteration after a prefill of `context` tokens, batch 1.
//
//   ./build/benchmarks/bench_decode
//   CACHESHRINK_BENCH_MODEL=tiny-gpt2 ./build/benchmarks/bench_decode   (GPT-2 stops at 512 positions)
#include <benchmark/benchmark.h>

#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/io/file.hpp>
#include <cstdlib>

using namespace cacheshrink;

namespace {

const std::string kFix = CACHESHRINK_FIXTURES_DIR;

struct Models {
  model::Model original, mla;
};

const Models& models() {
  static const Models ms = [] {
    const char* name = std::getenv("CACHESHRINK_BENCH_MODEL");
    Models r;
    r.original = model::load_model(kFix + "/models/" + (name ? name : "tiny-llama2"));
    auto tok = tokenizer::Tokenizer::from_file(kFix + "/data/tokenizer.json");
    auto calib = compression::encode_calibration(tok, compression::paragraphs(io::read_text_file(kFix + "/data/wikitext2_valid.txt"), 32), 256);
    compression::ConvertOptions o;
    o.compression_ratio = 4.0;  // d_latent = d_kv / 4
    r.mla = compression::convert(r.original, o, calib);
    return r;
  }();
  return ms;
}

// GPT-2 has learned positions up to 512, so its contexts are shorter.
const bool kGpt2 = std::getenv("CACHESHRINK_BENCH_MODEL") && std::string(std::getenv("CACHESHRINK_BENCH_MODEL")) == "tiny-gpt2";

enum Path { kStandard = 0, kDecompress = 1, kAbsorbed = 2 };

void BM_Decode(benchmark::State& state) {
  const int context = static_cast<int>(state.range(0));
  const auto path = static_cast<Path>(state.range(1));
  const auto& ms = models();
  const model::Model& m = path == kStandard ? ms.original : ms.mla;
  static const auto ids = io::read_ids_u16(kFix + "/data/wikitext2_test.ids.u16");
  dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    tf.set_absorbed(path == kAbsorbed);
    auto cache = tf.make_cache(1);
    model::ForwardOptions fo;
    fo.logits = model::LogitsFor::Last;
    std::vector<int> prefix(ids.begin(), ids.begin() + context);
    tf.forward(prefix, &cache, fo);
    int t = context;
    for (auto _ : state) {
      auto lg = tf.forward(std::vector<int>{ids[t++]}, &cache, fo);
      benchmark::DoNotOptimize(lg.data());
      if (t >= context + (kGpt2 ? 16 : 64)) {  // keep the context length fixed-ish: roll back the cache
        cache.length[0] = context;
        t = context;
      }
    }
    state.counters["kv_floats_per_token"] = static_cast<double>(cache.floats_per_token());
    return 0;
  });
  state.SetLabel(path == kStandard ? "standard cache" : path == kDecompress ? "MLA, rebuild K/V" : "MLA, latent attention");
}
BENCHMARK(BM_Decode)
    ->ArgsProduct({kGpt2 ? std::vector<std::int64_t>{128, 384} : std::vector<std::int64_t>{1024, 4096}, {kStandard, kDecompress, kAbsorbed}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();

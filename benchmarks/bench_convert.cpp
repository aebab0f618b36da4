// Conversion quality and time against the Python cacheshrink 0.1.5 anchor numbers
// (tests/fixtures/anchor/cacheshrink-0.1.5-tiny.json), same models, ratios and methods,
// calibration protocol of the fixtures README (first 128 WikiText-2 valid paragraphs, 256
// tokens each), full perplexity protocol (1682 windows of 256 tokens) unless
// CACHESHRINK_BENCH_WINDOWS is set. One benchmark per anchor row; a markdown table at exit.
//
//   ./build/benchmarks/bench_convert            (about 15 minutes on 2 cores)
//   CACHESHRINK_BENCH_WINDOWS=64 ./build/benchmarks/bench_convert
#include <benchmark/benchmark.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <chrono>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

using namespace cacheshrink;

namespace {

const std::string kFix = CACHESHRINK_FIXTURES_DIR;

long windows() {
  const char* w = std::getenv("CACHESHRINK_BENCH_WINDOWS");
  return w ? std::atol(w) : 0;
}

const std::vector<int>& test_ids() {
  static const auto ids = io::read_ids_u16(kFix + "/data/wikitext2_test.ids.u16");
  return ids;
}

const std::vector<std::vector<int>>& calibration() {
  static const auto seqs = [] {
    auto tok = tokenizer::Tokenizer::from_file(kFix + "/data/tokenizer.json");
    return compression::encode_calibration(tok, compression::paragraphs(io::read_text_file(kFix + "/data/wikitext2_valid.txt"), 128), 256);
  }();
  return seqs;
}

double ppl(const model::Model& m) {
  pipeline::PerplexityOptions po;
  po.max_windows = windows();
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    return pipeline::perplexity(tf, test_ids(), po).perplexity;
  });
}

std::map<std::string, double> g_orig_cache;
std::vector<std::string> g_rows;

void BM_ConvertAnchor(benchmark::State& state, nlohmann::json row) {
  const std::string name = row["model"];
  auto m = model::load_model(kFix + "/models/" + name);
  compression::ConvertOptions o;
  o.compression_ratio = row["ratio"].get<double>();
  o.method = row["method"].get<std::string>();
  compression::ConversionReport rep;
  model::Model mm;
  (void)calibration();  // tokenization is not part of the conversion time
  for (auto _ : state) mm = compression::convert(m, o, calibration(), &rep);
  if (!g_orig_cache.count(name)) g_orig_cache[name] = ppl(m);
  const double p0 = g_orig_cache[name], p1 = ppl(mm);
  const double py0 = row["ppl_original"], py1 = row["ppl_after_conversion"];
  state.counters["ppl_orig"] = p0;
  state.counters["ppl_mla"] = p1;
  state.counters["py_ppl_mla"] = py1;
  state.counters["convert_s"] = rep.seconds;
  char buf[512];
  std::snprintf(buf, sizeof buf, "| %s | %.0f | %s | %s | %d | %.2f | %.2f | %.2f | %.2f%% | %.2f%% | %.2f | %.2f |", name.c_str(),
                o.compression_ratio, o.method.c_str(), compression_method_name(rep.method), rep.d_latent, p0, py1, p1,
                100 * (py1 / py0 - 1), 100 * (p1 / p0 - 1), row["convert_seconds"].get<double>(), rep.seconds);
  g_rows.emplace_back(buf);
}

}  // namespace

int main(int argc, char** argv) {
  auto anchor = nlohmann::json::parse(io::read_text_file(kFix + "/anchor/cacheshrink-0.1.5-tiny.json"));
  for (const auto& row : anchor["results"]) {
    const std::string label = row["model"].get<std::string>() + "/" + row["method"].get<std::string>() + "/r" +
                              std::to_string(static_cast<int>(row["ratio"].get<double>()));
    benchmark::RegisterBenchmark(("BM_ConvertAnchor/" + label).c_str(), BM_ConvertAnchor, row)->Iterations(1)->Unit(benchmark::kSecond);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::printf("\nperplexity windows: %s\n", windows() ? std::to_string(windows()).c_str() : "all (1682)");
  std::printf("| model | ratio | method | used | d_latent | ppl original | Python ppl after | ours after | Python degradation | our degradation | Python convert s | our convert s |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& r : g_rows) std::printf("%s\n", r.c_str());
  return 0;
}

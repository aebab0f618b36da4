// Quality cost of the quantized latent cache (issue 9): each fixture converted with the
// anchor's method (auto) and ratio (tests/fixtures/anchor/cacheshrink-0.1.5-tiny.json, first
// row per model), calibration as bench_convert (first 128 WikiText-2 valid paragraphs, 256
// tokens), perplexity on the repo's protocol (wikitext2_test.ids.u16, non-overlapping 256-token
// windows, all 1682 unless CACHESHRINK_BENCH_WINDOWS is set) with the cache in float32, int8
// and fp8 E4M3 (per-token scales, model/kv_quant.hpp), plus KV bytes per token.
//
// Protocol: each window runs as one forward whose attention reads every token's K/V rows back
// from the quantized cache (the window's own rows included; Transformer::set_cache_dtype), which
// is what decoding the window token by token through that cache computes; tests/test_quant_cache
// checks the two agree. As a direct check the program also decodes the first
// CACHESHRINK_BENCH_DECODE_WINDOWS windows (default 2) one token at a time through the cache and
// prints that perplexity next to the windowed one on the same windows.
// CACHESHRINK_BENCH_ORIGINAL=1 adds the unconverted model with a float32/int8/fp8 cache.
//
//   ./build/benchmarks/bench_quant
//   CACHESHRINK_BENCH_WINDOWS=64 ./build/benchmarks/bench_quant --benchmark_filter=tiny-gpt2
#include <benchmark/benchmark.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

using namespace cacheshrink;
using model::CacheDtype;

namespace {

const std::string kFix = CACHESHRINK_FIXTURES_DIR;
constexpr CacheDtype kDtypes[] = {CacheDtype::F32, CacheDtype::Int8, CacheDtype::Fp8E4M3};

long env_long(const char* name, long dflt) {
  const char* v = std::getenv(name);
  return v ? std::atol(v) : dflt;
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

struct Ppl {
  double windowed = 0, decoded = 0, windowed_first = 0;  // decoded/windowed_first: the first few windows only
  std::size_t bytes_per_token = 0;
};

// Token-by-token decode of the first `n` windows through the cache: mean NLL -> perplexity.
template <class Tf>
double decode_ppl(Tf& tf, long n) {
  model::ForwardOptions fo;
  fo.logits = model::LogitsFor::Last;
  double nll = 0;
  long count = 0;
  const auto& ids = test_ids();
  for (long w = 0; w < n; ++w) {
    auto cache = tf.make_cache(1);
    const std::size_t b = static_cast<std::size_t>(w) * 256;
    for (int t = 0; t + 1 < 256; ++t) {
      MatrixRf lg = tf.forward(std::vector<int>{ids[b + t]}, &cache, fo);
      const float mx = lg.row(0).maxCoeff();
      nll += mx + std::log(static_cast<double>((lg.row(0).array() - mx).exp().sum())) - static_cast<double>(lg(0, ids[b + t + 1]));
      ++count;
    }
  }
  return std::exp(nll / static_cast<double>(count));
}

Ppl measure(const model::Model& m, CacheDtype dt) {
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    tf.set_cache_dtype(dt);
    Ppl r;
    pipeline::PerplexityOptions po;
    po.max_windows = env_long("CACHESHRINK_BENCH_WINDOWS", 0);
    r.windowed = pipeline::perplexity(tf, test_ids(), po).perplexity;
    const long nd = env_long("CACHESHRINK_BENCH_DECODE_WINDOWS", 2);
    if (nd > 0) {
      po.max_windows = nd;
      r.windowed_first = pipeline::perplexity(tf, test_ids(), po).perplexity;
      r.decoded = decode_ppl(tf, nd);
    }
    r.bytes_per_token = tf.make_cache(1).bytes_per_token();
    return r;
  });
}

std::vector<std::string> g_rows, g_decode_rows;

void BM_QuantCache(benchmark::State& state, nlohmann::json row) {
  const std::string name = row["model"];
  auto m = model::load_model(kFix + "/models/" + name);
  compression::ConvertOptions o;
  o.compression_ratio = row["ratio"].get<double>();
  o.method = row["method"].get<std::string>();
  compression::ConversionReport rep;
  model::Model mm;
  for (auto _ : state) mm = compression::convert(m, o, calibration(), &rep);
  std::map<CacheDtype, Ppl> mla, orig;
  for (CacheDtype dt : kDtypes) mla[dt] = measure(mm, dt);
  const bool with_orig = env_long("CACHESHRINK_BENCH_ORIGINAL", 0) != 0;
  if (with_orig)
    for (CacheDtype dt : kDtypes) orig[dt] = measure(m, dt);
  const double p0 = mla[CacheDtype::F32].windowed, p8 = mla[CacheDtype::Int8].windowed, pf = mla[CacheDtype::Fp8E4M3].windowed;
  state.counters["ppl_f32"] = p0;
  state.counters["ppl_int8"] = p8;
  state.counters["ppl_fp8"] = pf;
  char buf[768];
  std::string orig_cols;
  if (with_orig) {
    const double q0 = orig[CacheDtype::F32].windowed;
    std::snprintf(buf, sizeof buf, " %.2f | %.2f (%+.2f%%) | %.2f (%+.2f%%) | %zu |", q0, orig[CacheDtype::Int8].windowed,
                  100 * (orig[CacheDtype::Int8].windowed / q0 - 1), orig[CacheDtype::Fp8E4M3].windowed,
                  100 * (orig[CacheDtype::Fp8E4M3].windowed / q0 - 1), orig[CacheDtype::F32].bytes_per_token);
    orig_cols = buf;
  }
  std::snprintf(buf, sizeof buf, "| %s | %.0f | %s | %d |%s %.2f | %.2f (%+.2f%%) | %.2f (%+.2f%%) | %zu | %zu | %zu |", name.c_str(),
                o.compression_ratio, compression_method_name(rep.method), rep.d_latent, orig_cols.c_str(), p0, p8, 100 * (p8 / p0 - 1), pf,
                100 * (pf / p0 - 1), mla[CacheDtype::F32].bytes_per_token, mla[CacheDtype::Int8].bytes_per_token,
                mla[CacheDtype::Fp8E4M3].bytes_per_token);
  g_rows.emplace_back(buf);
  std::string d = "| " + name + " |";
  for (CacheDtype dt : kDtypes) {
    std::snprintf(buf, sizeof buf, " %.4f / %.4f |", mla[dt].windowed_first, mla[dt].decoded);
    d += buf;
  }
  g_decode_rows.push_back(d);
}

}  // namespace

int main(int argc, char** argv) {
  auto anchor = nlohmann::json::parse(io::read_text_file(kFix + "/anchor/cacheshrink-0.1.5-tiny.json"));
  std::set<std::string> seen;
  for (const auto& row : anchor["results"]) {
    const std::string name = row["model"].get<std::string>();
    if (!seen.insert(name).second) continue;  // first (default) row per model
    const std::string label = name + "/" + row["method"].get<std::string>() + "/r" + std::to_string(static_cast<int>(row["ratio"].get<double>()));
    benchmark::RegisterBenchmark(("BM_QuantCache/" + label).c_str(), BM_QuantCache, row)->Iterations(1)->Unit(benchmark::kSecond);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  const long w = env_long("CACHESHRINK_BENCH_WINDOWS", 0);
  const bool with_orig = env_long("CACHESHRINK_BENCH_ORIGINAL", 0) != 0;
  std::printf("\nperplexity windows: %s (256 tokens each)\n", w ? std::to_string(w).c_str() : "all (1682)");
  std::printf("| model | ratio | method | d_latent |%s MLA f32 cache | MLA int8 cache | MLA fp8 cache | MLA KV bytes/token f32 | int8 | fp8 |\n",
              with_orig ? " original f32 cache | original int8 | original fp8 | original KV bytes/token f32 |" : "");
  std::printf("|---|---|---|---|%s---|---|---|---|---|---|\n", with_orig ? "---|---|---|---|" : "");
  for (const auto& r : g_rows) std::printf("%s\n", r.c_str());
  const long nd = env_long("CACHESHRINK_BENCH_DECODE_WINDOWS", 2);
  if (nd > 0) {
    std::printf("\nfirst %ld windows, MLA model: windowed forward / token-by-token decode through the cache\n", nd);
    std::printf("| model | f32 | int8 | fp8 |\n|---|---|---|---|\n");
    for (const auto& r : g_decode_rows) std::printf("%s\n", r.c_str());
  }
  return 0;
}

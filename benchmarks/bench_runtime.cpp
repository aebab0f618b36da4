// CPU runtime throughput. BM_Perplexity runs the fixtures' full perplexity protocol on a
// model (default tiny-llama3, 1682 windows x 256 tokens) and, in the same run, measures
// Eigen's single-threaded GEMM rate on the model's own projection shapes, reporting
// tokens/s, achieved forward GFLOP/s and their ratio to the GEMM rate.
//
//   ./build/benchmarks/bench_runtime --benchmark_filter=Perplexity
//   CACHESHRINK_BENCH_MODEL=tiny-gpt2 ./build/benchmarks/bench_runtime ...
#include <benchmark/benchmark.h>

#include <cacheshrink/io/file.hpp>
#include <cacheshrink/model/transformer.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
#include <chrono>
#include <cstdlib>

using namespace cacheshrink;

namespace {

std::string bench_model() {
  const char* m = std::getenv("CACHESHRINK_BENCH_MODEL");
  return std::string(CACHESHRINK_FIXTURES_DIR) + "/models/" + (m ? m : "tiny-llama3");
}

/// Useful FLOPs of a forward over `windows` windows of T tokens (causal attention counts
/// only the visible keys; norms/activations ignored).
double forward_flops(const ModelConfig& c, long windows, int T) {
  const double H = c.hidden_size, I = c.intermediate_size, Dq = c.d_q(), Dkv = c.d_kv(), V = c.vocab_size;
  const double mlp = c.family == Family::Gpt2 ? 2 * H * I : 3 * H * I;
  const double per_token_layer = 2 * (H * Dq + 2 * H * Dkv + Dq * H + mlp);
  double attn_pairs = 0;  // (query, key) pairs visible per window
  for (int i = 0; i < T; ++i) attn_pairs += c.sliding_window > 0 ? std::min(i + 1, c.sliding_window) : i + 1;
  const double attn = 4.0 * attn_pairs * c.head_dim * c.n_heads;  // QK^T and PV
  return static_cast<double>(windows) * (c.n_layers * (T * per_token_layer + attn) + T * 2 * H * V);
}

/// GFLOP/s of Eigen's GEMM on the shapes the forward runs (rows = batch*T tokens).
double gemm_gflops(const ModelConfig& c, int rows) {
  const int H = c.hidden_size;
  const std::pair<int, int> shapes[] = {{H, c.d_q()}, {H, c.d_kv()}, {H, c.intermediate_size}, {c.intermediate_size, H}, {H, c.vocab_size}};
  double flops = 0, secs = 0;
  for (auto [k, n] : shapes) {
    MatrixRf a = MatrixRf::Random(rows, k), w = MatrixRf::Random(n, k), y(rows, n);
    y.noalias() = a * w.transpose();  // warm up
    const int reps = 5;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
      y.noalias() = a * w.transpose();
      benchmark::DoNotOptimize(y.data());
    }
    secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    flops += 2.0 * rows * k * n * reps;
  }
  return flops / secs / 1e9;
}

void BM_EigenGemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1)), n = static_cast<int>(state.range(2));
  MatrixRf a = MatrixRf::Random(m, k), w = MatrixRf::Random(n, k), y(m, n);
  for (auto _ : state) {
    y.noalias() = a * w.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * m * k * n * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EigenGemm)->Args({2048, 256, 256})->Args({2048, 256, 512})->Args({2048, 512, 256})->Args({2048, 256, 4096})->Unit(benchmark::kMillisecond);

void BM_Perplexity(benchmark::State& state) {
  auto m = model::load_model(bench_model());
  auto ids = io::read_ids_u16(std::string(CACHESHRINK_FIXTURES_DIR) + "/data/wikitext2_test.ids.u16");
  pipeline::PerplexityOptions po;
  po.max_windows = state.range(0);
  po.batch = 8;
  pipeline::PerplexityResult r;
  for (auto _ : state) {
    r = dispatch_attention_kind(m.config, [&](auto kind) {
      model::Transformer<decltype(kind)> tf(m);
      return pipeline::perplexity(tf, ids, po);
    });
  }
  const double gemm = gemm_gflops(m.config, po.batch * po.window);
  const double achieved = forward_flops(m.config, r.windows, po.window) / r.seconds / 1e9;
  state.counters["perplexity"] = r.perplexity;
  state.counters["windows"] = static_cast<double>(r.windows);
  state.counters["tokens_per_s"] = r.tokens_per_second;
  state.counters["fwd_GFLOP/s"] = achieved;
  state.counters["gemm_GFLOP/s"] = gemm;
  state.counters["fwd_over_gemm"] = achieved / gemm;
}
BENCHMARK(BM_Perplexity)->Arg(0)->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(BM_Perplexity)->Arg(64)->Iterations(1)->Unit(benchmark::kSecond);

}  // namespace

BENCHMARK_MAIN();

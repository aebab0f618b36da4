// Perplexity-evaluation throughput of Transformer<Kind, Cuda> (forward + NLL on the device),
// timed with CUDA events. Two parts:
//   fixtures: the seven fixture checkpoints on the full WikiText-2 test protocol (1682
//             windows x 256 tokens), bf16 and float32 modes, perplexity printed next to HF's.
//   7b:       random-weight models with LLaMA-2-7B and Qwen2.5-7B shapes, made on the device,
//             batches of B windows x T tokens.
// Prints a table and, with --json PATH, writes every row as JSON. The PyTorch baseline is
// benchmarks/python/bench_hf_eval.py (run in the same device session; docs/results_cuda.md).
//
//   bench_cuda_eval [--part fixtures|attention|7b|all] [--fixtures DIR] [--json PATH] [--iters N]
#include <cacheshrink/cuda.hpp>
#include <cacheshrink/io/file.hpp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "flash_case.cuh"
#include "shapes.hpp"

using namespace cacheshrink;

namespace {

struct Args {
  std::string part = "all";
  std::string fixtures = CACHESHRINK_FIXTURES_DIR;
  std::string json;
  int iters = 5;
};

using bench::llama2_7b;
using bench::qwen25_7b;

nlohmann::json rows = nlohmann::json::array();

template <class Tf>
void bench_random(Tf& tf, const std::string& name, int B, int T, int iters) {
  std::vector<std::vector<int>> seqs(B, std::vector<int>(T));
  unsigned s = 12345;
  for (auto& q : seqs)
    for (auto& t : q) t = static_cast<int>((s = s * 1664525u + 1013904223u) >> 8) % tf.config().vocab_size;
  for (int w = 0; w < 2; ++w) tf.nll(std::span<const std::vector<int>>(seqs));  // warm-up
  cuda::Event e0, e1;
  e0.record(tf.stream());
  double nll = 0;
  for (int i = 0; i < iters; ++i) nll += tf.nll(std::span<const std::vector<int>>(seqs)).first;
  e1.record(tf.stream());
  e1.synchronize();
  const double ms = e1.elapsed_since(e0) / iters;
  const double tps = B * T / (ms / 1000.0);
  std::printf("%-22s %-8s B=%-3d T=%-5d %10.2f ms/batch %12.0f tok/s  (mean nll %.3f)\n", name.c_str(), cuda::precision_name(tf.precision()), B, T,
              ms, tps, nll / iters / (B * (T - 1.0)));
  std::fflush(stdout);
  rows.push_back({{"part", "7b"}, {"model", name}, {"precision", cuda::precision_name(tf.precision())}, {"batch", B}, {"seq_len", T},
                  {"ms_per_batch", ms}, {"tokens_per_s", tps}, {"weight_bytes", tf.weight_bytes()}});
}

void part_7b(const Args& a) {
  struct Shape {
    int B, T;
  };
  const std::vector<Shape> shapes = {{4, 1024}, {2, 2048}, {1, 4096}};
  {
    model::Transformer<Mha, Cuda> tf(llama2_7b(), cuda::RandomWeights{1, 0.02f}, {cuda::Precision::BFloat16});
    for (auto sh : shapes) bench_random(tf, "llama2-7b-shapes", sh.B, sh.T, a.iters);
  }
  {
    model::Transformer<Gqa, Cuda> tf(qwen25_7b(), cuda::RandomWeights{2, 0.02f}, {cuda::Precision::BFloat16});
    for (auto sh : shapes) bench_random(tf, "qwen2.5-7b-shapes", sh.B, sh.T, a.iters);
  }
}

/// The flash attention kernels alone at 7B head shapes: achieved TFLOP/s (causal pairs only), the
/// mma.sync kernel and (where this binary and card have it) the sm_90a wgmma kernel in the same run.
void part_attention(const Args& a) {
  std::vector<std::pair<cuda::FlashKernel, const char*>> kinds = {{cuda::FlashKernel::MmaSync, "mma.sync"}};
  if (cuda::wgmma_available()) kinds.emplace_back(cuda::FlashKernel::Wgmma, "wgmma");
  for (auto [nh, nkv, T, B] : {std::tuple{32, 32, 1024, 4}, {32, 32, 4096, 1}, {28, 4, 4096, 1}}) {
    const int hd = 128;
    bench::FlashCase fc(nh, nkv, T, B, nullptr);
    double first_ms = 0;
    for (auto [kind, name] : kinds) {
      for (int w = 0; w < 3; ++w) fc.run(nullptr, kind);
      cuda::Event e0, e1;
      e0.record(nullptr);
      const int it = 20;
      for (int i = 0; i < it; ++i) fc.run(nullptr, kind);
      e1.record(nullptr);
      e1.synchronize();
      const double ms = e1.elapsed_since(e0) / it;
      if (first_ms == 0) first_ms = ms;
      const double flops = fc.flops();
      std::printf("flash %-8s nh=%d nkv=%d hd=%d B=%d T=%d: %.3f ms  %.1f TFLOP/s  (%.2fx the mma.sync kernel)\n", name, nh, nkv, hd, B, T, ms,
                  flops / ms / 1e9, first_ms / ms);
      std::fflush(stdout);
      rows.push_back({{"part", "attention"}, {"kernel", name}, {"n_heads", nh}, {"n_kv_heads", nkv}, {"batch", B}, {"seq_len", T}, {"ms", ms},
                      {"tflops", flops / ms / 1e9}});
    }
  }
  (void)a;
}

void part_fixtures(const Args& a) {
  const auto ids = io::read_ids_u16(std::filesystem::path(a.fixtures) / "data" / "wikitext2_test.ids.u16");
  for (const char* name : {"tiny-gpt2", "tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mqa", "tiny-qwen3"}) {
    const auto dir = std::filesystem::path(a.fixtures) / "models" / name;
    auto m = model::load_model(dir);
    const double ref =
        nlohmann::json::parse(io::read_text_file(dir / "reference.json"))["perplexity"]["wikitext2_test_all_windows"].get<double>();
    for (auto p : {cuda::Precision::BFloat16, cuda::Precision::Float32}) {
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind), Cuda> tf(m, {p});
        pipeline::PerplexityOptions o;
        o.window = 256;
        o.batch = 64;
        o.max_windows = 64;
        cuda::perplexity(tf, ids, o);  // warm-up
        o.max_windows = 0;
        cuda::Event e0, e1;
        e0.record(tf.stream());
        const auto r = cuda::perplexity(tf, ids, o);
        e1.record(tf.stream());
        e1.synchronize();
        const double s = e1.elapsed_since(e0) / 1000.0;
        const double tps = r.processed_tokens / s;
        std::printf("%-14s %-8s windows %ld  ppl %.4f (HF fp32 %.4f)  %.3f s  %12.0f tok/s\n", name, cuda::precision_name(p), r.windows, r.perplexity, ref,
                    s, tps);
        std::fflush(stdout);
        rows.push_back({{"part", "fixtures"}, {"model", name}, {"precision", cuda::precision_name(p)}, {"windows", r.windows}, {"window", 256},
                        {"batch", 64}, {"perplexity", r.perplexity}, {"hf_reference_ppl", ref}, {"seconds", s}, {"tokens_per_s", tps}});
        return 0;
      });
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw InvalidArgument(k + " needs a value");
      return argv[++i];
    };
    if (k == "--part") a.part = next();
    else if (k == "--fixtures") a.fixtures = next();
    else if (k == "--json") a.json = next();
    else if (k == "--iters") a.iters = std::stoi(next());
    else {
      std::fprintf(stderr, "usage: bench_cuda_eval [--part fixtures|attention|7b|all] [--fixtures DIR] [--json PATH] [--iters N]\n");
      return 2;
    }
  }
  try {
    if (cuda::device_count() == 0) {
      std::printf("no CUDA device: nothing to measure\n");
      return 0;
    }
    cudaDeviceProp prop{};
    CACHESHRINK_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    if (a.part == "fixtures" || a.part == "all") part_fixtures(a);
    if (a.part == "attention" || a.part == "all") part_attention(a);
    if (a.part == "7b" || a.part == "all") part_7b(a);
    if (!a.json.empty()) std::ofstream(a.json) << nlohmann::json{{"device", prop.name}, {"rows", rows}}.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}

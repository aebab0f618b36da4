// Conversion to MLA on the GPU at 7B shapes (issue #8's target: calibration on 128 x 512
// tokens + initialisation in < 60 s). A host model with random weights (uniform, std 0.02; the
// layout load_model produces) is converted by cuda::convert, the way a user converts a loaded
// checkpoint; the time is split into
//   upload       Transformer<Kind, Cuda> built from the host weights (bf16 or float32 copies),
//   calibration  the packed forward over the calibration batch + float64 Grams (cublasDsyrk),
//   init         statistics, cusolverDnDsyevd eigenbases (8 concurrent), down-projections.
// (upload + calibration = the report's calibration_seconds; the three sum to its seconds.)
// The PyTorch counterpart is benchmarks/python/bench_torch_convert.py, run in the same device
// session (docs/results_cuda.md).
//
//   bench_cuda_convert [--shapes llama2,qwen25] [--precision bf16|float32] [--seqs 128] [--len 512]
//                      [--batch 8] [--json PATH]
#include <cacheshrink/backend/cuda/convert.cuh>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "shapes.hpp"

using namespace cacheshrink;

namespace {

struct Args {
  std::vector<std::string> shapes = {"llama2", "qwen25"};
  cuda::Precision precision = cuda::Precision::BFloat16;
  int seqs = 128, len = 512, batch = 8;
  std::string json;
};

/// Fills `n` floats uniform(-a, a) with one splitmix64 stream per thread (deterministic).
void fill(float* p, std::size_t n, float a, std::uint64_t seed) {
  const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> th;
  for (unsigned t = 0; t < nt; ++t)
    th.emplace_back([=] {
      const std::size_t b = n * t / nt, e = n * (t + 1) / nt;
      std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + t + 1;
      for (std::size_t i = b; i < e; ++i) {
        std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        p[i] = a * (2.0f * static_cast<float>(z >> 40) / 16777216.0f - 1.0f);
      }
    });
  for (auto& t : th) t.join();
}

model::Model random_model(const ModelConfig& c, std::uint64_t seed) {
  const float a = std::sqrt(3.0f) * 0.02f;
  std::uint64_t k = seed * 1000;
  auto mat = [&](MatrixRf& m, Eigen::Index r, Eigen::Index cc) {
    m.resize(r, cc);
    fill(m.data(), static_cast<std::size_t>(m.size()), a, ++k);
  };
  model::Model m;
  m.config = c;
  m.stored_dtype = "random";
  auto& w = m.weights;
  const int H = c.hidden_size, I = c.intermediate_size;
  mat(w.embed, c.vocab_size, H);
  if (!c.tie_word_embeddings) mat(w.lm_head, c.vocab_size, H);
  w.final_norm_w = VectorXf::Ones(H);
  w.layers.resize(static_cast<std::size_t>(c.n_layers));
  for (auto& L : w.layers) {
    L.norm1_w = L.norm2_w = VectorXf::Ones(H);
    mat(L.wq, c.d_q(), H);
    mat(L.wk, c.d_kv(), H);
    mat(L.wv, c.d_kv(), H);
    mat(L.wo, H, c.d_q());
    mat(L.w_gate, I, H);
    mat(L.w_up, I, H);
    mat(L.w_down, H, I);
    if (c.qkv_bias) {
      L.bq = VectorXf::Zero(c.d_q());
      L.bk = VectorXf::Zero(c.d_kv());
      L.bv = VectorXf::Zero(c.d_kv());
    }
  }
  return m;
}

double seconds_since(std::chrono::steady_clock::time_point t) { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); }

}  // namespace

int main(int argc, char** argv) try {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw InvalidArgument(k + " needs a value");
      return argv[++i];
    };
    if (k == "--shapes") {
      a.shapes.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) a.shapes.push_back(t);
    } else if (k == "--precision") {
      const std::string p = next();
      if (p == "bf16") a.precision = cuda::Precision::BFloat16;
      else if (p == "float32") a.precision = cuda::Precision::Float32;
      else throw InvalidArgument("--precision: expected bf16 or float32, got '" + p + "'");
    } else if (k == "--seqs") a.seqs = std::stoi(next());
    else if (k == "--len") a.len = std::stoi(next());
    else if (k == "--batch") a.batch = std::stoi(next());
    else if (k == "--json") a.json = next();
    else throw InvalidArgument("unknown option " + k + " (see the file comment)");
  }
  if (cuda::device_count() == 0) {
    std::fprintf(stderr, "bench_cuda_convert: no CUDA device\n");
    return 2;
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& name : a.shapes) {
    ModelConfig c;
    if (name == "llama2") c = bench::llama2_7b();
    else if (name == "qwen25") c = bench::qwen25_7b();
    else throw InvalidArgument("--shapes: unknown shape '" + name + "' (llama2, qwen25)");
    auto t = std::chrono::steady_clock::now();
    model::Model m = random_model(c, name == "llama2" ? 1 : 2);
    const double build_s = seconds_since(t);
    std::vector<std::vector<int>> calib(static_cast<std::size_t>(a.seqs), std::vector<int>(static_cast<std::size_t>(a.len)));
    unsigned s = 777;
    for (auto& q : calib)
      for (auto& id : q) id = static_cast<int>((s = s * 1664525u + 1013904223u) >> 8) % c.vocab_size;

    // Upload alone (the part of calibration_seconds that is not the forward).
    double upload_s = 0;
    {
      CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
      t = std::chrono::steady_clock::now();
      dispatch_attention_kind(c, [&](auto kind) {
        model::Transformer<decltype(kind), Cuda> tf(m, cuda::Options{a.precision});
        CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(tf.stream()));
        upload_s = seconds_since(t);
        return 0;
      });
    }
    compression::ConvertOptions o;  // method auto: separate for MHA (4x), xkv for GQA (2x)
    o.compression_ratio = c.n_kv_heads == c.n_heads ? 4.0 : 2.0;
    o.calibration_batch = a.batch;
    compression::ConversionReport rep;
    t = std::chrono::steady_clock::now();
    cuda::DeviceInit::Timings ti;
    const model::Model mm = cuda::convert(std::move(m), o, calib, &rep, a.precision, &ti);  // in place: no host copy
    const double total_s = seconds_since(t);
    const double calib_s = rep.calibration_seconds - upload_s, init_s = total_s - rep.calibration_seconds;
    double e_min = 1, e_mean = 0;
    for (const auto& lr : rep.layers) {
      e_min = std::min({e_min, lr.energy_k, lr.energy_v});
      e_mean += (lr.energy_k + lr.energy_v) / (2.0 * static_cast<double>(rep.layers.size()));
    }
    const double tok = static_cast<double>(rep.calibration_tokens);
    std::printf("%-8s %-7s %s d_kv %d -> d_latent %d, %lld calibration tokens: total %.2f s = upload %.2f + calibration %.2f (%.0f tok/s) + init %.2f"
                "  [host model build %.1f s, not counted]; energy mean %.4f min %.4f\n",
                name.c_str(), cuda::precision_name(a.precision), compression_method_name(rep.method), rep.d_kv, rep.d_latent, rep.calibration_tokens,
                total_s, upload_s, calib_s, tok / calib_s, init_s, build_s, e_mean, e_min);
    std::printf("         init breakdown: statistics %.2f s, eigenbases %.2f s (syevd calls %.2f s summed over 8 workers), down-projections %.2f s, "
                "rest (host) %.2f s\n", ti.statistic, ti.bases, ti.solver, ti.down, init_s - ti.statistic - ti.bases - ti.down);
    std::fflush(stdout);
    rows.push_back({{"shape", name}, {"precision", cuda::precision_name(a.precision)}, {"method", compression_method_name(rep.method)},
                    {"d_kv", rep.d_kv}, {"d_latent", rep.d_latent}, {"calibration_tokens", rep.calibration_tokens}, {"total_s", total_s},
                    {"upload_s", upload_s}, {"calibration_s", calib_s}, {"init_s", init_s}, {"energy_mean", e_mean}, {"energy_min", e_min},
                    {"layers", static_cast<int>(mm.weights.layers.size())},
                    {"init_statistics_s", ti.statistic}, {"init_eigenbases_s", ti.bases}, {"init_syevd_sum_s", ti.solver}, {"init_down_s", ti.down}});
  }
  if (!a.json.empty()) {
    std::ofstream f(a.json);
    f << rows.dump(1) << "\n";
    if (!f) throw IoError("cannot write " + a.json);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_cuda_convert: %s\n", e.what());
  return 1;
}

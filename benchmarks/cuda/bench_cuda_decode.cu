// Decode throughput on the GPU (issue #9): random-weight models with LLaMA-2-7B and Qwen2.5-7B
// shapes in bf16, one new token per sequence per step at a fixed context, batch 1/16/64 and
// context 1K/4K/16K/32K. Paths, all timed in this process with CUDA events:
//   (a) standard   our uncompressed model, standard K/V cache (RoPE, the real shape)
//   (b) rebuild    our MLA model (separate latents, 4x / 2x for the GQA shape), K/V rebuilt from
//                  the whole latent cache every step (the original package's way)
//   (c) absorbed   our MLA model decoding on the latents (W_uk into the query, W_uv into the
//                  output). Absorption needs keys that no rotation touches, so (c) and its
//                  like-for-like baseline (a') run the same shapes with GPT-2-style learned
//                  positions (and a GELU MLP of the same weight bytes) instead of RoPE.
// The context is held fixed: every step appends one token, then the cache length is set back.
// Cache contents are random (cost does not depend on them). Also: the decode kernels alone
// (achieved GB/s vs a device-to-device copy measured here) and KV bytes per token vs the formula.
// HF transformers' decode is benchmarks/python/bench_hf_decode.py (same device session).
//
//   bench_cuda_decode [--json PATH] [--steps N] [--batches 1,16,64] [--contexts 1024,4096,16384,32768]
//                     [--shapes llama2,qwen25] [--kernels-only]
//                     [--paths kernel,standard,rebuild,standard_learned_pos,absorbed]   (default: all)
#include <algorithm>
#include <cacheshrink/cuda.hpp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "shapes.hpp"

using namespace cacheshrink;

namespace {

struct Args {
  std::string json;
  int steps = 8;
  std::vector<int> batches = {1, 16, 64};
  std::vector<int> contexts = {1024, 4096, 16384, 32768};
  std::vector<std::string> shapes = {"llama2", "qwen25"};
  bool kernels_only = false;
  std::vector<std::string> paths = {"kernel", "standard", "rebuild", "standard_learned_pos", "absorbed"};
  bool wants(const std::string& p) const { return std::find(paths.begin(), paths.end(), p) != paths.end(); }
};

std::vector<int> parse_ints(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');) v.push_back(std::stoi(t));
  return v;
}
std::vector<std::string> parse_strs(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');) v.push_back(t);
  return v;
}

struct Shape {
  std::string name;
  ModelConfig rope;   // the real architecture
  ModelConfig nope;   // same shapes, learned positions (absorbable)
  int d_latent = 0;   // per K and per V
  double ratio = 0;
};

Shape make_shape(const std::string& n) {
  ModelConfig c;
  Shape s;
  if (n == "llama2") {
    c = bench::llama2_7b(40000);
    s.ratio = 4;
  } else if (n == "qwen25") {
    c = bench::qwen25_7b(40000);
    s.ratio = 2;
  } else {
    throw InvalidArgument("--shapes: unknown shape '" + n + "' (llama2, qwen25)");
  }
  s.name = n;
  s.rope = c;
  s.d_latent = static_cast<int>(c.d_kv() / s.ratio);
  ModelConfig g = c;
  g.family = Family::Gpt2;
  g.model_type = "gpt2";
  g.source += " (learned positions)";
  g.intermediate_size = c.intermediate_size * 3 / 2;  // GELU MLP with SwiGLU's weight bytes
  g.tie_word_embeddings = c.model_type == "gpt2";
  s.nope = g;
  return s;
}

nlohmann::json rows = nlohmann::json::array();
double copy_gbs = 0;

double measure_copy() {
  const std::size_t n = std::size_t(4) << 30;
  cuda::DeviceBuffer<char> a(n), b(n);
  CACHESHRINK_CUDA_CHECK(cudaMemset(a.data(), 1, n));
  cuda::Event e0, e1;
  CACHESHRINK_CUDA_CHECK(cudaMemcpy(b.data(), a.data(), n, cudaMemcpyDeviceToDevice));
  e0.record(nullptr);
  for (int i = 0; i < 5; ++i) CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), n, cudaMemcpyDeviceToDevice, nullptr));
  e1.record(nullptr);
  e1.synchronize();
  return 5.0 * 2.0 * static_cast<double>(n) / (e1.elapsed_since(e0) * 1e-3) / 1e9;  // read + write
}

std::size_t free_bytes() {
  std::size_t f = 0, t = 0;
  CACHESHRINK_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  return f;
}

/// Times decode steps at a fixed context; returns ms per step (0 when it does not fit).
template <class Tf>
void run_cells(Tf& tf, const Shape& sh, const std::string& path, cuda::LatentDecode mode, const Args& args) {
  const auto& c = tf.config();
  for (int B : args.batches)
    for (int ctx : args.contexts) {
      nlohmann::json r = {{"shape", sh.name}, {"path", path}, {"batch", B}, {"context", ctx}, {"model", c.source}};
      // bytes this cell needs: cache + (rebuild) the K/V scratch
      const bool mla = path != "standard" && path != "standard_learned_pos";
      const std::size_t cap = (static_cast<std::size_t>(ctx) + 16) / 16 * 16;
      const std::size_t per_tok = mla ? static_cast<std::size_t>(2 * sh.d_latent) * 2 * c.n_layers : static_cast<std::size_t>(2 * c.d_kv()) * 2 * c.n_layers;
      std::size_t need = B * cap * per_tok + (std::size_t(2) << 30);
      if (mode == cuda::LatentDecode::Rebuild && mla) need += 2 * B * cap * static_cast<std::size_t>(c.d_kv()) * 2;
      r["kv_bytes_per_token_formula"] = per_tok;
      if (need > free_bytes()) {
        r["fits"] = false;
        r["needed_gib"] = static_cast<double>(need) / (1 << 30);
        std::printf("%-8s %-22s B=%-3d ctx=%-6d  does not fit (%.1f GiB needed)\n", sh.name.c_str(), path.c_str(), B, ctx, need / double(1 << 30));
        rows.push_back(r);
        continue;
      }
      auto cache = tf.make_cache(B, ctx + 1, mode);
      tf.fill_cache_random(cache, ctx - 1);
      r["kv_bytes_per_token"] = cache.bytes_per_token();
      std::vector<int> tok(B);
      for (int b = 0; b < B; ++b) tok[b] = (17 + 31 * b) % c.vocab_size;
      auto step = [&] {
        std::fill(cache.len.begin(), cache.len.end(), ctx - 1);
        tf.decode_device(cache, tok);
      };
      step();
      step();
      CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(tf.stream()));
      cuda::Event e0, e1;
      e0.record(tf.stream());
      step();
      e1.record(tf.stream());
      e1.synchronize();
      const double first = e1.elapsed_since(e0);
      const int steps = std::max(2, std::min(args.steps, static_cast<int>(1500.0 / std::max(first, 0.01))));
      e0.record(tf.stream());
      for (int i = 0; i < steps; ++i) step();
      e1.record(tf.stream());
      e1.synchronize();
      const double ms = e1.elapsed_since(e0) / steps;
      r["fits"] = true;
      r["ms_per_step"] = ms;
      r["tokens_per_s"] = B / (ms * 1e-3);
      r["steps"] = steps;
      std::printf("%-8s %-22s B=%-3d ctx=%-6d  %9.3f ms/step  %10.1f tok/s  KV %zu B/token (formula %zu)\n", sh.name.c_str(), path.c_str(), B, ctx, ms,
                  B / (ms * 1e-3), cache.bytes_per_token(), per_tok);
      std::fflush(stdout);
      rows.push_back(r);
    }
}

/// The decode attention kernels alone on one layer's cache: GB/s of cache read.
void kernel_bandwidth(const Shape& sh, const Args& args) {
  const auto& c = sh.rope;
  for (int B : args.batches)
    for (int ctx : args.contexts) {
      const std::size_t std_bytes = static_cast<std::size_t>(B) * ctx * 2 * c.d_kv() * 2;
      const std::size_t lat_bytes = static_cast<std::size_t>(B) * ctx * 2 * sh.d_latent * 2;
      if (std_bytes * 2 + (std::size_t(4) << 30) > free_bytes()) continue;
      cudaStream_t s = nullptr;
      cuda::DecodeScratch scratch;
      std::vector<int> lens(B, ctx);
      cuda::DeviceBuffer<int> dlen;
      dlen.upload(lens);
      const int hd = c.head_dim, nh = c.n_heads, Dkv = c.d_kv(), dl = sh.d_latent;
      const std::size_t cap = (ctx + 15) / 16 * 16;
      auto time = [&](auto&& f) {
        f();
        cuda::Event e0, e1;
        e0.record(s);
        for (int i = 0; i < 10; ++i) f();
        e1.record(s);
        e1.synchronize();
        return e1.elapsed_since(e0) / 10.0;
      };
      double ms_std = 0, ms_lat = 0, ms_wmma = 0;
      {
        cuda::DeviceBuffer<__nv_bfloat16> kv(static_cast<std::size_t>(B) * cap * 2 * Dkv), q(static_cast<std::size_t>(B) * nh * hd),
            out(static_cast<std::size_t>(B) * nh * hd);
        cuda::fill_uniform(kv.data(), static_cast<long long>(kv.size()), 3, 1.0f, s);
        cuda::fill_uniform(q.data(), static_cast<long long>(q.size()), 4, 1.0f, s);
        cuda::DecodeArgs<__nv_bfloat16> a;
        a.q = q.data();
        a.ldq = nh * hd;
        a.k = kv.data();
        a.v = kv.data() + static_cast<std::size_t>(B) * cap * Dkv;
        a.ldkv = Dkv;
        a.seq_stride = static_cast<long long>(cap) * Dkv;
        a.len = dlen.data();
        a.batch = B;
        a.n_heads = nh;
        a.n_kv_heads = c.n_kv_heads;
        a.head_dim = hd;
        a.scale = 0.088f;
        ms_std = time([&] { cuda::decode_attention(a, ctx, out.data(), nh * hd, scratch, s); });
      }
      {
        cuda::DeviceBuffer<__nv_bfloat16> lat(static_cast<std::size_t>(B) * cap * 2 * dl), q(static_cast<std::size_t>(B) * nh * dl),
            out(static_cast<std::size_t>(B) * nh * dl);
        cuda::fill_uniform(lat.data(), static_cast<long long>(lat.size()), 5, 1.0f, s);
        cuda::fill_uniform(q.data(), static_cast<long long>(q.size()), 6, 0.05f, s);
        cuda::LatentDecodeArgs<__nv_bfloat16> a;
        a.q_lat = q.data();
        a.ck = lat.data();
        a.cv = lat.data() + dl;
        a.ldc = 2 * dl;
        a.seq_stride = static_cast<long long>(cap) * 2 * dl;
        a.len = dlen.data();
        a.batch = B;
        a.n_heads = nh;
        a.d_latent = dl;
        ms_lat = time([&] { cuda::decode_latent_attention(a, ctx, out.data(), nh * dl, scratch, s); });
        // same-run baseline: the previous WMMA kernel (128-token splits, S through shared memory)
        ms_wmma = time([&] { cuda::decode_latent_attention(a, ctx, out.data(), nh * dl, scratch, s, false, true); });
      }
      const double gbs_std = std_bytes / (ms_std * 1e-3) / 1e9, gbs_lat = lat_bytes / (ms_lat * 1e-3) / 1e9;
      // FLOPs: standard 4 * nh * hd per token; latent 4 * nh * dl per token
      const double tf_lat = 4.0 * B * ctx * nh * dl / (ms_lat * 1e-3) / 1e12;
      const double gbs_wmma = lat_bytes / (ms_wmma * 1e-3) / 1e9;
      std::printf("kernel %-8s B=%-3d ctx=%-6d  standard %.3f ms %.0f GB/s (%.0f%% of copy) | latent %.3f ms %.0f GB/s (%.0f%%) %.1f TFLOP/s | "
                  "latent WMMA %.3f ms (%.0f%%), new/WMMA %.2fx\n",
                  sh.name.c_str(), B, ctx, ms_std, gbs_std, 100 * gbs_std / copy_gbs, ms_lat, gbs_lat, 100 * gbs_lat / copy_gbs, tf_lat, ms_wmma,
                  100 * gbs_wmma / copy_gbs, ms_wmma / ms_lat);
      std::fflush(stdout);
      rows.push_back({{"shape", sh.name}, {"path", "kernel"}, {"batch", B}, {"context", ctx}, {"std_ms", ms_std}, {"std_gbs", gbs_std},
                      {"latent_ms", ms_lat}, {"latent_gbs", gbs_lat}, {"latent_tflops", tf_lat}, {"latent_wmma_ms", ms_wmma}, {"copy_gbs", copy_gbs}});
    }
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw InvalidArgument("bench_cuda_decode: " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--json") args.json = val();
    else if (a == "--steps") args.steps = std::stoi(val());
    else if (a == "--batches") args.batches = parse_ints(val());
    else if (a == "--contexts") args.contexts = parse_ints(val());
    else if (a == "--shapes") args.shapes = parse_strs(val());
    else if (a == "--kernels-only") args.kernels_only = true;
    else if (a == "--paths") {
      args.paths = parse_strs(val());
      for (const auto& p : args.paths)
        if (!Args{}.wants(p)) {  // the default list holds every path
          std::fprintf(stderr, "bench_cuda_decode: --paths: unknown path '%s' (kernel, standard, rebuild, standard_learned_pos, absorbed)\n", p.c_str());
          return 2;
        }
    } else {
      std::fprintf(stderr, "usage: bench_cuda_decode [--json PATH] [--steps N] [--batches 1,16,64] [--contexts 1024,...] [--shapes llama2,qwen25] [--kernels-only] [--paths kernel,standard,...]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  try {
    if (cuda::device_count() == 0) {
      std::fprintf(stderr, "bench_cuda_decode: no CUDA device\n");
      return 1;
    }
    cudaDeviceProp p{};
    CACHESHRINK_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    copy_gbs = measure_copy();
    std::printf("device: %s, %d SMs; device-to-device copy %.0f GB/s (read + write)\n", p.name, p.multiProcessorCount, copy_gbs);
    for (const auto& name : args.shapes) {
      const Shape sh = make_shape(name);
      std::printf("== %s: d_latent %d per K/V (%.0fx), %d layers\n", name.c_str(), sh.d_latent, sh.ratio, sh.rope.n_layers);
      if (args.wants("kernel")) kernel_bandwidth(sh, args);
      if (args.kernels_only) continue;
      cuda::Options o{cuda::Precision::BFloat16};
      auto run = [&](const ModelConfig& c, int d_latent, const char* path, cuda::LatentDecode mode) {
        if (!args.wants(path)) return;
        dispatch_attention_kind(c, [&](auto kind) {
          cuda::RandomWeights rw;
          rw.mla_d_latent = d_latent;
          model::Transformer<decltype(kind), Cuda> tf(c, rw, o);
          run_cells(tf, sh, path, mode, args);
          return 0;
        });
      };
      run(sh.rope, 0, "standard", cuda::LatentDecode::Rebuild);
      run(sh.rope, sh.d_latent, "rebuild", cuda::LatentDecode::Rebuild);
      run(sh.nope, 0, "standard_learned_pos", cuda::LatentDecode::Rebuild);
      run(sh.nope, sh.d_latent, "absorbed", cuda::LatentDecode::Absorbed);
    }
    if (!args.json.empty()) {
      std::ofstream f(args.json);
      f << nlohmann::json{{"device", p.name}, {"copy_gbs", copy_gbs}, {"rows", rows}}.dump(1) << "\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}

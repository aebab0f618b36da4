// One fine-tuning step of an MLA model on the GPU (issue #8): random-weight models with
// LLaMA-2-7B (4x: d_latent 1024) and Qwen2.5-7B (2x: d_latent 256) shapes, every layer MLA with
// separate K/V latents, reconstruction loss blended with the LM loss (alpha 0.3), batch 4 x 512,
// float32, in two math modes: strict fp32 and TF32 tensor cores for the graph's GEMMs (the
// optimizer is always strict fp32). A step = zero_grad + forward + backward (cuda::TrainGraph) + gradient norm
// and clipping + AdamW on the down projections + RiemannianAdam on the Stiefel up projections
// (cuda::DeviceOptimizer), timed with CUDA events; also timed alone: the forward with its loss
// (no backward), the forward + backward, and the optimizer. Memory: device bytes in use after
// the steps minus before the model was made (every buffer is persistent, so this is the step's
// footprint; cuBLAS/cuSOLVER workspaces included). Roofline: the forward's GEMM + attention FLOPs
// over its time, next to the rate of one cublasSgemm of the MLP up-projection's shape (tokens x
// hidden times hidden x intermediate) timed in the same math mode.
// The PyTorch counterpart is benchmarks/python/bench_torch_train.py, run in the same device
// session (docs/results_cuda.md).
//
//   bench_cuda_train [--shapes llama2,qwen25] [--batch 4] [--seq 512] [--steps 5] [--warmup 2]
//                    [--recon-alpha 0.3] [--modes fp32,tf32] [--gemm-tuning on|off|both] [--gemm-profile]
//                    [--stage-profile] [--gemm-candidates 8] [--gemm-splitk] [--materialised-attention]
//                    [--flash-kernels auto|mma|wgmma[,...]]
//                    [--one-stream] [--json PATH]
// --materialised-attention: TF32 mode keeps the materialised attention (batched GEMMs, P kept)
// instead of the fused TF32 kernels (cuda::TrainGraph::set_fused_attention(false)).
// --flash-kernels auto|mma|wgmma[,...]: the fused attention's tensor-core form
// (cuda::TrainGraph::set_flash_kernel), one row per entry: "mma,wgmma,mma,wgmma" alternates an
// A/B in one process.
// --one-stream: no side stream (cuda::TrainGraph::set_side_stream(false)): the reconstruction
// residuals and the trainable weights' gradients in the main stream, in order.
// --gemm-tuning: cuda::TunedGemm's timed kernel choice for the graph's GEMMs (on, the default),
// cublasLt's first heuristic choice (off), or both, one after the other.
// --gemm-profile: after the timings, one more forward + backward with every graph GEMM bracketed
// by CUDA events; prints each shape's calls, time and TFLOP/s (a diagnostic, not in the JSON).
// --stage-profile: one more forward + backward cut into named stages (every kernel and GEMM kind,
// summed over layers) by CUDA events recorded between them; prints each stage's time and share
// (a diagnostic, not in the JSON; the marks cost a little host time).
// --gemm-candidates, --gemm-splitk: how wide the timed search is (cuda::TunedGemm::set_search).
#include <cacheshrink/backend/cuda/optim.cuh>
#include <cacheshrink/backend/cuda/train.cuh>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "shapes.hpp"

using namespace cacheshrink;

namespace {

// The fused attention's kernel as it runs (Auto resolved).
const char* flash_name(cuda::FlashKernel k) {
  const bool wg = k == cuda::FlashKernel::Wgmma || (k == cuda::FlashKernel::Auto && cuda::wgmma_available());
  return wg ? " wgmma" : " mma.sync";
}

struct Args {
  std::vector<std::string> shapes = {"llama2", "qwen25"};
  int batch = 4, seq = 512, steps = 5, warmup = 2;
  double recon_alpha = 0.3;
  std::vector<std::string> modes = {"fp32", "tf32"};
  std::vector<cuda::FlashKernel> flash_kernels = {cuda::FlashKernel::Auto};
  std::vector<bool> tunings = {true};  // cuda::TunedGemm kernel choice: timed (on) / heuristic (off)
  bool gemm_profile = false, stage_profile = false;
  int gemm_candidates = cuda::TunedGemm::kCandidates;
  bool gemm_splitk = false;
  bool materialised = false;
  bool one_stream = false;
  std::string json;
};

/// TFLOP/s of C (m, n) = A (m, k) B (k, n) in float32 with the given math mode (best of 5).
double sgemm_rate(int m, int n, int k, bool tf32) {
  cuda::Stream st;
  cuda::CublasHandle h(st.get());
  CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(h.get(), tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  cuda::DeviceBuffer<float> A(static_cast<std::size_t>(m) * k), B(static_cast<std::size_t>(k) * n), C(static_cast<std::size_t>(m) * n);
  cuda::fill_uniform<float>(A.data(), static_cast<long long>(A.size()), 1, 1.0f, st.get());
  cuda::fill_uniform<float>(B.data(), static_cast<long long>(B.size()), 2, 1.0f, st.get());
  const float one = 1.0f, zero = 0.0f;
  cuda::Event e0, e1;
  double best = 1e30;
  for (int r = 0; r < 6; ++r) {
    e0.record(st.get());
    CACHESHRINK_CUBLAS_CHECK(cublasSgemm(h.get(), CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data(), m, B.data(), k, &zero, C.data(), m));
    e1.record(st.get());
    e1.synchronize();
    if (r > 0) best = std::min(best, static_cast<double>(e1.elapsed_since(e0)));
  }
  return 2.0 * m * n * k / (best * 1e-3) / 1e12;
}

std::size_t used_bytes() {
  std::size_t free_b = 0, total_b = 0;
  CACHESHRINK_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

nlohmann::json run(const std::string& shape, const Args& a) {
  const bool llama = shape == "llama2";
  const ModelConfig c = llama ? bench::llama2_7b() : bench::qwen25_7b();
  const int d_latent = llama ? c.d_kv() / 4 : c.d_kv() / 2;
  CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
  const std::size_t before = used_bytes();
  cuda::TrainGraph g(c, d_latent, llama ? 1 : 2);
  optim::AdamWOptions eo;
  eo.lr = 1e-5;
  eo.weight_decay = 0.01;
  optim::RiemannianAdamOptions ro;
  ro.lr = 1e-4;
  cuda::DeviceOptimizer opt(g.stream(), g.blas(), eo, ro);
  std::size_t param_floats = 0;
  for (auto& p : g.params()) {
    opt.add(cuda::DeviceParam{p.name, p.value.data(), p.grad.data(), p.rows, p.cols, p.stiefel});
    param_floats += p.value.size();
  }
  std::vector<std::vector<int>> seqs(static_cast<std::size_t>(a.batch), std::vector<int>(static_cast<std::size_t>(a.seq)));
  unsigned s = 12345;
  for (auto& q : seqs)
    for (auto& t : q) t = static_cast<int>((s = s * 1664525u + 1013904223u) >> 8) % c.vocab_size;
  train::LossOptions lo;
  lo.recon_alpha = a.recon_alpha;
  // Forward FLOPs: every GEMM of the graph (q, original k/v for the targets, down and up
  // projections, o, MLP, head) plus the materialised attention's S and PV as executed (the
  // causal blocks of cuda::train_causal_blocks: 10/16 of n x n at four blocks).
  const double N = static_cast<double>(a.batch) * a.seq, H = c.hidden_size, Dq = c.d_q(), Dkv = c.d_kv(), I = c.intermediate_size;
  const double per_layer = H * Dq + 2 * H * Dkv + 2 * H * d_latent + 2 * d_latent * Dkv + Dq * H + 3 * H * I;
  const auto blocks = cuda::train_causal_blocks(a.seq);
  double score_entries = 0;  // per head and sequence
  for (std::size_t i = 0; i + 1 < blocks.size(); ++i) score_entries += static_cast<double>(blocks[i + 1]) * (blocks[i + 1] - blocks[i]);
  const double fwd_flops =
      2 * N * (c.n_layers * per_layer + H * c.vocab_size) + c.n_layers * 4.0 * c.n_heads * c.head_dim * score_entries * a.batch;
  nlohmann::json out = nlohmann::json::array();
  for (const auto& mode : a.modes)
    for (const bool tuning : a.tunings)
      for (const cuda::FlashKernel fk : a.flash_kernels) {
        g.set_flash_kernel(fk);
        g.set_tf32(mode == "tf32");
        g.set_fused_attention(!a.materialised);
        g.set_side_stream(!a.one_stream);
        g.set_gemm_tuning(tuning);
        g.set_gemm_search(a.gemm_candidates, a.gemm_splitk);
        train::LossParts last;
        auto step = [&] {
          g.zero_grad();
          last = g.forward_backward(seqs, lo, 1.0);
          opt.grad_norm_and_clip(1.0, false);
          opt.step(1e-5, 1e-4);
        };
        for (int i = 0; i < a.warmup; ++i) step();
        cuda::Event e0, e1;
        auto timed = [&](auto&& f) {
          e0.record(g.stream());
          for (int i = 0; i < a.steps; ++i) f();
          e1.record(g.stream());
          e1.synchronize();
          return e1.elapsed_since(e0) / a.steps;
        };
        const double step_ms = timed(step);
        const std::size_t after = used_bytes();
        const double fwd_ms = timed([&] { g.forward_backward(seqs, lo, 0.0); });
        const double fb_ms = timed([&] {
          g.zero_grad();
          g.forward_backward(seqs, lo, 1.0);
        });
        const double opt_ms = timed([&] {
          opt.grad_norm_and_clip(1.0, false);
          opt.step(1e-5, 1e-4);
        });
        if (a.gemm_profile) {
          // One more step (forward + backward) with every graph GEMM timed by CUDA events.
          g.set_gemm_profile(true);
          g.zero_grad();
          g.forward_backward(seqs, lo, 1.0);
          double total = 0, flops = 0;
          std::printf("%-8s %s GEMM profile of one forward + backward (cuBLAS column-major view; attention's batched GEMMs excluded):\n",
                      shape.c_str(), mode.c_str());
          for (const auto& r : g.gemm_profile()) {
            total += r.ms;
            flops += 2.0 * r.m * r.n * static_cast<double>(r.k) * r.calls;
            std::printf("  %c%c m %6d n %6d k %6d beta%s calls %4d  %8.3f ms  %6.1f TFLOP/s  (algo %d tile %d split-K %d)\n", r.ta, r.tb,
                        r.m, r.n, r.k, r.beta0 ? "=0 " : "!=0", r.calls, r.ms, r.tflops(), r.algo_id, r.tile_id, r.splitk);
          }
          std::printf("  total %.2f ms, %.1f TFLOP/s\n", total, flops / (total * 1e9));
          g.set_gemm_profile(false);
        }
        if (a.stage_profile) {
          g.set_stage_profile(true);
          e0.record(g.stream());
          g.zero_grad();
          g.forward_backward(seqs, lo, 1.0);
          e1.record(g.stream());
          e1.synchronize();
          const double whole = e1.elapsed_since(e0);
          const auto rows = g.stage_profile();
          double total = 0;
          for (const auto& r : rows) total += r.ms;
          std::printf(
              "%-8s %s stage profile of one forward + backward (%.2f ms between the first and last mark, %.2f ms the whole call):\n",
              shape.c_str(), mode.c_str(), total, whole);
          for (const auto& r : rows)
            std::printf("  %-28s calls %4d  %8.3f ms  %5.1f%%\n", r.name.c_str(), r.calls, r.ms, 100.0 * r.ms / total);
          g.set_stage_profile(false);
        }
        const double tokens = static_cast<double>(a.batch) * a.seq;
        // The MLP up-projection's shape: (tokens x hidden) x (hidden x intermediate).
        const double sgemm = sgemm_rate(static_cast<int>(I), a.batch * a.seq, static_cast<int>(H), mode == "tf32");
        const double tps = tokens / (step_ms / 1000.0);
        std::printf(
            "%-8s %s%s%s%s%s B=%d T=%d d_latent=%d: step %.1f ms (%.0f tok/s) = fwd+bwd %.1f + optimizer %.1f; forward alone %.1f ms "
            "(step/forward "
            "%.2fx); loss %.4f (lm %.4f, recon %.5f); device memory %.2f GiB (activations %.2f GiB); forward %.1f TFLOP/s, SGEMM %.1f "
            "TFLOP/s\n",
            shape.c_str(), mode.c_str(), tuning ? "" : " (heuristic GEMMs)", g.fused_attention() ? " fused-attn" : "",
            g.fused_attention() ? flash_name(fk) : "", g.side_stream() ? "" : " one-stream", a.batch, a.seq, d_latent, step_ms, tps, fb_ms,
            opt_ms, fwd_ms, step_ms / fwd_ms, last.total, last.lm, last.recon, static_cast<double>(after - before) / (1u << 30),
            static_cast<double>(g.activation_bytes()) / (1u << 30), fwd_flops / (fwd_ms * 1e-3) / 1e12, sgemm);
        std::fflush(stdout);
        out.push_back({{"shape", shape},
                       {"dtype", "float32"},
                       {"batch", a.batch},
                       {"seq", a.seq},
                       {"d_latent", d_latent},
                       {"recon_alpha", a.recon_alpha},
                       {"step_ms", step_ms},
                       {"tokens_per_s", tps},
                       {"forward_backward_ms", fb_ms},
                       {"optimizer_ms", opt_ms},
                       {"forward_ms", fwd_ms},
                       {"device_bytes", after - before},
                       {"activation_bytes", g.activation_bytes()},
                       {"trainable_params", param_floats},
                       {"loss", last.total},
                       {"lm", last.lm},
                       {"recon", last.recon},
                       {"math", mode},
                       {"attention", g.fused_attention() ? "fused" : "materialised"},
                       {"flash_kernel", g.fused_attention() ? flash_name(fk) + 1 : "-"},
                       {"side_stream", g.side_stream()},
                       {"gemm_tuning", tuning},
                       {"forward_tflops", fwd_flops / (fwd_ms * 1e-3) / 1e12},
                       {"sgemm_tflops", sgemm}});
      }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_cuda_train: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--shapes") {
      a.shapes.clear();
      std::stringstream ss(val());
      for (std::string t; std::getline(ss, t, ',');) {
        if (t != "llama2" && t != "qwen25") {
          std::fprintf(stderr, "bench_cuda_train: unknown shape '%s' (llama2, qwen25)\n", t.c_str());
          return 2;
        }
        a.shapes.push_back(t);
      }
    } else if (k == "--modes") {
      a.modes.clear();
      std::stringstream ss(val());
      for (std::string t; std::getline(ss, t, ',');) {
        if (t != "fp32" && t != "tf32") {
          std::fprintf(stderr, "bench_cuda_train: unknown math mode '%s' (fp32, tf32)\n", t.c_str());
          return 2;
        }
        a.modes.push_back(t);
      }
    } else if (k == "--gemm-tuning") {
      const std::string t = val();
      if (t == "on") a.tunings = {true};
      else if (t == "off") a.tunings = {false};
      else if (t == "both") a.tunings = {true, false};
      else {
        std::fprintf(stderr, "bench_cuda_train: --gemm-tuning takes on, off or both, not '%s'\n", t.c_str());
        return 2;
      }
    } else if (k == "--batch") a.batch = std::stoi(val());
    else if (k == "--seq") a.seq = std::stoi(val());
    else if (k == "--steps") a.steps = std::stoi(val());
    else if (k == "--warmup") a.warmup = std::stoi(val());
    else if (k == "--recon-alpha") a.recon_alpha = std::stod(val());
    else if (k == "--json") a.json = val();
    else if (k == "--gemm-profile") a.gemm_profile = true;
    else if (k == "--stage-profile") a.stage_profile = true;
    else if (k == "--gemm-candidates") a.gemm_candidates = std::stoi(val());
    else if (k == "--gemm-splitk") a.gemm_splitk = true;
    else if (k == "--materialised-attention") a.materialised = true;
    else if (k == "--flash-kernels") {
      a.flash_kernels.clear();
      std::stringstream ss(val());
      for (std::string t; std::getline(ss, t, ',');) {
        if (t == "auto") a.flash_kernels.push_back(cuda::FlashKernel::Auto);
        else if (t == "mma") a.flash_kernels.push_back(cuda::FlashKernel::MmaSync);
        else if (t == "wgmma") a.flash_kernels.push_back(cuda::FlashKernel::Wgmma);
        else {
          std::fprintf(stderr, "bench_cuda_train: --flash-kernels takes auto, mma or wgmma (comma-separated), not '%s'\n", t.c_str());
          return 2;
        }
      }
    } else if (k == "--one-stream") a.one_stream = true;
    else {
      std::fprintf(stderr,
                   "usage: bench_cuda_train [--shapes llama2,qwen25] [--batch 4] [--seq 512] [--steps 5] [--warmup 2] [--recon-alpha 0.3] "
                   "[--modes fp32,tf32] [--gemm-tuning on|off|both] [--gemm-profile] [--stage-profile] [--gemm-candidates N] "
                   "[--gemm-splitk] [--materialised-attention] [--flash-kernels auto|mma|wgmma[,...]] [--one-stream] [--json PATH]\n");
      return 2;
    }
  }
  if (a.batch < 1 || a.seq < 2 || a.steps < 1 || a.warmup < 0 || a.modes.empty()) {
    std::fprintf(stderr, "bench_cuda_train: --batch >= 1, --seq >= 2, --steps >= 1, --warmup >= 0\n");
    return 2;
  }
  try {
    cudaDeviceProp prop{};
    CACHESHRINK_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& s : a.shapes)
      for (auto& r : run(s, a)) rows.push_back(r);
    if (!a.json.empty()) {
      std::ofstream f(a.json);
      f << nlohmann::json{{"device", prop.name}, {"rows", rows}}.dump(2) << "\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_train: %s\n", e.what());
    return 1;
  }
  return 0;
}

// Google Benchmark suite of the CUDA backend's kernels, each against a baseline timed in the
// same run (CUDA events, manual time; the reported time is ours):
//   BM_FlashAttention/<shape>/<k>  the bf16 flash prefill kernels at 7B head shapes (k = 0: mma.sync,
//                              1: wgmma, sm_90a builds on Hopper only); counters: TFLOP/s
//                              (causal pairs) and its fraction of cuBLAS's bf16 GEMM rate on this
//                              card (8192^3, measured once per run): the roofline in issue 8's sense.
//   BM_TrainGemm/<shape>       cuda::TunedGemm (cublasLt, timed kernel choice, TF32) on the Qwen2.5-7B
//                              training graph's GEMM shapes vs cublasSgemm in TF32 math on the same
//                              operands; counters: TFLOP/s of both and speedup = cublasSgemm / ours.
// Needs a GPU (exits with a message otherwise). Run: bench_cuda_kernels [--benchmark_format=json].
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <cacheshrink/backend/cuda/tuned_gemm.cuh>
#include <cstdio>
#include <tuple>
#include <vector>

#include "flash_case.cuh"

using namespace cacheshrink;

namespace {

/// Times `f` (enqueued on `s`) with CUDA events: mean ms over `reps` calls.
template <class F>
double time_ms(cudaStream_t s, int reps, F&& f) {
  cuda::Event e0, e1;
  e0.record(s);
  for (int i = 0; i < reps; ++i) f();
  e1.record(s);
  e1.synchronize();
  return e1.elapsed_since(e0) / reps;
}

/// cuBLAS bf16 GEMM rate (float32 accumulation) at 8192^3 on this card, TFLOP/s (best of 5).
double bf16_gemm_rate() {
  static const double rate = [] {
    const int n = 8192;
    cuda::Stream st;
    cuda::CublasHandle h(st.get());
    cuda::DeviceBuffer<__nv_bfloat16> A(static_cast<std::size_t>(n) * n), B(A.size()), C(A.size());
    cuda::fill_uniform(A.data(), static_cast<long long>(A.size()), 1, 1.0f, st.get());
    cuda::fill_uniform(B.data(), static_cast<long long>(B.size()), 2, 1.0f, st.get());
    const float one = 1.0f, zero = 0.0f;
    auto run = [&] {
      CACHESHRINK_CUBLAS_CHECK(cublasGemmEx(h.get(), CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, A.data(), CUDA_R_16BF, n, B.data(), CUDA_R_16BF, n,
                                            &zero, C.data(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    };
    run();
    double best = 1e30;
    for (int r = 0; r < 5; ++r) best = std::min(best, time_ms(st.get(), 3, run));
    return 2.0 * n * n * static_cast<double>(n) / (best * 1e9);
  }();
  return rate;
}

// (n_heads, n_kv_heads, seq_len, batch), head_dim 128: LLaMA-2-7B and Qwen2.5-7B attention.
const std::vector<std::tuple<int, int, int, int>> kAttnShapes = {{32, 32, 1024, 4}, {32, 32, 4096, 1}, {28, 4, 4096, 1}};

void BM_FlashAttention(benchmark::State& state) {
  const auto [nh, nkv, T, B] = kAttnShapes[static_cast<std::size_t>(state.range(0))];
  const auto kind = state.range(1) == 0 ? cuda::FlashKernel::MmaSync : cuda::FlashKernel::Wgmma;
  if (kind == cuda::FlashKernel::Wgmma && !cuda::wgmma_available()) {
    state.SkipWithError("no sm_90a code for this device");
    return;
  }
  cuda::Stream st;
  bench::FlashCase fc(nh, nkv, T, B, st.get());
  auto run = [&] { fc.run(st.get(), kind); };
  run();
  const double flops = fc.flops();
  double total = 0;
  for (auto _ : state) {
    const double ms = time_ms(st.get(), 5, run);
    state.SetIterationTime(ms * 1e-3);
    total += ms;
  }
  const double tflops = flops / (total / static_cast<double>(state.iterations()) * 1e9);
  state.counters["TFLOPs"] = tflops;
  state.counters["of_bf16_gemm"] = tflops / bf16_gemm_rate();
  state.SetLabel(std::string(kind == cuda::FlashKernel::Wgmma ? "wgmma" : "mma.sync") + " nh " + std::to_string(nh) + " nkv " + std::to_string(nkv) + " " +
                 std::to_string(B) + "x" + std::to_string(T));
}

// Column-major (cuBLAS view) GEMMs of one Qwen2.5-7B training step (bench_cuda_train --gemm-profile),
// tokens = 2048: (ta, tb, m, n, k).
const std::vector<std::tuple<cublasOperation_t, cublasOperation_t, int, int, int>> kGemmShapes = {
    {CUBLAS_OP_T, CUBLAS_OP_N, 37888, 2048, 3584},  // gate/up forward
    {CUBLAS_OP_N, CUBLAS_OP_N, 3584, 2048, 37888},  // gate/up input gradient
    {CUBLAS_OP_T, CUBLAS_OP_N, 3584, 2048, 18944},  // down projection forward
    {CUBLAS_OP_N, CUBLAS_OP_N, 18944, 2048, 3584},  // MLP activation gradient
    {CUBLAS_OP_T, CUBLAS_OP_N, 4096, 2048, 3584},   // stacked q + latents forward
    {CUBLAS_OP_N, CUBLAS_OP_T, 3584, 512, 2048},    // stacked down projections' weight gradient
};

void BM_TrainGemm(benchmark::State& state) {
  const auto [ta, tb, m, n, k] = kGemmShapes[static_cast<std::size_t>(state.range(0))];
  const int lda = ta == CUBLAS_OP_N ? m : k, ldb = tb == CUBLAS_OP_N ? k : n;
  cuda::Stream st;
  cuda::CublasHandle h(st.get());
  CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(h.get(), CUBLAS_TF32_TENSOR_OP_MATH));
  cuda::TunedGemm tg(st.get(), h.get());
  tg.set_tf32(true);
  tg.set_tuning(true);
  cuda::DeviceBuffer<float> A(static_cast<std::size_t>(m) * k), B(static_cast<std::size_t>(k) * n), C(static_cast<std::size_t>(m) * n);
  cuda::fill_uniform<float>(A.data(), static_cast<long long>(A.size()), 1, 1.0f, st.get());
  cuda::fill_uniform<float>(B.data(), static_cast<long long>(B.size()), 2, 1.0f, st.get());
  const float one = 1.0f, zero = 0.0f;
  auto ours = [&] { tg.gemm(ta, tb, m, n, k, 1.0f, A.data(), lda, B.data(), ldb, 0.0f, C.data(), m); };
  auto base = [&] {
    CACHESHRINK_CUBLAS_CHECK(cublasSgemm(h.get(), ta, tb, m, n, k, &one, A.data(), lda, B.data(), ldb, &zero, C.data(), m));
  };
  ours();  // plans (and times the candidates) once
  base();
  double t_ours = 0, t_base = 0;
  for (auto _ : state) {
    const double a = time_ms(st.get(), 3, ours), b = time_ms(st.get(), 3, base);
    state.SetIterationTime(a * 1e-3);
    t_ours += a;
    t_base += b;
  }
  const double flops = 2.0 * m * n * static_cast<double>(k), it = static_cast<double>(state.iterations());
  state.counters["TFLOPs"] = flops / (t_ours / it * 1e9);
  state.counters["cublasSgemm_TFLOPs"] = flops / (t_base / it * 1e9);
  state.counters["speedup"] = t_base / t_ours;
  state.SetLabel(std::string(ta == CUBLAS_OP_N ? "N" : "T") + (tb == CUBLAS_OP_N ? "N" : "T") + " m " + std::to_string(m) + " n " +
                 std::to_string(n) + " k " + std::to_string(k));
}

BENCHMARK(BM_FlashAttention)
    ->ArgsProduct({benchmark::CreateDenseRange(0, static_cast<int>(kAttnShapes.size()) - 1, 1), {0, 1}})
    ->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TrainGemm)->DenseRange(0, static_cast<int>(kGemmShapes.size()) - 1)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_cuda_kernels: no CUDA device\n");
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

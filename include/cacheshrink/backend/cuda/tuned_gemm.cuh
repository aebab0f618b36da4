#pragma once
// cuda::TunedGemm: float32 column-major GEMMs (cublasSgemm's contract) through cublasLt, with
// the kernel of every distinct GEMM chosen by timing.
//
// cuBLAS picks one kernel per shape from its heuristics; for some of the training graph's shapes
// that pick is measurably slower than another candidate of the same heuristic list (issue #8).
// The first call of a shape (operations, m, n, k, leading dimensions, beta = 0 or not, math mode,
// pointer alignment) asks cublasLt for up to kCandidates algorithms, runs each once to warm up
// and kReps times under CUDA events, and keeps the fastest; later calls of that shape reuse it.
// Candidates are timed on the real inputs; the output goes to C when beta = 0 (the real call
// overwrites it afterwards) and to a scratch buffer otherwise, so tuning never changes a result.
// Only deterministic reductions are allowed (no atomics), so a chosen kernel gives the same bits
// on every call; the choice itself depends on timings, so two processes may pick different
// kernels (results then differ by float32 rounding; a gradient that is itself rounding-level,
// like test_cuda_train's reconstruction-only W_down, moved by 2e-3 relative between two runs).
// Tuning is therefore opt-in: by default (set_tuning(false)) each shape takes the heuristic's
// first choice, as cublasSgemm would, and a run is reproducible.
//
// Math mode: strict float32 (CUBLAS_COMPUTE_32F) or TF32 tensor cores
// (CUBLAS_COMPUTE_32F_FAST_TF32: inputs rounded to 10 mantissa bits, float32 accumulation).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/backend/cuda/memory.cuh"

namespace cacheshrink::cuda {

class TunedGemm {
 public:
  static constexpr int kCandidates = 8, kReps = 3;
  static constexpr std::size_t kWorkspaceBytes = std::size_t{32} << 20;

  /// `fallback` (cuBLAS on the same stream) handles the degenerate k = 0 case.
  TunedGemm(cudaStream_t s, cublasHandle_t fallback) : s_(s), fallback_(fallback) {
    CACHESHRINK_CUBLAS_CHECK(cublasLtCreate(&lt_));
    workspace_.resize(kWorkspaceBytes);
  }
  TunedGemm(const TunedGemm&) = delete;
  TunedGemm& operator=(const TunedGemm&) = delete;
  ~TunedGemm() {
    drop_profile();
    for (auto& [key, e] : plans_) release(e);
    if (lt_) (void)cublasLtDestroy(lt_);
  }

  void set_tf32(bool on) { tf32_ = on; }
  bool tf32() const { return tf32_; }
  /// Time the heuristic's candidates on a shape's first call (on) or take its first choice (off, the default).
  void set_tuning(bool on) { tune_ = on; }
  bool tuning() const { return tune_; }
  /// How wide tuning searches: the heuristic's first `candidates` algorithms (1..64; default
  /// kCandidates) and, with `splitk`, split-K variants (2-8 slices, deterministic reductions) of the
  /// first four of them. Only affects shapes planned after the call.
  void set_search(int candidates, bool splitk) {
    if (candidates < 1 || candidates > 64) throw InvalidArgument("TunedGemm::set_search: candidates must be in [1, 64]");
    candidates_ = candidates;
    splitk_ = splitk;
  }
  /// Distinct shapes planned so far.
  std::size_t planned() const { return plans_.size(); }

  /// Profiling: while on, every call is bracketed by CUDA events (a diagnostic; it adds a little
  /// launch overhead). profile() synchronises the stream and returns each shape's calls and total
  /// time since the last profile() or set_profile(true), slowest first.
  struct ProfileRow {
    char ta, tb;
    int m, n, k;
    bool beta0;
    int algo_id, tile_id, splitk;  // the chosen cublasLt algorithm and configuration
    int calls;
    double ms;
    double tflops() const { return ms > 0 ? 2.0 * m * n * static_cast<double>(k) * calls / (ms * 1e9) : 0.0; }
  };
  void set_profile(bool on) {
    drop_profile();
    profile_ = on;
  }
  std::vector<ProfileRow> profile() {
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s_));
    std::map<Key, ProfileRow> rows;
    for (const auto& [key, t0, t1] : pending_) {
      float ms = 0.0f;
      CACHESHRINK_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
      const auto [ta, tb, m, n, k, lda, ldb, ldc, beta0, tf32, align, search, oop] = key;
      const Plan& p = plans_.at(key);
      auto [it, fresh] = rows.try_emplace(key, ProfileRow{ta == CUBLAS_OP_N ? 'N' : 'T', tb == CUBLAS_OP_N ? 'N' : 'T', m, n, k, beta0,
                                                          config(p.algo, CUBLASLT_ALGO_CONFIG_ID), config(p.algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                                                          config(p.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM), 0, 0.0});
      ++it->second.calls;
      it->second.ms += ms;
    }
    drop_profile();
    std::vector<ProfileRow> out;
    for (auto& [key, r] : rows) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const ProfileRow& a, const ProfileRow& b) { return a.ms > b.ms; });
    return out;
  }

  /// C (m, n; ldc) = alpha op(A) op(B) + beta C, column-major float32.
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) {
    gemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, C);
  }
  /// D (m, n; ldc) = alpha op(A) op(B) + beta C: the result goes to D (same leading dimension as
  /// C), C is only read; D == C is the in-place call above. Saves a copy of C when it must survive.
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, const float* C, int ldc, float* D) {
    if (m == 0 || n == 0) return;
    if (k == 0 || (beta == 0.0f && C != D)) {
      if (C != D && beta != 0.0f)
        CACHESHRINK_CUDA_CHECK(cudaMemcpy2DAsync(D, static_cast<std::size_t>(ldc) * sizeof(float), C, static_cast<std::size_t>(ldc) * sizeof(float),
                                                 static_cast<std::size_t>(m) * sizeof(float), static_cast<std::size_t>(n), cudaMemcpyDeviceToDevice, s_));
      if (k == 0) {
        CACHESHRINK_CUBLAS_CHECK(cublasSgemm(fallback_, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, D, ldc));
        return;
      }
      C = D;  // beta = 0: C is not read
    }
    const bool oop = C != D;
    const auto bits = reinterpret_cast<std::uintptr_t>(A) | reinterpret_cast<std::uintptr_t>(B) | reinterpret_cast<std::uintptr_t>(C) |
                      reinterpret_cast<std::uintptr_t>(D);
    unsigned align = 256;
    while (align > 4 && bits % align != 0) align /= 2;
    const Key key{static_cast<int>(ta), static_cast<int>(tb), m, n, k, lda, ldb, ldc, beta == 0.0f, tf32_, align,
                  tune_ ? candidates_ * 2 + static_cast<int>(splitk_) : 0, oop};
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, plan(key, alpha, A, B, beta, D)).first;
    const Plan& p = it->second;
    cudaEvent_t t0 = nullptr, t1 = nullptr;
    if (profile_) {
      CACHESHRINK_CUDA_CHECK(cudaEventCreate(&t0));
      CACHESHRINK_CUDA_CHECK(cudaEventCreate(&t1));
      pending_.emplace_back(key, t0, t1);
      CACHESHRINK_CUDA_CHECK(cudaEventRecord(t0, s_));
    }
    CACHESHRINK_CUBLAS_CHECK(
        cublasLtMatmul(lt_, p.op, &alpha, A, p.a, B, p.b, &beta, C, p.c, D, p.c, &p.algo, workspace_.data(), kWorkspaceBytes, s_));
    if (profile_) CACHESHRINK_CUDA_CHECK(cudaEventRecord(t1, s_));
  }

 private:
  // ..., search (0 = untuned), out of place (D != C)
  using Key = std::tuple<int, int, int, int, int, int, int, int, bool, bool, unsigned, int, bool>;
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };

  static int config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
    std::uint32_t v = 0;  // every configuration attribute we read is 32-bit (uint32 or int32)
    std::size_t written = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written) != CUBLAS_STATUS_SUCCESS) return -1;
    return static_cast<int>(v);
  }

  void drop_profile() {
    for (auto& [key, t0, t1] : pending_) {
      (void)cudaEventDestroy(t0);
      (void)cudaEventDestroy(t1);
    }
    pending_.clear();
  }

  static void release(Plan& p) {
    if (p.a) (void)cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) (void)cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) (void)cublasLtMatrixLayoutDestroy(p.c);
    if (p.op) (void)cublasLtMatmulDescDestroy(p.op);
  }

  Plan plan(const Key& key, float alpha, const float* A, const float* B, float beta, float* C) {
    const auto [ta_i, tb_i, m, n, k, lda, ldb, ldc, beta0, tf32, align, search, oop] = key;
    const bool tune = search != 0;
    const auto ta = static_cast<cublasOperation_t>(ta_i), tb = static_cast<cublasOperation_t>(tb_i);
    Plan p;
    struct Guard {  // releases the descriptors if planning throws
      Plan* p;
      ~Guard() {
        if (p) release(*p);
      }
    } guard{&p};
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    const bool na = ta == CUBLAS_OP_N, nb = tb == CUBLAS_OP_N;
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_32F, na ? m : k, na ? k : m, lda));
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_32F, nb ? k : n, nb ? n : k, ldb));
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, m, n, ldc));

    cublasLtMatmulPreference_t pref = nullptr;
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    struct PrefGuard {
      cublasLtMatmulPreference_t p;
      ~PrefGuard() { (void)cublasLtMatmulPreferenceDestroy(p); }
    } pref_guard{pref};
    const std::size_t ws = kWorkspaceBytes;
    const std::uint32_t al = align, reductions = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_INPLACE |
                                                 CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions, sizeof(reductions)));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      CACHESHRINK_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al)));
    // Up to 64 heuristic candidates, then up to 4 x 5 x 2 split-K variants.
    cublasLtMatmulHeuristicResult_t results[64 + 40];
    int found = 0;
    const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt_, p.op, p.a, p.b, p.c, p.c, pref, tune ? search / 2 : (oop ? 8 : 1), results, &found);
    if (hs != CUBLAS_STATUS_SUCCESS || found == 0)
      throw CudaError("cublasLt: no algorithm for the float32 GEMM m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                      std::to_string(k) + " (status " + std::to_string(static_cast<int>(hs)) + ")");
    std::size_t count = 0;
    for (int i = 0; i < found; ++i) {  // an out-of-place call needs an algorithm that can write D != C
      std::int32_t cap = 1;
      std::size_t written = 0;
      if (oop && (cublasLtMatmulAlgoCapGetAttribute(&results[i].algo, CUBLASLT_ALGO_CAP_OUT_OF_PLACE_RESULT_SUPPORT, &cap, sizeof(cap),
                                                    &written) != CUBLAS_STATUS_SUCCESS ||
                  cap == 0))
        continue;
      results[count++] = results[i];
    }
    if (count == 0)
      throw CudaError("cublasLt: no out-of-place algorithm for the float32 GEMM m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                      std::to_string(k));
    p.algo = results[0].algo;
    if (tune && (search & 1)) {
      // Split-K variants of the first four candidates: the K range cut into s slices whose partial
      // products are summed in a fixed order (in place with sequencing counters, or in workspace).
      const std::size_t base = std::min<std::size_t>(count, 4);
      for (std::size_t i = 0; i < base; ++i) {
        std::int32_t cap = 0;
        std::size_t written = 0;
        if (results[i].state != CUBLAS_STATUS_SUCCESS ||
            cublasLtMatmulAlgoCapGetAttribute(&results[i].algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &cap, sizeof(cap), &written) !=
                CUBLAS_STATUS_SUCCESS ||
            cap == 0)
          continue;
        for (std::uint32_t slices : {2u, 3u, 4u, 6u, 8u})
          for (std::uint32_t scheme : {CUBLASLT_REDUCTION_SCHEME_INPLACE, CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE}) {
            cublasLtMatmulHeuristicResult_t v = results[i];
            if (cublasLtMatmulAlgoConfigSetAttribute(&v.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &slices, sizeof(slices)) != CUBLAS_STATUS_SUCCESS ||
                cublasLtMatmulAlgoConfigSetAttribute(&v.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) !=
                    CUBLAS_STATUS_SUCCESS ||
                cublasLtMatmulAlgoCheck(lt_, p.op, p.a, p.b, p.c, p.c, &v.algo, &v) != CUBLAS_STATUS_SUCCESS || v.workspaceSize > ws)
              continue;
            v.state = CUBLAS_STATUS_SUCCESS;
            results[count++] = v;
          }
      }
    }
    if (tune && count > 1) {
      // Time on the real inputs; beta != 0 writes into scratch so C keeps its contents.
      float* out = C;
      if (!beta0) {
        scratch_.reserve(static_cast<std::size_t>(ldc) * n);
        out = scratch_.data();
      }
      cudaEvent_t t0 = nullptr, t1 = nullptr;
      CACHESHRINK_CUDA_CHECK(cudaEventCreate(&t0));
      CACHESHRINK_CUDA_CHECK(cudaEventCreate(&t1));
      struct EventGuard {
        cudaEvent_t a, b;
        ~EventGuard() {
          (void)cudaEventDestroy(a);
          (void)cudaEventDestroy(b);
        }
      } events{t0, t1};
      float best = -1.0f;
      for (std::size_t i = 0; i < count; ++i) {
        if (results[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const auto run = [&] {
          return cublasLtMatmul(lt_, p.op, &alpha, A, p.a, B, p.b, &beta, out, p.c, out, p.c, &results[i].algo, workspace_.data(),
                                kWorkspaceBytes, s_);
        };
        if (run() != CUBLAS_STATUS_SUCCESS) continue;  // a candidate that cannot run this call is skipped
        CACHESHRINK_CUDA_CHECK(cudaEventRecord(t0, s_));
        for (int r = 0; r < kReps; ++r) CACHESHRINK_CUBLAS_CHECK(run());
        CACHESHRINK_CUDA_CHECK(cudaEventRecord(t1, s_));
        CACHESHRINK_CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0.0f;
        CACHESHRINK_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        if (best < 0.0f || ms < best) {
          best = ms;
          p.algo = results[i].algo;
        }
      }
    }
    guard.p = nullptr;
    return p;
  }

  cudaStream_t s_;
  cublasHandle_t fallback_;
  cublasLtHandle_t lt_ = nullptr;
  bool tf32_ = false, tune_ = false, profile_ = false, splitk_ = false;
  int candidates_ = kCandidates;
  std::vector<std::tuple<Key, cudaEvent_t, cudaEvent_t>> pending_;  // profiled calls not yet reported
  DeviceBuffer<unsigned char> workspace_;
  DeviceBuffer<float> scratch_;
  std::map<Key, Plan> plans_;
};

}  // namespace cacheshrink::cuda

#pragma once
// Transformer<Kind, Cuda>: the forward pass of every supported family on one GPU.
//
// Same semantics as the CPU reference (model/transformer.hpp): packed sequences, norms,
// RoPE (half-split, HF float32 inv_freq; the cos/sin table is computed on the host by the
// CPU code), GQA through kv_head = h / group, sliding window, Qwen3 q/k-norm before RoPE,
// GPT-2 GELU(tanh) + learned positions, MLA layers (K/V rebuilt from the latents).
//
// Two precisions (chosen at construction, weights uploaded once):
//  - Float32: float weights and activations, cublasSgemm, float attention (parity mode).
//  - BFloat16: bf16 weights and GEMM inputs, float32 accumulation (cublasGemmEx), tensor-core
//    attention; the residual stream, norms and softmax stay float.
// Projections are fused: [Wq; Wk; Wv] is one (Dq + 2 Dkv, H) GEMM and [Wgate; Wup] one
// (2I, H) GEMM; the output projections accumulate straight into the float residual (beta = 1).
//
// Decode (one token per sequence per step) runs against a cuda::DeviceKvCache: standard layers
// cache K and V; MLA layers cache the latents and either rebuild K/V for the whole cache every
// step (LatentDecode::Rebuild, the original package's way) or attend on the latents with W_uk
// absorbed into the query and W_uv into the output (LatentDecode::Absorbed; layers where no
// RoPE or k-norm sits between latent and key). decode.cuh has the kernels.
// Not yet on the GPU: the packed forward with a cache (use decode), the CPU ForwardHooks (the
// calibration hook is attention_inputs).
#include <cuda_bf16.h>

#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cacheshrink/backend/cpu/cpu.hpp"
#include "cacheshrink/backend/cuda/attention.cuh"
#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/decode.cuh"
#include "cacheshrink/backend/cuda/gemm.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/core/progress.hpp"
#include "cacheshrink/model/generate.hpp"
#include "cacheshrink/model/transformer.hpp"
#include "cacheshrink/pipeline/evaluate.hpp"

namespace cacheshrink {

/// Backend tag: cuBLAS + own kernels on one CUDA device.
struct Cuda {
  static constexpr const char* name = "cuda";
};

}  // namespace cacheshrink

namespace cacheshrink::cuda {

enum class Precision { Float32, BFloat16 };

inline const char* precision_name(Precision p) { return p == Precision::Float32 ? "float32" : "bf16"; }

struct Options {
  Precision precision = Precision::Float32;
  int device = 0;
  std::size_t upload_chunk = std::size_t(16) << 20;  // floats per pinned staging buffer (x2) for the weight upload
};

/// Random weights generated on the device (benchmarks with real 7B shapes, no files):
/// matrices uniform(-a, a) with a = sqrt(3) * stddev, norm weights 1, biases 0.
struct RandomWeights {
  unsigned long long seed = 1;
  float stddev = 0.02f;
  int mla_d_latent = 0;  // > 0: every layer is an MLA layer (separate K/V latents of this width)
};

/// A weight tensor in the model's compute precision (only one member is filled).
struct DevTensor {
  DeviceBuffer<float> f;
  DeviceBuffer<__nv_bfloat16> b;
  std::size_t size() const { return f.size() + b.size(); }
  template <class T>
  const T* ptr() const {
    if constexpr (std::is_same_v<T, float>) return f.data();
    else return b.data();
  }
};

/// How MLA layers decode from their latent cache.
enum class LatentDecode {
  Rebuild,   // K~ = C_k W_uk^T, V~ = C_v W_uv^T for every cached token, every step
  Absorbed,  // attention on the latents (needs no RoPE / k-norm between latent and key)
};

inline const char* latent_decode_name(LatentDecode m) { return m == LatentDecode::Rebuild ? "rebuild" : "absorbed"; }

/// A KV cache on the device, made by Transformer<Kind, Cuda>::make_cache. Per layer one
/// buffer `a` [batch][capacity][width_a] and, for standard layers, `b` for V:
/// standard layers: a = K (after RoPE / k-norm), b = V, width n_kv * head_dim;
/// MLA layers: a = [c_k | c_v] (joint: c), width 2 d_latent (joint: d_latent); b empty.
/// Elements are the model's compute precision (float or bf16). Capacity is rounded up to a
/// multiple of 16 and the buffers are zero-filled (the tensor-core kernel reads whole tiles).
struct DeviceKvCache {
  struct Layer {
    DevTensor a, b;
    int width_a = 0, width_b = 0;
    bool latent = false;
  };
  int batch = 0, capacity = 0;
  LatentDecode mode = LatentDecode::Absorbed;
  std::vector<int> len;  // tokens held per sequence (host copy)
  std::vector<Layer> layers;
  /// Bytes per cached token summed over layers (the KV-cache formula).
  std::size_t bytes_per_token() const {
    std::size_t n = 0;
    for (const auto& L : layers) n += static_cast<std::size_t>(L.width_a + L.width_b) * (L.a.f.size() ? 4 : 2);
    return n;
  }
  std::size_t allocated_bytes() const {
    std::size_t n = 0;
    for (const auto& L : layers) n += L.a.f.size() * 4 + L.a.b.size() * 2 + L.b.f.size() * 4 + L.b.b.size() * 2;
    return n;
  }
  void reset() { std::fill(len.begin(), len.end(), 0); }
};

}  // namespace cacheshrink::cuda

namespace cacheshrink::model {

template <AttentionKind Kind>
class Transformer<Kind, Cuda> {
 public:
  using Precision = cuda::Precision;

  /// Uploads the weights of `m` once. `m` must outlive nothing: everything is copied.
  explicit Transformer(const Model& m, cuda::Options opt = {}) : c_(m.config), opt_(opt) {
    check_attention_kind<Kind>(c_);
    init_device();
    upload(m.weights);
  }

  /// A model of config `c` with random weights made on the device (benchmarks).
  Transformer(const ModelConfig& c, cuda::RandomWeights rw, cuda::Options opt = {}) : c_(c), opt_(opt) {
    check_attention_kind<Kind>(c_);
    init_device();
    randomize(rw);
  }

  const ModelConfig& config() const { return c_; }
  Precision precision() const { return opt_.precision; }
  cudaStream_t stream() const { return stream_->get(); }

  /// Logits on the host, like the CPU Transformer: All -> one row per packed token; Last ->
  /// one row per sequence; None -> empty. `cache` must be nullptr (the GPU's cache is
  /// cuda::DeviceKvCache: make_cache, prefill, decode).
  MatrixRf forward(std::span<const std::vector<int>> seqs, KvCache* cache = nullptr, const ForwardOptions& opt = {}) {
    if (cache != nullptr)
      throw InvalidArgument("Transformer<Cuda>::forward: the host KV-cache is the CPU's; on the GPU use make_cache, prefill and decode "
                            "(cuda::DeviceKvCache), and pass cache = nullptr here");
    if (opt.hooks != nullptr || opt.stop_after_attn_input >= 0)
      throw InvalidArgument("Transformer<Cuda>::forward: hooks and stop_after_attn_input are CPU-only");
    prepare(seqs, nullptr);
    if (opt_.precision == Precision::BFloat16) run_layers<__nv_bfloat16>();
    else run_layers<float>();
    if (opt.logits == LogitsFor::None) {
      stream_->synchronize();
      return {};
    }
    const int B = static_cast<int>(seqs.size()), V = c_.vocab_size;
    const bool last = opt.logits == LogitsFor::Last;
    const int rows = last ? B : n_;
    logits_.reserve(static_cast<std::size_t>(rows) * V);
    if (opt_.precision == Precision::BFloat16) head<__nv_bfloat16>(last);
    else head<float>(last);
    MatrixRf out(rows, V);
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(out.data(), logits_.data(), sizeof(float) * rows * V, cudaMemcpyDeviceToHost, st()));
    stream_->synchronize();
    return out;
  }
  MatrixRf forward(const std::vector<int>& ids, KvCache* cache = nullptr, const ForwardOptions& opt = {}) {
    return forward(std::span<const std::vector<int>>(&ids, 1), cache, opt);
  }

  /// Calibration: runs the packed forward over `seqs` and calls fn(layer, h, rows) with each
  /// layer's attention input (the output of its input norm) on the device: (rows x hidden),
  /// row-major, element type float in Float32 mode and __nv_bfloat16 in BFloat16 mode, valid
  /// during the call and ordered on stream(). Stops after layer `last_layer` (-1: all layers);
  /// computes no logits.
  using AttnInputFn = std::function<void(int layer, const void* h, int rows)>;
  void attention_inputs(std::span<const std::vector<int>> seqs, const AttnInputFn& fn, int last_layer = -1) {
    if (last_layer >= c_.n_layers)
      throw InvalidArgument("Transformer<Cuda>::attention_inputs: last_layer " + std::to_string(last_layer) + " >= n_layers " +
                            std::to_string(c_.n_layers));
    prepare(seqs, nullptr);
    attn_hook_ = &fn;
    stop_after_ = last_layer;
    try {
      if (opt_.precision == Precision::BFloat16) run_layers<__nv_bfloat16>();
      else run_layers<float>();
    } catch (...) {
      attn_hook_ = nullptr;
      stop_after_ = -1;
      throw;
    }
    attn_hook_ = nullptr;
    stop_after_ = -1;
  }

  /// Negative log-likelihood on the device: position t of sequence s predicts token t + 1
  /// when t + 1 >= first_target[s] (first_target empty: every t + 1 >= 1). Returns the sum of
  /// the scored NLLs (accumulated in double on the host) and how many were scored. Only
  /// per-token NLLs leave the GPU, never the (tokens, vocab) logits.
  std::pair<double, long long> nll(std::span<const std::vector<int>> seqs, std::span<const int> first_target = {}) {
    prepare(seqs, &first_target);
    if (opt_.precision == Precision::BFloat16) {
      run_layers<__nv_bfloat16>();
      head<__nv_bfloat16>(false, true);
    } else {
      run_layers<float>();
      head<float>(false, true);
    }
    std::vector<float> v(static_cast<std::size_t>(n_));
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(v.data(), tok_nll_.data(), sizeof(float) * n_, cudaMemcpyDeviceToHost, st()));
    stream_->synchronize();
    double s = 0;
    for (int i = 0; i < n_; ++i)
      if (targets_host_[i] >= 0) s += v[i];
    return {s, scored_};
  }

  /// A device KV cache for `batch` sequences of up to `capacity` tokens (see DeviceKvCache).
  /// mode = Absorbed requires every MLA layer to be absorbable (no RoPE, no k-norm, not
  /// decoupled_rope); Rebuild takes every layer kind.
  cuda::DeviceKvCache make_cache(int batch, int capacity, cuda::LatentDecode mode = cuda::LatentDecode::Absorbed) {
    if (batch < 1) throw InvalidArgument("make_cache: batch must be >= 1 (got " + std::to_string(batch) + ")");
    if (capacity < 1) throw InvalidArgument("make_cache: capacity must be >= 1 (got " + std::to_string(capacity) + ")");
    if (c_.family == Family::Gpt2 && capacity > c_.max_position)
      throw InvalidArgument("make_cache: capacity " + std::to_string(capacity) + " exceeds max_position_embeddings " + std::to_string(c_.max_position));
    cuda::DeviceKvCache kc;
    kc.batch = batch;
    kc.capacity = (capacity + 15) / 16 * 16;
    kc.mode = mode;
    kc.len.assign(static_cast<std::size_t>(batch), 0);
    kc.layers.resize(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      DevLayer& L = layers_[l];
      auto& C = kc.layers[l];
      C.latent = L.mla;
      if (L.mla) {
        if (L.d_rope > 0 && mode == cuda::LatentDecode::Absorbed)
          throw InvalidArgument("make_cache: layer " + std::to_string(l) +
                                " is a decoupled_rope MLA layer, which decodes on rebuilt keys only; use cuda::LatentDecode::Rebuild");
        if (mode == cuda::LatentDecode::Absorbed && (c_.uses_rope() || !L.k_norm.empty()))
          throw InvalidArgument("make_cache: layer " + std::to_string(l) + " cannot decode on absorbed latents: " +
                                (c_.uses_rope() ? "RoPE rotates the reconstructed keys" : "a k-norm follows the reconstruction") +
                                "; use cuda::LatentDecode::Rebuild");
        if (mode == cuda::LatentDecode::Absorbed && c_.n_heads != c_.n_kv_heads && L.w_uk_q.size() == 0) {
          repeat_per_query_head(L.w_uk, L.w_uk_q, L.d_latent);
          repeat_per_query_head(L.w_uv, L.w_uv_q, L.d_latent);
        }
        C.width_a = L.latent_width();
      } else {
        C.width_a = C.width_b = c_.d_kv();
      }
      alloc_zero(C.a, static_cast<std::size_t>(batch) * kc.capacity * C.width_a);
      if (C.width_b) alloc_zero(C.b, static_cast<std::size_t>(batch) * kc.capacity * C.width_b);
    }
    stream_->synchronize();
    return kc;
  }

  /// Benchmarks: fills every cache row with uniform(-a, a) values and sets every sequence's
  /// length to `len` (the decode cost does not depend on the values).
  void fill_cache_random(cuda::DeviceKvCache& kc, int len, unsigned long long seed = 7, float a = 1.0f) {
    if (len < 0 || len >= kc.capacity) throw InvalidArgument("fill_cache_random: len must be in [0, capacity)");
    for (auto& C : kc.layers)
      for (cuda::DevTensor* t : {&C.a, &C.b}) {
        if (t->b.size()) cuda::fill_uniform(t->b.data(), static_cast<long long>(t->b.size()), seed++, a, st());
        if (t->f.size()) cuda::fill_uniform(t->f.data(), static_cast<long long>(t->f.size()), seed++, a, st());
      }
    std::fill(kc.len.begin(), kc.len.end(), len);
    stream_->synchronize();
  }

  /// Fills an empty device cache with the prompts in one packed forward (the rows decode would
  /// have appended token by token) and returns each sequence's last-token logits (batch x vocab);
  /// decode() continues from there. seqs.size() == kc.batch, every sequence non-empty and at most
  /// kc.capacity tokens, every slot of the cache empty (reset() it to reuse).
  MatrixRf prefill(cuda::DeviceKvCache& kc, std::span<const std::vector<int>> seqs) {
    const int B = kc.batch, V = c_.vocab_size;
    if (static_cast<int>(seqs.size()) != B)
      throw InvalidArgument("prefill: " + std::to_string(seqs.size()) + " sequences for a cache of batch " + std::to_string(B));
    if (kc.layers.size() != layers_.size()) throw InvalidArgument("prefill: the cache was made for another model");
    for (int b = 0; b < B; ++b) {
      if (kc.len[b] != 0)
        throw InvalidArgument("prefill: sequence " + std::to_string(b) + " of the cache already holds " + std::to_string(kc.len[b]) +
                              " tokens (prefill fills an empty cache; reset() it first)");
      if (static_cast<int>(seqs[b].size()) > kc.capacity)
        throw InvalidArgument("prefill: sequence " + std::to_string(b) + " has " + std::to_string(seqs[b].size()) +
                              " tokens, more than the cache's capacity " + std::to_string(kc.capacity));
    }
    prepare(seqs, nullptr);
    prefill_ = &kc;
    try {
      if (bf16()) run_layers<__nv_bfloat16>();
      else run_layers<float>();
    } catch (...) {
      prefill_ = nullptr;
      throw;
    }
    prefill_ = nullptr;
    logits_.reserve(static_cast<std::size_t>(B) * V);
    if (bf16()) head<__nv_bfloat16>(true);
    else head<float>(true);
    MatrixRf out(B, V);
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(out.data(), logits_.data(), sizeof(float) * B * V, cudaMemcpyDeviceToHost, st()));
    stream_->synchronize();
    for (int b = 0; b < B; ++b) kc.len[b] = static_cast<int>(seqs[b].size());
    return out;
  }

  /// One decode step: tokens[b] is appended to sequence b of the cache (at position len[b]) and
  /// the next-token logits (batch, vocab) come back to the host.
  MatrixRf decode(cuda::DeviceKvCache& kc, std::span<const int> tokens) {
    decode_device(kc, tokens);
    const int B = kc.batch, V = c_.vocab_size;
    MatrixRf out(B, V);
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(out.data(), logits_.data(), sizeof(float) * B * V, cudaMemcpyDeviceToHost, st()));
    stream_->synchronize();
    return out;
  }

  /// decode() without copying the logits to the host (they stay in device memory; the call
  /// is asynchronous on stream()).
  void decode_device(cuda::DeviceKvCache& kc, std::span<const int> tokens) {
    const int B = kc.batch;
    if (static_cast<int>(tokens.size()) != B)
      throw InvalidArgument("decode: " + std::to_string(tokens.size()) + " tokens for a cache of batch " + std::to_string(B));
    if (kc.layers.size() != layers_.size()) throw InvalidArgument("decode: the cache was made for another model");
    dec_host_.assign(static_cast<std::size_t>(3 * B), 0);
    int max_len = 0;
    for (int b = 0; b < B; ++b) {
      if (tokens[b] < 0 || tokens[b] >= c_.vocab_size)
        throw InvalidArgument("decode: token id " + std::to_string(tokens[b]) + " of sequence " + std::to_string(b) +
                              " is outside the vocabulary [0, " + std::to_string(c_.vocab_size) + ")");
      if (kc.len[b] + 1 > kc.capacity)
        throw InvalidArgument("decode: sequence " + std::to_string(b) + " is full (capacity " + std::to_string(kc.capacity) + " tokens)");
      if (c_.family == Family::Gpt2 && kc.len[b] + 1 > c_.max_position)
        throw InvalidArgument("decode: sequence " + std::to_string(b) + " reaches max_position_embeddings " + std::to_string(c_.max_position));
      dec_host_[b] = tokens[b];
      dec_host_[B + b] = kc.len[b];
      dec_host_[2 * B + b] = kc.len[b] + 1;
      max_len = std::max(max_len, kc.len[b] + 1);
    }
    if (c_.uses_rope()) ensure_rope(max_len);
    dec_meta_.reserve(dec_host_.size());
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(dec_meta_.data(), dec_host_.data(), sizeof(int) * dec_host_.size(), cudaMemcpyHostToDevice, st()));
    if (kc.mode == cuda::LatentDecode::Rebuild && c_.uses_rope() && static_cast<int>(iota_.size()) < max_len) {
      std::vector<int> io(static_cast<std::size_t>(kc.capacity));
      for (int i = 0; i < kc.capacity; ++i) io[i] = i;
      iota_.upload(io, st());
    }
    if (bf16()) decode_layers<__nv_bfloat16>(kc, max_len);
    else decode_layers<float>(kc, max_len);
    for (int b = 0; b < B; ++b) ++kc.len[b];
  }

  /// Bytes of device memory held by the weights.
  std::size_t weight_bytes() const {
    const std::size_t es = opt_.precision == Precision::BFloat16 ? 2 : 4;
    std::size_t n = (embed_.size() + pos_embed_.size() + lm_head_.size()) * es;
    for (const auto& L : layers_)
      n += (L.w_qkv.size() + L.wo.size() + L.w_gu.size() + L.w_down.size() + L.w_uk.size() + L.w_uv.size()) * es;
    return n;
  }

 private:
  struct DevLayer {
    cuda::DeviceBuffer<float> n1w, n1b, n2w, n2b, b_qkv, q_norm, k_norm, bo, b_gate, b_up, b_down;
    // (Dq + 2 Dkv, H) = [Wq; Wk; Wv]; MLA layers: (Dq + lw, H) = [Wq; W_dk; W_dv] (joint: [Wq; W_dk];
    // decoupled_rope: [Wq; W_dk; W_dv; Wr], Wr the d_rope exact key rows), so a decode step
    // projects the query and both latents with one GEMM.
    cuda::DevTensor w_qkv;
    cuda::DevTensor wo;     // (H, Dq)
    cuda::DevTensor w_gu;   // (2I, H) = [gate; up]; GPT-2: (I, H) = c_fc
    cuda::DevTensor w_down; // (H, I)
    // MLA: up projections (Dkv, d_latent) (the down projections are rows of w_qkv).
    bool mla = false, joint = false;
    int d_latent = 0, d_rope = 0;  // d_rope > 0: decoupled_rope (W_uk is (Dkv - d_rope, d_latent))
    int latent_width() const { return joint ? d_latent : 2 * d_latent + d_rope; }
    cuda::DevTensor w_uk, w_uv;
    cuda::DeviceBuffer<float> bv_q;  // MLA: the V bias repeated per query head (absorbed decode)
    // Absorbed decode with several query heads per KV head: w_uk / w_uv repeated per query head
    // ((n_heads * hd, d_latent); block h = KV head h / group's rows) so that one strided-batched
    // GEMM over the query heads does the absorption. Made by make_cache(Absorbed); empty else.
    cuda::DevTensor w_uk_q, w_uv_q;
  };

  /// dst = src's (hd, cols) row blocks repeated per query head: block h = KV block h / group.
  void repeat_per_query_head(const cuda::DevTensor& src, cuda::DevTensor& dst, int cols) {
    const int nh = c_.n_heads, g = c_.n_heads / c_.n_kv_heads, hd = c_.head_dim;
    const std::size_t block = static_cast<std::size_t>(hd) * cols;
    alloc(dst, block * nh);
    for (int h = 0; h < nh; ++h) {
      const std::size_t from = static_cast<std::size_t>(h / g) * block, to = static_cast<std::size_t>(h) * block;
      if (bf16())
        CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(dst.b.data() + to, src.b.data() + from, block * 2, cudaMemcpyDeviceToDevice, st()));
      else
        CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(dst.f.data() + to, src.f.data() + from, block * 4, cudaMemcpyDeviceToDevice, st()));
    }
  }

  void init_device() {
    if (cuda::device_count() == 0) throw cuda::CudaError("Transformer<Cuda>: no CUDA device is available");
    CACHESHRINK_CUDA_CHECK(cudaSetDevice(opt_.device));
    stream_ = std::make_unique<cuda::Stream>();
    blas_ = std::make_unique<cuda::CublasHandle>(stream_->get());
    if (c_.uses_rope()) {
      rope_ = Rope(c_);
      ensure_rope(std::max(1, c_.max_position));
    }
  }

  bool bf16() const { return opt_.precision == Precision::BFloat16; }
  cudaStream_t st() const { return stream_->get(); }

  void put(cuda::DevTensor& d, const float* host, std::size_t n) {
    alloc(d, n);
    put_at(d, 0, host, n);
  }
  void alloc(cuda::DevTensor& d, std::size_t n) {
    if (bf16()) d.b.resize(n);
    else d.f.resize(n);
  }
  /// Writes n host floats at element `offset` of d (allocated): chunks (default 64 MiB) through two pinned
  /// buffers (the memcpy into one overlaps the transfer from the other), converted to bf16 on
  /// the device in bf16 mode.
  void put_at(cuda::DevTensor& d, std::size_t offset, const float* host, std::size_t n) {
    const std::size_t chunk = std::max<std::size_t>(1, opt_.upload_chunk);
    if (pinned_[0].empty()) {
      pinned_[0] = cuda::PinnedBuffer<float>(chunk);
      pinned_[1] = cuda::PinnedBuffer<float>(chunk);
    }
    if (bf16()) staging_.reserve(2 * chunk);
    for (std::size_t i = 0, k = 0; i < n; i += chunk, ++k) {
      const std::size_t m = std::min(chunk, n - i), slot = k % 2;
      pinned_done_[slot].synchronize();  // the transfer that last read this buffer has finished
      std::memcpy(pinned_[slot].data(), host + i, m * sizeof(float));
      float* dst = bf16() ? staging_.data() + slot * chunk : d.f.data() + offset + i;
      CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(dst, pinned_[slot].data(), m * sizeof(float), cudaMemcpyHostToDevice, st()));
      pinned_done_[slot].record(st());
      if (bf16()) cuda::convert(staging_.data() + slot * chunk, d.b.data() + offset + i, static_cast<long long>(m), st());
    }
  }
  void put(cuda::DevTensor& d, const MatrixRf& m) { put(d, m.data(), static_cast<std::size_t>(m.size())); }
  void put(cuda::DeviceBuffer<float>& d, const VectorXf& v) {
    if (v.size()) d.upload(v.data(), static_cast<std::size_t>(v.size()), st());
  }

  void upload(const ModelWeights& W) {
    const int H = c_.hidden_size, Dq = c_.d_q(), Dkv = c_.d_kv();
    put(embed_, W.embed);
    if (W.pos_embed.size()) put(pos_embed_, W.pos_embed);
    if (W.lm_head.size()) put(lm_head_, W.lm_head);
    put(final_w_, W.final_norm_w);
    put(final_b_, W.final_norm_b);
    layers_.resize(W.layers.size());
    for (std::size_t l = 0; l < W.layers.size(); ++l) {
      const LayerWeights& lw = W.layers[l];
      DevLayer& L = layers_[l];
      put(L.n1w, lw.norm1_w);
      put(L.n1b, lw.norm1_b);
      put(L.n2w, lw.norm2_w);
      put(L.n2b, lw.norm2_b);
      if (lw.mla) {
        const MlaLayer& m = *lw.mla;
        L.mla = true;
        L.joint = m.method == CompressionMethod::Joint;
        L.d_latent = m.d_latent;
        L.d_rope = m.method == CompressionMethod::DecoupledRope ? m.d_rope : 0;
        alloc(L.w_qkv, static_cast<std::size_t>(Dq + L.latent_width()) * H);
        put_at(L.w_qkv, 0, lw.wq.data(), static_cast<std::size_t>(lw.wq.size()));
        put_at(L.w_qkv, static_cast<std::size_t>(Dq) * H, m.w_down_k.data(), static_cast<std::size_t>(m.w_down_k.size()));
        if (!L.joint) put_at(L.w_qkv, static_cast<std::size_t>(Dq + L.d_latent) * H, m.w_down_v.data(), static_cast<std::size_t>(m.w_down_v.size()));
        if (L.d_rope > 0)
          put_at(L.w_qkv, static_cast<std::size_t>(Dq + 2 * L.d_latent) * H, m.w_rope_k.data(), static_cast<std::size_t>(m.w_rope_k.size()));
        put(L.w_uk, *m.w_up_k);
        put(L.w_uv, *m.w_up_v);
        if (lw.bv.size()) {
          const int g = c_.n_heads / c_.n_kv_heads, hd = c_.head_dim;
          VectorXf bq(Dq);
          for (int h = 0; h < c_.n_heads; ++h) bq.segment(h * hd, hd) = lw.bv.segment((h / g) * hd, hd);
          put(L.bv_q, bq);
        }
      } else {  // [Wq; Wk; Wv] written in place, no host concatenation
        alloc(L.w_qkv, static_cast<std::size_t>(Dq + 2 * Dkv) * H);
        put_at(L.w_qkv, 0, lw.wq.data(), static_cast<std::size_t>(lw.wq.size()));
        put_at(L.w_qkv, static_cast<std::size_t>(Dq) * H, lw.wk.data(), static_cast<std::size_t>(lw.wk.size()));
        put_at(L.w_qkv, static_cast<std::size_t>(Dq + Dkv) * H, lw.wv.data(), static_cast<std::size_t>(lw.wv.size()));
      }
      if (lw.bq.size() || lw.bk.size() || lw.bv.size()) {
        VectorXf b = VectorXf::Zero(Dq + 2 * Dkv);
        if (lw.bq.size()) b.segment(0, Dq) = lw.bq;
        if (lw.bk.size()) b.segment(Dq, Dkv) = lw.bk;
        if (lw.bv.size()) b.segment(Dq + Dkv, Dkv) = lw.bv;
        put(L.b_qkv, b);
      }
      put(L.q_norm, lw.q_norm);
      put(L.k_norm, lw.k_norm);
      put(L.wo, lw.wo);
      put(L.bo, lw.bo);
      if (c_.family == Family::Gpt2) {
        put(L.w_gu, lw.w_up);
      } else {
        alloc(L.w_gu, static_cast<std::size_t>(2 * c_.intermediate_size) * H);
        put_at(L.w_gu, 0, lw.w_gate.data(), static_cast<std::size_t>(lw.w_gate.size()));
        put_at(L.w_gu, static_cast<std::size_t>(c_.intermediate_size) * H, lw.w_up.data(), static_cast<std::size_t>(lw.w_up.size()));
      }
      put(L.b_gate, lw.b_gate);
      put(L.b_up, lw.b_up);
      put(L.w_down, lw.w_down);
      put(L.b_down, lw.b_down);
    }
    stream_->synchronize();
    staging_.resize(0);
    pinned_[0] = {};
    pinned_[1] = {};
  }

  void alloc_zero(cuda::DevTensor& d, std::size_t n) {
    if (bf16()) {
      d.b.resize(n);
      CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(d.b.data(), 0, n * 2, st()));
    } else {
      d.f.resize(n);
      CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(d.f.data(), 0, n * 4, st()));
    }
  }

  void rand_t(cuda::DevTensor& d, std::size_t n, float a, unsigned long long seed) {
    if (bf16()) {
      d.b.resize(n);
      cuda::fill_uniform(d.b.data(), static_cast<long long>(n), seed, a, st());
    } else {
      d.f.resize(n);
      cuda::fill_uniform(d.f.data(), static_cast<long long>(n), seed, a, st());
    }
  }
  void const_f(cuda::DeviceBuffer<float>& d, std::size_t n, float v) {
    d.resize(n);
    cuda::fill_value(d.data(), static_cast<long long>(n), v, st());
  }

  void randomize(const cuda::RandomWeights& rw) {
    const std::size_t H = c_.hidden_size, Dq = c_.d_q(), Dkv = c_.d_kv(), I = c_.intermediate_size, V = c_.vocab_size;
    const float a = 1.7320508f * rw.stddev;
    unsigned long long seed = rw.seed;
    rand_t(embed_, V * H, a, seed++);
    if (c_.family == Family::Gpt2) rand_t(pos_embed_, static_cast<std::size_t>(c_.max_position) * H, a, seed++);
    if (!c_.tie_word_embeddings) rand_t(lm_head_, V * H, a, seed++);
    const bool gpt2 = c_.family == Family::Gpt2;
    const_f(final_w_, H, 1.0f);
    if (gpt2) const_f(final_b_, H, 0.0f);
    layers_.resize(c_.n_layers);
    for (auto& L : layers_) {
      const_f(L.n1w, H, 1.0f);
      const_f(L.n2w, H, 1.0f);
      if (gpt2) {
        const_f(L.n1b, H, 0.0f);
        const_f(L.n2b, H, 0.0f);
      }
      if (rw.mla_d_latent > 0) {
        const std::size_t dl = static_cast<std::size_t>(rw.mla_d_latent);
        L.mla = true;
        L.d_latent = rw.mla_d_latent;
        rand_t(L.w_qkv, (Dq + 2 * dl) * H, a, seed++);  // [Wq; W_dk; W_dv]
        const float au = 1.7320508f / std::sqrt(static_cast<float>(Dkv));  // columns of unit norm on average
        rand_t(L.w_uk, Dkv * dl, au, seed++);
        rand_t(L.w_uv, Dkv * dl, au, seed++);
      } else {
        rand_t(L.w_qkv, (Dq + 2 * Dkv) * H, a, seed++);
      }
      if (c_.qkv_bias || gpt2) const_f(L.b_qkv, Dq + 2 * Dkv, 0.0f);
      if (c_.qk_norm) {
        const_f(L.q_norm, c_.head_dim, 1.0f);
        const_f(L.k_norm, c_.head_dim, 1.0f);
      }
      rand_t(L.wo, H * Dq, a, seed++);
      if (c_.o_bias || gpt2) const_f(L.bo, H, 0.0f);
      rand_t(L.w_gu, (gpt2 ? 1 : 2) * I * H, a, seed++);
      rand_t(L.w_down, H * I, a, seed++);
      if (gpt2) {
        const_f(L.b_up, I, 0.0f);
        const_f(L.b_down, H, 0.0f);
      }
    }
    stream_->synchronize();
  }

  void ensure_rope(int positions) {
    if (positions <= rope_positions_) return;
    const int half = c_.head_dim / 2;
    std::vector<float> cs(static_cast<std::size_t>(positions) * half), sn(cs.size());
    for (int p = 0; p < positions; ++p) rope_.angles(p, cs.data() + static_cast<std::size_t>(p) * half, sn.data() + static_cast<std::size_t>(p) * half);
    rope_cos_.upload(cs, st());
    rope_sin_.upload(sn, st());
    rope_positions_ = positions;
  }

  /// Validates the batch, uploads ids/positions/attention plan (and targets when nll wants them).
  void prepare(std::span<const std::vector<int>> seqs, const std::span<const int>* first_target) {
    const int B = static_cast<int>(seqs.size());
    if (B == 0) throw InvalidArgument("forward: empty batch");
    if (first_target && !first_target->empty() && static_cast<int>(first_target->size()) != B)
      throw InvalidArgument("nll: first_target must hold one entry per sequence");
    std::vector<int> off(B + 1, 0);
    int maxlen = 0;
    for (int s = 0; s < B; ++s) {
      const auto& t = seqs[s];
      if (t.empty()) throw InvalidArgument("forward: sequence " + std::to_string(s) + " has no tokens");
      if (static_cast<int>(t.size()) > c_.max_position && c_.family == Family::Gpt2)
        throw InvalidArgument("forward: sequence " + std::to_string(s) + " reaches position " + std::to_string(t.size()) +
                              " but the model has max_position_embeddings " + std::to_string(c_.max_position));
      for (int id : t)
        if (id < 0 || id >= c_.vocab_size)
          throw InvalidArgument("forward: token id " + std::to_string(id) + " in sequence " + std::to_string(s) +
                                " is outside the vocabulary [0, " + std::to_string(c_.vocab_size) + ")");
      off[s + 1] = off[s] + static_cast<int>(t.size());
      maxlen = std::max(maxlen, static_cast<int>(t.size()));
    }
    n_ = off[B];
    if (c_.uses_rope()) ensure_rope(maxlen);
    last_rows_.assign(off.begin() + 1, off.end());
    for (auto& r : last_rows_) --r;
    off_host_ = off;
    auto plan = cuda::AttentionPlan::from_offsets(off);
    n_tiles_ = static_cast<int>(plan.tiles.size());
    // meta: [tiles (4 ints each) | ids | pos | row_begin | targets]
    meta_host_.assign(static_cast<std::size_t>(4 * n_tiles_ + 4 * n_), 0);
    std::memcpy(meta_host_.data(), plan.tiles.data(), sizeof(int4) * plan.tiles.size());
    int* ids = meta_host_.data() + 4 * n_tiles_;
    int* pos = ids + n_;
    int* rb = pos + n_;
    int* tg = rb + n_;
    targets_host_.assign(static_cast<std::size_t>(n_), -1);
    scored_ = 0;
    for (int s = 0; s < B; ++s) {
      const int len = off[s + 1] - off[s];
      const int ft = (first_target && !first_target->empty()) ? (*first_target)[s] : 1;
      for (int i = 0; i < len; ++i) {
        ids[off[s] + i] = seqs[s][i];
        pos[off[s] + i] = i;
        rb[off[s] + i] = off[s];
        if (i + 1 < len && i + 1 >= ft) {
          targets_host_[off[s] + i] = seqs[s][i + 1];
          ++scored_;
        }
      }
    }
    std::memcpy(tg, targets_host_.data(), sizeof(int) * n_);
    meta_.reserve(meta_host_.size());
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(meta_.data(), meta_host_.data(), sizeof(int) * meta_host_.size(), cudaMemcpyHostToDevice, st()));
    d_tiles_ = reinterpret_cast<const int4*>(meta_.data());
    d_ids_ = meta_.data() + 4 * n_tiles_;
    d_pos_ = d_ids_ + n_;
    d_row_begin_ = d_pos_ + n_;
    d_targets_ = d_row_begin_ + n_;
  }

  template <class T>
  cuda::DeviceBuffer<T>& act(cuda::DeviceBuffer<float>& f, cuda::DeviceBuffer<__nv_bfloat16>& b) {
    if constexpr (std::is_same_v<T, float>) return f;
    else return b;
  }

  // prefill: the rows decode would have appended, per sequence into rows [0, len) of its cache
  // slot: a standard layer's K and V after bias, k-norm and RoPE (qkv), an MLA layer's latents
  // [c_k | c_v | k_r] as the input projection made them (lat).
  template <class T>
  void cache_rows(std::size_t li, const T* qkv, const T* lat) {
    const DevLayer& L = layers_[li];
    auto& C = prefill_->layers[li];
    const int Dq = c_.d_q(), Dkv = c_.d_kv(), Wqkv = Dq + 2 * Dkv, cap = prefill_->capacity;
    for (std::size_t b = 0; b + 1 < off_host_.size(); ++b) {
      const int first = off_host_[b], rows = off_host_[b + 1] - first;
      if (L.mla) {
        const int lw = C.width_a;
        copy_rows(const_cast<T*>(C.a.template ptr<T>()) + b * static_cast<std::size_t>(cap) * lw, lw, lat + static_cast<std::size_t>(first) * lw,
                  lw, lw, rows);
      } else {
        const T* row = qkv + static_cast<std::size_t>(first) * Wqkv + Dq;
        copy_rows(const_cast<T*>(C.a.template ptr<T>()) + b * static_cast<std::size_t>(cap) * Dkv, Dkv, row, Wqkv, Dkv, rows);
        copy_rows(const_cast<T*>(C.b.template ptr<T>()) + b * static_cast<std::size_t>(cap) * Dkv, Dkv, row + Dkv, Wqkv, Dkv, rows);
      }
    }
  }

  // dst[r, 0:width) = src[r, 0:width) for `rows` rows (row strides ld, lds), on the stream.
  template <class T>
  void copy_rows(T* dst, int ld, const T* src, int lds, int width, int rows) {
    CACHESHRINK_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<std::size_t>(ld) * sizeof(T), src, static_cast<std::size_t>(lds) * sizeof(T),
                                             static_cast<std::size_t>(width) * sizeof(T), static_cast<std::size_t>(rows),
                                             cudaMemcpyDeviceToDevice, st()));
  }
  // An MLA layer's K~ = c_k W_uk^T and V~ = c_v W_uv^T for `rows` latent rows [c_k | c_v | k_r]
  // (stride lw), into k and v (stride ld), before biases; decoupled_rope: K~ = [k_r | c_k W_uk^T],
  // k_r the rows' exact key features. The packed forward and the rebuilding decode both use it.
  template <class T>
  void rebuild_kv(const DevLayer& L, const T* lat, int lw, int rows, T* k, T* v, int ld) {
    const int dl = L.d_latent, dr = L.d_rope, Dkv = c_.d_kv();
    cublasHandle_t hb = blas_->get();
    if (dr > 0) copy_rows(k, ld, lat + 2 * dl, lw, dr, rows);
    cuda::gemm_xwt<T, T>(hb, rows, Dkv - dr, dl, lat, lw, L.w_uk.template ptr<T>(), dl, k + dr, ld);
    cuda::gemm_xwt<T, T>(hb, rows, Dkv, dl, lat + (L.joint ? 0 : dl), lw, L.w_uv.template ptr<T>(), dl, v, ld);
  }

  template <class T>
  void run_layers() {
    const int N = n_, H = c_.hidden_size, Dq = c_.d_q(), Dkv = c_.d_kv(), hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int I = c_.intermediate_size, Wqkv = Dq + 2 * Dkv;
    const bool gpt2 = c_.family == Family::Gpt2;
    const float eps = static_cast<float>(c_.norm_eps);
    cublasHandle_t hb = blas_->get();
    cudaStream_t s = st();
    auto& h = act<T>(h_f_, h_b_);
    auto& qkv = act<T>(qkv_f_, qkv_b_);
    auto& attn = act<T>(attn_f_, attn_b_);
    auto& gu = act<T>(gu_f_, gu_b_);
    auto& a2 = act<T>(act_f_, act_b_);
    auto& lat = act<T>(lat_f_, lat_b_);
    x_.reserve(static_cast<std::size_t>(N) * H);
    h.reserve(static_cast<std::size_t>(N) * H);
    qkv.reserve(static_cast<std::size_t>(N) * Wqkv);
    attn.reserve(static_cast<std::size_t>(N) * Dq);
    gu.reserve(static_cast<std::size_t>(N) * (gpt2 ? I : 2 * I));
    if (!gpt2) a2.reserve(static_cast<std::size_t>(N) * I);

    cuda::embedding<T>(d_ids_, d_pos_, embed_.template ptr<T>(), gpt2 ? pos_embed_.template ptr<T>() : nullptr, x_.data(), N, H, s);
    const float* pend = nullptr;  // bias still to be added to the residual x_ (folded into the next norm)
    for (std::size_t li = 0; li < layers_.size(); ++li) {
      const DevLayer& L = layers_[li];
      cuda::bias_norm_rows<T>(x_.data(), H, pend, L.n1w.data(), gpt2 ? L.n1b.data() : nullptr, gpt2, eps, h.data(), H, N, H, s);
      if (attn_hook_ != nullptr) {
        (*attn_hook_)(static_cast<int>(li), h.data(), N);
        if (static_cast<int>(li) == stop_after_) return;
      }
      if (!L.mla) {
        cuda::gemm_xwt<T, T>(hb, N, Wqkv, H, h.data(), H, L.w_qkv.template ptr<T>(), H, qkv.data(), Wqkv);
      } else {
        const int lw = L.latent_width();
        lat.reserve(static_cast<std::size_t>(N) * lw);
        // q into qkv, [c_k | c_v] into lat (K~ / V~ are written into qkv next, so the latents
        // cannot share its columns here)
        cuda::gemm_xwt<T, T>(hb, N, Dq, H, h.data(), H, L.w_qkv.template ptr<T>(), H, qkv.data(), Wqkv);
        cuda::gemm_xwt<T, T>(hb, N, lw, H, h.data(), H, L.w_qkv.template ptr<T>() + static_cast<std::size_t>(Dq) * H, H, lat.data(), lw);
        // K~, V~ from the latents (biases below with the fused bias).
        rebuild_kv<T>(L, lat.data(), lw, N, qkv.data() + Dq, qkv.data() + Dq + Dkv, Wqkv);
      }
      if (!L.b_qkv.empty()) cuda::add_bias<T>(qkv.data(), Wqkv, N, Wqkv, L.b_qkv.data(), s);
      if (!L.q_norm.empty()) cuda::head_rms_norm<T>(qkv.data(), Wqkv, 0, N, nh, hd, L.q_norm.data(), eps, s);
      if (!L.k_norm.empty()) cuda::head_rms_norm<T>(qkv.data(), Wqkv, Dq, N, nkv, hd, L.k_norm.data(), eps, s);
      if (c_.uses_rope()) cuda::rope<T>(qkv.data(), Wqkv, 0, N, nh + nkv, hd, d_pos_, rope_cos_.data(), rope_sin_.data(), s);
      if (prefill_ != nullptr) cache_rows<T>(li, qkv.data(), lat.data());
      cuda::AttentionArgs<T> aa;
      aa.q = qkv.data();
      aa.k = qkv.data() + Dq;
      aa.v = qkv.data() + Dq + Dkv;
      aa.out = attn.data();
      aa.ldq = aa.ldkv = Wqkv;
      aa.ldo = Dq;
      aa.rows = N;
      aa.n_heads = nh;
      aa.n_kv_heads = nkv;
      aa.head_dim = hd;
      aa.window = c_.sliding_window;
      aa.scale = 1.0f / std::sqrt(static_cast<float>(hd));
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        if (cuda::flash_supported(aa)) cuda::flash_attention(aa, d_tiles_, n_tiles_, s);
        else cuda::attention_rows<T>(aa, d_row_begin_, s);
      } else {
        cuda::attention_rows<T>(aa, d_row_begin_, s);
      }
      cuda::gemm_xwt<T, float>(hb, N, H, Dq, attn.data(), Dq, L.wo.template ptr<T>(), Dq, x_.data(), H, 1.0f, 1.0f);
      pend = mlp_block<T>(L, N, L.bo.empty() ? nullptr : L.bo.data());
    }
    auto& hf = act<T>(h_f_, h_b_);
    const bool gpt2n = gpt2;
    cuda::bias_norm_rows<T>(x_.data(), H, pend, final_w_.data(), gpt2n ? final_b_.data() : nullptr, gpt2n, eps, hf.data(), H, N, H, s);
  }

  /// x += MLP(norm2(x + pend)) for N rows (activation buffers reserved by the caller's size;
  /// pend: the attention output's bias, added to x by the norm). Returns the bias the caller
  /// still has to add to x (the down projection's, or nullptr), for the next norm to fold in.
  template <class T>
  const float* mlp_block(const DevLayer& L, int N, const float* pend) {
    const int H = c_.hidden_size, I = c_.intermediate_size;
    const bool gpt2 = c_.family == Family::Gpt2;
    const float eps = static_cast<float>(c_.norm_eps);
    cublasHandle_t hb = blas_->get();
    cudaStream_t s = st();
    auto& h = act<T>(h_f_, h_b_);
    auto& gu = act<T>(gu_f_, gu_b_);
    auto& a2 = act<T>(act_f_, act_b_);
    cuda::bias_norm_rows<T>(x_.data(), H, pend, L.n2w.data(), gpt2 ? L.n2b.data() : nullptr, gpt2, eps, h.data(), H, N, H, s);
    if (gpt2) {
      cuda::gemm_xwt<T, T>(hb, N, I, H, h.data(), H, L.w_gu.template ptr<T>(), H, gu.data(), I);
      cuda::bias_gelu<T>(gu.data(), N, I, L.b_up.empty() ? nullptr : L.b_up.data(), s);
      cuda::gemm_xwt<T, float>(hb, N, H, I, gu.data(), I, L.w_down.template ptr<T>(), I, x_.data(), H, 1.0f, 1.0f);
    } else {
      cuda::gemm_xwt<T, T>(hb, N, 2 * I, H, h.data(), H, L.w_gu.template ptr<T>(), H, gu.data(), 2 * I);
      cuda::swiglu<T>(gu.data(), N, I, L.b_gate.empty() ? nullptr : L.b_gate.data(), L.b_up.empty() ? nullptr : L.b_up.data(), a2.data(), s);
      cuda::gemm_xwt<T, float>(hb, N, H, I, a2.data(), I, L.w_down.template ptr<T>(), I, x_.data(), H, 1.0f, 1.0f);
    }
    return L.b_down.empty() ? nullptr : L.b_down.data();
  }

  /// One decode step over every layer (metadata in dec_meta_: tokens | pos | len after).
  template <class T>
  void decode_layers(cuda::DeviceKvCache& kc, int max_len) {
    const int B = kc.batch, H = c_.hidden_size, Dq = c_.d_q(), Dkv = c_.d_kv(), hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int I = c_.intermediate_size, Wqkv = Dq + 2 * Dkv, V = c_.vocab_size, cap = kc.capacity;
    const bool gpt2 = c_.family == Family::Gpt2;
    const float eps = static_cast<float>(c_.norm_eps), scale = 1.0f / std::sqrt(static_cast<float>(hd));
    cublasHandle_t hb = blas_->get();
    cudaStream_t s = st();
    const int* d_tok = dec_meta_.data();
    const int* d_pos = d_tok + B;
    const int* d_len = d_pos + B;
    auto& h = act<T>(h_f_, h_b_);
    auto& qkv = act<T>(qkv_f_, qkv_b_);
    auto& attn = act<T>(attn_f_, attn_b_);
    auto& kbuf = act<T>(kbuf_f_, kbuf_b_);
    auto& vbuf = act<T>(vbuf_f_, vbuf_b_);
    auto& qlat = act<T>(qlat_f_, qlat_b_);
    auto& olat = act<T>(olat_f_, olat_b_);
    x_.reserve(static_cast<std::size_t>(B) * H);
    h.reserve(static_cast<std::size_t>(B) * H);
    qkv.reserve(static_cast<std::size_t>(B) * Wqkv);
    attn.reserve(static_cast<std::size_t>(B) * Dq);
    act<T>(gu_f_, gu_b_).reserve(static_cast<std::size_t>(B) * (gpt2 ? I : 2 * I));
    if (!gpt2) act<T>(act_f_, act_b_).reserve(static_cast<std::size_t>(B) * I);
    cuda::embedding<T>(d_tok, d_pos, embed_.template ptr<T>(), gpt2 ? pos_embed_.template ptr<T>() : nullptr, x_.data(), B, H, s);
    // Standard-cache decode over K/V rows of width Dkv (the layer's own cache, or the rebuilt K/V).
    auto std_args = [&](const T* k, const T* v, long long seq_stride) {
      cuda::DecodeArgs<T> da;
      da.q = qkv.data();
      da.ldq = Wqkv;
      da.k = k;
      da.v = v;
      da.ldkv = Dkv;
      da.seq_stride = seq_stride;
      da.len = d_len;
      da.batch = B;
      da.n_heads = nh;
      da.n_kv_heads = nkv;
      da.head_dim = hd;
      da.window = c_.sliding_window;
      da.scale = scale;
      return da;
    };
    const float* pend = nullptr;  // bias still to be added to the residual x_ (folded into the next norm)
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const DevLayer& L = layers_[l];
      auto& C = kc.layers[l];
      T* ca = const_cast<T*>(C.a.template ptr<T>());
      cuda::bias_norm_rows<T>(x_.data(), H, pend, L.n1w.data(), gpt2 ? L.n1b.data() : nullptr, gpt2, eps, h.data(), H, B, H, s);
      if (!L.mla) {
        T* cb = const_cast<T*>(C.b.template ptr<T>());
        cuda::gemm_xwt<T, T>(hb, B, Wqkv, H, h.data(), H, L.w_qkv.template ptr<T>(), H, qkv.data(), Wqkv);
        if (!L.b_qkv.empty()) cuda::add_bias<T>(qkv.data(), Wqkv, B, Wqkv, L.b_qkv.data(), s);
        if (!L.q_norm.empty()) cuda::head_rms_norm<T>(qkv.data(), Wqkv, 0, B, nh, hd, L.q_norm.data(), eps, s);
        if (!L.k_norm.empty()) cuda::head_rms_norm<T>(qkv.data(), Wqkv, Dq, B, nkv, hd, L.k_norm.data(), eps, s);
        if (c_.uses_rope()) cuda::rope<T>(qkv.data(), Wqkv, 0, B, nh + nkv, hd, d_pos, rope_cos_.data(), rope_sin_.data(), s);
        const long long ss = static_cast<long long>(cap) * Dkv;
        cuda::append_rows<T>(qkv.data() + Dq, Wqkv, ca, Dkv, ss, d_pos, B, Dkv, s);
        cuda::append_rows<T>(qkv.data() + Dq + Dkv, Wqkv, cb, Dkv, ss, d_pos, B, Dkv, s);
        const cuda::DecodeArgs<T> da = std_args(ca, cb, ss);
        cuda::decode_attention<T>(da, max_len, attn.data(), Dq, scratch_, s);
      } else {
        const int dl = L.d_latent, lw = C.width_a;
        const long long ss = static_cast<long long>(cap) * lw;
        // [q | c_k | c_v] = h [Wq; W_dk; W_dv]^T in one GEMM (Dq + lw <= Wqkv columns of qkv)
        cuda::gemm_xwt<T, T>(hb, B, Dq + lw, H, h.data(), H, L.w_qkv.template ptr<T>(), H, qkv.data(), Wqkv);
        cuda::append_rows<T>(qkv.data() + Dq, Wqkv, ca, lw, ss, d_pos, B, lw, s);
        if (!L.b_qkv.empty()) cuda::add_bias<T>(qkv.data(), Wqkv, B, Dq, L.b_qkv.data(), s);
        if (!L.q_norm.empty()) cuda::head_rms_norm<T>(qkv.data(), Wqkv, 0, B, nh, hd, L.q_norm.data(), eps, s);
        const T* ck = ca;
        const T* cv = ca + (L.joint ? 0 : dl);
        if (kc.mode == cuda::LatentDecode::Rebuild) {
          kbuf.reserve(static_cast<std::size_t>(B) * cap * Dkv);
          vbuf.reserve(static_cast<std::size_t>(B) * cap * Dkv);
          for (int b = 0; b < B; ++b) {
            const int rows = dec_host_[2 * B + b];
            T* kb = kbuf.data() + static_cast<std::size_t>(b) * cap * Dkv;
            T* vb = vbuf.data() + static_cast<std::size_t>(b) * cap * Dkv;
            rebuild_kv<T>(L, ca + b * ss, lw, rows, kb, vb, Dkv);
            if (!L.b_qkv.empty()) {
              cuda::add_bias<T>(kb, Dkv, rows, Dkv, L.b_qkv.data() + Dq, s);
              cuda::add_bias<T>(vb, Dkv, rows, Dkv, L.b_qkv.data() + Dq + Dkv, s);
            }
            if (!L.k_norm.empty()) cuda::head_rms_norm<T>(kb, Dkv, 0, rows, nkv, hd, L.k_norm.data(), eps, s);
            if (c_.uses_rope()) cuda::rope<T>(kb, Dkv, 0, rows, nkv, hd, iota_.data(), rope_cos_.data(), rope_sin_.data(), s);
          }
          if (c_.uses_rope()) cuda::rope<T>(qkv.data(), Wqkv, 0, B, nh, hd, d_pos, rope_cos_.data(), rope_sin_.data(), s);
          const cuda::DecodeArgs<T> da = std_args(kbuf.data(), vbuf.data(), static_cast<long long>(cap) * Dkv);
          cuda::decode_attention<T>(da, max_len, attn.data(), Dq, scratch_, s);
        } else {
          // q_lat[b, h, :] = scale * W_uk,kvh^T q[b, h, :]; the K bias adds q . b_k to every score
          // of a row (softmax ignores it), the V bias is added after W_uv (probabilities sum to 1).
          qlat.reserve(static_cast<std::size_t>(B) * nh * dl);
          olat.reserve(static_cast<std::size_t>(B) * nh * dl);
          // One strided-batched GEMM over the query heads (per-head copies of W_uk / W_uv when
          // several query heads share a KV head, see DevLayer::w_uk_q).
          const bool rep = nh != nkv;
          const T* wuk = (rep ? L.w_uk_q : L.w_uk).template ptr<T>();
          const T* wuv = (rep ? L.w_uv_q : L.w_uv).template ptr<T>();
          const long long wstride = static_cast<long long>(hd) * dl;
          cuda::gemm_cm_strided_batched<T>(hb, CUBLAS_OP_N, CUBLAS_OP_N, dl, B, hd, scale, wuk, dl, wstride, qkv.data(), Wqkv, hd, 0.0f, qlat.data(),
                                           nh * dl, dl, nh);
          cuda::LatentDecodeArgs<T> la;
          la.q_lat = qlat.data();
          la.ck = ck;
          la.cv = cv;
          la.ldc = lw;
          la.seq_stride = ss;
          la.len = d_len;
          la.batch = B;
          la.n_heads = nh;
          la.d_latent = dl;
          la.window = c_.sliding_window;
          cuda::decode_latent_attention<T>(la, max_len, olat.data(), nh * dl, scratch_, s, force_latent_rows_);
          cuda::gemm_cm_strided_batched<T>(hb, CUBLAS_OP_T, CUBLAS_OP_N, hd, B, dl, 1.0f, wuv, dl, wstride, olat.data(), nh * dl, dl, 0.0f, attn.data(),
                                           Dq, hd, nh);
          if (!L.bv_q.empty()) cuda::add_bias<T>(attn.data(), Dq, B, Dq, L.bv_q.data(), s);
        }
      }
      cuda::gemm_xwt<T, float>(hb, B, H, Dq, attn.data(), Dq, L.wo.template ptr<T>(), Dq, x_.data(), H, 1.0f, 1.0f);
      pend = mlp_block<T>(L, B, L.bo.empty() ? nullptr : L.bo.data());
    }
    cuda::bias_norm_rows<T>(x_.data(), H, pend, final_w_.data(), gpt2 ? final_b_.data() : nullptr, gpt2, eps, h.data(), H, B, H, s);
    const cuda::DevTensor& W = lm_head_.size() ? lm_head_ : embed_;
    logits_.reserve(static_cast<std::size_t>(B) * V);
    cuda::gemm_xwt<T, float>(hb, B, V, H, h.data(), H, W.template ptr<T>(), H, logits_.data(), V);
  }

 public:
  /// Tests: run the absorbed latent attention with the warp kernel even where the tensor-core
  /// kernel applies.
  void set_force_latent_rows(bool on) { force_latent_rows_ = on; }

 private:
  /// Logits (float) of the final-normed rows into logits_; `last`: one row per sequence;
  /// `nll`: then per-token NLL into tok_nll_ (chunked so the logits buffer stays bounded).
  template <class T>
  void head(bool last, bool nll = false) {
    const int H = c_.hidden_size, V = c_.vocab_size;
    const cuda::DevTensor& W = lm_head_.size() ? lm_head_ : embed_;
    auto& h = act<T>(h_f_, h_b_);
    cublasHandle_t hb = blas_->get();
    if (last) {
      for (std::size_t b = 0; b < last_rows_.size(); ++b)
        cuda::gemm_xwt<T, float>(hb, 1, V, H, h.data() + static_cast<std::size_t>(last_rows_[b]) * H, H, W.template ptr<T>(), H,
                                 logits_.data() + b * static_cast<std::size_t>(V), V);
      return;
    }
    if (!nll) {
      cuda::gemm_xwt<T, float>(hb, n_, V, H, h.data(), H, W.template ptr<T>(), H, logits_.data(), V);
      return;
    }
    // Bounded logits buffer: at most ~1 GiB of float logits per chunk.
    const int chunk = static_cast<int>(std::max<long long>(1, std::min<long long>(n_, (1LL << 28) / V)));
    logits_.reserve(static_cast<std::size_t>(chunk) * V);
    tok_nll_.reserve(static_cast<std::size_t>(n_));
    for (int r0 = 0; r0 < n_; r0 += chunk) {
      const int rows = std::min(chunk, n_ - r0);
      cuda::gemm_xwt<T, float>(hb, rows, V, H, h.data() + static_cast<std::size_t>(r0) * H, H, W.template ptr<T>(), H, logits_.data(), V);
      cuda::nll_rows(logits_.data(), rows, V, d_targets_ + r0, tok_nll_.data() + r0, st());
    }
  }

  ModelConfig c_;
  cuda::Options opt_;
  std::unique_ptr<cuda::Stream> stream_;
  std::unique_ptr<cuda::CublasHandle> blas_;
  Rope rope_;
  int rope_positions_ = 0;
  cuda::DeviceBuffer<float> rope_cos_, rope_sin_;
  // weights
  cuda::DevTensor embed_, pos_embed_, lm_head_;
  cuda::DeviceBuffer<float> final_w_, final_b_;
  std::vector<DevLayer> layers_;
  cuda::DeviceBuffer<float> staging_;
  cuda::PinnedBuffer<float> pinned_[2];
  cuda::Event pinned_done_[2];
  // per-batch state
  int n_ = 0, n_tiles_ = 0;
  long long scored_ = 0;
  std::vector<int> meta_host_, targets_host_, last_rows_, off_host_;
  cuda::DeviceBuffer<int> meta_;
  const int4* d_tiles_ = nullptr;
  const int *d_ids_ = nullptr, *d_pos_ = nullptr, *d_row_begin_ = nullptr, *d_targets_ = nullptr;
  // activations (allocated once per batch shape, grown on demand)
  cuda::DeviceBuffer<float> x_, logits_, tok_nll_;
  cuda::DeviceBuffer<float> h_f_, qkv_f_, attn_f_, gu_f_, act_f_, lat_f_;
  cuda::DeviceBuffer<__nv_bfloat16> h_b_, qkv_b_, attn_b_, gu_b_, act_b_, lat_b_;
  // decode state
  std::vector<int> dec_host_;
  cuda::DeviceBuffer<int> dec_meta_, iota_;
  cuda::DecodeScratch scratch_;
  cuda::DeviceBuffer<float> kbuf_f_, vbuf_f_, qlat_f_, olat_f_;
  cuda::DeviceBuffer<__nv_bfloat16> kbuf_b_, vbuf_b_, qlat_b_, olat_b_;
  bool force_latent_rows_ = false;
  const AttnInputFn* attn_hook_ = nullptr;  // set during attention_inputs
  int stop_after_ = -1;
  cuda::DeviceKvCache* prefill_ = nullptr;  // set during prefill: run_layers writes each layer's cache rows
};

}  // namespace cacheshrink::model

namespace cacheshrink::cuda {

/// pipeline::perplexity's windows on the GPU, with the NLL computed on the device (only one
/// float per token comes back). Same protocol and result fields.
template <class Tf>
pipeline::PerplexityResult perplexity(Tf& tf, const std::vector<int>& ids, const pipeline::PerplexityOptions& o = {}) {
  if (o.window < 2) throw InvalidArgument("perplexity: window must be >= 2 (got " + std::to_string(o.window) + ")");
  if (o.stride < 0 || o.stride > o.window) throw InvalidArgument("perplexity: stride must be in [0, window]");
  if (o.batch < 1) throw InvalidArgument("perplexity: batch must be >= 1");
  if (static_cast<long>(ids.size()) < o.window)
    throw InvalidArgument("perplexity: " + std::to_string(ids.size()) + " tokens are fewer than one window of " + std::to_string(o.window));
  std::vector<pipeline::detail::Window> wins;
  const int stride = (o.stride == 0) ? o.window : o.stride;
  if (stride == o.window) {
    for (std::size_t b = 0; b + o.window <= ids.size(); b += o.window) wins.push_back({b, o.window, 1});
  } else {
    std::size_t prev_end = 0;
    for (std::size_t b = 0; b < ids.size(); b += stride) {
      const std::size_t e = std::min(b + o.window, ids.size());
      const int trg = static_cast<int>(e - prev_end);
      const int len = static_cast<int>(e - b);
      if (len >= 2) wins.push_back({b, len, std::max(1, len - trg)});
      prev_end = e;
      if (e == ids.size()) break;
    }
  }
  if (o.max_windows > 0 && static_cast<long>(wins.size()) > o.max_windows) wins.resize(static_cast<std::size_t>(o.max_windows));
  pipeline::PerplexityResult r;
  Progress bar("perplexity", static_cast<long long>(wins.size()), "windows", o.progress);
  double nll = 0;
  for (std::size_t w0 = 0; w0 < wins.size(); w0 += o.batch) {
    const std::size_t w1 = std::min(wins.size(), w0 + o.batch);
    std::vector<std::vector<int>> seqs;
    std::vector<int> first;
    for (std::size_t w = w0; w < w1; ++w) {
      seqs.emplace_back(ids.begin() + wins[w].begin, ids.begin() + wins[w].begin + wins[w].length);
      first.push_back(wins[w].first_target);
      r.processed_tokens += wins[w].length;
    }
    auto [s, n] = tf.nll(std::span<const std::vector<int>>(seqs), std::span<const int>(first));
    nll += s;
    r.predicted_tokens += n;
    bar.update(static_cast<long long>(w1), static_cast<double>(r.processed_tokens), "tok");
  }
  r.windows = static_cast<long>(wins.size());
  r.seconds = bar.elapsed();
  r.mean_nll = r.predicted_tokens ? nll / static_cast<double>(r.predicted_tokens) : 0.0;
  r.perplexity = std::exp(r.mean_nll);
  r.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.processed_tokens) / r.seconds : 0.0;
  return r;
}

/// model::generate on the GPU with a device KV cache (`mode`: the latent layers' decode, see
/// LatentDecode; Rebuild takes every model). The prompt fills the cache in one packed forward
/// (Transformer::prefill), then each new token is picked on the host
/// by model::Sampler from that step's logits (greedy, or temperature / top-k / top-p with the
/// seed), as the CPU's generate with its cache. Returns only the new tokens; use_cache = false
/// is refused (the GPU decodes on its cache only).
template <class Tf>
std::vector<int> generate(Tf& tf, const std::vector<int>& prompt, const model::SamplingOptions& o, LatentDecode mode = LatentDecode::Rebuild) {
  model::detail::check_generate("cuda::generate", prompt, o);
  if (!o.use_cache) throw InvalidArgument("cuda::generate: use_cache = false (full recomputation) is a CPU option");
  model::Sampler sampler(o);
  if (o.max_new_tokens == 0) return {};
  auto cache = tf.make_cache(1, static_cast<int>(prompt.size()) + o.max_new_tokens, mode);
  return model::detail::sample_loop(sampler, tf.prefill(cache, std::span<const std::vector<int>>(&prompt, 1)), o,
                                    [&](int t) { return tf.decode(cache, std::span<const int>(&t, 1)); });
}

}  // namespace cacheshrink::cuda

#pragma once
// One bf16 flash-attention prefill problem at 7B head shapes (head_dim 128): packed [Q | K | V]
// rows of B sequences of T tokens, uniform random, the tile plan on the device. Shared by
// bench_cuda_eval --part attention and bench_cuda_kernels.
#include <cuda_bf16.h>

#include <cacheshrink/backend/cuda/attention.cuh>
#include <cacheshrink/backend/cuda/memory.cuh>
#include <vector>

namespace cacheshrink::bench {

struct FlashCase {
  int nh, nkv, T, B, hd = 128;
  cuda::DeviceBuffer<__nv_bfloat16> qkv, out;
  cuda::AttentionPlan plan;
  cuda::DeviceBuffer<int4> tiles;
  cuda::AttentionArgs<__nv_bfloat16> args;

  FlashCase(int n_heads, int n_kv_heads, int seq_len, int batch, cudaStream_t s) : nh(n_heads), nkv(n_kv_heads), T(seq_len), B(batch) {
    const int Dq = nh * hd, Dkv = nkv * hd, ld = Dq + 2 * Dkv, N = B * T;
    qkv.resize(static_cast<std::size_t>(N) * ld);
    out.resize(static_cast<std::size_t>(N) * Dq);
    cuda::fill_uniform(qkv.data(), static_cast<long long>(qkv.size()), 7, 1.0f, s);
    std::vector<int> off{0};
    for (int b = 0; b < B; ++b) off.push_back(off.back() + T);
    plan = cuda::AttentionPlan::from_offsets(off);
    tiles.upload(plan.tiles, s);
    args.q = qkv.data();
    args.k = qkv.data() + Dq;
    args.v = qkv.data() + Dq + Dkv;
    args.out = out.data();
    args.ldq = args.ldkv = ld;
    args.ldo = Dq;
    args.rows = N;
    args.n_heads = nh;
    args.n_kv_heads = nkv;
    args.head_dim = hd;
    args.scale = 0.088388f;  // 1 / sqrt(128)
  }
  void run(cudaStream_t s, cuda::FlashKernel k = cuda::FlashKernel::Auto) {
    cuda::flash_attention(args, tiles.data(), static_cast<int>(plan.tiles.size()), s, k);
  }
  /// Causal FLOPs: 4 hd per (query, visible key) pair and head.
  double flops() const { return 4.0 * B * (static_cast<double>(T) * (T + 1) / 2) * hd * nh; }
};

}  // namespace cacheshrink::bench

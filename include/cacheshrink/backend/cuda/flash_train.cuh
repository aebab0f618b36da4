#pragma once
// Fused TF32 attention for training (cuda::TrainGraph in TF32 mode): a FlashAttention-2-style
// forward and backward on mma.sync m16n8k8 (tf32 in, float accumulate), causal with an optional
// sliding window (query i sees key j iff j <= i and i - j < window, window <= 0: no window),
// MHA/GQA/MQA (query head h reads KV head h / group), packed sequences (off: batch + 1 offsets).
//
//  - flash_train_fwd<HD>: a block takes 128 queries of one (sequence, head), eight warps of 16
//    rows. Q lives in registers as TF32 fragments; K and V tiles of 64 keys are double-buffered
//    in shared memory by cp.async and rounded to TF32 there (unless the caller stored them
//    rounded: FlashTrainArgs::rounded); the online softmax stays in registers. It writes O and
//    each row's lse2 = log2 sum_j 2^(c s_j) (c = scale log2 e, s = q.k): nothing n x n.
//  - flash_delta: D = rowsum(dO o O) per (token, head).
//  - flash_train_bwd<HD>: a block takes 128 keys of one (sequence, query head), eight warps of 16
//    keys, and walks the 32-query tiles that can see them (Q, dO double-buffered). It recomputes P^T = 2^(c S^T - lse2)
//    from K Q^T, dP^T = V dO^T, dS^T = P^T o (dP^T - D), and accumulates dV = P^T dO and
//    dK = scale dS^T Q in registers, written per query head (the caller sums GQA groups). dS (the
//    gradient of the scaled scores) goes to a P-shaped buffer (per sequence and head, n x n, row =
//    query) for the caller's dQ = scale dS K GEMM; the entries the kernel does not visit (tiles
//    above the diagonal, outside the window) are not written: the caller keeps them zero.
//
// One block per SM (~230-250 registers a thread; 134 KB / 205 KB of shared memory at HD = 128),
// the longest blocks launched first. The operands are rounded to TF32 (round to nearest) before
// the tensor cores see them: feeding float32 bits would truncate, and that bias moved the
// gradients 4-7x further from float64 than the materialised TF32 path (measured, rejected).
// tests/cuda/test_cuda_train_kernels.cu checks both kernels against float64 on odd lengths,
// GQA/MQA, a window, unaligned operands and pre-rounded ones.
//
// flash_train_fwd_wg / flash_train_bwd_wg (sm_90a, FlashKernel::Auto's choice where the binary has
// it): the same blocks and arithmetic with every product on tf32 wgmma (see "The wgmma (sm_90a)
// forms" below); ~230 KB of shared memory at HD = 128. Both forms are tested on the same cases.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/mma.cuh"
#include "cacheshrink/backend/cuda/wgmma.cuh"
#include "cacheshrink/core/error.hpp"

namespace cacheshrink::cuda {

/// Operands of the fused training attention. Row operands are packed token rows (row 0 of the
/// batch) at the column of head 0; ld is their row stride in floats.
struct FlashTrainArgs {
  const float* q = nullptr;
  int ldq = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int ldkv = 0;
  float* o = nullptr;  // forward output (read back by flash_delta)
  int ldo = 0;
  float* lse2 = nullptr;  // (tokens, n_heads), written by the forward, read by the backward
  const float* dout = nullptr;
  int lddo = 0;
  float* delta = nullptr;               // (tokens, n_heads) scratch of the backward
  float* ds = nullptr;                  // P-shaped dS: sequence s, head h, query i, key j at
  const std::size_t* ds_off = nullptr;  //   ds[ds_off[s] + (h n + i) n + j] (ds_off on the device)
  float* dk = nullptr;                  // dK, dV per query head h at column h head_dim
  float* dv = nullptr;
  int lddkv = 0;
  const int* off = nullptr;  // device: batch + 1 sequence offsets into the token rows
  int batch = 0, max_len = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, window = 0;
  float scale = 1.0f;
  bool rounded = false;  // q, k, v hold TF32 values already (cvt.rna): the kernels skip rounding them
};

namespace train_kernels {

constexpr int kFlashWarps = 8;  // warps per block: 128 queries (forward) or 128 keys (backward)

// The kernels' tile geometry (rows; shared-memory row strides in floats, see below) and dynamic
// shared memory, one definition for the kernels and their launchers.
template <int HD>
struct FlashFwdTiles {
  // K: row reads (stride HD + 8); V: column reads (stride HD + 4); two stages of [K tile | V tile].
  static constexpr int BQ = 16 * kFlashWarps, BK = 64, SK = HD + 8, SV = HD + 4, STAGE = BK * (SK + SV);
  static constexpr int smem = 2 * STAGE * static_cast<int>(sizeof(float));
};
template <int HD>
struct FlashBwdTiles {
  // K, V: row reads (stride HD + 8); Q, dO: row and column reads (stride HD + 8, swizzled); two
  // stages of [Q tile | dO tile] and of [lse2 | delta].
  static constexpr int BK = 16 * kFlashWarps, BQ = 32, SP = HD + 8, QT = BQ * SP;
  static constexpr int smem = (2 * BK * SP + 4 * QT + 4 * BQ) * static_cast<int>(sizeof(float));
};

// Tile layouts in shared memory (raw float32 as loaded, rounded to TF32 in place before use):
// row stride SP floats, and a column swizzle col ^ swz(row) (bit 3 of the column flipped on rows
// 4..7 of every 8, or never). The fragment reads then hit distinct banks:
//  - "row" reads (rows g, columns 2t..2t+1 of an 8-column group, one 64-bit load; the head
//    dimension's k slots are permuted so that slot t is column 2t and slot t + 4 column 2t + 1):
//    SP = HD + 8, no swizzle needed;
//  - "column" reads (rows 2t and 2t + 1, column g, 32-bit): SP = HD + 4, or SP = HD + 8 with the
//    swizzle, which keeps the row reads conflict-free too (the tiles read both ways: the
//    backward's Q and dO).
template <bool Swz>
__device__ __forceinline__ int flash_swz(int row) {
  return Swz ? ((row >> 2) & 1) << 3 : 0;
}

// Rows [0, R) of a tile into shared memory (stride SP, swizzled if Swz) as raw float32: valid
// rows from g (row stride ld), the rest zero. v4 (g 16-byte aligned, ld a multiple of 4):
// cp.async, the caller commits and waits; otherwise plain loads, done on return.
template <int HD, int R, int SP, bool Swz, int NT>
__device__ __forceinline__ void flash_load(float* sm, const float* g, int ld, int valid, bool v4) {
  if (v4) {
    constexpr int C4 = HD / 4;
    for (int i = threadIdx.x; i < R * C4; i += NT) {
      const int r = i / C4, c = (i - r * C4) * 4;
      kernels::cp_async16(sm + r * SP + (c ^ flash_swz<Swz>(r)), g + static_cast<long long>(r < valid ? r : 0) * ld + c,
                          r < valid ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < R * HD; i += NT) {
      const int r = i / HD, c = i - r * HD;
      sm[r * SP + (c ^ flash_swz<Swz>(r))] = r < valid ? g[static_cast<long long>(r) * ld + c] : 0.0f;
    }
  }
}
// Rounds rows [0, R) (stride SP) to TF32 in place: once per element, not at every fragment read.
template <int HD, int R, int SP, int NT>
__device__ __forceinline__ void flash_round(float* sm) {
  constexpr int C4 = HD / 4;
  for (int i = threadIdx.x; i < R * C4; i += NT) {
    const int r = i / C4, c = (i - r * C4) * 4;
    float4* p = reinterpret_cast<float4*>(sm + r * SP + c);
    const float4 x = *p;
    *reinterpret_cast<uint4*>(p) = make_uint4(kernels::to_tf32(x.x), kernels::to_tf32(x.y), kernels::to_tf32(x.z), kernels::to_tf32(x.w));
  }
}
// Two consecutive 32-bit words of shared memory (8-byte aligned) as one load.
__device__ __forceinline__ uint2 lds64(const unsigned* p) { return *reinterpret_cast<const uint2*>(p); }

// A forward block's place (grid: heads, sequences, query blocks, the last query block, which has
// the most key tiles, launched first so that the shortest blocks fill the last wave): its head,
// sequence, first query and key tile, the thread's warp, fragment coordinates and two query rows.
struct FlashFwdBlock {
  int h, s, begin, n, q0, warp, g, t, kvh, wq, rq0, rq1, kt0, tiles;
  const float *kb, *vb;  // the sequence's K / V rows at the KV head
};
template <int HD, int BQ, int BK>
__device__ __forceinline__ FlashFwdBlock flash_fwd_block(const FlashTrainArgs& a) {
  FlashFwdBlock b;
  b.h = blockIdx.x;
  b.s = blockIdx.y;
  b.begin = a.off[b.s];
  b.n = a.off[b.s + 1] - b.begin;
  b.q0 = static_cast<int>(gridDim.z - 1 - blockIdx.z) * BQ;
  b.warp = threadIdx.x >> 5;
  b.g = (threadIdx.x & 31) >> 2;
  b.t = threadIdx.x & 3;
  b.kvh = b.h / (a.n_heads / a.n_kv_heads);
  b.wq = b.q0 + b.warp * 16;  // the warp's first query
  b.rq0 = b.wq + b.g;
  b.rq1 = b.rq0 + 8;
  const int q_last = min(b.q0 + BQ, b.n) - 1;
  b.kt0 = (a.window > 0 ? max(0, b.q0 - a.window + 1) : 0) / BK;
  b.tiles = q_last / BK - b.kt0 + 1;
  b.kb = a.k + static_cast<long long>(b.begin) * a.ldkv + b.kvh * HD;
  b.vb = a.v + static_cast<long long>(b.begin) * a.ldkv + b.kvh * HD;
  return b;
}
// A backward block's place (grid: heads, sequences, key blocks, the first key block, seen by the
// most queries, launched first): its first key, the thread's two key rows, the query tiles that
// see the block (queries [k0, q_end): the last key k0 + BK - 1 is seen up to k0 + BK - 2 + window).
struct FlashBwdBlock {
  int h, s, begin, n, k0, warp, g, t, kvh, kw, kr0, kr1, tiles;
  const float *qb, *db;  // the sequence's Q / dO rows at the head
};
template <int HD, int BQ, int BK>
__device__ __forceinline__ FlashBwdBlock flash_bwd_block(const FlashTrainArgs& a) {
  FlashBwdBlock b;
  b.h = blockIdx.x;
  b.s = blockIdx.y;
  b.begin = a.off[b.s];
  b.n = a.off[b.s + 1] - b.begin;
  b.k0 = static_cast<int>(blockIdx.z) * BK;
  b.warp = threadIdx.x >> 5;
  b.g = (threadIdx.x & 31) >> 2;
  b.t = threadIdx.x & 3;
  b.kvh = b.h / (a.n_heads / a.n_kv_heads);
  b.kw = b.k0 + b.warp * 16;  // the warp's first key
  b.kr0 = b.kw + b.g;
  b.kr1 = b.kr0 + 8;
  const int q_end = a.window > 0 ? min(b.n, b.k0 + BK - 1 + a.window) : b.n;
  b.tiles = (q_end - b.k0 + BQ - 1) / BQ;
  b.qb = a.q + static_cast<long long>(b.begin) * a.ldq + b.h * HD;
  b.db = a.dout + static_cast<long long>(b.begin) * a.lddo + b.h * HD;
  return b;
}
// The backward's lse2 and delta of the BQ queries from q0 into ld (cp.async; 0 past the sequence,
// masked later), by the first 2 BQ threads.
template <int BQ>
__device__ __forceinline__ void flash_load_lse_delta(const FlashTrainArgs& a, int begin, int n, int h, float* ld, int q0) {
  if (threadIdx.x < 2 * BQ) {
    const int j = static_cast<int>(threadIdx.x) % BQ, i = q0 + j;
    const float* src = (threadIdx.x < BQ ? a.lse2 : a.delta) + static_cast<long long>(begin + min(i, n - 1)) * a.n_heads + h;
    kernels::cp_async4(ld + threadIdx.x, src, i < n ? 4 : 0);
  }
}
// Double buffering: starts tile it + 1's copies (load, into the stage tile it - 1 used) and waits
// for this thread's copies of tile it.
template <class Load>
__device__ __forceinline__ void flash_next_tile(Load& load, int it, int tiles) {
  if (it + 1 < tiles) {
    load(it + 1);
    kernels::cp_async_wait<1>();
  } else {
    kernels::cp_async_wait<0>();
  }
}

// One 64-key tile of the forward's online softmax for the thread's two query rows rq0, rq1 (the
// warp's rows start at wq): masks the scores sc (8 n8 tiles, keys from k0; causal / window) on
// tiles that cross a limit, moves the running max m and sum l, rescales O, and leaves the
// unnormalised P = 2^(c s - c m) in sc.
template <int NO>
__device__ __forceinline__ void flash_fwd_softmax(float (&sc)[8][4], float (&o)[NO][4], float (&m)[2], float (&l)[2], int k0, int wq,
                                                  int rq0, int rq1, int t, int window, float c) {
  // Masked on tiles reaching past the warp's first query or before its last query's window.
  if (k0 + 63 > wq || (window > 0 && k0 <= wq + 15 - window)) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + j * 8 + 2 * t + (e & 1), row = e < 2 ? rq0 : rq1;
        if (key > row || (window > 0 && row - key >= window)) sc[j][e] = -INFINITY;
      }
  }
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(sc[j][0], sc[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(sc[j][2], sc[j][3]));
  }
  float alpha[2], mc[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = quad_max(mx[r]);
    const float mu = mx[r] == -INFINITY ? 0.0f : mx[r];  // a row with nothing visible yet
    alpha[r] = kernels::fast_exp2((m[r] - mu) * c);
    m[r] = mx[r];
    mc[r] = mu * c;
  }
  float rs[2] = {0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    sc[j][0] = kernels::fast_exp2(fmaf(sc[j][0], c, -mc[0]));
    sc[j][1] = kernels::fast_exp2(fmaf(sc[j][1], c, -mc[0]));
    sc[j][2] = kernels::fast_exp2(fmaf(sc[j][2], c, -mc[1]));
    sc[j][3] = kernels::fast_exp2(fmaf(sc[j][3], c, -mc[1]));
    rs[0] += sc[j][0] + sc[j][1];
    rs[1] += sc[j][2] + sc[j][3];
  }
  l[0] = l[0] * alpha[0] + rs[0];
  l[1] = l[1] * alpha[1] + rs[1];
  // Once the rows' maxima settle (most tiles of a long row) alpha is exactly 1: skip the multiplies
  // unless some row of the warp moved.
  if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) kernels::rescale_rows(o, alpha);
}

// The forward's epilogue: O = acc / l and lse2 of the thread's two rows (the quad sums l first).
template <int NO>
__device__ __forceinline__ void flash_fwd_store(const FlashTrainArgs& a, const float (&o)[NO][4], float (&l)[2], const float (&m)[2],
                                                int begin, int n, int h, int rq0, int rq1, int t, float c) {
  constexpr int HD = NO * 8, KS = NO;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
  }
  float* ob = a.o + static_cast<long long>(begin) * a.ldo + h * HD + 2 * t;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? rq0 : rq1;
    if (row >= n) continue;
    const float inv = 1.0f / l[r];
    float* orow = ob + static_cast<long long>(row) * a.ldo;
#pragma unroll
    for (int nt = 0; nt < KS; ++nt) {
      orow[nt * 8] = o[nt][2 * r] * inv;
      orow[nt * 8 + 1] = o[nt][2 * r + 1] * inv;
    }
    if (t == 0) a.lse2[static_cast<long long>(begin + row) * a.n_heads + h] = m[r] * c + log2f(l[r]);
  }
}

template <int HD>
static __global__ void __launch_bounds__(kFlashWarps * 32, 1) flash_train_fwd(FlashTrainArgs a, bool v4) {
  using kernels::mma_tf32;
  using kernels::to_tf32;
  using T = FlashFwdTiles<HD>;
  constexpr int NT = kFlashWarps * 32, BQ = T::BQ, BK = T::BK, SK = T::SK, SV = T::SV, KS = HD / 8, STAGE = T::STAGE;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  float* sm = reinterpret_cast<float*>(flash_smem);  // two stages of [K tile | V tile]
  const FlashFwdBlock b = flash_fwd_block<HD, BQ, BK>(a);
  if (b.q0 >= b.n) return;
  const int h = b.h, begin = b.begin, n = b.n, g = b.g, t = b.t, wq = b.wq, rq0 = b.rq0, rq1 = b.rq1, kt0 = b.kt0, tiles = b.tiles;
  const float *kb = b.kb, *vb = b.vb;
  auto load = [&](int it) {
    const int k0 = (kt0 + it) * BK;
    float* st = sm + (it & 1) * STAGE;
    flash_load<HD, BK, SK, false, NT>(st, kb + static_cast<long long>(k0) * a.ldkv, a.ldkv, n - k0, v4);
    flash_load<HD, BK, SV, false, NT>(st + BK * SK, vb + static_cast<long long>(k0) * a.ldkv, a.ldkv, n - k0, v4);
    kernels::cp_async_commit();
  };
  load(0);
  // Q as A fragments, head dimension permuted as the K row reads: slot t = column 2t, t + 4 = 2t + 1.
  unsigned qf[KS][4];
  {
    const float* p0 = a.q + static_cast<long long>(begin + rq0) * a.ldq + h * HD;
    const float* p1 = p0 + 8LL * a.ldq;
    const bool v0 = rq0 < n, v1 = rq1 < n;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qf[ks][0] = v0 ? to_tf32(p0[ks * 8 + 2 * t]) : 0u;
      qf[ks][1] = v1 ? to_tf32(p1[ks * 8 + 2 * t]) : 0u;
      qf[ks][2] = v0 ? to_tf32(p0[ks * 8 + 2 * t + 1]) : 0u;
      qf[ks][3] = v1 ? to_tf32(p1[ks * 8 + 2 * t + 1]) : 0u;
    }
  }
  float o[KS][4];
#pragma unroll
  for (int j = 0; j < KS; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float c = a.scale * 1.4426950408889634f;
  for (int it = 0; it < tiles; ++it) {
    flash_next_tile(load, it, tiles);
    __syncthreads();
    float* Ks = sm + (it & 1) * STAGE;
    if (!a.rounded) {
      flash_round<HD, BK, SK, NT>(Ks);
      flash_round<HD, BK, SV, NT>(Ks + BK * SK);
      __syncthreads();
    }
    const unsigned* Ku = reinterpret_cast<const unsigned*>(Ks);
    const unsigned* Vu = Ku + BK * SK;
    const int k0 = (kt0 + it) * BK;
    // The warp's rows see none of the tile: all keys after them, or all before their window.
    const bool none = wq >= n || k0 > wq + 15 || (a.window > 0 && k0 + BK - 1 <= wq - a.window);
    if (!none) {
      float sc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint2 b = lds64(Ku + (j * 8 + g) * SK + ks * 8 + 2 * t);
          mma_tf32(sc[j], qf[ks], b.x, b.y);
        }
      flash_fwd_softmax(sc, o, m, l, k0, wq, rq0, rq1, t, a.window, c);
      // O += P V over the tile's 64 keys, 8 at a time (k permuted: slot t = key 2t, t + 4 = key 2t + 1).
#pragma unroll
      for (int kk = 0; kk < 8; ++kk) {
        const unsigned pa[4] = {to_tf32(sc[kk][0]), to_tf32(sc[kk][2]), to_tf32(sc[kk][1]), to_tf32(sc[kk][3])};
        const unsigned* vr = Vu + (kk * 8 + 2 * t) * SV + g;
#pragma unroll
        for (int nt = 0; nt < KS; ++nt) mma_tf32(o[nt], pa, vr[nt * 8], vr[SV + nt * 8]);
      }
    }
    __syncthreads();  // this stage is free for the load two iterations on
  }
  flash_fwd_store(a, o, l, m, begin, n, h, rq0, rq1, t, c);
}

// delta[row * heads + h] = sum_d dO o O over head h's hd columns. One warp per (row, head).
static __global__ void flash_delta(const float* o, int ldo, const float* dout, int lddo, float* delta, int rows, int heads, int hd) {
  const long long w = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (w >= static_cast<long long>(rows) * heads) return;
  const long long r = w / heads;
  const int h = static_cast<int>(w - r * heads);
  const float* x = o + r * ldo + h * hd;
  const float* y = dout + r * lddo + h * hd;
  float acc = 0.0f;
  for (int d = lane; d < hd; d += 32) acc += x[d] * y[d];
  acc = warp_sum(acc);
  if (lane == 0) delta[w] = acc;
}

// The backward's P^T = 2^(c S^T - lse2) and dS^T = P^T o (dP^T - D) of a warp's (16 keys x 32
// queries) tile, in place of S^T (st4) and dP^T (dp): keys kr0, kr1 (the warp's start at kw),
// queries from q0, masked (causal, window, past the sequence) on tiles that cross a limit.
__device__ __forceinline__ void flash_bwd_p_ds(float (&st4)[4][4], float (&dp)[4][4], const float* Ls, const float* Ds, int q0, int kw,
                                               int kr0, int kr1, int n, int window, int t, float c) {
  // Masks: causal / window on tiles crossing them, and queries past the sequence.
  const bool edge = kw + 15 > q0 || (window > 0 && q0 + 32 - 1 - kw >= window) || q0 + 32 > n;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * t + (e & 1), qi = q0 + col, key = e < 2 ? kr0 : kr1;
      float p = kernels::fast_exp2(fmaf(st4[j][e], c, -Ls[col]));
      if (edge && (qi < key || qi >= n || (window > 0 && qi - key >= window))) p = 0.0f;
      st4[j][e] = p;                        // P^T
      dp[j][e] = p * (dp[j][e] - Ds[col]);  // dS^T
    }
}

// dS^T of a warp's tile (keys kr0, kr1; queries from q0) into the (query, key) rows of dsb (row
// length n), inside the sequence.
__device__ __forceinline__ void flash_store_ds(float* dsb, const float (&dp)[4][4], int q0, int kr0, int kr1, int n, int t) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = q0 + j * 8 + 2 * t + (e & 1), key = e < 2 ? kr0 : kr1;
      if (qi < n && key < n) dsb[static_cast<std::size_t>(qi) * n + key] = dp[j][e];
    }
}

// The backward's epilogue: dK (times the scale) and dV rows of the thread's two keys.
template <int NO>
__device__ __forceinline__ void flash_bwd_store(const FlashTrainArgs& a, const float (&dk)[NO][4], const float (&dv)[NO][4], int begin,
                                                int n, int h, int kr0, int kr1, int t) {
  constexpr int HD = NO * 8, KS = NO;
  float* dkb = a.dk + static_cast<long long>(begin) * a.lddkv + h * HD + 2 * t;
  float* dvb = a.dv + static_cast<long long>(begin) * a.lddkv + h * HD + 2 * t;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = r == 0 ? kr0 : kr1;
    if (key >= n) continue;
    const long long at = static_cast<long long>(key) * a.lddkv;
#pragma unroll
    for (int nt = 0; nt < KS; ++nt) {
      dkb[at + nt * 8] = dk[nt][2 * r] * a.scale;
      dkb[at + nt * 8 + 1] = dk[nt][2 * r + 1] * a.scale;
      dvb[at + nt * 8] = dv[nt][2 * r];
      dvb[at + nt * 8 + 1] = dv[nt][2 * r + 1];
    }
  }
}

template <int HD>
static __global__ void __launch_bounds__(kFlashWarps * 32, 1) flash_train_bwd(FlashTrainArgs a, bool v4) {
  using kernels::mma_tf32;
  using kernels::to_tf32;
  using T = FlashBwdTiles<HD>;
  constexpr int NT = kFlashWarps * 32, BK = T::BK, BQ = T::BQ, SP = T::SP, KS = HD / 8, QT = T::QT;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  float* Ks = reinterpret_cast<float*>(flash_smem);
  float* Vs = Ks + BK * SP;
  float* stage0 = Vs + BK * SP;  // two stages of [Q tile | dO tile]
  float* LD = stage0 + 4 * QT;   // two stages of [lse2 | delta] (BQ each)
  // (The block's place is computed inline here, not by flash_bwd_block: at head_dim 128 this
  // kernel sits at 255 registers, and the struct form made ptxas spill.)
  const int h = blockIdx.x, s = blockIdx.y;
  const int begin = a.off[s], n = a.off[s + 1] - begin;
  const int k0 = static_cast<int>(blockIdx.z) * BK;
  if (k0 >= n) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  flash_load<HD, BK, SP, false, NT>(Ks, a.k + static_cast<long long>(begin + k0) * a.ldkv + kvh * HD, a.ldkv, n - k0, v4);
  flash_load<HD, BK, SP, false, NT>(Vs, a.v + static_cast<long long>(begin + k0) * a.ldkv + kvh * HD, a.ldkv, n - k0, v4);
  const int kw = k0 + warp * 16;          // the warp's first key
  const int kr0 = kw + g, kr1 = kr0 + 8;  // the thread's two key rows
  const float c = a.scale * 1.4426950408889634f;
  const int q_end = a.window > 0 ? min(n, k0 + BK - 1 + a.window) : n;
  const int tiles = (q_end - k0 + BQ - 1) / BQ;
  const float* qb = a.q + static_cast<long long>(begin) * a.ldq + h * HD;
  const float* db = a.dout + static_cast<long long>(begin) * a.lddo + h * HD;
  auto load = [&](int it) {
    const int q0 = k0 + it * BQ;
    float* st = stage0 + 2 * (it & 1) * QT;
    flash_load<HD, BQ, SP, true, NT>(st, qb + static_cast<long long>(q0) * a.ldq, a.ldq, n - q0, v4);
    flash_load<HD, BQ, SP, true, NT>(st + QT, db + static_cast<long long>(q0) * a.lddo, a.lddo, n - q0, v4);
    flash_load_lse_delta<BQ>(a, begin, n, h, LD + 2 * BQ * (it & 1), q0);
    kernels::cp_async_commit();
  };
  load(0);  // K and V ride in its commit group
  float dk[KS][4], dv[KS][4];
#pragma unroll
  for (int j = 0; j < KS; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.0f;
  float* dsb = a.ds + a.ds_off[s] + static_cast<std::size_t>(h) * n * n;
  const unsigned* Ku = reinterpret_cast<const unsigned*>(Ks);
  const unsigned* Vu = reinterpret_cast<const unsigned*>(Vs);
  // Column reads of Q / dO rows 2t and 2t + 1 (same swizzle: rows 4..7 of 8 iff t >= 2).
  const int cswz = flash_swz<true>(2 * t);
  for (int it = 0; it < tiles; ++it) {
    flash_next_tile(load, it, tiles);
    __syncthreads();
    float* st = stage0 + 2 * (it & 1) * QT;
    if (a.rounded) {
      flash_round<HD, BQ, SP, NT>(st + QT);  // dO only
    } else {
      if (it == 0) flash_round<HD, 2 * BK, SP, NT>(Ks);  // K and V are contiguous
      flash_round<HD, 2 * BQ, SP, NT>(st);               // so are Q and dO
    }
    __syncthreads();
    const unsigned* Qu = reinterpret_cast<const unsigned*>(st);
    const unsigned* Ou = Qu + QT;  // dO
    const float* Ls = LD + 2 * BQ * (it & 1);
    const float* Ds = Ls + BQ;
    const int q0 = k0 + it * BQ;
    // Nothing of this tile is visible from the warp's keys: every key after every query, or
    // every query past the window of every key (or no key in the sequence).
    const bool none = kw >= n || kw > q0 + BQ - 1 || (a.window > 0 && q0 - (kw + 15) >= a.window);
    if (!none) {
      float st4[4][4], dp[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) st4[j][0] = st4[j][1] = st4[j][2] = st4[j][3] = dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // A fragments of the warp's K and V rows, head dimension permuted (slot t = column 2t).
        const int ka_off = (warp * 16 + g) * SP + ks * 8 + 2 * t;
        const uint2 k0f = lds64(Ku + ka_off), k1f = lds64(Ku + ka_off + 8 * SP);
        const uint2 v0f = lds64(Vu + ka_off), v1f = lds64(Vu + ka_off + 8 * SP);
        const unsigned ka[4] = {k0f.x, k1f.x, k0f.y, k1f.y};
        const unsigned va[4] = {v0f.x, v1f.x, v0f.y, v1f.y};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int r = j * 8 + g, off = r * SP + ((ks * 8) ^ flash_swz<true>(r)) + 2 * t;
          const uint2 qv = lds64(Qu + off), dv2 = lds64(Ou + off);
          mma_tf32(st4[j], ka, qv.x, qv.y);   // S^T = K Q^T
          mma_tf32(dp[j], va, dv2.x, dv2.y);  // dP^T = V dO^T
        }
      }
      flash_bwd_p_ds(st4, dp, Ls, Ds, q0, kw, kr0, kr1, n, a.window, t, c);
      // dV += P^T dO, dK += dS^T Q over the tile's 32 queries, 8 at a time (k permuted: slot t =
      // query 2t, t + 4 = query 2t + 1).
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const unsigned pa[4] = {to_tf32(st4[kk][0]), to_tf32(st4[kk][2]), to_tf32(st4[kk][1]), to_tf32(st4[kk][3])};
        const unsigned sa[4] = {to_tf32(dp[kk][0]), to_tf32(dp[kk][2]), to_tf32(dp[kk][1]), to_tf32(dp[kk][3])};
        const int row = (kk * 8 + 2 * t) * SP;
#pragma unroll
        for (int nt = 0; nt < KS; ++nt) {
          const int col = (nt * 8 + g) ^ cswz;
          mma_tf32(dv[nt], pa, Ou[row + col], Ou[row + SP + col]);
          mma_tf32(dk[nt], sa, Qu[row + col], Qu[row + SP + col]);
        }
      }
      flash_store_ds(dsb, dp, q0, kr0, kr1, n, t);
    }
    __syncthreads();  // this stage is free for the load two iterations on
  }
  flash_bwd_store(a, dk, dv, begin, n, h, kr0, kr1, t);
}

// ---- The wgmma (sm_90a) forms: every product on warpgroup MMAs ----
// Same blocks as the mma.sync kernels (eight warps = two warpgroups of 64 rows); all tiles are
// float32 in the 128-byte-swizzled layout of wgmma.cuh. tf32 wgmma takes only K-major operands,
// so the products that contract over keys (forward O += P V) or queries (backward dV += P^T dO,
// dK += dS^T Q) read a transposed copy of V, dO and Q made in shared memory for each tile. P (or
// P^T, dS^T) stays in registers as the A operand: a thread's accumulator pair (columns 2t, 2t + 1)
// becomes the fragment's (t, t + 4) slots, so the copy stores the rows of every 8 in that order.
template <int HD>
struct FlashFwdWgTiles {
  // [Q | two stages of [K | V] | V^T], each piece a multiple of 1024 bytes; slack for the boundary.
  static constexpr int BQ = 16 * kFlashWarps, BK = 64, QT = BQ * HD, KT = BK * HD;
  static constexpr int smem = (QT + 5 * KT) * static_cast<int>(sizeof(float)) + 1024;
};
template <int HD>
struct FlashBwdWgTiles {
  // [K | V | two stages of [Q | dO] | Q^T | dO^T | two stages of [lse2 | delta]]; slack as above.
  static constexpr int BK = 16 * kFlashWarps, BQ = 32, KV = BK * HD, QT = BQ * HD;
  static constexpr int smem = (2 * KV + 6 * QT + 4 * BQ) * static_cast<int>(sizeof(float)) + 1024;
};

// Rows [0, R) of an (R, HD) tile into the swizzled layout: valid rows from g (row stride ld), the
// rest zero; v4 as flash_load. With v4 each thread copies the same 16-byte chunk of every
// (NT / (HD / 4))-th row: its shared offsets differ by whole swizzle rows and its global ones by a
// fixed stride, so a copy costs one add (the pass count is a compile-time constant).
template <int HD, int R, int NT>
__device__ __forceinline__ void flash_load_sw(float* sm, const float* g, int ld, int valid, bool v4) {
  constexpr int C4 = HD / 4, RP = NT / C4;  // chunks per row, rows per pass
  static_assert(NT % C4 == 0 && RP % 8 == 0 && R % RP == 0, "whole swizzle rows per pass");
  if (v4) {
    const int r0 = static_cast<int>(threadIdx.x) / C4, c = static_cast<int>(threadIdx.x) % C4;
    unsigned char* d = reinterpret_cast<unsigned char*>(sm) + kernels::sw128_offset_rows<R>(r0, c);
    const float* src = g + static_cast<long long>(r0) * ld + c * 4;
#pragma unroll
    for (int k = 0; k < R / RP; ++k) {
      const bool in = r0 + k * RP < valid;
      kernels::cp_async16(d + k * RP * 128, in ? src + static_cast<long long>(k) * RP * ld : g, in ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < R * HD; i += NT) {
      const int r = i / HD, c = i - r * HD;
      sm[kernels::sw128_index_f32<R>(r, c)] = r < valid ? g[static_cast<long long>(r) * ld + c] : 0.0f;
    }
  }
}

// Rounds COUNT contiguous floats (the swizzled tiles have no padding) to TF32 in place, one float4
// per thread and pass.
template <int COUNT, int NT>
__device__ __forceinline__ void flash_round_flat(float* sm) {
  static_assert(COUNT % (4 * NT) == 0, "whole passes");
  float4* p = reinterpret_cast<float4*>(sm) + threadIdx.x;
#pragma unroll 8
  for (int k = 0; k < COUNT / (4 * NT); ++k) {
    const float4 x = p[k * NT];
    *reinterpret_cast<uint4*>(p + k * NT) =
        make_uint4(kernels::to_tf32(x.x), kernels::to_tf32(x.y), kernels::to_tf32(x.z), kernels::to_tf32(x.w));
  }
}

// dst (HD, R) = src (R, HD)^T, both swizzled, with src's rows stored in the fragment order: inside
// every 8, row 2p' goes to slot p' and row 2p' + 1 to slot p' + 4. round: rounded to TF32 on the
// way, and with WriteBack the rounded values also replace src's. Thread tid takes row tid % R and
// the chunks tid / R + k CP (CP = NT / R per pass): a warp reads 32 rows' same chunk (whole
// swizzle rows, no conflicts) and writes 32 slots of one dst row. Every offset is a per-thread
// constant plus a compile-time one.
template <int HD, int R, int NT, bool WriteBack>
__device__ __forceinline__ void flash_transpose_sw(float* dst, float* src, bool round) {
  constexpr int CP = NT / R;
  static_assert(R % 32 == 0 && NT % R == 0 && 8 % CP == 0 && (HD / 4) % CP == 0, "passes of whole chunk groups");
  const int r = static_cast<int>(threadIdx.x) % R, c0 = static_cast<int>(threadIdx.x) / R;
  const int slot = (r & ~7) | ((r >> 1) & 3) | ((r & 1) << 2);
  // src (row r, chunk c0 + k CP) = sbase + ((k CP) / 8) R 32 + ((sx ^ ((k CP) % 8)) << 2): c0 < CP
  // and (k CP) % 8 is a multiple of CP, so the chunk's low bits are c0 | that.
  float* sbase = src + r * 32;
  const int sx = c0 ^ (r & 7);
  // dst (row 4 c + j, slot) = dbase + 128 k CP + 32 j + dx[j]: (4 c + j) % 8 = 4 (c0 % 2) + j.
  float* dbase = dst + (slot >> 5) * (HD * 32) + 128 * c0 + (slot & 3);
  int dx[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) dx[j] = (((slot >> 2) & 7) ^ (4 * (c0 & 1) + j)) << 2;
#pragma unroll
  for (int k = 0; k < (HD / 4) / CP; ++k) {
    float4* sp = reinterpret_cast<float4*>(sbase + ((k * CP) >> 3) * (R * 32) + ((sx ^ ((k * CP) & 7)) << 2));
    float4 x = *sp;
    if (round) {
      x = make_float4(__uint_as_float(kernels::to_tf32(x.x)), __uint_as_float(kernels::to_tf32(x.y)),
                      __uint_as_float(kernels::to_tf32(x.z)), __uint_as_float(kernels::to_tf32(x.w)));
      if constexpr (WriteBack) *sp = x;
    }
    float* d = dbase + 128 * k * CP;
    d[dx[0]] = x.x;
    d[32 + dx[1]] = x.y;
    d[64 + dx[2]] = x.z;
    d[96 + dx[3]] = x.w;
  }
}

// d (64 x N) = A B^T over the head dimension: A the warpgroup's 64 rows of a swizzled tile of
// a_rows rows, B the b_rows rows of another (N = b_rows), 8 columns per wgmma; waits for it. With
// Two, a second product (d2 = a2 b2^T) shares the commit group; otherwise d2, a2, b2 are unused.
template <int HD, int NJ, bool Two>
__device__ __forceinline__ void flash_wg_scores(float (&d1)[NJ][4], const float* a1, const float* b1, float (&d2)[NJ][4], const float* a2,
                                                const float* b2, int a_rows) {
#if defined(CACHESHRINK_WGMMA_DEVICE)
  constexpr int b_rows = NJ * 8;
  const std::uint64_t da1 = kernels::sw128_desc(a1, 16, 1024), db1 = kernels::sw128_desc(b1, 16, 1024);
  const std::uint64_t da2 = kernels::sw128_desc(a2, 16, 1024), db2 = kernels::sw128_desc(b2, 16, 1024);
  kernels::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < HD / 8; ++ks) {
    const int oa = (ks >> 2) * (a_rows * 128) + (ks & 3) * 32, ob = (ks >> 2) * (b_rows * 128) + (ks & 3) * 32;
    if constexpr (NJ == 4) {
      kernels::wgmma_m64n32k8_tf32_ss(d1, kernels::sw128_desc_add(da1, oa), kernels::sw128_desc_add(db1, ob), ks > 0);
      if constexpr (Two) kernels::wgmma_m64n32k8_tf32_ss(d2, kernels::sw128_desc_add(da2, oa), kernels::sw128_desc_add(db2, ob), ks > 0);
    } else {
      kernels::wgmma_m64n64k8_tf32_ss(d1, kernels::sw128_desc_add(da1, oa), kernels::sw128_desc_add(db1, ob), ks > 0);
      if constexpr (Two) kernels::wgmma_m64n64k8_tf32_ss(d2, kernels::sw128_desc_add(da2, oa), kernels::sw128_desc_add(db2, ob), ks > 0);
    }
  }
  kernels::wgmma_commit();
  kernels::wgmma_wait<0>();
  kernels::wgmma_fence_operands(d1);
  if constexpr (Two) kernels::wgmma_fence_operands(d2);
#else
  (void)d1, (void)a1, (void)b1, (void)d2, (void)a2, (void)b2, (void)a_rows;
  __trap();
#endif
}

// acc (64 x HD) += A B over KK k-steps of 8: A in registers (a[kk], fragment order), B a swizzled
// transposed tile (HD rows; k-step kk at column block kk / 4, + 32 bytes per step inside it). Two
// such products (Two) share one commit group. Returns with them in flight: the caller does
// other work and then flash_wg_wait (acc and a must not be touched before).
template <int HD, int KK, bool Two>
__device__ __forceinline__ void flash_wg_accumulate(float (&acc1)[HD / 8][4], unsigned (&a1)[KK][4], const float* b1,
                                                    float (&acc2)[HD / 8][4], unsigned (&a2)[KK][4], const float* b2) {
#if defined(CACHESHRINK_WGMMA_DEVICE)
  const std::uint64_t d1 = kernels::sw128_desc(b1, 16, 1024), d2 = kernels::sw128_desc(b2, 16, 1024);
  kernels::wgmma_fence_operands(acc1);
  kernels::wgmma_fence_operands(a1);
  if constexpr (Two) {
    kernels::wgmma_fence_operands(acc2);
    kernels::wgmma_fence_operands(a2);
  }
  kernels::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const int off = (kk >> 2) * (HD * 128) + (kk & 3) * 32;
    if constexpr (HD == 128) {
      kernels::wgmma_m64n128k8_tf32_rs(acc1, a1[kk], kernels::sw128_desc_add(d1, off), 1);
      if constexpr (Two) kernels::wgmma_m64n128k8_tf32_rs(acc2, a2[kk], kernels::sw128_desc_add(d2, off), 1);
    } else if constexpr (HD == 64) {
      kernels::wgmma_m64n64k8_tf32_rs(acc1, a1[kk], kernels::sw128_desc_add(d1, off), 1);
      if constexpr (Two) kernels::wgmma_m64n64k8_tf32_rs(acc2, a2[kk], kernels::sw128_desc_add(d2, off), 1);
    } else {
      kernels::wgmma_m64n32k8_tf32_rs(acc1, a1[kk], kernels::sw128_desc_add(d1, off), 1);
      if constexpr (Two) kernels::wgmma_m64n32k8_tf32_rs(acc2, a2[kk], kernels::sw128_desc_add(d2, off), 1);
    }
  }
  kernels::wgmma_commit();
#else
  (void)acc1, (void)a1, (void)b1, (void)acc2, (void)a2, (void)b2;
  __trap();
#endif
}
// Waits for flash_wg_accumulate's products.
template <int HD, bool Two>
__device__ __forceinline__ void flash_wg_wait(float (&acc1)[HD / 8][4], float (&acc2)[HD / 8][4]) {
#if defined(CACHESHRINK_WGMMA_DEVICE)
  kernels::wgmma_wait<0>();
  kernels::wgmma_fence_operands(acc1);
  if constexpr (Two) kernels::wgmma_fence_operands(acc2);
#else
  (void)acc1, (void)acc2;
#endif
}

// A fragments (fragment order) of an accumulator tile: rows g, g + 8; slot t = column 2t, t + 4 = 2t + 1.
template <int NJ>
__device__ __forceinline__ void flash_fragments(unsigned (&f)[NJ][4], const float (&x)[NJ][4]) {
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    f[j][0] = kernels::to_tf32(x[j][0]);
    f[j][1] = kernels::to_tf32(x[j][2]);
    f[j][2] = kernels::to_tf32(x[j][1]);
    f[j][3] = kernels::to_tf32(x[j][3]);
  }
}

template <int HD>
static __global__ void __launch_bounds__(kFlashWarps * 32, 1) flash_train_fwd_wg(FlashTrainArgs a, bool v4) {
  using T = FlashFwdWgTiles<HD>;
  constexpr int NT = kFlashWarps * 32, BQ = T::BQ, BK = T::BK, KT = T::KT;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  float* Qs = reinterpret_cast<float*>(kernels::smem_align_1024(flash_smem));
  float* stages = Qs + T::QT;  // two stages of [K | V]
  float* Vt = stages + 4 * KT;
  const FlashFwdBlock b = flash_fwd_block<HD, BQ, BK>(a);
  if (b.q0 >= b.n) return;
  const int h = b.h, begin = b.begin, n = b.n, q0 = b.q0, warp = b.warp, t = b.t, wq = b.wq, rq0 = b.rq0, rq1 = b.rq1, kt0 = b.kt0,
            tiles = b.tiles;
  const int wgq = q0 + (warp >> 2) * 64;  // the warpgroup's first query
  const float *kb = b.kb, *vb = b.vb;
  auto load = [&](int it) {
    const int k0 = (kt0 + it) * BK;
    float* st = stages + 2 * (it & 1) * KT;
    flash_load_sw<HD, BK, NT>(st, kb + static_cast<long long>(k0) * a.ldkv, a.ldkv, n - k0, v4);
    flash_load_sw<HD, BK, NT>(st + KT, vb + static_cast<long long>(k0) * a.ldkv, a.ldkv, n - k0, v4);
    kernels::cp_async_commit();
  };
  flash_load_sw<HD, BQ, NT>(Qs, a.q + static_cast<long long>(begin + q0) * a.ldq + h * HD, a.ldq, n - q0, v4);
  load(0);  // Q rides in its commit group
  float o[HD / 8][4];
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const float c = a.scale * 1.4426950408889634f;
  for (int it = 0; it < tiles; ++it) {
    flash_next_tile(load, it, tiles);
    __syncthreads();
    float* Ks = stages + 2 * (it & 1) * KT;
    if (!a.rounded) {
      if (it == 0) flash_round_flat<BQ * HD, NT>(Qs);
      flash_round_flat<BK * HD, NT>(Ks);
    }
    flash_transpose_sw<HD, BK, NT, false>(Vt, Ks + KT, !a.rounded);
    kernels::fence_proxy_async();  // the generic-proxy writes, visible to wgmma's operand reads
    __syncthreads();
    const int k0 = (kt0 + it) * BK;
    // Nothing of the tile visible to the warp's (warpgroup's) rows: all keys after them, or all
    // before their window. The warpgroup issues its products together.
    const bool none = wq >= n || k0 > wq + 15 || (a.window > 0 && k0 + BK - 1 <= wq - a.window);
    const bool wg_none = wgq >= n || k0 > wgq + 63 || (a.window > 0 && k0 + BK - 1 <= wgq - a.window);
    if (!wg_none) {
      float sc[8][4];
      flash_wg_scores<HD, 8, false>(sc, Qs + (warp >> 2) * 64 * 32, Ks, sc, Qs, Ks, BQ);  // S = Q K^T
      unsigned pa[8][4];
      if (!none) {
        flash_fwd_softmax(sc, o, m, l, k0, wq, rq0, rq1, t, a.window, c);
        flash_fragments(pa, sc);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) pa[j][0] = pa[j][1] = pa[j][2] = pa[j][3] = 0u;
      }
      flash_wg_accumulate<HD, 8, false>(o, pa, Vt, o, pa, Vt);  // O += P V
      flash_wg_wait<HD, false>(o, o);
    }
    __syncthreads();  // Vt and this stage are free again
  }
  flash_fwd_store(a, o, l, m, begin, n, h, rq0, rq1, t, c);
}

template <int HD>
static __global__ void __launch_bounds__(kFlashWarps * 32, 1) flash_train_bwd_wg(FlashTrainArgs a, bool v4) {
  using T = FlashBwdWgTiles<HD>;
  constexpr int NT = kFlashWarps * 32, BK = T::BK, BQ = T::BQ, KV = T::KV, QT = T::QT;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  float* Ks = reinterpret_cast<float*>(kernels::smem_align_1024(flash_smem));
  float* Vs = Ks + KV;
  float* stages = Vs + KV;  // two stages of [Q | dO]
  float* Qt = stages + 4 * QT;
  float* Ot = Qt + QT;  // dO^T
  float* LD = Ot + QT;  // two stages of [lse2 | delta]
  const FlashBwdBlock b = flash_bwd_block<HD, BQ, BK>(a);
  if (b.k0 >= b.n) return;
  const int h = b.h, s = b.s, begin = b.begin, n = b.n, k0 = b.k0, warp = b.warp, t = b.t, kw = b.kw, kr0 = b.kr0, kr1 = b.kr1,
            tiles = b.tiles;
  const int wgk = k0 + (warp >> 2) * 64;  // the warpgroup's first key
  flash_load_sw<HD, BK, NT>(Ks, a.k + static_cast<long long>(begin + k0) * a.ldkv + b.kvh * HD, a.ldkv, n - k0, v4);
  flash_load_sw<HD, BK, NT>(Vs, a.v + static_cast<long long>(begin + k0) * a.ldkv + b.kvh * HD, a.ldkv, n - k0, v4);
  const float c = a.scale * 1.4426950408889634f;
  auto load = [&](int it) {
    const int q0 = k0 + it * BQ;
    float* st = stages + 2 * (it & 1) * QT;
    flash_load_sw<HD, BQ, NT>(st, b.qb + static_cast<long long>(q0) * a.ldq, a.ldq, n - q0, v4);
    flash_load_sw<HD, BQ, NT>(st + QT, b.db + static_cast<long long>(q0) * a.lddo, a.lddo, n - q0, v4);
    flash_load_lse_delta<BQ>(a, begin, n, h, LD + 2 * BQ * (it & 1), q0);
    kernels::cp_async_commit();
  };
  load(0);  // K and V ride in its commit group
  float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.0f;
  float* dsb = a.ds + a.ds_off[s] + static_cast<std::size_t>(h) * n * n;
  const int ko = (warp >> 2) * 64 * 32;  // the warpgroup's rows of K and V (row 64 x 128 bytes on)
  for (int it = 0; it < tiles; ++it) {
    flash_next_tile(load, it, tiles);
    __syncthreads();
    float* st = stages + 2 * (it & 1) * QT;
    if (!a.rounded && it == 0) flash_round_flat<2 * BK * HD, NT>(Ks);  // K and V are contiguous
    flash_transpose_sw<HD, BQ, NT, true>(Qt, st, !a.rounded);
    flash_transpose_sw<HD, BQ, NT, true>(Ot, st + QT, true);
    kernels::fence_proxy_async();
    __syncthreads();
    const float* Ls = LD + 2 * BQ * (it & 1);
    const float* Ds = Ls + BQ;
    const int q0 = k0 + it * BQ;
    const bool none = kw >= n || kw > q0 + BQ - 1 || (a.window > 0 && q0 - (kw + 15) >= a.window);
    const bool wg_none = wgk >= n || wgk > q0 + BQ - 1 || (a.window > 0 && q0 - (wgk + 63) >= a.window);
    if (!wg_none) {
      float st4[4][4], dp[4][4];
      flash_wg_scores<HD, 4, true>(st4, Ks + ko, st, dp, Vs + ko, st + QT, BK);  // S^T = K Q^T, dP^T = V dO^T
      unsigned pa[4][4], sa[4][4];
      if (!none) {
        flash_bwd_p_ds(st4, dp, Ls, Ds, q0, kw, kr0, kr1, n, a.window, t, c);
        flash_fragments(pa, st4);
        flash_fragments(sa, dp);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) pa[j][0] = pa[j][1] = pa[j][2] = pa[j][3] = sa[j][0] = sa[j][1] = sa[j][2] = sa[j][3] = 0u;
      }
      flash_wg_accumulate<HD, 4, true>(dv, pa, Ot, dk, sa, Qt);  // dV += P^T dO, dK += dS^T Q
      if (!none) flash_store_ds(dsb, dp, q0, kr0, kr1, n, t);    // while they run
      flash_wg_wait<HD, true>(dv, dk);
    }
    __syncthreads();  // Qt, Ot and this stage are free again
  }
  flash_bwd_store(a, dk, dv, begin, n, h, kr0, kr1, t);
}

// f(std::integral_constant<int, HD>) for the head sizes the kernels are built for.
template <class F>
void with_flash_head_dim(int hd, F&& f) {
  switch (hd) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: throw InvalidArgument("fused training attention: head_dim " + std::to_string(hd) + " (supported: 32, 64, 128)");
  }
}
// Every row operand 16-byte aligned with a row stride that keeps it so.
inline bool flash_v4(const FlashTrainArgs& a) {
  const auto al = [](const void* p, int ld) { return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && ld % 4 == 0); };
  return al(a.q, a.ldq) && al(a.k, a.ldkv) && al(a.v, a.ldkv) && al(a.dout, a.lddo);
}
inline void check_flash_args(const FlashTrainArgs& a) {
  if (a.batch <= 0 || a.batch > 65535 || a.max_len <= 0 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0)
    throw InvalidArgument("fused training attention: batch " + std::to_string(a.batch) + ", max_len " + std::to_string(a.max_len) +
                          ", heads " + std::to_string(a.n_heads) + " / " + std::to_string(a.n_kv_heads) + " kv");
}

}  // namespace train_kernels

/// Which head sizes flash_train_forward / flash_train_backward take.
inline bool flash_train_supported(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

namespace train_kernels {
// Launches a fused-attention kernel: grid (heads, sequences, blocks of 16 kFlashWarps queries or keys).
template <class Kernel>
void launch_flash(Kernel kernel, int smem_bytes, const FlashTrainArgs& a, cudaStream_t st) {
  CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  constexpr int block_rows = 16 * kFlashWarps;
  const dim3 grid(static_cast<unsigned>(a.n_heads), static_cast<unsigned>(a.batch),
                  static_cast<unsigned>((a.max_len + block_rows - 1) / block_rows));
  kernel<<<grid, 32 * kFlashWarps, smem_bytes, st>>>(a, flash_v4(a));
}
}  // namespace train_kernels

namespace train_kernels {
// Whether the wgmma kernels run for `kind` (Auto: where wgmma_available(); every head size the
// kernels take has a wgmma form). Forcing Wgmma where it cannot run throws.
inline bool flash_train_wgmma(FlashKernel kind, const char* what) {
  if (kind == FlashKernel::MmaSync) return false;
  const bool ok = wgmma_available();
  if (kind == FlashKernel::Wgmma && !ok)
    throw InvalidArgument(std::string(what) + ": the wgmma kernel needs a binary with sm_90a code running on an sm_90 device");
  return ok;
}
}  // namespace train_kernels

/// O and lse2 of a.q, a.k, a.v (see FlashTrainArgs). `kind` picks the tensor-core form (Auto:
/// wgmma where this binary and device have it; tests and benchmarks force one).
inline void flash_train_forward(const FlashTrainArgs& a, cudaStream_t st, FlashKernel kind = FlashKernel::Auto) {
  const bool wg = train_kernels::flash_train_wgmma(kind, "flash_train_forward");
  train_kernels::check_flash_args(a);
  train_kernels::with_flash_head_dim(a.head_dim, [&](auto HDc) {
    constexpr int HD = decltype(HDc)::value;
    if (wg) train_kernels::launch_flash(train_kernels::flash_train_fwd_wg<HD>, train_kernels::FlashFwdWgTiles<HD>::smem, a, st);
    else train_kernels::launch_flash(train_kernels::flash_train_fwd<HD>, train_kernels::FlashFwdTiles<HD>::smem, a, st);
  });
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_train_fwd");
}

/// dK, dV per query head and dS (see FlashTrainArgs) from a.dout and the forward's O and lse2.
inline void flash_train_backward(const FlashTrainArgs& a, int rows, cudaStream_t st, FlashKernel kind = FlashKernel::Auto) {
  const bool wg = train_kernels::flash_train_wgmma(kind, "flash_train_backward");
  train_kernels::check_flash_args(a);
  const long long warps = static_cast<long long>(rows) * a.n_heads;
  train_kernels::flash_delta<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, st>>>(a.o, a.ldo, a.dout, a.lddo, a.delta, rows,
                                                                                              a.n_heads, a.head_dim);
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_delta");
  train_kernels::with_flash_head_dim(a.head_dim, [&](auto HDc) {
    constexpr int HD = decltype(HDc)::value;
    if (wg) train_kernels::launch_flash(train_kernels::flash_train_bwd_wg<HD>, train_kernels::FlashBwdWgTiles<HD>::smem, a, st);
    else train_kernels::launch_flash(train_kernels::flash_train_bwd<HD>, train_kernels::FlashBwdTiles<HD>::smem, a, st);
  });
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_train_bwd");
}

}  // namespace cacheshrink::cuda

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
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/mma.cuh"
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
  float* delta = nullptr;              // (tokens, n_heads) scratch of the backward
  float* ds = nullptr;                 // P-shaped dS: sequence s, head h, query i, key j at
  const std::size_t* ds_off = nullptr;  //   ds[ds_off[s] + (h n + i) n + j] (ds_off on the device)
  float* dk = nullptr;                 // dK, dV per query head h at column h head_dim
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
      kernels::cp_async16(sm + r * SP + (c ^ flash_swz<Swz>(r)), g + static_cast<long long>(r < valid ? r : 0) * ld + c, r < valid ? 16 : 0);
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

template <int HD>
static __global__ void __launch_bounds__(kFlashWarps * 32, 1) flash_train_fwd(FlashTrainArgs a, bool v4) {
  using kernels::mma_tf32;
  using kernels::to_tf32;
  using T = FlashFwdTiles<HD>;
  constexpr int NT = kFlashWarps * 32, BQ = T::BQ, BK = T::BK, SK = T::SK, SV = T::SV, KS = HD / 8, STAGE = T::STAGE;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  float* sm = reinterpret_cast<float*>(flash_smem);  // two stages of [K tile | V tile]
  // Grid (heads, sequences, query blocks), the last query block (the most key tiles) launched
  // first, so the shortest blocks fill the last wave.
  const int h = blockIdx.x, s = blockIdx.y;
  const int begin = a.off[s], n = a.off[s + 1] - begin;
  const int q0 = static_cast<int>(gridDim.z - 1 - blockIdx.z) * BQ;
  if (q0 >= n) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  const int wq = q0 + warp * 16;          // the warp's first query
  const int rq0 = wq + g, rq1 = rq0 + 8;  // the thread's two query rows
  const int q_last = min(q0 + BQ, n) - 1;
  const int kt0 = (a.window > 0 ? max(0, q0 - a.window + 1) : 0) / BK, tiles = q_last / BK - kt0 + 1;
  const float* kb = a.k + static_cast<long long>(begin) * a.ldkv + kvh * HD;
  const float* vb = a.v + static_cast<long long>(begin) * a.ldkv + kvh * HD;
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
    if (it + 1 < tiles) {
      load(it + 1);  // into the stage the previous iteration finished reading
      kernels::cp_async_wait<1>();
    } else {
      kernels::cp_async_wait<0>();
    }
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
      // Masked on tiles reaching past the warp's first query or before its last query's window.
      if (k0 + BK - 1 > wq || (a.window > 0 && k0 <= wq + 15 - a.window)) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = k0 + j * 8 + 2 * t + (e & 1), row = e < 2 ? rq0 : rq1;
            if (key > row || (a.window > 0 && row - key >= a.window)) sc[j][e] = -INFINITY;
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
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
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
      kernels::rescale_rows(o, alpha);
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
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
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
  for (int sh = 16; sh > 0; sh >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, sh);
  if (lane == 0) delta[w] = acc;
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
  // Grid (heads, sequences, key blocks): the first key block (seen by the most queries) launched
  // first, so the shortest blocks fill the last wave.
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
  // Queries [k0, q_end) see some key of the block (the last key k0 + BK - 1 up to query k0 + BK - 2 + window).
  const int q_end = a.window > 0 ? min(n, k0 + BK - 1 + a.window) : n;
  const int tiles = (q_end - k0 + BQ - 1) / BQ;
  const float* qb = a.q + static_cast<long long>(begin) * a.ldq + h * HD;
  const float* db = a.dout + static_cast<long long>(begin) * a.lddo + h * HD;
  auto load = [&](int it) {
    const int q0 = k0 + it * BQ;
    float* st = stage0 + 2 * (it & 1) * QT;
    flash_load<HD, BQ, SP, true, NT>(st, qb + static_cast<long long>(q0) * a.ldq, a.ldq, n - q0, v4);
    flash_load<HD, BQ, SP, true, NT>(st + QT, db + static_cast<long long>(q0) * a.lddo, a.lddo, n - q0, v4);
    if (threadIdx.x < 2 * BQ) {  // lse2 and delta of the tile's queries (0 past the sequence: masked below)
      const int j = static_cast<int>(threadIdx.x) % BQ, i = q0 + j;
      const float* src = (threadIdx.x < BQ ? a.lse2 : a.delta) + static_cast<long long>(begin + min(i, n - 1)) * a.n_heads + h;
      kernels::cp_async4(LD + 2 * BQ * (it & 1) + threadIdx.x, src, i < n ? 4 : 0);
    }
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
    if (it + 1 < tiles) {
      load(it + 1);
      kernels::cp_async_wait<1>();
    } else {
      kernels::cp_async_wait<0>();
    }
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
      // Masks: causal / window on tiles crossing them, and queries past the sequence.
      const bool edge = kw + 15 > q0 || (a.window > 0 && q0 + BQ - 1 - kw >= a.window) || q0 + BQ > n;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * t + (e & 1), qi = q0 + col, key = e < 2 ? kr0 : kr1;
          float p = kernels::fast_exp2(fmaf(st4[j][e], c, -Ls[col]));
          if (edge && (qi < key || qi >= n || (a.window > 0 && qi - key >= a.window))) p = 0.0f;
          st4[j][e] = p;                         // P^T
          dp[j][e] = p * (dp[j][e] - Ds[col]);  // dS^T
        }
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
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = q0 + j * 8 + 2 * t + (e & 1), key = e < 2 ? kr0 : kr1;
          if (qi < n && key < n) dsb[static_cast<std::size_t>(qi) * n + key] = dp[j][e];
        }
    }
    __syncthreads();  // this stage is free for the load two iterations on
  }
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

/// O and lse2 of a.q, a.k, a.v (see FlashTrainArgs).
inline void flash_train_forward(const FlashTrainArgs& a, cudaStream_t st) {
  train_kernels::check_flash_args(a);
  train_kernels::with_flash_head_dim(a.head_dim, [&](auto HDc) {
    constexpr int HD = decltype(HDc)::value;
    train_kernels::launch_flash(train_kernels::flash_train_fwd<HD>, train_kernels::FlashFwdTiles<HD>::smem, a, st);
  });
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_train_fwd");
}

/// dK, dV per query head and dS (see FlashTrainArgs) from a.dout and the forward's O and lse2.
inline void flash_train_backward(const FlashTrainArgs& a, int rows, cudaStream_t st) {
  train_kernels::check_flash_args(a);
  const long long warps = static_cast<long long>(rows) * a.n_heads;
  train_kernels::flash_delta<<<static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, st>>>(a.o, a.ldo, a.dout, a.lddo, a.delta, rows,
                                                                                            a.n_heads, a.head_dim);
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_delta");
  train_kernels::with_flash_head_dim(a.head_dim, [&](auto HDc) {
    constexpr int HD = decltype(HDc)::value;
    train_kernels::launch_flash(train_kernels::flash_train_bwd<HD>, train_kernels::FlashBwdTiles<HD>::smem, a, st);
  });
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_train_bwd");
}

}  // namespace cacheshrink::cuda

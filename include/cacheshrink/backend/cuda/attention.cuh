#pragma once
// Causal (optionally sliding-window) attention over packed sequences, MHA/GQA/MQA through one
// path: query head h reads KV head h / group (group = n_heads / n_kv_heads; MQA: group =
// n_heads). A query at position i of its sequence sees keys j with (window <= 0 or
// j > i - window) and j <= i. Scores, softmax and accumulation are float.
//
// Two kernels:
//  - attention_rows<T>: one warp per (query row, head), online softmax; any head_dim <= 256,
//    float or bf16. Used in float32 mode (parity) and as the fallback.
//  - flash_attn_bf16<HD>: tensor-core (mma.sync m16n8k16, bf16 -> float) tiled online-softmax
//    kernel for HD in {32, 64, 128} in the FlashAttention-2 layout: a block takes 64 queries of
//    one head, four warps of 16 rows each, and walks key tiles of 64 (only those the mask leaves
//    visible); scores, probabilities and the output accumulator stay in registers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/mma.cuh"
#include "cacheshrink/backend/cuda/wgmma.cuh"

namespace cacheshrink::cuda {

/// Geometry shared by both kernels. Pointers address row 0, column of head 0; rows are packed
/// tokens. q: (rows, n_heads*hd) with leading dim ldq; k, v: (rows, n_kv*hd), ldkv; out: ldo.
template <class T>
struct AttentionArgs {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  int ldq = 0, ldkv = 0, ldo = 0;
  int rows = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, window = 0;
  float scale = 1.0f;
};

namespace kernels {

template <class T>
__global__ void attention_rows(AttentionArgs<T> a, const int* row_begin) {
  const long long warp = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<long long>(a.rows) * a.n_heads) return;
  const int r = static_cast<int>(warp / a.n_heads), h = static_cast<int>(warp % a.n_heads);
  const int group = a.n_heads / a.n_kv_heads, kvh = h / group, hd = a.head_dim;
  const int begin = row_begin[r], i = r - begin;
  constexpr int kMaxPerLane = 8;  // head_dim <= 256
  float qv[kMaxPerLane], acc[kMaxPerLane];
  const T* qr = a.q + static_cast<long long>(r) * a.ldq + h * hd;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    qv[t] = d < hd ? to_f(qr[d]) * a.scale : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const int jlo = a.window > 0 ? max(0, i - a.window + 1) : 0;
  for (int j = jlo; j <= i; ++j) {
    const T* kr = a.k + static_cast<long long>(begin + j) * a.ldkv + kvh * hd;
    const T* vr = a.v + static_cast<long long>(begin + j) * a.ldkv + kvh * hd;
    float dot = 0.0f;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < hd) dot += qv[t] * to_f(kr[d]);
    }
    dot = warp_sum(dot);
    const float m_new = fmaxf(m, dot);
    const float alpha = expf(m - m_new), p = expf(dot - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < hd) acc[t] = acc[t] * alpha + p * to_f(vr[d]);
    }
    m = m_new;
  }
  T* orow = a.out + static_cast<long long>(r) * a.ldo + h * hd;
  const float inv = 1.0f / l;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < hd) orow[d] = from_f<T>(acc[t] * inv);
  }
}

constexpr int kFlashBq = 64, kFlashBk = 64, kFlashWarps = 4;
// Padded shared-memory row stride (elements): the eight rows an ldmatrix reads start in
// different banks.
template <int HD>
constexpr int flash_ld() {
  return HD + 8;
}

template <int HD>
constexpr int flash_smem_bytes() {
  // Double-buffered K, V tiles (bf16); the Q tile borrows the second buffer until it is in
  // registers, so at head_dim 128 a block takes 68 KB and three blocks fit on an SM (was 85 KB, two).
  static_assert(kFlashBq == kFlashBk, "the Q tile is staged in a K tile's slot");
  return 2 * 2 * kFlashBk * flash_ld<HD>() * 2;
}

/// Starts an asynchronous copy (cp.async, 16 bytes per thread-chunk) of rows [row0, row0 + 64)
/// of a sequence's (len rows) head slice into a (64, HD) smem tile with row stride LD,
/// zero-filling rows past the sequence end. The caller commits and waits.
template <int HD>
__device__ __forceinline__ void load_tile_async(__nv_bfloat16* dst, const __nv_bfloat16* src, int ld, int row0, int len) {
  constexpr int kChunks = HD / 8, LD = flash_ld<HD>();
  for (int idx = threadIdx.x; idx < kFlashBk * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool in = row0 + r < len;
    const __nv_bfloat16* g = src + static_cast<long long>(in ? row0 + r : 0) * ld + c * 8;
    cp_async16(dst + r * LD + c * 8, g, in ? 16 : 0);
  }
}

/// Online-softmax step shared by the flash kernels, on one warp's 16 rows x (8 NS) keys of S in the
/// m16n8 accumulator layout (this lane: rows qr[0] and qr[1], key columns 2 tq and 2 tq + 1 of each
/// 8): masks what the causal / window / length mask hides (only when `edge`: tiles that reach the
/// diagonal, the window's edge or the sequence end), moves the running max m_i (log2 units: scores
/// stay unscaled, the scale sl = scale * log2(e) joins the exponent's FFMA, scale > 0 keeps the
/// order), writes P = exp2(S sl - m) as the bf16 A fragments of P V (the C fragments of two
/// adjacent 8-key tiles are the A fragment of their 16 keys), adds the float32 row sums to this
/// lane's share l_i and returns in alpha the factor the output accumulators must be scaled by.
template <int NS>
__device__ __forceinline__ void flash_softmax_tile(float (&sc)[NS][4], bool edge, const int (&qr)[2], int k0, int len, int window, int tq,
                                                   float sl, float (&m_i)[2], float (&l_i)[2], float (&alpha)[2],
                                                   unsigned (&pa)[NS / 2][4]) {
  if (edge) {
    const int q0r = qr[0], q1r = qr[1];  // (qr[e >> 1] through the reference cost the 128 kernels ~50 B of spills)
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = (e >> 1) ? q1r : q0r, j = k0 + n * 8 + 2 * tq + (e & 1);
        if (!(i < len && j <= i && (window <= 0 || j > i - window))) sc[n][e] = -INFINITY;
      }
  }
  float neg_m[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
    mx = quad_max(mx);
    const float m_new = fmaxf(m_i[r], mx * sl);
    alpha[r] = m_new == -INFINITY ? 1.0f : fast_exp2(m_i[r] - m_new);
    m_i[r] = m_new;
    // A row with every key so far masked has m = -inf and only -inf scores: exp2(-inf) = 0.
    neg_m[r] = m_new == -INFINITY ? 0.0f : -m_new;
  }
  // P summed in float32 and rounded to bf16 for P V (as FlashAttention-2).
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    float p[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) p[e] = fast_exp2(fmaf(sc[n][e], sl, neg_m[e >> 1]));
    sum[0] += p[0] + p[1];
    sum[1] += p[2] + p[3];
    pa[n / 2][(n & 1) * 2 + 0] = pack_bf16(p[0], p[1]);  // rows g: a0 (n even) / a2 (n odd)
    pa[n / 2][(n & 1) * 2 + 1] = pack_bf16(p[2], p[3]);  // rows g + 8: a1 / a3
  }
  l_i[0] = l_i[0] * alpha[0] + sum[0];
  l_i[1] = l_i[1] * alpha[1] + sum[1];
}

/// The flash kernels' epilogue: completes the row sums over the quad and writes this lane's two
/// rows of O / l (m16n8 layout, NO 8-column tiles) as bf16 pairs; rows past the sequence are skipped.
template <int NO>
__device__ __forceinline__ void flash_store_rows(const float (&o)[NO][4], float (&l_i)[2], const int (&qr)[2], int len, int tq,
                                                 __nv_bfloat16* obase, int ldo) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_i[r] = quad_sum(l_i[r]);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (qr[r] >= len) continue;
    const float inv = l_i[r] > 0.0f ? 1.0f / l_i[r] : 0.0f;
    __nv_bfloat16* orow = obase + static_cast<long long>(qr[r]) * ldo + 2 * tq;
#pragma unroll
    for (int j = 0; j < NO; ++j)
      *reinterpret_cast<__nv_bfloat162*>(orow + j * 8) = __floats2bfloat162_rn(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
  }
}

// tiles[b] = {first packed row of the sequence, sequence length, first query position, 0}.
// Block: 64 queries of one head, four warps of 16 query rows; walks 64-key tiles (only those the
// mask leaves visible), K/V double-buffered by cp.async. Per warp and key tile: S (16 x 64) =
// Q K^T by mma.sync into registers, the online softmax in registers (a row's 64 scores live in
// the four lanes of a quad), then O (16 x HD) += P V with P taken straight from S's registers.
template <int HD>
__global__ void __launch_bounds__(128, 3) flash_attn_bf16(AttentionArgs<__nv_bfloat16> a, const int4* tiles) {
  using bf16 = __nv_bfloat16;
  constexpr int BK = kFlashBk, LD = flash_ld<HD>(), KD = HD / 16, NO = HD / 8, NS = BK / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sKV = reinterpret_cast<bf16*>(smem);  // [buffer][K | V] tiles of (BK, LD)
  auto sK = [&](int buf) { return sKV + (2 * buf) * BK * LD; };
  auto sV = [&](int buf) { return sKV + (2 * buf + 1) * BK * LD; };

  const int4 t = tiles[blockIdx.x];
  const int begin = t.x, len = t.y, q0 = t.z;
  const int h = blockIdx.y, group = a.n_heads / a.n_kv_heads, kvh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;

  const int qlast = min(q0 + kFlashBq, len) - 1;
  int kstart = a.window > 0 ? max(0, q0 - a.window + 1) : 0;
  kstart = (kstart / BK) * BK;
  const bf16* kbase = a.k + static_cast<long long>(begin) * a.ldkv + kvh * HD;
  const bf16* vbase = a.v + static_cast<long long>(begin) * a.ldkv + kvh * HD;

  // Q goes through buffer 1's K slot: loaded with the first K/V tile, moved to registers, and
  // the slot is free again (second barrier) before the loop prefetches into buffer 1.
  bf16* sQ = sK(1);
  load_tile_async<HD>(sQ, a.q + static_cast<long long>(begin) * a.ldq + h * HD, a.ldq, q0, len);
  load_tile_async<HD>(sK(0), kbase, a.ldkv, kstart, len);
  load_tile_async<HD>(sV(0), vbase, a.ldkv, kstart, len);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[KD][4];
#pragma unroll
  for (int d = 0; d < KD; ++d) ldmatrix_x4(qa[d], sQ + (warp * 16 + (lane & 15)) * LD + d * 16 + (lane >> 4) * 8);
  __syncthreads();

  float o[NO][4];
#pragma unroll
  for (int j = 0; j < NO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // This lane's two query rows (g and g + 8 of the warp's 16) and their running max / sum
  // (the sum is this lane's share; the quad adds the four at the end).
  const int qr[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
  const float sl = a.scale * kLog2e;  // scores to log2 units: exponentials by fast_exp2
  const int warp_last = min(q0 + warp * 16 + 15, len - 1);

  int buf = 0;
  for (int k0 = kstart; k0 <= qlast; k0 += BK, buf ^= 1) {
    const bool more = k0 + BK <= qlast;
    if (more) {
      load_tile_async<HD>(sK(buf ^ 1), kbase, a.ldkv, k0 + BK, len);
      load_tile_async<HD>(sV(buf ^ 1), vbase, a.ldkv, k0 + BK, len);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this tile landed
    __syncthreads();
    const bf16* tK = sK(buf);
    const bf16* tV = sV(buf);
    // Warps whose rows all precede the tile (causal) or end before the window skip the math.
    const bool active = k0 <= warp_last && (a.window <= 0 || k0 + BK - 1 > q0 + warp * 16 - a.window);
    if (active) {
      float sc[NS][4];
#pragma unroll
      for (int n = 0; n < NS; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
      for (int d = 0; d < KD; ++d)
#pragma unroll
        for (int n = 0; n < NS; n += 2) {
          unsigned kb[4];  // b0, b1 of key tiles n and n + 1
          ldmatrix_x4(kb, tK + (n * 8 + (lane & 7) + ((lane >> 4) << 3)) * LD + d * 16 + ((lane >> 3) & 1) * 8);
          mma_bf16(sc[n], qa[d], kb[0], kb[1]);
          mma_bf16(sc[n + 1], qa[d], kb[2], kb[3]);
        }
      const bool edge = k0 + BK - 1 > q0 + warp * 16 || k0 + BK > len || q0 + warp * 16 + 15 >= len || a.window > 0;
      float alpha[2];
      unsigned pa[BK / 16][4];
      flash_softmax_tile<NS>(sc, edge, qr, k0, len, a.window, tq, sl, m_i, l_i, alpha, pa);
      rescale_rows(o, alpha);
      // O += P V over the tile's four 16-key blocks.
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
        for (int j = 0; j < NO; j += 2) {
          unsigned vb[4];  // b0, b1 of dim tiles j and j + 1
          ldmatrix_x4_trans(vb, tV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + j * 8 + (lane >> 4) * 8);
          mma_bf16(o[j], pa[kk], vb[0], vb[1]);
          mma_bf16(o[j + 1], pa[kk], vb[2], vb[3]);
        }
    }
    __syncthreads();  // everyone done with this buffer before it is refilled
  }
  cp_async_wait<0>();
  flash_store_rows<NO>(o, l_i, qr, len, tq, a.out + static_cast<long long>(begin) * a.ldo + h * HD, a.ldo);
}

// ---- sm_90a: the same algorithm on warpgroup MMAs (wgmma.mma_async) ----
// One warpgroup (128 threads) per block takes 64 queries of one head; S (64 x 64) = Q K^T is
// HD / 16 m64n64k16 wgmma with K read from a swizzled shared-memory tile, the softmax runs on S's
// accumulators in registers as above, and O (64 x HD) += P V is four m64nHDk16 wgmma with P in
// registers and V read MN-major from its tile. The tensor cores take the operand tiles straight
// from shared memory: no ldmatrix in the loop.
// Where Q comes from: at head_dim 128, registers (loaded once; the tile's 16 KB stay free, so three
// blocks fit on an SM); at head_dim 64, its own shared-memory tile (8 KB). A register Q at 64 was
// miscompiled by ptxas 13.0: the SASS packed P into the very registers that held Q's fragments,
// so every key tile after the first multiplied K by the previous P (stop 24, found by a probe and
// the SASS; the 128 instance kept Q's registers intact through the loop in its SASS at the time).
// Both instances are tested on multi-tile sequences, which is where such a fault shows.
constexpr int kWgBq = 64, kWgBk = 64;

/// True when flash_attn_wgmma<HD> reads Q from shared memory (wgmma A descriptor) rather than registers.
template <int HD>
constexpr bool wg_q_in_smem() {
  return HD == 64;
}

template <int HD>
constexpr int wg_tile_bytes() {
  return kWgBk * HD * 2;
}
template <int HD>
constexpr int wg_smem_bytes() {
  // Double-buffered K and V tiles (a register Q is staged in buffer 1's K slot as in
  // flash_attn_bf16; a shared-memory Q has a fifth tile), plus slack to round the dynamic shared
  // memory up to the swizzle's 1024-byte boundary.
  return (wg_q_in_smem<HD>() ? 5 : 4) * wg_tile_bytes<HD>() + 1024;
}

/// cp.async of rows [row0, row0 + 64) of a (len rows) head slice into a swizzled (64, HD) tile
/// (wgmma.cuh), zero-filling rows past the sequence end; for 128-thread blocks. Each thread copies
/// the same 16-byte column chunk of every (128 / (HD / 8))-th row, so its shared-memory offsets
/// differ by whole swizzle atoms and its global addresses by a fixed row stride: one add per copy.
/// The caller commits and waits.
template <int HD>
__device__ __forceinline__ void load_tile_sw128(unsigned char* dst, const __nv_bfloat16* src, int ld, int row0, int len) {
  constexpr int kChunks = HD / 8, kRowStep = 128 / kChunks;  // rows one pass of the block covers: 8 at 128, 16 at 64
  static_assert(kRowStep % 8 == 0 && kWgBk % kRowStep == 0, "a pass must cover whole swizzle atoms");
  const int r0 = static_cast<int>(threadIdx.x) / kChunks, c = static_cast<int>(threadIdx.x) % kChunks;
  unsigned char* d = dst + sw128_offset(r0, c);
  const __nv_bfloat16* g = src + static_cast<long long>(row0 + r0) * ld + c * 8;
#pragma unroll
  for (int i = 0; i < kWgBk / kRowStep; ++i) {
    const bool in = row0 + r0 + i * kRowStep < len;
    cp_async16(d + i * kRowStep * 128, in ? g + static_cast<long long>(i * kRowStep) * ld : src, in ? 16 : 0);
  }
}

template <int HD>
__global__ void __launch_bounds__(128, 3) flash_attn_wgmma(AttentionArgs<__nv_bfloat16> a, const int4* tiles) {
#if defined(CACHESHRINK_WGMMA_DEVICE)
  using bf16 = __nv_bfloat16;
  static_assert(HD == 64 || HD == 128, "wgmma attention: head_dim 64 or 128");
  constexpr bool kQSmem = wg_q_in_smem<HD>();
  constexpr int BK = kWgBk, KD = HD / 16, NS = BK / 8, TILE = wg_tile_bytes<HD>();
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_align_1024(smem_raw);
  auto sK = [&](int buf) { return smem + (2 * buf) * TILE; };
  auto sV = [&](int buf) { return smem + (2 * buf + 1) * TILE; };

  const int4 t = tiles[blockIdx.x];
  const int begin = t.x, len = t.y, q0 = t.z;
  const int h = blockIdx.y, group = a.n_heads / a.n_kv_heads, kvh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;

  const int qlast = min(q0 + kWgBq, len) - 1;
  int kstart = a.window > 0 ? max(0, q0 - a.window + 1) : 0;
  kstart = (kstart / BK) * BK;
  const bf16* kbase = a.k + static_cast<long long>(begin) * a.ldkv + kvh * HD;
  const bf16* vbase = a.v + static_cast<long long>(begin) * a.ldkv + kvh * HD;

  unsigned char* sQ = kQSmem ? smem + 4 * TILE : sK(1);
  load_tile_sw128<HD>(sQ, a.q + static_cast<long long>(begin) * a.ldq + h * HD, a.ldq, q0, len);
  load_tile_sw128<HD>(sK(0), kbase, a.ldkv, kstart, len);
  load_tile_sw128<HD>(sV(0), vbase, a.ldkv, kstart, len);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[kQSmem ? 1 : KD][4];  // register Q: this warp's 16 query rows as wgmma A fragments (the m16n8k16 layout)
  if constexpr (!kQSmem) {
#pragma unroll
    for (int d = 0; d < KD; ++d) ldmatrix_x4(qa[d], sQ + sw128_offset(warp * 16 + (lane & 15), 2 * d + (lane >> 4)));
    __syncthreads();
  }

  float o[HD / 8][4];  // O (64 x HD) accumulators: this warp's rows, m16n8 tile j at o[j]
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  // Operand descriptors of buffer 0's tiles; a tile and a k-step are byte offsets added to the
  // start-address field (sw128_desc_add), not a new descriptor per wgmma.
  const std::uint64_t desc_k0 = sw128_desc(sK(0), 16, 1024), desc_v0 = sw128_desc(sV(0), 64 * 128, 1024), desc_q = sw128_desc(sQ, 16, 1024);
  (void)desc_q;
  const int qr[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
  const float sl = a.scale * kLog2e;

  int buf = 0;
  for (int k0 = kstart; k0 <= qlast; k0 += BK, buf ^= 1) {
    const bool more = k0 + BK <= qlast;
    if (more) {
      load_tile_sw128<HD>(sK(buf ^ 1), kbase, a.ldkv, k0 + BK, len);
      load_tile_sw128<HD>(sV(buf ^ 1), vbase, a.ldkv, k0 + BK, len);
    }
    cp_async_commit();
    cp_async_wait<1>();   // this tile landed (this thread's copies)
    fence_proxy_async();  // ... and is visible to the tensor cores' operand reads
    __syncthreads();
    // S = Q K^T: K-major A and B, k-step d at column block d / 4, +32 bytes per 16 columns inside it.
    float sc[NS][4];
    if constexpr (!kQSmem) wgmma_fence_operands(qa);
    wgmma_fence();
    const std::uint64_t desc_k = sw128_desc_add(desc_k0, buf * 2 * TILE), desc_v = sw128_desc_add(desc_v0, buf * 2 * TILE);
#pragma unroll
    for (int d = 0; d < KD; ++d) {
      const int off = (d >> 2) * (64 * 128) + (d & 3) * 32;
      if constexpr (kQSmem) wgmma_m64n64k16_ss(sc, sw128_desc_add(desc_q, off), sw128_desc_add(desc_k, off), d > 0);
      else wgmma_m64n64k16_rs(sc, qa[d], sw128_desc_add(desc_k, off), d > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(sc);

    const bool edge = k0 + BK - 1 > q0 + warp * 16 || k0 + BK > len || q0 + warp * 16 + 15 >= len || a.window > 0;
    float alpha[2];
    unsigned pa[BK / 16][4];
    flash_softmax_tile<NS>(sc, edge, qr, k0, len, a.window, tq, sl, m_i, l_i, alpha, pa);
    // Once a row's running max settles (most tiles of a long row) alpha is 1: skip the HD / 2
    // multiplies unless some row of this warp moved.
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) rescale_rows(o, alpha);
    // O += P V: MN-major B, 16 keys (2048 bytes) per k-step, 64-wide head_dim blocks LBO apart.
    wgmma_fence_operands(o);
    wgmma_fence_operands(pa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      if constexpr (HD == 128) wgmma_m64n128k16_rs_tb(o, pa[kk], sw128_desc_add(desc_v, kk * 2048), 1);
      else wgmma_m64n64k16_rs_tb(o, pa[kk], sw128_desc_add(desc_v, kk * 2048), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
    __syncthreads();  // everyone done with this buffer before it is refilled
  }
  cp_async_wait<0>();
  flash_store_rows<HD / 8>(o, l_i, qr, len, tq, a.out + static_cast<long long>(begin) * a.ldo + h * HD, a.ldo);
#else
  (void)a;
  (void)tiles;
  __trap();  // launched only when wgmma_available()
#endif
}

}  // namespace kernels

/// Per-batch attention metadata: for each packed row its sequence's first row, and the
/// 64-query tiles of every sequence for the flash kernel. Built on the host from offsets.
struct AttentionPlan {
  std::vector<int> row_begin;  // (rows)
  std::vector<int4> tiles;     // flash tiles: {begin, len, q0, 0}
  static AttentionPlan from_offsets(const std::vector<int>& off) {
    AttentionPlan p;
    for (std::size_t s = 0; s + 1 < off.size(); ++s) {
      const int len = off[s + 1] - off[s];
      for (int i = 0; i < len; ++i) p.row_begin.push_back(off[s]);
      for (int q0 = 0; q0 < len; q0 += kernels::kFlashBq) p.tiles.push_back(make_int4(off[s], len, q0, 0));
    }
    return p;
  }
};

inline void check_attention_shape(int n_heads, int n_kv_heads, int hd) {
  if (n_kv_heads <= 0 || n_heads % n_kv_heads != 0)
    throw InvalidArgument("cuda attention: n_heads " + std::to_string(n_heads) + " is not a multiple of n_kv_heads " +
                          std::to_string(n_kv_heads));
  if (hd <= 0 || hd > 256) throw InvalidArgument("cuda attention: head_dim " + std::to_string(hd) + " outside [1, 256]");
}

/// Generic attention (any head_dim <= 256). row_begin: device (rows).
template <class T>
void attention_rows(const AttentionArgs<T>& a, const int* row_begin, cudaStream_t s) {
  check_attention_shape(a.n_heads, a.n_kv_heads, a.head_dim);
  const long long threads = static_cast<long long>(a.rows) * a.n_heads * 32;
  if (threads == 0) return;
  kernels::attention_rows<T><<<static_cast<unsigned>((threads + 127) / 128), 128, 0, s>>>(a, row_begin);
  CACHESHRINK_CUDA_LAUNCH_CHECK("attention_rows");
}

/// True when the flash kernel handles this geometry (bf16, head_dim 32/64/128, 16-byte
/// aligned input rows, 4-byte aligned output pairs).
inline bool flash_supported(const AttentionArgs<__nv_bfloat16>& a) {
  const bool hd_ok = a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128;
  const auto aligned = [](const void* p, unsigned n) { return reinterpret_cast<std::uintptr_t>(p) % n == 0; };
  return hd_ok && a.ldq % 8 == 0 && a.ldkv % 8 == 0 && a.ldo % 2 == 0 && aligned(a.q, 16) && aligned(a.k, 16) && aligned(a.v, 16) &&
         aligned(a.out, 4);
}

template <int HD>
void launch_flash(const AttentionArgs<__nv_bfloat16>& a, const int4* tiles, int n_tiles, cudaStream_t s) {
  constexpr int bytes = kernels::flash_smem_bytes<HD>();
  static const bool configured = [] {
    CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::flash_attn_bf16<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  kernels::flash_attn_bf16<HD><<<dim3(n_tiles, a.n_heads), 128, bytes, s>>>(a, tiles);
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_attn_bf16");
}

template <int HD>
void launch_flash_wgmma(const AttentionArgs<__nv_bfloat16>& a, const int4* tiles, int n_tiles, cudaStream_t s) {
  constexpr int bytes = kernels::wg_smem_bytes<HD>();
  static const bool configured = [] {
    CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::flash_attn_wgmma<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  kernels::flash_attn_wgmma<HD><<<dim3(n_tiles, a.n_heads), 128, bytes, s>>>(a, tiles);
  CACHESHRINK_CUDA_LAUNCH_CHECK("flash_attn_wgmma");
}

/// Tensor-core attention; the caller checks flash_supported(). tiles: device (n_tiles), the
/// 64-query tiles of AttentionPlan (both kernels take 64 queries per block). `kind` forces a
/// kernel (tests, benchmarks); Wgmma throws InvalidArgument where it cannot run.
inline void flash_attention(const AttentionArgs<__nv_bfloat16>& a, const int4* tiles, int n_tiles, cudaStream_t s,
                            FlashKernel kind = FlashKernel::Auto) {
  check_attention_shape(a.n_heads, a.n_kv_heads, a.head_dim);
  if (!flash_supported(a)) throw InvalidArgument("flash_attention: unsupported head_dim or alignment");
  const bool wg_shape = a.head_dim == 64 || a.head_dim == 128;
  if (kind == FlashKernel::Wgmma && !(wg_shape && wgmma_available()))
    throw InvalidArgument(
        "flash_attention: the wgmma kernel needs head_dim 64 or 128 and a binary with sm_90a code running on an sm_90 device (head_dim " +
        std::to_string(a.head_dim) + ")");
  if (n_tiles == 0) return;
  const bool wg = kind == FlashKernel::Wgmma || (kind == FlashKernel::Auto && wg_shape && wgmma_available());
  if (wg) {
    if (a.head_dim == 64) launch_flash_wgmma<64>(a, tiles, n_tiles, s);
    else launch_flash_wgmma<128>(a, tiles, n_tiles, s);
    return;
  }
  switch (a.head_dim) {
    case 32: launch_flash<32>(a, tiles, n_tiles, s); break;
    case 64: launch_flash<64>(a, tiles, n_tiles, s); break;
    default: launch_flash<128>(a, tiles, n_tiles, s); break;
  }
}

}  // namespace cacheshrink::cuda

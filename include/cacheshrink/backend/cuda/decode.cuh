#pragma once
// Decode attention on the GPU: one new query token per sequence against a device cache, with
// the sequence split over blocks ("split-K", so batch 1 still fills the card) and a second
// kernel merging the per-split partial softmaxes.
//
// Two caches:
//  - standard: K and V rows, [batch][capacity][n_kv * hd] each (row stride ldkv, sequence
//    stride seq_stride, in elements). Query head h reads KV head h / group.
//  - latent (MLA with absorption): per token a K latent c_k and a V latent c_v of d_latent
//    values each (joint: the same vector), shared by every head. The caller absorbs W_uk into
//    the query (q_lat[h] = W_uk,h^T q_h * scale) and W_uv into the output (o_h = W_uv,h o_lat[h]),
//    so attention runs on the latents:  s_hj = q_lat[h] . c_k,j,  o_lat[h] = sum_j p_hj c_v,j.
//    Valid only where no rotation or norm sits between the latent and the key (GPT-2-style
//    learned positions, or position-free attention); RoPE models decode by rebuilding keys.
//
// A query at position L-1 (L = len[b], cache length including the new token) sees keys j with
// j < L and (window <= 0 or j > L-1-window). Scores, softmax and accumulation are float.
//
// Partial results: po [batch][n_heads][splits][D] (unnormalised sum of p * v), pml
// [batch][n_heads][splits] = (running max m, running sum l); combine() writes
// out[b, h*D + d] = sum_s e^{m_s-M} po_s / sum_s e^{m_s-M} l_s.
//
// Kernels:
//  - decode_std<T>: 128 threads; K/V tiles of 64 tokens staged in shared memory (16-byte loads
//    when rows allow), a block serves up to `hpb` query heads of one KV head. decode_attention
//    uses it for float32 and for bf16 MHA; bf16 GQA/MQA (>= 4 query heads per KV head) goes to
//    the tensor-core kernel below with one group per KV head.
//  - decode_latent_rows<T>: one warp per (sequence, head, split); any d_latent <= 1024; float32
//    parity mode and the fallback.
//  - decode_latent_mma<D, RT>: bf16 tensor cores through mma.sync m16n8k16 for d_latent in
//    {64, 128, 256, 512}: a block walks a whole split in token tiles with an online softmax
//    (one partial per split), the latent tiles arrive through a 2-4 stage cp.async ring, the
//    output accumulator stays in registers (details above the kernel). The default for bf16
//    wherever it applies, including the GQA standard cache (d_latent = head_dim).
//  - decode_latent_wmma<HT>: bf16 tensor cores (WMMA 16x16x16, float accumulate); a block serves
//    HT x 16 heads (HT = 2 above 16 heads when the grid stays large, so a 32-head model reads
//    each latent once) and one
//    split of 128 tokens whose latents are staged through shared memory with cp.async,
//    double-buffered 64 columns at a time: S = Q C_k^T, exact softmax over the split, O = P C_v
//    stored per column tile. Rows past the sequence are zero-filled, never read.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/backend/cuda/mma.cuh"
#include "cacheshrink/core/error.hpp"

namespace cacheshrink::cuda {

template <class T>
struct DecodeArgs {
  const T* q = nullptr;  // (batch, n_heads * hd), leading dim ldq
  const T* k = nullptr;  // cache, see header
  const T* v = nullptr;
  int ldq = 0, ldkv = 0;
  long long seq_stride = 0;
  const int* len = nullptr;  // device (batch)
  int batch = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, window = 0;
  float scale = 1.0f;
};

template <class T>
struct LatentDecodeArgs {
  const T* q_lat = nullptr;  // (batch, n_heads, d_latent): head h of sequence b at b*ldq + h*d_latent
  const T* ck = nullptr;     // latent cache: token j of sequence b at b*seq_stride + j*ldc
  const T* cv = nullptr;
  int ldc = 0;
  long long seq_stride = 0;
  const int* len = nullptr;  // device (batch)
  int batch = 0, n_heads = 0, d_latent = 0, window = 0;
  int ldq = 0;          // 0: n_heads * d_latent
  float scale = 1.0f;   // applied to the scores (the absorbed path folds it into q_lat)
  int groups = 1;       // tensor-core kernel only: heads split into `groups` equal groups, group g
                        // reading columns [g*d_latent, (g+1)*d_latent) of the cache rows (GQA on
                        // a standard cache: groups = n_kv_heads, d_latent = head_dim)
};

/// Scratch for the partial softmaxes (grown on demand, owned by the caller).
struct DecodeScratch {
  DeviceBuffer<float> po;
  DeviceBuffer<float2> pml;
  void reserve(long long rows, int splits, int D) {
    po.reserve(static_cast<std::size_t>(rows) * splits * D);
    pml.reserve(static_cast<std::size_t>(rows) * splits);
  }
};

namespace kernels {

constexpr int kDecTile = 64;
constexpr int kDecThreads = 128;
constexpr int kDecMaxAcc = 32;  // (heads per block) * hd <= 128 * 32

__device__ __forceinline__ void visible_range(int L, int window, int split, int chunk, int& j0, int& j1) {
  const int lo = window > 0 ? max(0, L - window) : 0;
  j0 = max(split * chunk, lo);
  j1 = min(L, (split + 1) * chunk);
}

template <class T>
__global__ void __launch_bounds__(kDecThreads) decode_std(DecodeArgs<T> a, int chunk, int splits, int hpb, float* po, float2* pml) {
  constexpr int PAD = sizeof(T) == 2 ? 2 : 1;
  const int split = blockIdx.x, b = blockIdx.z, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = a.n_heads / a.n_kv_heads, blocks_per_kv = (g + hpb - 1) / hpb;
  const int kvh = blockIdx.y / blocks_per_kv, h0 = kvh * g + (blockIdx.y % blocks_per_kv) * hpb;
  const int nhb = min(hpb, kvh * g + g - h0), hd = a.head_dim, ldt = hd + PAD;
  extern __shared__ __align__(16) unsigned char dsmem[];
  float* qs = reinterpret_cast<float*>(dsmem);  // hpb * hd
  float* ps = qs + hpb * hd;                    // hpb * tile
  float* alpha = ps + hpb * kDecTile;           // hpb
  float* mrow = alpha + hpb;
  float* lrow = mrow + hpb;
  T* ks = reinterpret_cast<T*>(lrow + hpb);
  T* vs = ks + kDecTile * ldt;
  const int L = a.len[b];
  int j0, j1;
  visible_range(L, a.window, split, chunk, j0, j1);
  for (int i = tid; i < nhb * hd; i += kDecThreads)
    qs[i] = to_f(a.q[static_cast<long long>(b) * a.ldq + static_cast<long long>(h0) * hd + i]) * a.scale;
  if (tid < hpb) {
    mrow[tid] = -INFINITY;
    lrow[tid] = 0.0f;
  }
  float acc[kDecMaxAcc];
#pragma unroll
  for (int i = 0; i < kDecMaxAcc; ++i) acc[i] = 0.0f;
  const T* kb = a.k + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(kvh) * hd;
  const T* vb = a.v + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(kvh) * hd;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = hd % VEC == 0 && a.ldkv % VEC == 0 && (reinterpret_cast<std::uintptr_t>(kb) % 16 == 0) &&
                   (reinterpret_cast<std::uintptr_t>(vb) % 16 == 0);
  for (int t0 = j0; t0 < j1; t0 += kDecTile) {
    const int n = min(kDecTile, j1 - t0);
    __syncthreads();
    if (vec) {
      // all of a thread's 16-byte loads are issued before any shared-memory store
      constexpr int U = 4;
      const int per_row = hd / VEC, total = n * per_row;
      for (int i0 = tid; i0 < total; i0 += kDecThreads * U) {
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = i0 + u * kDecThreads;
          if (i < total) {
            const long long off = static_cast<long long>(t0 + i / per_row) * a.ldkv + (i % per_row) * VEC;
            kr[u] = *reinterpret_cast<const uint4*>(kb + off);
            vr[u] = *reinterpret_cast<const uint4*>(vb + off);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = i0 + u * kDecThreads;
          if (i < total) {
            const int r = i / per_row, c = (i % per_row) * VEC;
            const T* ke = reinterpret_cast<const T*>(&kr[u]);
            const T* ve = reinterpret_cast<const T*>(&vr[u]);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              ks[r * ldt + c + e] = ke[e];
              vs[r * ldt + c + e] = ve[e];
            }
          }
        }
      }
    } else {
      for (int i = tid; i < n * hd; i += kDecThreads) {
        const int r = i / hd, c = i % hd;
        const long long off = static_cast<long long>(t0 + r) * a.ldkv + c;
        ks[r * ldt + c] = kb[off];
        vs[r * ldt + c] = vb[off];
      }
    }
    __syncthreads();
    for (int i = tid; i < nhb * kDecTile; i += kDecThreads) {
      const int h = i / kDecTile, j = i % kDecTile;
      float s = -INFINITY;
      if (j < n) {
        s = 0.0f;
        const float* qh = qs + h * hd;
        const T* kr = ks + j * ldt;
        for (int d = 0; d < hd; ++d) s += qh[d] * to_f(kr[d]);
      }
      ps[i] = s;
    }
    __syncthreads();
    for (int h = warp; h < nhb; h += kDecThreads / 32) {
      float* pr = ps + h * kDecTile;
      float mx = -INFINITY;
      for (int j = lane; j < kDecTile; j += 32) mx = fmaxf(mx, pr[j]);
      mx = warp_max(mx);
      const float mold = mrow[h], mnew = fmaxf(mold, mx);
      const float al = mold == -INFINITY ? 0.0f : __expf(mold - mnew);
      float sum = 0.0f;
      for (int j = lane; j < kDecTile; j += 32) {
        const float p = j < n ? __expf(pr[j] - mnew) : 0.0f;
        pr[j] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        lrow[h] = lrow[h] * al + sum;
        mrow[h] = mnew;
        alpha[h] = al;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kDecMaxAcc; ++i) {
      const int idx = tid + kDecThreads * i;
      if (idx < nhb * hd) {
        const int h = idx / hd, d = idx % hd;
        const float* pr = ps + h * kDecTile;
        float s = acc[i] * alpha[h];
        for (int j = 0; j < n; ++j) s += pr[j] * to_f(vs[j * ldt + d]);
        acc[i] = s;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kDecMaxAcc; ++i) {
    const int idx = tid + kDecThreads * i;
    if (idx < nhb * hd) {
      const int h = idx / hd, d = idx % hd;
      po[((static_cast<long long>(b) * a.n_heads + h0 + h) * splits + split) * hd + d] = acc[i];
    }
  }
  if (tid < nhb) pml[(static_cast<long long>(b) * a.n_heads + h0 + tid) * splits + split] = make_float2(mrow[tid], lrow[tid]);
}

constexpr int kLatMaxPerLane = 32;  // d_latent <= 1024 in the warp kernel

template <class T>
__global__ void decode_latent_rows(LatentDecodeArgs<T> a, int chunk, int splits, float* po, float2* pml) {
  const long long warp = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<long long>(a.batch) * a.n_heads * splits) return;
  const int split = static_cast<int>(warp % splits);
  const int h = static_cast<int>((warp / splits) % a.n_heads);
  const int b = static_cast<int>(warp / (static_cast<long long>(splits) * a.n_heads));
  const int D = a.d_latent;
  float qv[kLatMaxPerLane], acc[kLatMaxPerLane];
  const T* qr = a.q_lat + static_cast<long long>(b) * (a.ldq > 0 ? a.ldq : a.n_heads * D) + static_cast<long long>(h) * D;
#pragma unroll
  for (int t = 0; t < kLatMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    qv[t] = d < D ? to_f(qr[d]) : 0.0f;
    acc[t] = 0.0f;
  }
  int j0, j1;
  visible_range(a.len[b], a.window, split, chunk, j0, j1);
  float m = -INFINITY, l = 0.0f;
  const T* kb = a.ck + static_cast<long long>(b) * a.seq_stride;
  const T* vb = a.cv + static_cast<long long>(b) * a.seq_stride;
  for (int j = j0; j < j1; ++j) {
    const T* kr = kb + static_cast<long long>(j) * a.ldc;
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < kLatMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < D) s += qv[t] * to_f(kr[d]);
    }
    s = warp_sum(s) * a.scale;
    const float mn = fmaxf(m, s), al = __expf(m - mn), p = __expf(s - mn);
    l = l * al + p;
    m = mn;
    const T* vr = vb + static_cast<long long>(j) * a.ldc;
#pragma unroll
    for (int t = 0; t < kLatMaxPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < D) acc[t] = acc[t] * al + p * to_f(vr[d]);
    }
  }
  float* o = po + ((static_cast<long long>(b) * a.n_heads + h) * splits + split) * D;
#pragma unroll
  for (int t = 0; t < kLatMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < D) o[d] = acc[t];
  }
  if (lane == 0) pml[(static_cast<long long>(b) * a.n_heads + h) * splits + split] = make_float2(m, l);
}

constexpr int kLatChunk = 128;  // tokens per block (one split)
constexpr int kLatWarps = 8;
constexpr int kLatCB = 64;      // latent columns per staged block
constexpr int kLatLdt = kLatCB + 8;  // staged row stride (bf16): 16-byte rows, 32-byte WMMA tiles

/// Shared memory of decode_latent_wmma<HT> (HT x 16 heads per block).
inline std::size_t latent_wmma_smem(int D, int HT) {
  return static_cast<std::size_t>(16 * HT) * D * 2                  // Q (bf16)
         + 2 * static_cast<std::size_t>(kLatChunk) * kLatLdt * 2     // two staged blocks (S aliases the second)
         + static_cast<std::size_t>(16 * HT) * kLatChunk * 2;        // P (bf16)
}

/// cp.async of rows [t0, t0 + 128) x columns [c0, c0 + w) into `st`; rows at or past `valid`
/// are zero-filled instead of read.
__device__ __forceinline__ void stage_async(const __nv_bfloat16* base, int ldc, int t0, int valid, int c0, int w, __nv_bfloat16* st) {
  const int per_row = w / 8;
  for (int i = threadIdx.x; i < kLatChunk * per_row; i += kLatWarps * 32) {
    const int r = i / per_row, c = (i % per_row) * 8;
    __nv_bfloat16* d = st + r * kLatLdt + c;
    if (t0 + r < valid) {
      const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(d));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(base + static_cast<long long>(t0 + r) * ldc + c0 + c));
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  }
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void stage_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/// One block = HT x 16 heads (all heads of a 32-head model read the latents once) x one split of
/// 128 tokens; latents staged through shared memory with cp.async, double-buffered 64 columns
/// at a time. Pass A: S = Q C_k^T (warp w: token tile w, every head tile). Exact softmax over the
/// split. Pass B: O = P C_v (warp w: one (head tile, column tile) of each staged block), stored
/// straight to the partials (padded to HT x 16 heads per block).
template <int HT>
__global__ void __launch_bounds__(kLatWarps * 32) decode_latent_wmma(LatentDecodeArgs<__nv_bfloat16> a, int splits, int nh_pad, float* po, float2* pml) {
  using namespace nvcuda;
  using bf16 = __nv_bfloat16;
  constexpr int R = 16 * HT;  // head rows per block
  const int split = blockIdx.x, b = blockIdx.z;
  const int hpg = a.n_heads / a.groups, hbg = (hpg + R - 1) / R;  // heads per group, blocks per group
  const int grp = blockIdx.y / hbg, h0g = (blockIdx.y % hbg) * R;   // group, first head in the group
  const int h0 = grp * hpg + h0g;                                      // first head (global)
  const long long prow = static_cast<long long>(grp) * hbg * R + h0g;  // first padded partial row
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, D = a.d_latent;
  const int nh = min(R, hpg - h0g);
  extern __shared__ __align__(128) unsigned char dsmem[];
  bf16* Qs = reinterpret_cast<bf16*>(dsmem);
  bf16* St0 = Qs + R * D;
  bf16* St1 = St0 + kLatChunk * kLatLdt;
  bf16* Ps = St1 + kLatChunk * kLatLdt;
  float* Ss = reinterpret_cast<float*>(St1);  // R x 128 floats, used between the passes
  __shared__ float mrow[R], lrow[R];
  const int L = a.len[b];
  int j0, j1;
  visible_range(L, a.window, split, kLatChunk, j0, j1);
  const int t0 = split * kLatChunk;
  const bf16* kb = a.ck + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(grp) * D;
  const bf16* vb = a.cv + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(grp) * D;
  const int ncb = (D + kLatCB - 1) / kLatCB;
  // Q (16-byte cp.async; rows of padding heads zero) joins the first staged block's group.
  const bf16* qb = a.q_lat + static_cast<long long>(b) * (a.ldq > 0 ? a.ldq : a.n_heads * D) + static_cast<long long>(h0) * D;
  for (int i = tid; i < R * D / 8; i += kLatWarps * 32) {
    bf16* d = Qs + i * 8;
    if (i * 8 / D < nh) {
      const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(d));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(qb + i * 8));
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  }
  if (j1 > j0) stage_async(kb, a.ldc, t0, j1, 0, min(kLatCB, D), St0);
  else asm volatile("cp.async.commit_group;\n" ::);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sfrag[HT];
#pragma unroll
  for (int t = 0; t < HT; ++t) wmma::fill_fragment(sfrag[t], 0.0f);
  const bool live = j1 > j0 && t0 + warp * 16 < j1 && t0 + warp * 16 + 16 > j0;
  if (j1 > j0) {
    for (int cb = 0; cb < ncb; ++cb) {
      bf16* cur = (cb & 1) ? St1 : St0;
      if (cb + 1 < ncb) {
        stage_async(kb, a.ldc, t0, j1, (cb + 1) * kLatCB, min(kLatCB, D - (cb + 1) * kLatCB), (cb & 1) ? St0 : St1);
        stage_wait<1>();
      } else {
        stage_wait<0>();
      }
      __syncthreads();
      if (live) {
        const int c0 = cb * kLatCB, w = min(kLatCB, D - c0);
        for (int k = 0; k < w; k += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, cur + warp * 16 * kLatLdt + k, kLatLdt);
#pragma unroll
          for (int t = 0; t < HT; ++t) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qa;
            wmma::load_matrix_sync(qa, Qs + t * 16 * D + c0 + k, D);
            wmma::mma_sync(sfrag[t], qa, kf, sfrag[t]);
          }
        }
      }
      __syncthreads();
    }
    // first value block in flight while the softmax runs
    stage_async(vb, a.ldc, t0, j1, 0, min(kLatCB, D), St0);
  } else {
    stage_wait<0>();
  }
#pragma unroll
  for (int t = 0; t < HT; ++t) {
    if (a.scale != 1.0f)
      for (int e = 0; e < sfrag[t].num_elements; ++e) sfrag[t].x[e] *= a.scale;
    wmma::store_matrix_sync(Ss + t * 16 * kLatChunk + warp * 16, sfrag[t], kLatChunk, wmma::mem_row_major);
  }
  __syncthreads();
  for (int r = warp; r < R; r += kLatWarps) {
    const float* sr = Ss + r * kLatChunk;
    float mx = -INFINITY;
    for (int j = lane; j < kLatChunk; j += 32) {
      const int t = t0 + j;
      if (t >= j0 && t < j1) mx = fmaxf(mx, sr[j]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < kLatChunk; j += 32) {
      const int t = t0 + j;
      const float p = (t >= j0 && t < j1) ? __expf(sr[j] - mx) : 0.0f;
      Ps[r * kLatChunk + j] = __float2bfloat16(p);
      sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      mrow[r] = mx;
      lrow[r] = sum;
    }
  }
  __syncthreads();
  const long long hstride = static_cast<long long>(splits) * D;
  float* pbase = po + ((static_cast<long long>(b) * nh_pad + prow) * splits + split) * D;
  const int kmax = j1 > t0 ? min(kLatChunk, j1 - t0) : 0;
  const int ht = warp / (kLatCB / 16), f = warp % (kLatCB / 16);  // this warp's (head tile, column tile)
  for (int cb = 0; cb < ncb; ++cb) {
    const int c0 = cb * kLatCB, w = min(kLatCB, D - c0);
    const bool mine = ht < HT && f * 16 < w;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
    wmma::fill_fragment(o, 0.0f);
    if (j1 > j0) {
      bf16* cur = (cb & 1) ? St1 : St0;
      if (cb + 1 < ncb) {
        stage_async(vb, a.ldc, t0, j1, (cb + 1) * kLatCB, min(kLatCB, D - (cb + 1) * kLatCB), (cb & 1) ? St0 : St1);
        stage_wait<1>();
      } else {
        stage_wait<0>();
      }
      __syncthreads();
      if (mine)
        for (int k = 0; k < kmax; k += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
          wmma::load_matrix_sync(pa, Ps + ht * 16 * kLatChunk + k, kLatChunk);
          wmma::load_matrix_sync(vf, cur + k * kLatLdt + f * 16, kLatLdt);
          wmma::mma_sync(o, pa, vf, o);
        }
      __syncthreads();
    }
    if (mine) wmma::store_matrix_sync(pbase + ht * 16 * hstride + c0 + f * 16, o, static_cast<unsigned>(hstride), wmma::mem_row_major);
  }
  if (tid < R) pml[(static_cast<long long>(b) * nh_pad + prow + tid) * splits + split] = make_float2(mrow[tid], lrow[tid]);
}

// ---- decode_latent_mma<D, RT>: the register-resident tensor-core latent kernel ----
//
// One block = RT x 16 query rows (heads of one group; rows past the group's heads are zero) x
// one split, which it walks in tiles of NT tokens (64; 32 for D = 512) with an online softmax,
// so one partial per (row, split) however long the split. Both latent tiles of a token tile
// (C_k and C_v rows, NT x D bf16 each) arrive by cp.async in a ST-stage ring (ST = 2..4, as
// many as fit next to Q in 227 KB). 4 x RT warps: warp (rt, tw) owns row tile rt and
//   S:  tokens [tw NT/4, (tw+1) NT/4) of the tile: S = Q C_k^T by mma.sync m16n8k16, Q's
//       fragments held in registers for D <= 256;
//   PV: columns [tw D/4, (tw+1) D/4) of O, accumulated in registers across all tiles.
// The softmax of a row needs all four token groups: per tile two barriers exchange the four
// partial row maxima and, after P = exp2(S - m) is rounded to bf16 into shared memory, the four
// partial row sums. Every warp of a row tile then holds the same running (m, l).
template <int D>
constexpr int lat_mma_nt() {
  return D <= 256 ? 64 : 32;
}
template <int D, int RT, int ST, int NT = lat_mma_nt<D>()>
constexpr std::size_t lat_mma_smem_for() {
  constexpr int R = 16 * RT;
  return 2 * (static_cast<std::size_t>(R) * (D + 8) + static_cast<std::size_t>(ST) * 2 * NT * (D + 8) + static_cast<std::size_t>(R) * (NT + 8)) +
         sizeof(float) * 2 * R * 4;
}
constexpr std::size_t kMaxBlockSmem = 227 * 1024;
template <int D, int RT, int NT = lat_mma_nt<D>()>
constexpr int lat_mma_stages() {
  return lat_mma_smem_for<D, RT, 4, NT>() <= kMaxBlockSmem / 2 ? 4 : lat_mma_smem_for<D, RT, 3, NT>() <= kMaxBlockSmem ? 3 : 2;
}

template <int D, int RT, int NT, int ST>
__global__ void __launch_bounds__(128 * RT) decode_latent_mma(LatentDecodeArgs<__nv_bfloat16> a, int chunk, int splits, int nh_pad, float* po,
                                                               float2* pml) {
  using bf16 = __nv_bfloat16;
  constexpr int R = 16 * RT, LD = D + 8, LDP = NT + 8;
  constexpr int TS = NT / 4, NS = TS / 8, CW = D / 4, NO = CW / 8, KD = D / 16;
  constexpr bool kQReg = D <= 256;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  static_assert(NS >= 1 && NO % 2 == 0 && D % 64 == 0, "decode_latent_mma: unsupported width");
  const int split = blockIdx.x, b = blockIdx.z;
  const int hpg = a.n_heads / a.groups, hbg = (hpg + R - 1) / R;
  const int grp = blockIdx.y / hbg, h0g = (blockIdx.y % hbg) * R;
  const int h0 = grp * hpg + h0g;
  const long long prow = static_cast<long long>(grp) * hbg * R + h0g;
  const int nh = min(R, hpg - h0g);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, tq = lane & 3;
  const int rt = warp / 4, tw = warp % 4;
  extern __shared__ __align__(128) unsigned char lat_smem[];
  bf16* Qs = reinterpret_cast<bf16*>(lat_smem);
  bf16* ring = Qs + R * LD;  // [stage][C_k | C_v] tiles of (NT, LD)
  bf16* Ps = ring + ST * 2 * NT * LD;
  float* red_max = reinterpret_cast<float*>(Ps + R * LDP);  // [row][tw]
  float* red_sum = red_max + R * 4;

  const int L = a.len[b];
  int j0, j1;
  visible_range(L, a.window, split, chunk, j0, j1);
  const int tb = (j0 / NT) * NT;
  const int ntiles = j1 > j0 ? (j1 - tb + NT - 1) / NT : 0;
  const bf16* kb = a.ck + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(grp) * D;
  const bf16* vb = a.cv + static_cast<long long>(b) * a.seq_stride + static_cast<long long>(grp) * D;
  const auto load_tile = [&](int it) {
    bf16* dk = ring + (it % ST) * 2 * NT * LD;
    bf16* dv = dk + NT * LD;
    const int t0 = tb + it * NT;
    for (int i = tid; i < NT * (D / 8); i += 128 * RT) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const bool in = t0 + r < j1;
      const long long off = static_cast<long long>(in ? t0 + r : 0) * a.ldc + c;
      cp_async16(dk + r * LD + c, kb + off, in ? 16 : 0);
      cp_async16(dv + r * LD + c, vb + off, in ? 16 : 0);
    }
  };
  // Q (rows past the group's heads zero-filled) joins the first tile's commit group.
  const bf16* qb = a.q_lat + static_cast<long long>(b) * (a.ldq > 0 ? a.ldq : a.n_heads * D) + static_cast<long long>(h0) * D;
  for (int i = tid; i < R * (D / 8); i += 128 * RT) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    cp_async16(Qs + r * LD + c, qb + (r < nh ? static_cast<long long>(r) * D + c : 0), r < nh ? 16 : 0);
  }
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < ntiles) load_tile(s);
    cp_async_commit();
  }
  unsigned qa[kQReg ? KD : 1][4];
  float o[NO][4];
#pragma unroll
  for (int j = 0; j < NO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
  const float sl = a.scale * kLog2e;
  const bf16* qrow = Qs + (rt * 16 + (lane & 15)) * LD + (lane >> 4) * 8;
  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<ST - 2>();  // tile `it` (and Q) landed for this thread
    __syncthreads();          // ... for every thread; everyone is done with tile it - 1's stage
    if (it + ST - 1 < ntiles) load_tile(it + ST - 1);
    cp_async_commit();
    if constexpr (kQReg) {
      if (it == 0) {
#pragma unroll
        for (int d = 0; d < KD; ++d) ldmatrix_x4(qa[d], qrow + d * 16);
      }
    }
    const bf16* tK = ring + (it % ST) * 2 * NT * LD;
    const bf16* tV = tK + NT * LD;
    const int t0 = tb + it * NT;
    // S (16 x TS) of this warp's row tile and token group.
    float sc[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
    for (int d = 0; d < KD; ++d) {
      unsigned qtmp[4];
      const unsigned* qf = qtmp;
      if constexpr (kQReg) qf = qa[d];
      else ldmatrix_x4(qtmp, qrow + d * 16);
      if constexpr (NS % 2 == 0) {
#pragma unroll
        for (int n = 0; n < NS; n += 2) {
          unsigned kf[4];
          ldmatrix_x4(kf, tK + (tw * TS + n * 8 + (lane & 7) + ((lane >> 4) << 3)) * LD + d * 16 + ((lane >> 3) & 1) * 8);
          mma_bf16(sc[n], qf, kf[0], kf[1]);
          mma_bf16(sc[n + 1], qf, kf[2], kf[3]);
        }
      } else {
        unsigned kf[2];
        ldmatrix_x2(kf, tK + (tw * TS + (lane & 7)) * LD + d * 16 + ((lane >> 3) & 1) * 8);
        mma_bf16(sc[0], qf, kf[0], kf[1]);
      }
    }
    // Scale to log2 units; mask tokens outside [j0, j1) (tiles at the split's edges only).
    const bool edge = t0 < j0 || t0 + NT > j1;
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = sc[n][e] * sl;
        if (edge) {
          const int j = t0 + tw * TS + n * 8 + 2 * tq + (e & 1);
          if (j < j0 || j >= j1) v = -INFINITY;
        }
        sc[n][e] = v;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
      mx = quad_max(mx);
      if (tq == 0) red_max[(rt * 16 + g + 8 * r) * 4 + tw] = mx;
    }
    __syncthreads();
    float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* rm = red_max + (rt * 16 + g + 8 * r) * 4;
      const float m_new = fmaxf(m_i[r], fmaxf(fmaxf(rm[0], rm[1]), fmaxf(rm[2], rm[3])));
      alpha[r] = m_new == -INFINITY ? 1.0f : exp2f(m_i[r] - m_new);
      m_i[r] = m_new;
    }
    // P = exp2(S - m), rounded to bf16 once (the sums and P V use the same values), to shared memory.
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) p[e] = m_i[e >> 1] == -INFINITY ? 0.0f : exp2f(sc[n][e] - m_i[e >> 1]);
      const unsigned lo = pack_bf16(p[0], p[1]), hi = pack_bf16(p[2], p[3]);
      const __nv_bfloat162 blo = *reinterpret_cast<const __nv_bfloat162*>(&lo), bhi = *reinterpret_cast<const __nv_bfloat162*>(&hi);
      sum[0] += __low2float(blo) + __high2float(blo);
      sum[1] += __low2float(bhi) + __high2float(bhi);
      const int c = tw * TS + n * 8 + 2 * tq;
      *reinterpret_cast<unsigned*>(Ps + (rt * 16 + g) * LDP + c) = lo;
      *reinterpret_cast<unsigned*>(Ps + (rt * 16 + g + 8) * LDP + c) = hi;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] = quad_sum(sum[r]);
      if (tq == 0) red_sum[(rt * 16 + g + 8 * r) * 4 + tw] = sum[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* rs = red_sum + (rt * 16 + g + 8 * r) * 4;
      l_i[r] = l_i[r] * alpha[r] + ((rs[0] + rs[1]) + (rs[2] + rs[3]));
    }
    rescale_rows(o, alpha);
    // O (16 x CW) += P (16 x NT) C_v[:, this warp's columns].
#pragma unroll
    for (int kk = 0; kk < NT / 16; ++kk) {
      unsigned pa[4];
      ldmatrix_x4(pa, Ps + (rt * 16 + (lane & 15)) * LDP + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int j = 0; j < NO; j += 2) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, tV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + tw * CW + j * 8 + (lane >> 4) * 8);
        mma_bf16(o[j], pa, vf[0], vf[1]);
        mma_bf16(o[j + 1], pa, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait<0>();
  // Partials: unnormalised O and (m, l), m back in natural-log units for decode_combine.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = static_cast<long long>(b) * nh_pad + prow + rt * 16 + g + 8 * r;
    if (ntiles > 0) {
      float* pr = po + (row * splits + split) * D + tw * CW + 2 * tq;
#pragma unroll
      for (int j = 0; j < NO; ++j) *reinterpret_cast<float2*>(pr + j * 8) = make_float2(o[j][2 * r], o[j][2 * r + 1]);
    }
    if (tw == 0 && tq == 0) pml[row * splits + split] = make_float2(m_i[r] == -INFINITY ? -INFINITY : m_i[r] * kLn2, l_i[r]);
  }
}

/// out[b, h*D + d] (leading dim ldo) = merged partials. Grid (batch * n_heads, ceil(D / 128)).
/// Partials are indexed with nh_pad heads per sequence (>= n_heads).
/// Head h's partials sit at padded row (h / hpg) * hpg_pad + h % hpg of nh_pad rows per sequence
/// (identity when hpg = hpg_pad = n_heads = nh_pad).
template <class T>
__global__ void decode_combine(const float* po, const float2* pml, int n_heads, int nh_pad, int hpg, int hpg_pad, int splits, int D, T* out,
                               int ldo) {
  const int b = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
  const long long row = static_cast<long long>(b) * nh_pad + static_cast<long long>(h / hpg) * hpg_pad + h % hpg;
  const float2* ml = pml + row * splits;
  const int d = blockIdx.y * blockDim.x + threadIdx.x;
  if (d >= D) return;
  // One pass with a running maximum (the split count is small; loads of different splits are
  // independent, so they overlap instead of three dependent sweeps).
  float M = -INFINITY, den = 0.0f, num = 0.0f;
  const float* p = po + row * splits * D + d;
#pragma unroll 4
  for (int s = 0; s < splits; ++s) {
    const float2 v = ml[s];
    if (v.x == -INFINITY) continue;
    const float x = p[static_cast<long long>(s) * D];
    if (v.x > M) {
      const float c = __expf(M - v.x);  // 0 on the first live split (M = -inf)
      den *= c;
      num *= c;
      M = v.x;
    }
    const float w = __expf(v.x - M);
    den += w * v.y;
    num += w * x;
  }
  out[static_cast<long long>(b) * ldo + static_cast<long long>(h) * D + d] = from_f<T>(den > 0.0f ? num / den : 0.0f);
}

/// dst[b][pos[b]][0:width] = src[b, 0:width] (dst sequence stride seq_stride, row stride ld).
template <class T>
__global__ void append_rows(const T* src, int lds, T* dst, int ld, long long seq_stride, const int* pos, int batch, int width) {
  const long long n = static_cast<long long>(batch) * width;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(i / width), c = static_cast<int>(i % width);
    dst[b * seq_stride + static_cast<long long>(pos[b]) * ld + c] = src[static_cast<long long>(b) * lds + c];
  }
}

}  // namespace kernels

/// How many splits to cut a sequence of `max_len` tokens into so that `blocks` x splits fills
/// the card (about 4 blocks per SM), with chunks of at least `min_chunk` tokens.
/// Multiprocessors of the current device (132 if the query fails).
inline int sm_count() {
  int sms = 132, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) (void)cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

inline int decode_splits(long long blocks, int max_len, int min_chunk, int multiple) {
  const int sms = sm_count();
  const long long want = std::max<long long>(1, (4LL * sms + blocks - 1) / std::max<long long>(1, blocks));
  const int by_len = std::max(1, (max_len + min_chunk - 1) / min_chunk);
  int s = static_cast<int>(std::min<long long>(want, by_len));
  int chunk = (max_len + s - 1) / s;
  chunk = (chunk + multiple - 1) / multiple * multiple;
  return std::max(1, (max_len + chunk - 1) / chunk);
}
inline int decode_chunk(int max_len, int splits, int multiple) {
  int chunk = (max_len + splits - 1) / splits;
  return std::max(multiple, (chunk + multiple - 1) / multiple * multiple);
}

/// Standard-cache decode: out (batch, n_heads * hd; leading dim ldo). max_len: the largest
/// len[b] (host value; it sizes the split).
template <class T>
void decode_latent_attention(const LatentDecodeArgs<T>& a, int max_len, T* out, int ldo, DecodeScratch& scratch, cudaStream_t s,
                             bool force_rows = false, bool force_wmma = false);
inline bool latent_wmma_supported(const LatentDecodeArgs<__nv_bfloat16>& a);

/// force_cuda_cores: bf16 GQA/MQA also on the CUDA-core kernel (tests, benchmarks).
template <class T>
void decode_attention(const DecodeArgs<T>& a, int max_len, T* out, int ldo, DecodeScratch& scratch, cudaStream_t s,
                      bool force_cuda_cores = false) {
  if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads != 0)
    throw InvalidArgument("decode_attention: n_heads " + std::to_string(a.n_heads) + " is not a multiple of n_kv_heads " + std::to_string(a.n_kv_heads));
  if (a.head_dim <= 0 || a.head_dim > kernels::kDecThreads * kernels::kDecMaxAcc)
    throw InvalidArgument("decode_attention: head_dim " + std::to_string(a.head_dim) + " is out of range");
  if (a.batch == 0 || max_len <= 0) return;
  const int g = a.n_heads / a.n_kv_heads;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // Several query heads per KV head (GQA/MQA): the tensor-core kernel, with each KV head a group
    // of query rows over its own columns of the cache rows.
    if (g >= 4 && !force_cuda_cores) {
      LatentDecodeArgs<T> la;
      la.q_lat = a.q;
      la.ldq = a.ldq;
      la.ck = a.k;
      la.cv = a.v;
      la.ldc = a.ldkv;
      la.seq_stride = a.seq_stride;
      la.len = a.len;
      la.batch = a.batch;
      la.n_heads = a.n_heads;
      la.d_latent = a.head_dim;
      la.window = a.window;
      la.scale = a.scale;
      la.groups = a.n_kv_heads;
      if (latent_wmma_supported(la)) {
        decode_latent_attention<T>(la, max_len, out, ldo, scratch, s);
        return;
      }
    }
  }
  const int hpb = std::max(1, std::min({g, kernels::kDecThreads * kernels::kDecMaxAcc / a.head_dim, kernels::kDecThreads}));
  const int bpk = (g + hpb - 1) / hpb;
  const long long blocks = static_cast<long long>(a.batch) * a.n_kv_heads * bpk;
  const int splits = decode_splits(blocks, max_len, 256, kernels::kDecTile);
  const int chunk = decode_chunk(max_len, splits, kernels::kDecTile);
  scratch.reserve(static_cast<long long>(a.batch) * a.n_heads, splits, a.head_dim);
  const int pad = sizeof(T) == 2 ? 2 : 1;
  const std::size_t smem = sizeof(float) * (static_cast<std::size_t>(hpb) * a.head_dim + hpb * kernels::kDecTile + 3 * hpb) +
                           2 * sizeof(T) * kernels::kDecTile * (a.head_dim + pad) + 16;
  if (smem > 48 * 1024) {
    static const bool configured = [] {
      CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::decode_std<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
      return true;
    }();
    (void)configured;
  }
  kernels::decode_std<T><<<dim3(splits, a.n_kv_heads * bpk, a.batch), kernels::kDecThreads, smem, s>>>(a, chunk, splits, hpb, scratch.po.data(), scratch.pml.data());
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_std");
  kernels::decode_combine<T><<<dim3(a.batch * a.n_heads, (a.head_dim + 127) / 128), 128, 0, s>>>(scratch.po.data(), scratch.pml.data(), a.n_heads, a.n_heads, a.n_heads, a.n_heads, splits, a.head_dim, out, ldo);
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_combine");
}

/// True when the tensor-core latent kernel handles this geometry.
inline bool latent_wmma_supported(const LatentDecodeArgs<__nv_bfloat16>& a) {
  const auto al16 = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return a.d_latent % 16 == 0 && a.d_latent <= 2048 && a.ldc % 8 == 0 && a.seq_stride % 8 == 0 && a.ldq % 8 == 0 && al16(a.ck) &&
         al16(a.cv) && al16(a.q_lat) && a.groups >= 1 && a.n_heads % a.groups == 0;
}

/// Splits for `blocks` independent (sequence, head block) units of `tiles` token tiles each, on
/// a card holding `resident` blocks at once: the count minimising (waves) x (tiles per block + 2,
/// for the pipeline fill and the partial's write), with at least `min_tiles` tiles per split.
inline int balanced_splits(long long blocks, int tiles, long long resident, int min_tiles) {
  const int max_s = std::max(1, tiles / std::max(1, min_tiles));
  int best = 1;
  long long best_cost = -1;
  for (int sp = 1; sp <= max_s; ++sp) {
    const int per = (tiles + sp - 1) / sp, eff = (tiles + per - 1) / per;
    if (eff != sp) continue;  // same chunk as a smaller count
    const long long waves = (blocks * sp + resident - 1) / std::max<long long>(1, resident);
    const long long cost = waves * (per + 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = sp;
    }
  }
  return best;
}

/// One decode_latent_mma configuration (NT tokens per tile, ST stages; the defaults are what
/// decode_latent_attention runs; benchmarks may time others).
template <int D, int RT, int NT = kernels::lat_mma_nt<D>(), int ST = kernels::lat_mma_stages<D, RT, NT>()>
void run_latent_mma(const LatentDecodeArgs<__nv_bfloat16>& a, int max_len, __nv_bfloat16* out, int ldo, DecodeScratch& scratch, cudaStream_t s) {
  constexpr int R = 16 * RT;
  constexpr std::size_t smem = kernels::lat_mma_smem_for<D, RT, ST, NT>();
  static_assert(smem <= kernels::kMaxBlockSmem, "run_latent_mma: shared memory over the per-block limit");
  static const long long resident = [] {
    CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::decode_latent_mma<D, RT, NT, ST>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int per_sm = 1;
    CACHESHRINK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernels::decode_latent_mma<D, RT, NT, ST>, 128 * RT, smem));
    return static_cast<long long>(std::max(1, per_sm)) * sm_count();
  }();
  const int hpg = a.n_heads / a.groups, hbg = (hpg + R - 1) / R, hpg_pad = hbg * R, nh_pad = a.groups * hpg_pad;
  const int tiles = (max_len + NT - 1) / NT;
  const long long blocks = static_cast<long long>(a.batch) * a.groups * hbg;
  const int splits = balanced_splits(blocks, tiles, resident, 2);
  const int chunk = (tiles + splits - 1) / splits * NT;
  scratch.reserve(static_cast<long long>(a.batch) * nh_pad, splits, D);
  kernels::decode_latent_mma<D, RT, NT, ST><<<dim3(splits, a.groups * hbg, a.batch), 128 * RT, smem, s>>>(a, chunk, splits, nh_pad, scratch.po.data(), scratch.pml.data());
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_latent_mma");
  kernels::decode_combine<__nv_bfloat16><<<dim3(a.batch * a.n_heads, (D + 127) / 128), 128, 0, s>>>(scratch.po.data(), scratch.pml.data(), a.n_heads, nh_pad, hpg, hpg_pad, splits, D, out, ldo);
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_combine");
}

/// The register-resident tensor-core kernel for d_latent in {64, 128, 256, 512} (rows of 32 heads
/// of a group per block when the group has more than 16, else 16); false: geometry not covered.
inline bool launch_latent_mma(const LatentDecodeArgs<__nv_bfloat16>& a, int max_len, __nv_bfloat16* out, int ldo, DecodeScratch& scratch,
                              cudaStream_t s) {
  const bool two = a.n_heads / a.groups > 16;
  switch (a.d_latent) {
    case 64: two ? run_latent_mma<64, 2>(a, max_len, out, ldo, scratch, s) : run_latent_mma<64, 1>(a, max_len, out, ldo, scratch, s); return true;
    case 128: two ? run_latent_mma<128, 2>(a, max_len, out, ldo, scratch, s) : run_latent_mma<128, 1>(a, max_len, out, ldo, scratch, s); return true;
    case 256: two ? run_latent_mma<256, 2>(a, max_len, out, ldo, scratch, s) : run_latent_mma<256, 1>(a, max_len, out, ldo, scratch, s); return true;
    case 512: two ? run_latent_mma<512, 2>(a, max_len, out, ldo, scratch, s) : run_latent_mma<512, 1>(a, max_len, out, ldo, scratch, s); return true;
    default: return false;
  }
}

/// Latent-cache decode: o_lat (batch, n_heads * d_latent; leading dim ldo). With bf16 and a
/// supported geometry a tensor-core kernel runs (decode_latent_mma for d_latent in {64, 128,
/// 256, 512}, else decode_latent_wmma); otherwise the warp kernel (d_latent <= 1024).
/// force_rows: always the warp kernel; force_wmma: the WMMA kernel even where the mma kernel
/// applies (tests, and the benchmark's same-run baseline).
template <class T>
void decode_latent_attention(const LatentDecodeArgs<T>& a, int max_len, T* out, int ldo, DecodeScratch& scratch, cudaStream_t s,
                             bool force_rows, bool force_wmma) {
  if (a.batch == 0 || max_len <= 0) return;
  if (a.d_latent <= 0) throw InvalidArgument("decode_latent_attention: d_latent must be positive");
  bool wmma = false;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    wmma = !force_rows && latent_wmma_supported(a);
    if (wmma && !force_wmma && launch_latent_mma(a, max_len, out, ldo, scratch, s)) return;
  }
  if (wmma) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // 32 heads per block (each latent read once) when that still leaves >= 2 blocks per SM;
      // otherwise 16 (more blocks for batch 1).
      const int sms = sm_count();
      const int splits = (max_len + kernels::kLatChunk - 1) / kernels::kLatChunk;
      const int hpg = a.n_heads / a.groups;
      const int ht = hpg > 16 && static_cast<long long>(a.batch) * a.groups * splits >= 2LL * sms ? 2 : 1, rows = 16 * ht;
      const int hbg = (hpg + rows - 1) / rows, hpg_pad = hbg * rows, nh_pad = a.groups * hpg_pad;
      scratch.reserve(static_cast<long long>(a.batch) * nh_pad, splits, a.d_latent);
      static const bool configured = [] {
        CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::decode_latent_wmma<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
        CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(kernels::decode_latent_wmma<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
        return true;
      }();
      (void)configured;
      const dim3 grid(splits, a.groups * hbg, a.batch);
      const std::size_t smem = kernels::latent_wmma_smem(a.d_latent, ht);
      if (ht == 2) kernels::decode_latent_wmma<2><<<grid, kernels::kLatWarps * 32, smem, s>>>(a, splits, nh_pad, scratch.po.data(), scratch.pml.data());
      else kernels::decode_latent_wmma<1><<<grid, kernels::kLatWarps * 32, smem, s>>>(a, splits, nh_pad, scratch.po.data(), scratch.pml.data());
      CACHESHRINK_CUDA_LAUNCH_CHECK("decode_latent_wmma");
      kernels::decode_combine<T><<<dim3(a.batch * a.n_heads, (a.d_latent + 127) / 128), 128, 0, s>>>(
          scratch.po.data(), scratch.pml.data(), a.n_heads, nh_pad, hpg, hpg_pad, splits, a.d_latent, out, ldo);
      CACHESHRINK_CUDA_LAUNCH_CHECK("decode_combine");
      return;
    }
  }
  if (a.groups != 1) throw InvalidArgument("decode_latent_attention: groups > 1 needs the bf16 tensor-core kernel");
  if (a.d_latent > 32 * kernels::kLatMaxPerLane)
    throw InvalidArgument("decode_latent_attention: d_latent " + std::to_string(a.d_latent) +
                          " > 1024 needs the bf16 tensor-core kernel (d_latent and the cache row stride multiples of 16)");
  const long long warps_wo_split = static_cast<long long>(a.batch) * a.n_heads;
  const int splits = decode_splits((warps_wo_split + 3) / 4, max_len, 64, 1);
  const int chunk = decode_chunk(max_len, splits, 1);
  scratch.reserve(warps_wo_split, splits, a.d_latent);
  const long long threads = warps_wo_split * splits * 32;
  kernels::decode_latent_rows<T><<<static_cast<unsigned>((threads + 127) / 128), 128, 0, s>>>(a, chunk, splits, scratch.po.data(), scratch.pml.data());
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_latent_rows");
  kernels::decode_combine<T><<<dim3(a.batch * a.n_heads, (a.d_latent + 127) / 128), 128, 0, s>>>(scratch.po.data(), scratch.pml.data(), a.n_heads, a.n_heads, a.n_heads, a.n_heads, splits, a.d_latent, out, ldo);
  CACHESHRINK_CUDA_LAUNCH_CHECK("decode_combine");
}

template <class T>
void append_rows(const T* src, int lds, T* dst, int ld, long long seq_stride, const int* pos, int batch, int width, cudaStream_t s) {
  const long long n = static_cast<long long>(batch) * width;
  if (n == 0) return;
  kernels::append_rows<T><<<grid_for(n, 256), 256, 0, s>>>(src, lds, dst, ld, seq_stride, pos, batch, width);
  CACHESHRINK_CUDA_LAUNCH_CHECK("append_rows");
}

}  // namespace cacheshrink::cuda

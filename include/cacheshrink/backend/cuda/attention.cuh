#pragma once
// Causal (optionally sliding-window) attention over packed sequences, MHA/GQA/MQA through one
// path: query head h reads KV head h / group (group = n_heads / n_kv_heads; MQA: group =
// n_heads). A query at position i of its sequence sees keys j with (window <= 0 or
// j > i - window) and j <= i. Scores, softmax and accumulation are float.
//
// Two kernels:
//  - attention_rows<T>: one warp per (query row, head), online softmax; any head_dim <= 256,
//    float or bf16. Used in float32 mode (parity) and as the fallback.
//  - flash_attn_bf16<HD>: tensor-core (WMMA bf16 -> float) tiled online-softmax kernel for
//    HD in {32, 64, 128}: a block takes 64 queries of one head, four warps of 16 rows each,
//    and walks key tiles of 64 (only those the mask leaves visible).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <string>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"

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
// Padded shared-memory row strides (elements): rows start in different banks, so the
// ldmatrix-style fragment loads and the softmax's row accesses do not conflict.
template <int HD>
constexpr int flash_ld() { return HD + 8; }
constexpr int kFlashLdS = kFlashBk + 4;  // float scores
constexpr int kFlashLdP = kFlashBk + 8;  // bf16 probabilities

template <int HD>
constexpr int flash_smem_bytes() {
  return 2 * 2 * kFlashBk * flash_ld<HD>() * 2  // K, V tiles, double-buffered (bf16)
         + kFlashWarps * 16 * kFlashLdS * 4     // per-warp scores (float)
         + kFlashWarps * 16 * kFlashLdP * 2     // per-warp probabilities (bf16)
         + kFlashWarps * 16 * 4;                // per-row rescale factors
}

// cp.async (sm_80+) through inline PTX: 16 bytes global -> shared, zero-filling what lies past
// src_bytes. (cuda_pipeline.h would drag libcu++'s ::cuda namespace into users' code.)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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

// tiles[b] = {first packed row of the sequence, sequence length, first query position, 0}.
template <int HD>
__global__ void __launch_bounds__(128) flash_attn_bf16(AttentionArgs<__nv_bfloat16> a, const int4* tiles) {
  using namespace nvcuda;
  using bf16 = __nv_bfloat16;
  constexpr int BK = kFlashBk, ND = HD / 16, LD = flash_ld<HD>(), LS = kFlashLdS, LP = kFlashLdP;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* sKV = reinterpret_cast<bf16*>(smem);  // [buffer][K | V] tiles of (BK, LD)
  float* sS = reinterpret_cast<float*>(sKV + 4 * BK * LD);
  bf16* sP = reinterpret_cast<bf16*>(sS + kFlashWarps * 16 * LS);
  float* sRow = reinterpret_cast<float*>(sP + kFlashWarps * 16 * LP);
  auto sK = [&](int buf) { return sKV + (2 * buf) * BK * LD; };
  auto sV = [&](int buf) { return sKV + (2 * buf + 1) * BK * LD; };

  const int4 t = tiles[blockIdx.x];
  const int begin = t.x, len = t.y, q0 = t.z;
  const int h = blockIdx.y, group = a.n_heads / a.n_kv_heads, kvh = h / group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sSw = sS + warp * 16 * LS;
  bf16* sPw = sP + warp * 16 * LP;
  float* sRw = sRow + warp * 16;

  const int qlast = min(q0 + kFlashBq, len) - 1;
  int kstart = a.window > 0 ? max(0, q0 - a.window + 1) : 0;
  kstart = (kstart / BK) * BK;
  const bf16* kbase = a.k + static_cast<long long>(begin) * a.ldkv + kvh * HD;
  const bf16* vbase = a.v + static_cast<long long>(begin) * a.ldkv + kvh * HD;

  // Q tile through buffer 1's K slot; first K/V tile into buffer 0 meanwhile.
  load_tile_async<HD>(sK(1), a.q + static_cast<long long>(begin) * a.ldq + h * HD, a.ldq, q0, len);
  cp_async_commit();
  load_tile_async<HD>(sK(0), kbase, a.ldkv, kstart, len);
  load_tile_async<HD>(sV(0), vbase, a.ldkv, kstart, len);
  cp_async_commit();
  cp_async_wait<1>();  // Q landed
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf[ND];
#pragma unroll
  for (int d = 0; d < ND; ++d) wmma::load_matrix_sync(qf[d], sK(1) + warp * 16 * LD + d * 16, LD);

  // Which row of a 16x16 accumulator each of this lane's elements holds: load a matrix whose
  // entries are their row index (the mapping is fixed for the fragment type).
  for (int e = lane; e < 256; e += 32) sSw[(e / 16) * LS + e % 16] = static_cast<float>(e / 16);
  __syncwarp();
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> rowf;
  wmma::load_matrix_sync(rowf, sSw, LS, wmma::mem_row_major);
  __syncwarp();

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[ND];
#pragma unroll
  for (int d = 0; d < ND; ++d) wmma::fill_fragment(of[d], 0.0f);

  // Softmax work split: lane owns row r and one 32-column half; it walks its columns
  // starting at a lane-dependent rotation so the 32 lanes hit 32 different banks.
  const int r = lane >> 1, cb = (lane & 1) * 32;
  const int qi = q0 + warp * 16 + r;
  float m_i = -INFINITY, l_i = 0.0f;
  __syncthreads();  // every warp has its Q fragments before buffer 1 is reused

  int buf = 0;
  for (int k0 = kstart; k0 <= qlast; k0 += BK, buf ^= 1) {
    // Prefetch the next tile into the other buffer while this one is used.
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
    // S (16 x 64) = Q_w K^T
#pragma unroll
    for (int kb = 0; kb < BK / 16; ++kb) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::fill_fragment(c, 0.0f);
#pragma unroll
      for (int d = 0; d < ND; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, tK + kb * 16 * LD + d * 16, LD);
        wmma::mma_sync(c, qf[d], kf, c);
      }
      wmma::store_matrix_sync(sSw + kb * 16, c, LS, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax, two lanes per row.
    float mx = -INFINITY;
    float* srow = sSw + r * LS + cb;
#pragma unroll 8
    for (int c0 = 0; c0 < 32; ++c0) {
      const int c = (c0 + lane) & 31;
      const int j = k0 + cb + c;
      const bool vis = qi < len && j <= qi && (a.window <= 0 || j > qi - a.window);
      const float s = vis ? srow[c] * a.scale : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_i - m_new);
    float sum = 0.0f;
    bf16* prow = sPw + r * LP + cb;
#pragma unroll 8
    for (int c0 = 0; c0 < 32; ++c0) {
      const int c = (c0 + lane) & 31;
      const float s = srow[c];
      const float p = s == -INFINITY ? 0.0f : __expf(s - m_new);
      const bf16 pb = __float2bfloat16(p);
      prow[c] = pb;
      sum += __bfloat162float(pb);  // the normaliser sums exactly what P V multiplies
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    if ((lane & 1) == 0) sRw[r] = alpha;
    __syncwarp();
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
      for (int e = 0; e < of[d].num_elements; ++e) of[d].x[e] *= sRw[static_cast<int>(rowf.x[e])];
    // O (16 x HD) += P (16 x 64) V (64 x HD)
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf;
      wmma::load_matrix_sync(pf, sPw + kk * 16, LP);
#pragma unroll
      for (int d = 0; d < ND; ++d) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, tV + kk * 16 * LD + d * 16, LD);
        wmma::mma_sync(of[d], pf, vf, of[d]);
      }
    }
    __syncthreads();  // everyone done with this buffer before it is refilled
  }
  cp_async_wait<0>();
  if ((lane & 1) == 0) sRw[r] = l_i > 0.0f ? 1.0f / l_i : 0.0f;
  __syncwarp();
  bf16* obase = a.out + static_cast<long long>(begin) * a.ldo + h * HD;
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    wmma::store_matrix_sync(sSw, of[d], LS, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e / 16, cc = e % 16, q = q0 + warp * 16 + rr;
      if (q < len) obase[static_cast<long long>(q) * a.ldo + d * 16 + cc] = __float2bfloat16(sSw[rr * LS + cc] * sRw[rr]);
    }
    __syncwarp();
  }
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
    throw InvalidArgument("cuda attention: n_heads " + std::to_string(n_heads) + " is not a multiple of n_kv_heads " + std::to_string(n_kv_heads));
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
/// aligned rows).
inline bool flash_supported(const AttentionArgs<__nv_bfloat16>& a) {
  const bool hd_ok = a.head_dim == 32 || a.head_dim == 64 || a.head_dim == 128;
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return hd_ok && a.ldq % 8 == 0 && a.ldkv % 8 == 0 && aligned(a.q) && aligned(a.k) && aligned(a.v);
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

/// Tensor-core attention; the caller checks flash_supported(). tiles: device (n_tiles).
inline void flash_attention(const AttentionArgs<__nv_bfloat16>& a, const int4* tiles, int n_tiles, cudaStream_t s) {
  check_attention_shape(a.n_heads, a.n_kv_heads, a.head_dim);
  if (n_tiles == 0) return;
  if (!flash_supported(a)) throw InvalidArgument("flash_attention: unsupported head_dim or alignment");
  switch (a.head_dim) {
    case 32: launch_flash<32>(a, tiles, n_tiles, s); break;
    case 64: launch_flash<64>(a, tiles, n_tiles, s); break;
    default: launch_flash<128>(a, tiles, n_tiles, s); break;
  }
}

}  // namespace cacheshrink::cuda

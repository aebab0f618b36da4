#pragma once
// cuda::TrainGraph: the training forward (keeping activations) and backward of a converted
// model on the GPU, float32: the same math, parameters, losses and batch packing as the CPU
// train::TrainGraph (include/cacheshrink/train/graph.hpp, whose header comment defines the
// losses); tests/cuda/test_cuda_train.cu compares the two on the fixtures.
//
// Layout. Every matrix is row-major in HF orientation, tokens packed (each sequence's real
// tokens, positions 0..n-1). Trainable parameters live on the device as row-major buffers of
// the CPU parameters' logical shapes, in the CPU graph's order and names (download() maps them
// to the CPU's column-major matrices):
//   per MLA layer  w_down_k, w_down_v (d_latent, hidden); joint: w_down_k only
//   per basis      w_up_k, w_up_v (d_kv, d_latent) (xkv groups share one), joint: the stacked
//                  [Wuk; Wuv] (2 d_kv, d_latent)
// Frozen weights are uploaded once in float32 ([W_gate; W_up] stacked for one GEMM; each layer's
// input projections stacked as [Wq; W_down_k; W_down_v; Wk; Wv], the down rows being the down
// projection parameters' storage, see Frozen).
//
// Attention is materialised: S = scale Q K^T, a row softmax with the causal/sliding-window mask
// writes P (kept for the backward), O = P V. Each of the six attention GEMMs (two forward, four
// backward) is a few pointer-array batched SGEMMs over every (sequence, head) pair of one length
// at once, and only the causal lower part is computed: a sequence's queries are cut into up to
// four blocks, and block i's scores take keys [0, end of block i) only (the P V and gradient
// GEMMs likewise skip the zero upper blocks), 10/16 of the full n^2 work at four blocks. The
// pointer tables are built on the host when the batch or a buffer changes (plan_attention).
// Shared KV heads (GQA/MQA) are read in place (query head h's pointers go to KV head h / group),
// and the backward's per-query-head dK, dV are summed back per group. At the lengths training uses
// (<= a few thousand tokens) P costs heads * n^2 floats per sequence and layer (and dP as much
// for one layer); the GEMMs are cuBLAS's.
//
// In TF32 mode (below) with head_dim 32, 64 or 128 the attention is fused instead
// (flash_train.cuh, set_fused_attention): the forward keeps O and a log-sum-exp per (token, head),
// no P; the backward recomputes P tile by tile, accumulates dK, dV in registers and writes only dS
// (into the one-layer dP buffer, whose unvisited entries stay zero: cleared whenever the plan is
// rebuilt) for the one remaining batched GEMM, dQ = scale dS K.
//
// Math mode: cuBLAS's default (true float32, no TF32), like the CPU graph; set_tf32(true)
// switches the graph's GEMMs to TF32 tensor cores (the benchmark runs both, against the PyTorch
// baseline benchmarks/python/bench_torch_train.py in the same mode).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/flash_train.cuh"
#include "cacheshrink/backend/cuda/gemm.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/backend/cuda/tuned_gemm.cuh"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/model/layers.hpp"
#include "cacheshrink/model/weights.hpp"
#include "cacheshrink/train/graph.hpp"

namespace cacheshrink::cuda {

namespace train_kernels {
// The kernels are `static`: a plain __global__ function defined in a header gets one host stub per
// translation unit that includes it, and two such units in one program fail to link.

// Vectorised element access: W = 4 moves 16-byte float4s (the caller checks alignment: widths
// and row strides multiples of 4, buffers 256-byte aligned), W = 1 plain floats. The bandwidth-
// bound kernels below are templated on it, so the tested W = 4 path and the W = 1 fallback
// share their code.
template <int W>
__device__ __forceinline__ void ldv(const float* p, float (&r)[W]) {
  if constexpr (W == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    r[0] = t.x, r[1] = t.y, r[2] = t.z, r[3] = t.w;
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) r[e] = p[e];
  }
}
template <int W>
__device__ __forceinline__ void stv(float* p, const float (&r)[W]) {
  if constexpr (W == 4) *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
  else {
#pragma unroll
    for (int e = 0; e < W; ++e) p[e] = r[e];
  }
}
// Grid for (rows, width) elementwise kernels in vectors of W: x over a row's vectors, y over rows
// (the kernels stride rows by gridDim.y, so more than 65535 rows are fine).
inline dim3 vec_grid(int rows, int width, int W, int threads = 256) {
  const int v = (width / W + threads - 1) / threads;
  return dim3(static_cast<unsigned>(std::max(v, 1)), static_cast<unsigned>(std::clamp(rows, 1, 65535)));
}

// Norm forward with the row held in registers (one 128-thread block per row, H <= 128 * W * C):
// x is read once. Same math as norm_fwd below (the fallback for wider or unaligned rows).
template <int W, int C>
static __global__ void __launch_bounds__(128)
    norm_fwd_reg(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b, bool layer, float eps,
                 float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int H) {
  const long long off = static_cast<long long>(blockIdx.x) * H;
  float v[C][W];
  const float inv_n = 1.0f / static_cast<float>(H);
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = (k * 128 + static_cast<int>(threadIdx.x)) * W;
    if (c < H) {
      ldv<W>(x + off + c, v[k]);
#pragma unroll
      for (int e = 0; e < W; ++e) s += v[k][e];
    }
  }
  float mu = 0.0f;
  if (layer) mu = block_sum(s) * inv_n;
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k)
    if ((k * 128 + static_cast<int>(threadIdx.x)) * W < H)
#pragma unroll
      for (int e = 0; e < W; ++e) ss += (v[k][e] - mu) * (v[k][e] - mu);
  const float r = rsqrtf(block_sum(ss) * inv_n + eps);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = (k * 128 + static_cast<int>(threadIdx.x)) * W;
    if (c < H) {
      float wv[W], o[W];
      ldv<W>(w + c, wv);
#pragma unroll
      for (int e = 0; e < W; ++e) o[e] = (v[k][e] - mu) * r * wv[e];
      if (b) {
        float bv[W];
        ldv<W>(b + c, bv);
#pragma unroll
        for (int e = 0; e < W; ++e) o[e] += bv[e];
      }
      stv<W>(y + off + c, o);
    }
  }
  if (threadIdx.x == 0) {
    if (mean) mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = r;
  }
}

// Norm backward with x and dy held in registers (as norm_fwd_reg); dx += (same math as norm_bwd).
template <int W, int C>
static __global__ void __launch_bounds__(128)
    norm_bwd_reg(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                 bool layer, const float* __restrict__ dy, float* __restrict__ dx, int H) {
  const long long off = static_cast<long long>(blockIdx.x) * H;
  const float r = rstd[blockIdx.x], mu = layer ? mean[blockIdx.x] : 0.0f;
  const float inv_n = 1.0f / static_cast<float>(H);
  float xh[C][W], g[C][W];
  float sg = 0.0f, sgx = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = (k * 128 + static_cast<int>(threadIdx.x)) * W;
    if (c < H) {
      float wv[W];
      ldv<W>(x + off + c, xh[k]);
      ldv<W>(dy + off + c, g[k]);
      ldv<W>(w + c, wv);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        g[k][e] *= wv[e];
        xh[k][e] = (xh[k][e] - mu) * r;
        sg += g[k][e];
        sgx += g[k][e] * xh[k][e];
      }
    }
  }
  if (layer) sg = block_sum(sg) * inv_n;
  sgx = block_sum(sgx) * inv_n;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int c = (k * 128 + static_cast<int>(threadIdx.x)) * W;
    if (c < H) {
      float d[W];
      ldv<W>(dx + off + c, d);
#pragma unroll
      for (int e = 0; e < W; ++e) d[e] += layer ? r * (g[k][e] - sg - xh[k][e] * sgx) : r * (g[k][e] - xh[k][e] * sgx);
      stv<W>(dx + off + c, d);
    }
  }
}

// Norm forward keeping its statistics: y = norm(x) (RMS or Layer), mean/rstd per row.
static __global__ void norm_fwd(const float* x, const float* w, const float* b, bool layer, float eps, float* y, float* mean, float* rstd,
                                int H) {
  const float* xr = x + static_cast<long long>(blockIdx.x) * H;
  float* yr = y + static_cast<long long>(blockIdx.x) * H;
  const float inv_n = 1.0f / static_cast<float>(H);
  float mu = 0.0f;
  if (layer) {
    float s = 0.0f;
    for (int c = threadIdx.x; c < H; c += blockDim.x) s += xr[c];
    mu = block_sum(s) * inv_n;
  }
  float ss = 0.0f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    const float d = xr[c] - mu;
    ss += d * d;
  }
  const float r = rsqrtf(block_sum(ss) * inv_n + eps);
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = (xr[c] - mu) * r * w[c];
    if (b) v += b[c];
    yr[c] = v;
  }
  if (threadIdx.x == 0) {
    if (mean) mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = r;
  }
}

// dx += d norm(x) / dx applied to dy (one block per row).
//   RMS:   dx = r g - x r^3 mean(g x),                g = w dy
//   Layer: dx = r (g - mean(g) - xhat mean(g xhat)), xhat = (x - mean) r
static __global__ void norm_bwd(const float* x, const float* w, const float* mean, const float* rstd, bool layer, const float* dy,
                                float* dx, int H) {
  const long long off = static_cast<long long>(blockIdx.x) * H;
  const float* xr = x + off;
  const float* dyr = dy + off;
  float* dxr = dx + off;
  const float r = rstd[blockIdx.x], mu = layer ? mean[blockIdx.x] : 0.0f;
  const float inv_n = 1.0f / static_cast<float>(H);
  float sg = 0.0f, sgx = 0.0f;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    const float g = w[c] * dyr[c];
    sg += g;
    sgx += g * (xr[c] - mu) * r;
  }
  if (layer) sg = block_sum(sg) * inv_n;
  sgx = block_sum(sgx) * inv_n;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    const float g = w[c] * dyr[c], xh = (xr[c] - mu) * r;
    dxr[c] += layer ? r * (g - sg - xh * sgx) : r * (g - xh * sgx);
  }
}

// Per-head RMSNorm forward (q/k norm), in place on y (rows, heads*hd; row stride ld): pre (packed)
// <- y, rstd per (row, head), y <- y rstd w. One warp per (row, head).
static __global__ void head_norm_fwd(float* y, int ld, float* pre, float* rstd, int rows, int heads, int hd, const float* w, float eps) {
  const long long warp = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<long long>(rows) * heads) return;
  float* p = y + (warp / heads) * ld + (warp % heads) * hd;
  float* q = pre + warp * hd;
  float ss = 0.0f;
  for (int d = lane; d < hd; d += 32) {
    const float v = p[d];
    q[d] = v;
    ss += v * v;
  }
  const float rs = rsqrtf(warp_sum(ss) / static_cast<float>(hd) + eps);
  if (lane == 0) rstd[warp] = rs;
  for (int d = lane; d < hd; d += 32) p[d] = q[d] * rs * w[d];
}

// Its backward, in place on dy: dx = r g - x r^3 mean(g x), g = w dy.
static __global__ void head_norm_bwd(float* dy, int ld, const float* pre, const float* rstd, int rows, int heads, int hd, const float* w) {
  const long long warp = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<long long>(rows) * heads) return;
  float* g = dy + (warp / heads) * ld + (warp % heads) * hd;
  const float* x = pre + warp * hd;
  const float r = rstd[warp];
  float s = 0.0f;
  for (int d = lane; d < hd; d += 32) s += w[d] * g[d] * x[d];
  s = warp_sum(s) / static_cast<float>(hd);
  for (int d = lane; d < hd; d += 32) g[d] = r * w[d] * g[d] - x[d] * r * r * r * s;
}

// Boundary i (0..min(4, n)) of the causal query blocks of an n-token sequence (train_causal_blocks:
// quarters, rounded down to multiples of 32 from n = 128).
__host__ __device__ inline int causal_bound(int i, int n) {
  const int nb = n < 4 ? n : 4;
  int v = static_cast<int>(static_cast<long long>(i) * n / nb);
  if (n >= 128 && i < nb) v = v / 32 * 32;
  return v;
}
// The end of the causal block holding query i: the attention GEMMs read a row's keys [0, end).
__device__ inline int causal_block_end(int i, int n) {
  int b = 1;
  while (causal_bound(b, n) <= i) ++b;
  return causal_bound(b, n);
}

// Row softmax of scale-free scores S (rows = heads * n, each n wide, query index i = row % n),
// in place, keys j with i - window < j <= i (window 0: causal only); masked entries up to the
// end of the row's causal block become 0 (no GEMM reads a row past it). One warp per row.
static __global__ void masked_softmax(float* S, long long rows, int n, int window) {
  const long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % n);
  const int a = window > 0 ? max(0, i - window + 1) : 0;
  float* s = S + row * n;
  float m = -INFINITY;
  for (int j = a + lane; j <= i; j += 32) m = fmaxf(m, s[j]);
  m = warp_max(m);
  float sum = 0.0f;
  for (int j = a + lane; j <= i; j += 32) sum += expf(s[j] - m);
  const float inv = 1.0f / warp_sum(sum);
  const int end = causal_block_end(i, n);
  for (int j = lane; j < end; j += 32) s[j] = (j >= a && j <= i) ? expf(s[j] - m) * inv : 0.0f;
}

// Softmax backward in place on dP: dS = P (dP - sum_j P dP), rows as masked_softmax. Only the
// visible keys of dP are read (the causal-block GEMMs leave the rest unwritten); the masked
// entries of dS become 0. One warp per row.
static __global__ void softmax_bwd(const float* P, float* dP, long long rows, int n, int window) {
  const long long row = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = static_cast<int>(row % n);
  const int a = window > 0 ? max(0, i - window + 1) : 0;
  const float* p = P + row * n;
  float* d = dP + row * n;
  float s = 0.0f;
  for (int j = a + lane; j <= i; j += 32) s += p[j] * d[j];
  s = warp_sum(s);
  const int end = causal_block_end(i, n);
  for (int j = lane; j < end; j += 32) d[j] = (j >= a && j <= i) ? p[j] * (d[j] - s) : 0.0f;
}

// masked_softmax / softmax_bwd with the row in registers and float4 access, for rows of
// n <= 128 K floats, n a multiple of 4 and a 16-byte aligned block of rows (the launcher checks;
// other rows take the kernels above). A row is read once; entries past the causal block's end up
// to the next multiple of 4 (inside the row) are written as the masked zeros they are.
template <int K>
static __global__ void masked_softmax_v4(float* S, int rows, int n, int window) {
  const int row = static_cast<int>((blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = row % n, a = window > 0 ? max(0, i - window + 1) : 0, end = causal_block_end(i, n);
  float* s = S + static_cast<long long>(row) * n;
  float v[K][4];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 128 + lane * 4;
    if (c < end) {
      ldv<4>(s + c, v[k]);
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (c + e >= a && c + e <= i) m = fmaxf(m, v[k][e]);
    }
  }
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 128 + lane * 4;
    if (c < end)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        v[k][e] = (c + e >= a && c + e <= i) ? expf(v[k][e] - m) : 0.0f;
        sum += v[k][e];
      }
  }
  const float inv = 1.0f / warp_sum(sum);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 128 + lane * 4;
    if (c < end) {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[k][e] *= inv;
      stv<4>(s + c, v[k]);
    }
  }
}
template <int K>
static __global__ void softmax_bwd_v4(const float* P, float* dP, int rows, int n, int window) {
  const int row = static_cast<int>((blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = row % n, a = window > 0 ? max(0, i - window + 1) : 0, end = causal_block_end(i, n);
  const float* p = P + static_cast<long long>(row) * n;
  float* d = dP + static_cast<long long>(row) * n;
  float pv[K][4], dv[K][4];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 128 + lane * 4;
    if (c < end) {
      ldv<4>(p + c, pv[k]);
      ldv<4>(d + c, dv[k]);
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (c + e >= a && c + e <= i) sum += pv[k][e] * dv[k][e];
    }
  }
  sum = warp_sum(sum);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = k * 128 + lane * 4;
    if (c < end) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dv[k][e] = (c + e >= a && c + e <= i) ? pv[k][e] * (dv[k][e] - sum) : 0.0f;
      stv<4>(d + c, dv[k]);
    }
  }
}

// dst (rows, nkv*hd) = sum over the group's query heads of src (rows, nh*hd); W = 4 needs hd % 4 == 0.
// blockIdx.z picks the pair (src0, dst0) or (src1, dst1): dK and dV in one launch.
template <int W>
static __global__ void sum_head_groups(const float* __restrict__ src0, float* __restrict__ dst0, const float* __restrict__ src1,
                                       float* __restrict__ dst1, int rows, int nkv, int group, int hd) {
  const float* src = blockIdx.z ? src1 : src0;
  float* dst = blockIdx.z ? dst1 : dst0;
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * W;  // column of dst
  if (c >= nkv * hd) return;
  const int k = c / hd, d = c - k * hd;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* sp = src + (static_cast<long long>(r) * nkv * group + static_cast<long long>(k) * group) * hd + d;
    float acc[W] = {}, t[W];
    for (int g = 0; g < group; ++g) {
      ldv<W>(sp + static_cast<long long>(g) * hd, t);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] += t[e];
    }
    stv<W>(dst + static_cast<long long>(r) * nkv * hd + c, acc);
  }
}

// RoPE in place on the heads of each row (rows, heads hd; row stride ld): one block per row, so
// the position's cos/sin row is shared and the indexing is 32-bit. sin_t negated: the inverse.
// bias (heads*hd, or nullptr) is added to each row first (a projection's pending bias). W = 2
// moves float2 pairs (hd % 4 == 0, ld even, 8-byte aligned rows and bias; the launcher checks).
// tf32: the results are stored rounded to TF32 (the fused attention's operands, see flash_train.cuh).
template <int W>
static __global__ void rope_rows(float* __restrict__ y, int ld, int heads, int hd, const int* __restrict__ pos,
                                 const float* __restrict__ cos_t, const float* __restrict__ sin_t, const float* __restrict__ bias,
                                 bool tf32) {
  using V = std::conditional_t<W == 2, float2, float>;
  const int half = hd / 2, hw = half / W, r = blockIdx.x;
  float* row = y + static_cast<long long>(r) * ld;
  const float* c = cos_t + static_cast<long long>(pos[r]) * half;
  const float* sn = sin_t + static_cast<long long>(pos[r]) * half;
  for (int e = threadIdx.x; e < heads * hw; e += blockDim.x) {
    const int h = e / hw, k = (e - h * hw) * W;
    float* p = row + h * hd;
    float x1[W], x2[W], cc[W], ss[W];
    *reinterpret_cast<V*>(x1) = *reinterpret_cast<const V*>(p + k);
    *reinterpret_cast<V*>(x2) = *reinterpret_cast<const V*>(p + k + half);
    *reinterpret_cast<V*>(cc) = *reinterpret_cast<const V*>(c + k);
    *reinterpret_cast<V*>(ss) = *reinterpret_cast<const V*>(sn + k);
    if (bias) {
      float b1[W], b2[W];
      *reinterpret_cast<V*>(b1) = *reinterpret_cast<const V*>(bias + h * hd + k);
      *reinterpret_cast<V*>(b2) = *reinterpret_cast<const V*>(bias + h * hd + k + half);
#pragma unroll
      for (int w = 0; w < W; ++w) x1[w] += b1[w], x2[w] += b2[w];
    }
    float o1[W], o2[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
      o1[w] = x1[w] * cc[w] - x2[w] * ss[w];
      o2[w] = x2[w] * cc[w] + x1[w] * ss[w];
      if (tf32) {
        o1[w] = __uint_as_float(kernels::to_tf32(o1[w]));
        o2[w] = __uint_as_float(kernels::to_tf32(o2[w]));
      }
    }
    *reinterpret_cast<V*>(p + k) = *reinterpret_cast<const V*>(o1);
    *reinterpret_cast<V*>(p + k + half) = *reinterpret_cast<const V*>(o2);
  }
}

// act = silu(g) u from gu = [g | u] (rows, 2I) (biases already added); grid vec_grid(rows, I, W).
template <int W>
static __global__ void swiglu_fwd(const float* __restrict__ gu, float* __restrict__ act, int rows, int I) {
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (c >= I) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const long long o = static_cast<long long>(r) * I;
    float g[W], u[W];
    ldv<W>(gu + 2 * o + c, g);
    ldv<W>(gu + 2 * o + I + c, u);
#pragma unroll
    for (int e = 0; e < W; ++e) g[e] = kernels::silu_f(g[e]) * u[e];
    stv<W>(act + o + c, g);
  }
}
// dgu = [da u silu'(g) | da silu(g)].
template <int W>
static __global__ void swiglu_bwd(const float* __restrict__ gu, const float* __restrict__ da, float* __restrict__ dgu, int rows, int I) {
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * W;
  if (c >= I) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const long long o = static_cast<long long>(r) * I;
    float g[W], u[W], d[W];
    ldv<W>(gu + 2 * o + c, g);
    ldv<W>(gu + 2 * o + I + c, u);
    ldv<W>(da + o + c, d);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float x = g[e], sg = 1.0f / (1.0f + expf(-x));
      g[e] = d[e] * u[e] * sg * (1.0f + x * (1.0f - sg));
      u[e] = d[e] * x * sg;
    }
    stv<W>(dgu + 2 * o + c, g);
    stv<W>(dgu + 2 * o + I + c, u);
  }
}
static __global__ void gelu_fwd(const float* u, float* act, int I) {
  const long long off = static_cast<long long>(blockIdx.x) * I;
  kernels::for_row_chunk(I, [&](int c) { act[off + c] = kernels::gelu_tanh_f(u[off + c]); });
}
// da *= gelu'(u) (tanh approximation).
static __global__ void gelu_bwd(const float* u, float* da, int I) {
  const long long off = static_cast<long long>(blockIdx.x) * I;
  kernels::for_row_chunk(I, [&](int c) {
    constexpr float k0 = 0.7978845608028654f, k1 = 0.044715f;
    const float x = u[off + c], t = tanhf(k0 * (x + k1 * x * x * x));
    da[off + c] *= 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x * x);
  });
}

// Cross-entropy of each row against target (< 0: unscored): acc += nll (double); with dz,
// dz = weight (softmax - onehot) (0 on unscored rows). One block per row; the max and the sum of
// exponentials come from one pass (a running max per thread, its sum rescaled when it grows), so
// the row is read twice, not three times. W = 4 needs V % 4 == 0.
template <int W>
static __global__ void cross_entropy(const float* __restrict__ z, int V, const int* __restrict__ target, float weight,
                                     float* __restrict__ dz, double* acc) {
  const long long off = static_cast<long long>(blockIdx.x) * V;
  const int t = target[blockIdx.x];
  const int step = static_cast<int>(blockDim.x) * W;
  if (t < 0) {
    if (dz) {
      const float zero[W] = {};
      for (int c = threadIdx.x * W; c < V; c += step) stv<W>(dz + off + c, zero);
    }
    return;
  }
  float m = -INFINITY, s = 0.0f;
  for (int c = threadIdx.x * W; c < V; c += step) {
    float v[W];
    ldv<W>(z + off + c, v);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      if (v[e] > m) {
        s = s * expf(m - v[e]) + 1.0f;
        m = v[e];
      } else {
        s += expf(v[e] - m);
      }
    }
  }
  const float M = block_max(m);
  s = m == -INFINITY ? 0.0f : s * expf(m - M);
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(acc, static_cast<double>(M) + log(static_cast<double>(s)) - static_cast<double>(z[off + t]));
  if (dz) {
    const float k = weight / s;
    for (int c = threadIdx.x * W; c < V; c += step) {
      float v[W];
      ldv<W>(z + off + c, v);
#pragma unroll
      for (int e = 0; e < W; ++e) v[e] = expf(v[e] - M) * k - (c + e == t ? weight : 0.0f);
      stv<W>(dz + off + c, v);
    }
  }
}

// KL(softmax(zt/T) || softmax(z/T)) per row into acc; dz += weight/T (q - p). One block per row.
static __global__ void kl_temperature(const float* z, const float* zt, int V, float T, float weight, float* dz, double* acc) {
  const long long off = static_cast<long long>(blockIdx.x) * V;
  const float inv = 1.0f / T;
  float mp = -INFINITY, mq = -INFINITY;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    mp = fmaxf(mp, zt[off + c] * inv);
    mq = fmaxf(mq, z[off + c] * inv);
  }
  mp = block_max(mp);
  mq = block_max(mq);
  float sp = 0.0f, sq = 0.0f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    sp += expf(zt[off + c] * inv - mp);
    sq += expf(z[off + c] * inv - mq);
  }
  sp = block_sum(sp);
  sq = block_sum(sq);
  const float lsp = mp + logf(sp), lsq = mq + logf(sq);
  float kl = 0.0f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    const float lp = zt[off + c] * inv - lsp, lq = z[off + c] * inv - lsq, p = expf(lp);
    kl += p * (lp - lq);
    if (dz) dz[off + c] += weight * inv * (expf(lq) - p);
  }
  kl = block_sum(kl);
  if (threadIdx.x == 0) atomicAdd(acc, static_cast<double>(kl));
}

// The reconstruction loss's gradient: dk += w r (the reconstruction's side) and g = -w r (the
// target's side, row stride ldg: a block of the fused input projection's gradient).
// Grid: x over columns (256 a block), y over rows (strided).
static __global__ void recon_grad(const float* __restrict__ r, int rows, int cols, float w, float* __restrict__ dk, float* __restrict__ g,
                                  int ldg) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    const long long i = static_cast<long long>(row) * cols + c;
    const float v = w * r[i];
    dk[i] += v;
    g[static_cast<long long>(row) * ldg + c] = -v;
  }
}

// acc += sum x^2 (double): warp sums, then one double atomicAdd per block (a per-warp atomic
// from thousands of blocks serialised on the one address and cost ~60 us per call at 7B shapes).
static __global__ void __launch_bounds__(256) sq_sum(const float* __restrict__ x, long long n, double* acc) {
  __shared__ double part[8];
  double s = 0.0;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    s += static_cast<double>(x[i]) * x[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < 8; ++w) t += part[w];
    atomicAdd(acc, t);
  }
}

// u (rows, cols) = the first cols columns of the identity.
static __global__ void identity_columns(float* u, int rows, int cols) {
  const long long n = static_cast<long long>(rows) * cols;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    u[i] = (i / cols == i % cols) ? 1.0f : 0.0f;
}

// y += a x.
static __global__ void axpy(float a, const float* x, float* y, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    y[i] += a * x[i];
}

// y[i] rounded to TF32 in place, float4 (n % 4 == 0, y 16-byte aligned) or one by one.
template <int W>
static __global__ void round_tf32(float* y, long long n) {
  const long long i = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) * W;
  if (i >= n) return;
  if constexpr (W == 4) {
    float4* p = reinterpret_cast<float4*>(y + i);
    const float4 x = *p;
    *reinterpret_cast<uint4*>(p) = make_uint4(kernels::to_tf32(x.x), kernels::to_tf32(x.y), kernels::to_tf32(x.z), kernels::to_tf32(x.w));
  } else {
    y[i] = __uint_as_float(kernels::to_tf32(y[i]));
  }
}

// ---- host launchers: the register / float4 kernels where sizes and alignment allow, else the
// plain ones (tests/cuda/test_cuda_train_kernels.cu checks both against float64 references) ----
// p (nullptr counts as aligned) on a `bytes` boundary: float4 paths need 16, float2 paths 8.
inline bool aligned(const void* p, unsigned bytes = 16) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }
// f(std::integral_constant<int, K>) with the fewest 128-float chunks K in {1, 2, 4, 8} covering a
// row of n <= 1024 floats (the register softmax kernels' template argument).
template <class F>
void with_row_chunks(int n, F&& f) {
  if (n <= 128) f(std::integral_constant<int, 1>{});
  else if (n <= 256) f(std::integral_constant<int, 2>{});
  else if (n <= 512) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

/// y = norm(x) row-wise, keeping mean (LayerNorm only; may be nullptr otherwise) and rstd.
inline void norm_forward(const float* x, const float* w, const float* b, bool layer, float eps, float* y, float* mean, float* rstd,
                         int rows, int H, cudaStream_t st) {
  if (rows <= 0) return;
  if (H % 4 == 0 && H <= 128 * 4 * 16 && aligned(x) && aligned(y) && aligned(w) && aligned(b)) {
    if (H <= 128 * 4 * 8) norm_fwd_reg<4, 8><<<rows, 128, 0, st>>>(x, w, b, layer, eps, y, mean, rstd, H);
    else norm_fwd_reg<4, 16><<<rows, 128, 0, st>>>(x, w, b, layer, eps, y, mean, rstd, H);
  } else {
    norm_fwd<<<rows, 256, 0, st>>>(x, w, b, layer, eps, y, mean, rstd, H);
  }
  CACHESHRINK_CUDA_LAUNCH_CHECK("norm_fwd");
}
/// dx += d norm(x)/dx applied to dy.
inline void norm_backward(const float* x, const float* w, const float* mean, const float* rstd, bool layer, const float* dy, float* dx,
                          int rows, int H, cudaStream_t st) {
  if (rows <= 0) return;
  if (H % 4 == 0 && H <= 128 * 4 * 16 && aligned(x) && aligned(w) && aligned(dy) && aligned(dx)) {
    if (H <= 128 * 4 * 8) norm_bwd_reg<4, 8><<<rows, 128, 0, st>>>(x, w, mean, rstd, layer, dy, dx, H);
    else norm_bwd_reg<4, 16><<<rows, 128, 0, st>>>(x, w, mean, rstd, layer, dy, dx, H);
  } else {
    norm_bwd<<<rows, 256, 0, st>>>(x, w, mean, rstd, layer, dy, dx, H);
  }
  CACHESHRINK_CUDA_LAUNCH_CHECK("norm_bwd");
}
/// Masked row softmax of one sequence's scores (rows = heads * n rows of n), in place.
inline void softmax_forward(float* S, long long rows, int n, int window, cudaStream_t st) {
  if (rows <= 0) return;
  const unsigned grid = grid_for(rows * 32, 256);
  if (n % 4 == 0 && n <= 1024 && aligned(S) && rows <= 65535LL * 256) {
    with_row_chunks(n, [&](auto K) { masked_softmax_v4<decltype(K)::value><<<grid, 256, 0, st>>>(S, static_cast<int>(rows), n, window); });
  } else {
    masked_softmax<<<grid, 256, 0, st>>>(S, rows, n, window);
  }
  CACHESHRINK_CUDA_LAUNCH_CHECK("masked_softmax");
}
/// Its backward in place on dP (rows as softmax_forward).
inline void softmax_backward(const float* P, float* dP, long long rows, int n, int window, cudaStream_t st) {
  if (rows <= 0) return;
  const unsigned grid = grid_for(rows * 32, 256);
  if (n % 4 == 0 && n <= 1024 && aligned(P) && aligned(dP) && rows <= 65535LL * 256) {
    with_row_chunks(n, [&](auto K) { softmax_bwd_v4<decltype(K)::value><<<grid, 256, 0, st>>>(P, dP, static_cast<int>(rows), n, window); });
  } else {
    softmax_bwd<<<grid, 256, 0, st>>>(P, dP, rows, n, window);
  }
  CACHESHRINK_CUDA_LAUNCH_CHECK("softmax_bwd");
}
/// RoPE (cos/sin tables (positions, hd/2); sin negated: the inverse) on `heads` heads of hd
/// floats of each of `rows` rows (stride ld), after adding bias (heads*hd, or nullptr); tf32: the
/// results rounded to TF32.
inline void rope_forward(float* y, int ld, int rows, int heads, int hd, const int* pos, const float* cos_t, const float* sin_t,
                         const float* bias, cudaStream_t st, bool tf32 = false) {
  const int pairs = heads * (hd / 2);
  if (rows <= 0 || pairs == 0) return;
  if (hd % 4 == 0 && ld % 2 == 0 && aligned(y, 8) && aligned(bias, 8))
    rope_rows<2><<<rows, std::min(256, (pairs / 2 + 31) / 32 * 32), 0, st>>>(y, ld, heads, hd, pos, cos_t, sin_t, bias, tf32);
  else rope_rows<1><<<rows, std::min(256, (pairs + 31) / 32 * 32), 0, st>>>(y, ld, heads, hd, pos, cos_t, sin_t, bias, tf32);
  CACHESHRINK_CUDA_LAUNCH_CHECK("rope_rows");
}
/// y[0, n) rounded to TF32 in place.
inline void round_to_tf32(float* y, long long n, cudaStream_t st) {
  if (n <= 0) return;
  if (n % 4 == 0 && aligned(y)) round_tf32<4><<<grid_for(n / 4, 256), 256, 0, st>>>(y, n);
  else round_tf32<1><<<grid_for(n, 256), 256, 0, st>>>(y, n);
  CACHESHRINK_CUDA_LAUNCH_CHECK("round_tf32");
}
/// act = silu(g) u of gu = [g | u] (rows, 2I).
inline void swiglu_forward(const float* gu, float* act, int rows, int I, cudaStream_t st) {
  if (rows <= 0 || I <= 0) return;
  if (I % 4 == 0 && aligned(gu) && aligned(act)) swiglu_fwd<4><<<vec_grid(rows, I, 4), 256, 0, st>>>(gu, act, rows, I);
  else swiglu_fwd<1><<<vec_grid(rows, I, 1), 256, 0, st>>>(gu, act, rows, I);
  CACHESHRINK_CUDA_LAUNCH_CHECK("swiglu_fwd");
}
/// dgu = d [g | u] of act = silu(g) u, given d act.
inline void swiglu_backward(const float* gu, const float* da, float* dgu, int rows, int I, cudaStream_t st) {
  if (rows <= 0 || I <= 0) return;
  if (I % 4 == 0 && aligned(gu) && aligned(da) && aligned(dgu)) swiglu_bwd<4><<<vec_grid(rows, I, 4), 256, 0, st>>>(gu, da, dgu, rows, I);
  else swiglu_bwd<1><<<vec_grid(rows, I, 1), 256, 0, st>>>(gu, da, dgu, rows, I);
  CACHESHRINK_CUDA_LAUNCH_CHECK("swiglu_bwd");
}
/// Cross-entropy of rows of logits z (rows, V) against target (< 0: unscored) into acc; dz if given.
inline void cross_entropy_rows(const float* z, int rows, int V, const int* target, float weight, float* dz, double* acc, cudaStream_t st) {
  if (rows <= 0) return;
  if (V % 4 == 0 && aligned(z) && aligned(dz)) cross_entropy<4><<<rows, 1024, 0, st>>>(z, V, target, weight, dz, acc);
  else cross_entropy<1><<<rows, 1024, 0, st>>>(z, V, target, weight, dz, acc);
  CACHESHRINK_CUDA_LAUNCH_CHECK("cross_entropy");
}
/// dst (rows, nkv hd) = per-group sums of src (rows, nkv group hd).
// sum_head_groups of src into dst, and of src2 into dst2 in the same launch when given. Blocks
// as wide as a row needs (down to 32 threads): a narrow kv width (512 floats at Qwen2.5-7B) no
// longer leaves half of every 256-thread block idle.
inline void sum_groups(const float* src, float* dst, int rows, int nkv, int group, int hd, cudaStream_t st, const float* src2 = nullptr,
                       float* dst2 = nullptr) {
  if (rows <= 0) return;
  const bool two = src2 != nullptr;
  const bool v4 = hd % 4 == 0 && aligned(src) && aligned(dst) && (!two || (aligned(src2) && aligned(dst2)));
  const int W = v4 ? 4 : 1, lanes = nkv * hd / W;
  int threads = 32;
  while (threads < 256 && threads < lanes) threads *= 2;
  dim3 grid = vec_grid(rows, nkv * hd, W, threads);
  grid.z = two ? 2 : 1;
  if (v4) sum_head_groups<4><<<grid, threads, 0, st>>>(src, dst, src2, dst2, rows, nkv, group, hd);
  else sum_head_groups<1><<<grid, threads, 0, st>>>(src, dst, src2, dst2, rows, nkv, group, hd);
  CACHESHRINK_CUDA_LAUNCH_CHECK("sum_head_groups");
}

}  // namespace train_kernels

/// Block boundaries of the training attention's causal split for a sequence of n tokens:
/// 0 = b_0 < ... < b_nb = n, nb = min(4, n), cut at multiples of 32 once n >= 128 (aligned
/// sub-matrices for cuBLAS). Query block i's scores take keys [0, b_{i+1}) only.
inline std::vector<int> train_causal_blocks(int n) {
  const int nb = std::min(4, n);
  std::vector<int> b(static_cast<std::size_t>(nb) + 1);
  for (int i = 0; i <= nb; ++i) b[static_cast<std::size_t>(i)] = train_kernels::causal_bound(i, n);
  return b;
}

class TrainGraph {
 public:
  using MatR = MatrixR<float>;

  /// Device memory a parameter's value lives in: its own buffer, or (the down projections) rows
  /// of its layer's stacked input projection (Frozen::wcat), so the forward's one GEMM reads the
  /// current values with no copy.
  struct ValueView {
    float* p = nullptr;
    std::size_t n = 0;
    float* data() const { return p; }
    std::size_t size() const { return n; }
    bool empty() const { return n == 0; }
  };
  /// A trainable matrix: device value and gradient, row-major (rows, cols).
  struct Param {
    std::string name;
    int rows = 0, cols = 0;
    bool stiefel = false;
    ValueView value;
    DeviceBuffer<float> grad;
    DeviceBuffer<float> own;  // value's storage unless it is a view into the stacked projection
  };
  using Slots = train::TrainGraph<float>::Slots;

  explicit TrainGraph(const model::Model& m)
      : c_(m.config),
        stream_(std::make_unique<Stream>()),
        blas_(std::make_unique<CublasHandle>(stream_->get())),
        gemm_(std::make_unique<TunedGemm>(stream_->get(), blas_->get())),
        side_stream_(std::make_unique<Stream>()),
        side_blas_(std::make_unique<CublasHandle>(side_stream_->get())),
        side_gemm_(std::make_unique<TunedGemm>(side_stream_->get(), side_blas_->get())) {
    const auto& W = m.weights;
    const int L = c_.n_layers, dkv = c_.d_kv();
    up(embed_, W.embed);
    if (c_.family == Family::Gpt2) up(pos_embed_, W.pos_embed);
    if (W.lm_head.size()) up(head_, W.lm_head);
    upv(fnw_, W.final_norm_w);
    upv(fnb_, W.final_norm_b);
    if (c_.uses_rope()) rope_ = model::Rope(c_);
    layers_.resize(static_cast<std::size_t>(L));
    slots_.assign(static_cast<std::size_t>(L), Slots{});
    std::map<const MatrixRf*, int> up_index;
    for (int l = 0; l < L; ++l) {
      const auto& lw = W.layers[static_cast<std::size_t>(l)];
      auto& f = layers_[static_cast<std::size_t>(l)];
      upv(f.n1w, lw.norm1_w);
      upv(f.n1b, lw.norm1_b);
      upv(f.n2w, lw.norm2_w);
      upv(f.n2b, lw.norm2_b);
      up(f.wo, lw.wo);
      upv(f.bq, lw.bq);
      upv(f.bk, lw.bk);
      upv(f.bv, lw.bv);
      upv(f.bo, lw.bo);
      upv(f.qn, lw.q_norm);
      upv(f.kn, lw.k_norm);
      if (gpt2()) {
        up(f.wgu, lw.w_up);
        upv(f.bgu, lw.b_up);
      } else {
        MatrixRf gu(lw.w_gate.rows() + lw.w_up.rows(), lw.w_up.cols());
        gu << lw.w_gate, lw.w_up;
        up(f.wgu, gu);
        if (lw.b_gate.size() || lw.b_up.size()) {
          VectorXf b = VectorXf::Zero(gu.rows());
          if (lw.b_gate.size()) b.head(lw.w_gate.rows()) = lw.b_gate;
          if (lw.b_up.size()) b.tail(lw.w_up.rows()) = lw.b_up;
          upv(f.bgu, b);
        }
      }
      up(f.wd, lw.w_down);
      upv(f.bd, lw.b_down);
      f.has_original_kv = lw.wk.rows() == dkv && lw.wv.rows() == dkv;
      {  // the stacked input projection; the down projections' rows are their parameters' storage (add below)
        const int dl = lw.mla ? lw.mla->d_latent : 0;
        layout_cat(f, dl, lw.mla && lw.mla->method == CompressionMethod::Joint);
        MatrixRf cat = MatrixRf::Zero(cat_rows(f), c_.hidden_size);
        cat.topRows(c_.d_q()) = lw.wq;
        if (f.cat_k >= 0) {
          cat.middleRows(f.cat_k, dkv) = lw.wk;
          cat.middleRows(f.cat_v, dkv) = lw.wv;
        }
        up(f.wcat, cat);
      }
      if (!lw.mla) {
        if (!f.has_original_kv)
          throw InvalidArgument("cuda train: layer " + std::to_string(l) + " has neither MLA weights nor k_proj/v_proj");
        continue;
      }
      const auto& a = *lw.mla;
      if (a.method != CompressionMethod::Separate && a.method != CompressionMethod::Xkv && a.method != CompressionMethod::Joint)
        throw InvalidArgument(std::string("cuda train: layer ") + std::to_string(l) + " uses compression method '" +
                              compression_method_name(a.method) + "', which training does not support yet (separate, xkv, joint)");
      f.mla = true;
      f.d_latent = a.d_latent;
      ++n_mla_;
      auto& sl = slots_[static_cast<std::size_t>(l)];
      const std::string p = "layers." + std::to_string(l) + ".";
      if (lmin_ < 0) lmin_ = l;
      float* const wrows = f.wcat.data();  // the down projections live in the stacked matrix
      sl.down_k = add(p + "w_down_k", a.w_down_k, false, wrows + static_cast<std::size_t>(f.cat_dk) * c_.hidden_size);
      if (a.method == CompressionMethod::Joint) {
        sl.joint = true;
        MatrixRf u(2 * dkv, a.d_latent);
        u << *a.w_up_k, *a.w_up_v;
        sl.up_k = add(p + "w_up_kv", u, true);
        continue;
      }
      sl.down_v = add(p + "w_down_v", a.w_down_v, false, wrows + static_cast<std::size_t>(f.cat_dv) * c_.hidden_size);
      auto it = up_index.find(a.w_up_k.get());
      if (it != up_index.end()) {
        sl.up_k = it->second;
        sl.up_v = it->second + 1;
      } else {
        const std::string u = a.group >= 0 ? "groups." + std::to_string(a.group) + "." : p;
        sl.up_k = add(u + "w_up_k", *a.w_up_k, true);
        sl.up_v = add(u + "w_up_v", *a.w_up_v, true);
        up_index[a.w_up_k.get()] = sl.up_k;
      }
    }
    if (n_mla_ == 0) throw InvalidArgument("cuda train: the model has no MLA layers (convert it first)");
    acc_.resize(4);
    stream_->synchronize();
  }

  /// A model of config `c` with random weights made on the device (benchmarks; no host copy):
  /// every layer an MLA layer with separate K/V latents of width d_latent that keeps its
  /// original K/V projections (for the reconstruction loss). Weights uniform with standard
  /// deviation `stddev`, norms 1, biases 0; up projections the first d_latent columns of the
  /// identity (orthonormal, as the optimizer requires; the cost of a step does not depend on it).
  TrainGraph(const ModelConfig& c, int d_latent, unsigned long long seed = 1, float stddev = 0.02f)
      : c_(c),
        stream_(std::make_unique<Stream>()),
        blas_(std::make_unique<CublasHandle>(stream_->get())),
        gemm_(std::make_unique<TunedGemm>(stream_->get(), blas_->get())),
        side_stream_(std::make_unique<Stream>()),
        side_blas_(std::make_unique<CublasHandle>(side_stream_->get())),
        side_gemm_(std::make_unique<TunedGemm>(side_stream_->get(), side_blas_->get())) {
    const int Dkv = c_.d_kv();
    if (d_latent <= 0 || d_latent > Dkv) throw InvalidArgument("cuda train: d_latent must be in [1, d_kv = " + std::to_string(Dkv) + "]");
    const std::size_t H = c_.hidden_size, Dq = static_cast<std::size_t>(c_.d_q()), I = c_.intermediate_size, V = c_.vocab_size;
    const float a = 1.7320508f * stddev;
    auto rnd = [&](DeviceBuffer<float>& d, std::size_t n, float amp) {
      d.resize(n);
      cuda::fill_uniform<float>(d.data(), static_cast<long long>(n), seed++, amp, st());
    };
    auto cst = [&](DeviceBuffer<float>& d, std::size_t n, float v) {
      d.resize(n);
      cuda::fill_value<float>(d.data(), static_cast<long long>(n), v, st());
    };
    const bool g2 = gpt2();
    rnd(embed_, V * H, a);
    if (g2) rnd(pos_embed_, static_cast<std::size_t>(c_.max_position) * H, a);
    if (!c_.tie_word_embeddings) rnd(head_, V * H, a);
    cst(fnw_, H, 1.0f);
    if (g2) cst(fnb_, H, 0.0f);
    if (c_.uses_rope()) rope_ = model::Rope(c_);
    layers_.resize(static_cast<std::size_t>(c_.n_layers));
    slots_.assign(layers_.size(), Slots{});
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      auto& f = layers_[l];
      cst(f.n1w, H, 1.0f);
      cst(f.n2w, H, 1.0f);
      if (g2) {
        cst(f.n1b, H, 0.0f);
        cst(f.n2b, H, 0.0f);
      }
      f.has_original_kv = true;
      layout_cat(f, d_latent, false);
      f.wcat.resize(static_cast<std::size_t>(cat_rows(f)) * H);
      cuda::fill_uniform<float>(f.wcat.data(), static_cast<long long>(Dq * H), seed++, a, st());  // Wq; Wk, Wv below
      cuda::fill_uniform<float>(f.wcat.data() + static_cast<std::size_t>(f.cat_k) * H, static_cast<long long>(2 * Dkv * H), seed++, a,
                                st());
      rnd(f.wo, H * Dq, a);
      if (c_.qkv_bias || g2) {
        cst(f.bq, Dq, 0.0f);
        cst(f.bk, static_cast<std::size_t>(Dkv), 0.0f);
        cst(f.bv, static_cast<std::size_t>(Dkv), 0.0f);
      }
      if (c_.o_bias || g2) cst(f.bo, H, 0.0f);
      if (c_.qk_norm) {
        cst(f.qn, static_cast<std::size_t>(c_.head_dim), 1.0f);
        cst(f.kn, static_cast<std::size_t>(c_.head_dim), 1.0f);
      }
      rnd(f.wgu, (g2 ? 1 : 2) * I * H, a);
      if (g2) cst(f.bgu, I, 0.0f);
      rnd(f.wd, H * I, a);
      if (g2) cst(f.bd, H, 0.0f);
      f.mla = true;
      f.has_original_kv = true;
      f.d_latent = d_latent;
      ++n_mla_;
      auto& sl = slots_[l];
      const std::string p = "layers." + std::to_string(l) + ".";
      // A parameter in its own buffer (Stiefel: identity columns) or, row >= 0, the stacked
      // matrix's rows from `row` on (a down projection, random).
      auto param = [&](std::string name, int rows, int cols, bool stiefel, int row = -1) {
        Param q;
        q.name = std::move(name);
        q.rows = rows;
        q.cols = cols;
        q.stiefel = stiefel;
        const std::size_t n = static_cast<std::size_t>(rows) * cols;
        if (stiefel) {
          q.own.resize(n);
          q.value = {q.own.data(), n};
          train_kernels::identity_columns<<<grid_for(static_cast<long long>(n), 256), 256, 0, st()>>>(q.value.data(), rows, cols);
          CACHESHRINK_CUDA_LAUNCH_CHECK("identity_columns");
        } else {
          q.value = {f.wcat.data() + static_cast<std::size_t>(row) * H, n};
          cuda::fill_uniform<float>(q.value.data(), static_cast<long long>(n), seed++, a, st());
        }
        q.grad.resize(n);
        params_.push_back(std::move(q));
        return static_cast<int>(params_.size()) - 1;
      };
      sl.down_k = param(p + "w_down_k", d_latent, static_cast<int>(H), false, f.cat_dk);
      sl.down_v = param(p + "w_down_v", d_latent, static_cast<int>(H), false, f.cat_dv);
      sl.up_k = param(p + "w_up_k", Dkv, d_latent, true);
      sl.up_v = param(p + "w_up_v", Dkv, d_latent, true);
    }
    lmin_ = 0;
    acc_.resize(4);
    zero_grad();
    stream_->synchronize();
  }

  /// TF32 tensor-core math for the graph's GEMMs (inputs rounded to 10 mantissa bits, float32
  /// accumulation: cublasLt's CUBLAS_COMPUTE_32F_FAST_TF32, cuBLAS's CUBLAS_TF32_TENSOR_OP_MATH
  /// for the attention's batched GEMMs); off (the default) is true float32.
  void set_tf32(bool on) {
    for (auto* h : {hb(), side_blas_->get()})
      CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(h, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    gemm_->set_tf32(on);
    side_gemm_->set_tf32(on);
    tf32_ = on;
  }
  bool tf32() const { return tf32_; }
  /// The fused TF32 attention (flash_train.cuh) in TF32 mode (on by default); off: the
  /// materialised attention's batched GEMMs in TF32 too. Strict float32 always materialises.
  void set_fused_attention(bool on) { fused_on_ = on; }
  /// Whether the next forward_backward runs the fused attention.
  bool fused_attention() const { return tf32_ && fused_on_ && flash_train_supported(c_.head_dim); }
  /// Which tensor-core form the fused attention takes (FlashKernel::Auto, the default: the wgmma
  /// kernels where this binary and device have them, else mma.sync; Wgmma throws at the next
  /// forward where it cannot run).
  void set_flash_kernel(FlashKernel k) { flash_kernel_ = k; }
  FlashKernel flash_kernel() const { return flash_kernel_; }
  /// Kernel choice of the graph's (non-attention) GEMMs: timed among cublasLt's candidates on
  /// each shape's first call (on: ~1-3% faster at 7B shapes in TF32, but the pick rests on timings
  /// and can differ between processes) or cublasLt's first choice (off, the default: reproducible).
  void set_gemm_tuning(bool on) {
    gemm_->set_tuning(on);
    side_gemm_->set_tuning(on);
  }
  /// The timed search's width (cuda::TunedGemm::set_search).
  void set_gemm_search(int candidates, bool splitk) {
    gemm_->set_search(candidates, splitk);
    side_gemm_->set_search(candidates, splitk);
  }
  /// Diagnostic: time every graph GEMM (not the attention's batched ones) until gemm_profile().
  void set_gemm_profile(bool on) {
    gemm_->set_profile(on);
    gemm_profile_ = on;
  }
  std::vector<TunedGemm::ProfileRow> gemm_profile() { return gemm_->profile(); }
  bool gemm_tuning() const { return gemm_->tuning(); }
  /// Side stream (on by default): the work nothing on the critical path waits for (the
  /// reconstruction residuals and their squared norms in the forward; the trainable weights'
  /// gradients in the backward) runs on a second stream, concurrently with the main stream's
  /// next layers, and is joined before the forward's and the backward's ends. Off: everything in
  /// one stream. The stage and GEMM profiles run everything in one stream too (their events and
  /// timings are one stream's), so they see the side work as stages of their own.
  void set_side_stream(bool on) { side_on_ = on; }
  bool side_stream() const { return side_on_ && !stage_profile_ && !gemm_profile_; }
  /// Diagnostic: split every forward_backward into named stages (each kernel or GEMM of a layer,
  /// the same name summed over layers) timed by CUDA events recorded between them on the graph's
  /// stream, until stage_profile(). A stage's time runs from the previous mark to its own, so
  /// launch gaps count where they occur; the marks add a little host overhead.
  struct StageRow {
    std::string name;
    int calls = 0;
    double ms = 0;
  };
  void set_stage_profile(bool on) {
    drop_stages();
    stage_profile_ = on;
  }
  /// Synchronises the stream; per stage name, calls and total ms since the last call, slowest first.
  std::vector<StageRow> stage_profile() {
    stream_->synchronize();
    std::map<std::string, StageRow> rows;
    for (std::size_t i = 1; i < marks_.size(); ++i) {
      if (!marks_[i].first) continue;  // a start mark: nothing ran since the previous one
      const double ms = marks_[i].second->elapsed_since(*marks_[i - 1].second);
      StageRow& r = rows[marks_[i].first];
      r.name = marks_[i].first;
      ++r.calls;
      r.ms += ms;
    }
    drop_stages();
    std::vector<StageRow> out;
    for (auto& [name, r] : rows) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const StageRow& a, const StageRow& b) { return a.ms > b.ms; });
    return out;
  }

  const ModelConfig& config() const { return c_; }
  cudaStream_t stream() const { return stream_->get(); }
  cublasHandle_t blas() const { return blas_->get(); }
  std::vector<Param>& params() { return params_; }
  const std::vector<Param>& params() const { return params_; }
  int n_mla_layers() const { return n_mla_; }
  bool has_original_kv() const {
    for (const auto& f : layers_)
      if (f.mla && !f.has_original_kv) return false;
    return true;
  }

  void zero_grad() {
    for (auto& p : params_) CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(p.grad.data(), 0, p.grad.size() * sizeof(float), stream()));
  }

  /// Parameter i's value / gradient as a host (rows, cols) matrix in the CPU graph's layout.
  linalg::Matrix<float> value(std::size_t i) const { return fetch(params_.at(i).value, params_[i]); }
  linalg::Matrix<float> grad(std::size_t i) const { return fetch(params_.at(i).grad, params_[i]); }
  /// Sets parameter i's value from a host matrix of its shape.
  void set_value(std::size_t i, const linalg::Matrix<float>& v) {
    Param& p = params_.at(i);
    if (v.rows() != p.rows || v.cols() != p.cols) throw InvalidArgument("cuda train: set_value of " + p.name + ": wrong shape");
    const MatR r = v;
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(p.value.data(), r.data(), p.value.size() * sizeof(float), cudaMemcpyHostToDevice, stream()));
    stream_->synchronize();
  }

  /// Copies the current compression parameters into m's MLA weights (train::write_back_mla, as the
  /// CPU graph).
  void write_back(model::Model& m) const {
    train::write_back_mla(m, slots_, c_.d_kv(), [&](int i) { return value(static_cast<std::size_t>(i)); });
  }

  /// Logits of the last forward (tokens, vocab), downloaded.
  MatR logits() const {
    MatR z(n_tokens_, c_.vocab_size);
    CACHESHRINK_CUDA_CHECK(
        cudaMemcpyAsync(z.data(), logits_.data(), static_cast<std::size_t>(z.size()) * sizeof(float), cudaMemcpyDeviceToHost, stream()));
    stream_->synchronize();
    return z;
  }

  /// Forward with loss; with backward_scale > 0 the loss gradient (times backward_scale) is then
  /// propagated and ACCUMULATED into every parameter's grad. Distillation runs the teacher (the
  /// same model with the original K/V projections) first, on the device.
  train::LossParts forward_backward(std::span<const std::vector<int>> seqs, const train::LossOptions& lo, double backward_scale = 0.0) {
    lo.validate();
    if ((lo.recon_alpha > 0 || lo.distill) && !has_original_kv())
      throw InvalidArgument(std::string(lo.distill ? "distillation" : "reconstruction") +
                            " loss needs the original k_proj/v_proj weights of every MLA layer, but they are missing (a saved MLA "
                            "model keeps them only when saved with store_original_weights / --store-original-weights)");
    const bool grad = backward_scale > 0.0;
    prepare(seqs, lo);
    CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(acc_.data(), 0, acc_.size() * sizeof(double), stream()));
    stage(nullptr);  // the profile's start mark (no-op unless profiling)
    if (lo.distill) {
      run_forward(/*teacher=*/true, lo);
      std::swap(logits_, teacher_logits_);
    }
    recon_coef_ = grad ? static_cast<float>(backward_scale * lo.recon_alpha / n_mla_) : 0.0f;
    run_forward(false, lo);
    const int N = n_tokens_, V = c_.vocab_size;
    const double w_lm = lo.distill ? 1.0 - lo.distill_alpha : 1.0 - lo.recon_alpha;
    const bool need_dz = grad && (w_lm > 0 || lo.distill);
    const float lm_w = pred_ > 0 ? static_cast<float>(backward_scale * w_lm / static_cast<double>(pred_)) : 0.0f;
    if (need_dz) dz_.reserve(static_cast<std::size_t>(N) * V);
    train_kernels::cross_entropy_rows(logits_.data(), N, V, d_target_.data(), lm_w, need_dz ? dz_.data() : nullptr, acc_.data(), stream());
    stage("cross_entropy");
    if (lo.distill) {
      const float kw = static_cast<float>(backward_scale * lo.distill_alpha * lo.temperature * lo.temperature / N);
      train_kernels::kl_temperature<<<N, 1024, 0, stream()>>>(logits_.data(), teacher_logits_.data(), V, static_cast<float>(lo.temperature),
                                                              kw, need_dz ? dz_.data() : nullptr, acc_.data() + 1);
      CACHESHRINK_CUDA_LAUNCH_CHECK("kl_temperature");
      stage("kl_temperature");
    }
    if (grad) run_backward(need_dz);
    double acc[4];
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(acc, acc_.data(), sizeof(acc), cudaMemcpyDeviceToHost, stream()));
    stream_->synchronize();
    train::LossParts lp;
    lp.tokens = N;
    lp.predicted = pred_;
    lp.lm = pred_ > 0 ? acc[0] / static_cast<double>(pred_) : 0.0;
    lp.recon = lo.recon_alpha > 0 ? 0.5 * acc[2] / (recon_slots_ * c_.d_kv()) / n_mla_ : 0.0;
    if (lo.distill) {
      lp.kl = acc[1] / N;
      lp.total = lo.distill_alpha * lo.temperature * lo.temperature * lp.kl + w_lm * lp.lm;
    } else {
      lp.total = w_lm * lp.lm + lo.recon_alpha * lp.recon;
    }
    return lp;
  }

  /// Device bytes held by activations and scratch (after at least one forward).
  std::size_t activation_bytes() const {
    std::size_t b = 0;
    for (const auto& a : acts_)
      for (const auto* p : {&a.x_mid, &a.h,  &a.mean1, &a.rstd1, &a.y,   &a.q_pre, &a.q_rstd, &a.k,     &a.k_pre, &a.k_rstd,
                            &a.v,     &a.rk, &a.rv,    &a.P,     &a.lse, &a.attn,  &a.h2,     &a.mean2, &a.rstd2, &a.gu})
        b += p->size() * sizeof(float);
    for (const auto& x : xs_) b += x.size() * sizeof(float);
    for (const auto* p : {&logits_, &teacher_logits_, &dz_, &hf_, &fmean_, &frstd_, &tmp_, &dx_, &dh_, &dcat_, &dk_, &dv_, &dkh_, &dvh_,
                          &da_, &dgu_, &gdown_, &dP_, &delta_})
      b += p->size() * sizeof(float);
    return b;
  }

 private:
  // The layer's input projections stacked into one (rows, hidden) matrix, so that one GEMM of the
  // normed input makes every projection of it (and one GEMM, K = the stacked rows, takes their
  // gradients back): [Wq; W_down_k; W_down_v; Wk; Wv] for an MLA layer (W_down_v absent when joint;
  // the original Wk, Wv present when kept, for the reconstruction targets and the teacher), [Wq;
  // Wk; Wv] for a plain one. The down projections' rows are the trainable parameters' own storage
  // (Param::value views them), so the optimizer's updates are what the next forward reads.
  struct Frozen {
    DeviceBuffer<float> n1w, n1b, n2w, n2b, wcat, wo, bq, bk, bv, bo, qn, kn, wgu, bgu, wd, bd;
    bool mla = false, has_original_kv = false;
    int d_latent = 0;
    int cat_dk = -1, cat_dv = -1, cat_k = -1, cat_v = -1;  // first rows of the blocks in wcat (-1: absent)
    int cat_base = 0;  // rows the fused GEMM computes without the reconstruction targets (MLA: q and latents; plain: q)
    int ycols = 0;     // rows the backward's gradient spans (MLA: all; plain: q only): the row stride of dcat_
  };
  struct Acts {
    // y: the fused input projection's output (tokens, cat_base): q at column 0, the latents at
    // cat_dk / cat_dv (the reconstruction targets are not kept: rk, rv hold the residuals).
    // P: the materialised attention's probabilities; lse: the fused attention's log2-sum-exp
    // (tokens, heads). Each path sizes only its own.
    DeviceBuffer<float> x_mid, h, mean1, rstd1, y, q_pre, q_rstd, k, k_pre, k_rstd, v, rk, rv, P, lse, attn, h2, mean2, rstd2, gu;
  };
  // Lays out f's stacked input projection (rows; see Frozen) for a layer with d_latent dl (0: plain).
  void layout_cat(Frozen& f, int dl, bool joint) const {
    const int Dq = c_.d_q(), Dkv = c_.d_kv();
    if (dl == 0) {
      f.cat_k = Dq;
      f.cat_v = Dq + Dkv;
      f.cat_base = f.ycols = Dq;
      return;
    }
    f.cat_dk = Dq;
    f.cat_dv = joint ? -1 : Dq + dl;
    f.cat_base = Dq + (joint ? 1 : 2) * dl;
    if (f.has_original_kv) {
      f.cat_k = f.cat_base;
      f.cat_v = f.cat_base + Dkv;
    }
    f.ycols = f.cat_base + (f.has_original_kv ? 2 * Dkv : 0);
  }
  int cat_rows(const Frozen& f) const { return std::max({f.ycols, f.cat_v + c_.d_kv(), f.cat_base}); }
  const float* wrow(const Frozen& f, int row) const { return f.wcat.data() + static_cast<std::size_t>(row) * c_.hidden_size; }

  bool gpt2() const { return c_.family == Family::Gpt2; }
  cudaStream_t st() const { return stream_->get(); }
  cublasHandle_t hb() const { return blas_->get(); }
  // Row-major GEMMs of the graph (HF-orientation weights; column-major underneath, through TunedGemm).
  // Y (rows, out) = alpha X (rows, in) W^T + beta Y.
  void xwt(int rows, int out, int in, const float* X, int ldx, const float* W, int ldw, float* Y, int ldy, float alpha = 1.0f,
           float beta = 0.0f, TunedGemm* g = nullptr) {
    (g ? g : gemm_.get())->gemm(CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, alpha, W, ldw, X, ldx, beta, Y, ldy);
  }
  // Y (rows, out) = alpha X W^T + C: C (same layout as Y) is read, not overwritten.
  void xwt_plus(int rows, int out, int in, const float* X, int ldx, const float* W, int ldw, const float* C, float* Y, int ldy,
                float alpha = 1.0f) {
    gemm_->gemm(CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, alpha, W, ldw, X, ldx, 1.0f, C, ldy, Y);
  }
  // Y (rows, out) = alpha X (rows, in) W (in, out) + beta Y.
  void xw(int rows, int out, int in, const float* X, int ldx, const float* W, int ldw, float* Y, int ldy, float alpha = 1.0f,
          float beta = 0.0f) {
    gemm_->gemm(CUBLAS_OP_N, CUBLAS_OP_N, out, rows, in, alpha, W, ldw, X, ldx, beta, Y, ldy);
  }
  // G (m, n) = alpha X^T Y + beta G, X (rows, m), Y (rows, n).
  void xty(int rows, int m, int n, const float* X, int ldx, const float* Y, int ldy, float* G, float alpha = 1.0f, float beta = 1.0f,
           TunedGemm* g = nullptr) {
    (g ? g : gemm_.get())->gemm(CUBLAS_OP_N, CUBLAS_OP_T, n, m, rows, alpha, Y, ldy, X, ldx, beta, G, n);
  }

  void up(DeviceBuffer<float>& d, const MatrixRf& m) {
    if (m.size()) d.upload(m.data(), static_cast<std::size_t>(m.size()), st());
  }
  void upv(DeviceBuffer<float>& d, const VectorXf& v) {
    if (v.size()) d.upload(v.data(), static_cast<std::size_t>(v.size()), st());
  }
  // Adds a parameter with value v, stored at `at` (device memory of v's size) or in its own buffer.
  int add(std::string name, const MatrixRf& v, bool stiefel, float* at = nullptr) {
    Param p;
    p.name = std::move(name);
    p.rows = static_cast<int>(v.rows());
    p.cols = static_cast<int>(v.cols());
    p.stiefel = stiefel;
    const std::size_t n = static_cast<std::size_t>(v.size());
    if (at == nullptr) {
      p.own.resize(n);
      at = p.own.data();
    }
    p.value = {at, n};
    if (n) {
      CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(at, v.data(), n * sizeof(float), cudaMemcpyHostToDevice, st()));
      stream_->synchronize();
    }
    p.grad.resize(static_cast<std::size_t>(v.size()));
    CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(p.grad.data(), 0, p.grad.size() * sizeof(float), st()));
    params_.push_back(std::move(p));
    return static_cast<int>(params_.size()) - 1;
  }
  template <class Buf>
  linalg::Matrix<float> fetch(const Buf& d, const Param& p) const {
    MatR r(p.rows, p.cols);
    CACHESHRINK_CUDA_CHECK(
        cudaMemcpyAsync(r.data(), d.data(), static_cast<std::size_t>(r.size()) * sizeof(float), cudaMemcpyDeviceToHost, st()));
    stream_->synchronize();
    return r;
  }
  const float* pv(int i) const { return params_[static_cast<std::size_t>(i)].value.data(); }
  float* pg(int i) { return params_[static_cast<std::size_t>(i)].grad.data(); }
  static const float* opt(const DeviceBuffer<float>& b) { return b.empty() ? nullptr : b.data(); }
  const DeviceBuffer<float>& head() const { return head_.empty() ? embed_ : head_; }

  // Validates the batch, uploads ids/positions/targets, sizes every buffer.
  void prepare(std::span<const std::vector<int>> seqs, const train::LossOptions& lo) {
    const int B = static_cast<int>(seqs.size());
    if (B == 0) throw InvalidArgument("cuda train forward: empty batch");
    off_.assign(static_cast<std::size_t>(B) + 1, 0);
    int maxlen = 0;
    std::vector<int> ids, pos, target;
    pred_ = 0;
    for (int s = 0; s < B; ++s) {
      const auto& t = seqs[static_cast<std::size_t>(s)];
      if (t.empty()) throw InvalidArgument("cuda train forward: sequence " + std::to_string(s) + " has no tokens");
      if (gpt2() && static_cast<int>(t.size()) > c_.max_position)
        throw InvalidArgument("cuda train forward: sequence " + std::to_string(s) + " is longer than max_position_embeddings " +
                              std::to_string(c_.max_position));
      for (std::size_t i = 0; i < t.size(); ++i) {
        const int id = t[i];
        if (id < 0 || id >= c_.vocab_size)
          throw InvalidArgument("cuda train forward: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                std::to_string(c_.vocab_size) + ")");
        ids.push_back(id);
        pos.push_back(static_cast<int>(i));
        target.push_back(i + 1 < t.size() ? t[i + 1] : -1);
        pred_ += i + 1 < t.size();
      }
      off_[static_cast<std::size_t>(s) + 1] = off_[static_cast<std::size_t>(s)] + static_cast<int>(t.size());
      maxlen = std::max(maxlen, static_cast<int>(t.size()));
    }
    n_tokens_ = off_.back();
    max_len_ = maxlen;
    d_ids_.upload(ids, st());
    d_pos_.upload(pos, st());
    d_target_.upload(target, st());
    if (c_.uses_rope() && maxlen > rope_positions_) {
      const int half = c_.head_dim / 2;
      std::vector<float> cs(static_cast<std::size_t>(maxlen) * half), sn(cs.size());
      for (int p = 0; p < maxlen; ++p)
        rope_.angles(p, cs.data() + static_cast<std::size_t>(p) * half, sn.data() + static_cast<std::size_t>(p) * half);
      rope_cos_.upload(cs, st());
      rope_sin_.upload(sn, st());
      for (auto& v : sn) v = -v;  // R(-theta) = R(theta)^T: the backward's rotation
      rope_sin_neg_.upload(sn, st());
      rope_positions_ = maxlen;
    }
    recon_slots_ = lo.recon_norm == train::ReconNorm::Padded ? static_cast<double>(B) * maxlen : static_cast<double>(n_tokens_);
    // Buffers (grow only).
    const std::size_t N = static_cast<std::size_t>(n_tokens_), H = c_.hidden_size, Dq = static_cast<std::size_t>(c_.d_q()),
                      Dkv = static_cast<std::size_t>(c_.d_kv()), nh = c_.n_heads, nkv = c_.n_kv_heads, I = c_.intermediate_size;
    std::size_t P = 0;
    for (int s = 0; s < B; ++s) {
      const std::size_t n = static_cast<std::size_t>(off_[static_cast<std::size_t>(s) + 1] - off_[static_cast<std::size_t>(s)]);
      P += nh * n * n;
    }
    const std::size_t gu_w = (gpt2() ? 1 : 2) * I;
    xs_.resize(layers_.size() + 1);
    for (auto& x : xs_) x.reserve(N * H);
    acts_.resize(layers_.size());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Frozen& f = layers_[l];
      Acts& a = acts_[l];
      for (auto* b : {&a.x_mid, &a.h, &a.h2}) b->reserve(N * H);
      for (auto* b : {&a.mean1, &a.rstd1, &a.mean2, &a.rstd2}) b->reserve(N);
      a.y.reserve(N * static_cast<std::size_t>(f.cat_base));
      a.attn.reserve(N * Dq);
      a.k.reserve(N * Dkv);
      a.v.reserve(N * Dkv);
      if (f.qn.size()) {
        a.q_pre.reserve(N * Dq);
        a.q_rstd.reserve(N * nh);
      }
      if (f.kn.size()) {
        a.k_pre.reserve(N * Dkv);
        a.k_rstd.reserve(N * nkv);
      }
      if (f.mla) {
        if (lo.recon_alpha > 0) {
          a.rk.reserve(N * Dkv);
          a.rv.reserve(N * Dkv);
        }
      }
      if (fused_attention()) a.lse.reserve(N * nh);
      else a.P.reserve(P);
      a.gu.reserve(N * gu_w);
    }
    for (auto* b : {&hf_, &dx_, &dh_}) b->reserve(N * H);
    for (auto* b : {&fmean_, &frstd_}) b->reserve(N);
    logits_.reserve(N * static_cast<std::size_t>(c_.vocab_size));
    if (lo.distill) teacher_logits_.reserve(N * static_cast<std::size_t>(c_.vocab_size));
    tmp_.reserve(N * std::max({I, H, Dq}));  // MLP activation, then d attn
    if (nkv != nh) {
      dkh_.reserve(N * Dq);
      dvh_.reserve(N * Dq);
    }
    int ycols = 0;
    for (const auto& f : layers_) ycols = std::max(ycols, f.ycols);
    dcat_.reserve(N * static_cast<std::size_t>(ycols));
    dk_.reserve(N * Dkv);
    dv_.reserve(N * Dkv);
    da_.reserve(N * I);
    dgu_.reserve(N * gu_w);
    int dl = 0;
    for (const auto& f : layers_) dl = std::max(dl, f.d_latent);
    gdown_.reserve(2 * static_cast<std::size_t>(std::max(dl, 1)) * H);
    dP_.reserve(P);  // one layer's dP for every sequence: the batched GEMMs cover all of them at once
    if (fused_attention()) delta_.reserve(N * nh);
    plan_attention();
  }

  // ---- Attention GEMM plan ----
  // The six attention GEMMs of a layer, each a list of pointer-array batched SGEMM calls.
  enum AttnUse { kFwdScores, kFwdOut, kBwdScores, kBwdV, kBwdQ, kBwdK, kAttnUses };
  struct AttnCall {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    std::size_t at;  // A pointers at attn_ptrs_[at, at + count), then B's, then C's
    int count;
    // Every pointer 16-byte aligned and every ld a multiple of 4. cuBLAS cannot check a pointer
    // array, and its TF32 tensor-core kernels fail on misaligned matrices (CUBLAS_STATUS_INTERNAL_ERROR
    // on the H200 for sequence lengths that are not multiples of 4): such calls run in float32.
    bool aligned = true;
  };
  struct AttnLayer {
    std::vector<AttnCall> calls[kAttnUses];
  };
  // Column-major shapes of one causal block (cuBLAS's view of the row-major buffers: a head's
  // Q/K/V/O slice is (hd, n) with its buffer's row stride, its P slice (n_k, n_q) with ld n).
  // Scores: S^T block (keys [0, e), queries [b, e)) = A^T B. Out: O^T block (queries [b, e)) =
  // A (keys [0, e)) P. Weighted: the block of keys [b, e) of A P^T over queries [b, n), e.g.
  // dV = dO P^T. In each, A is a row operand; B is a row operand for Scores and P otherwise; C is
  // P for Scores and a row operand otherwise.
  enum class AttnKind { Scores, Out, Weighted };
  // A row operand: packed rows with stride ld; query head h reads head h / div of it (div =
  // the GQA group for the shared K/V heads, which are therefore never expanded). A P operand:
  // the layer's P-shaped buffer (ld, div unused).
  struct AttnOperand {
    const float* base;
    int ld = 0, div = 1;
  };

  // Appends to `out` the calls of one GEMM (kind) over every (sequence, head), one call per causal
  // block of each group of equal-length sequences (by_len: length -> sequences); pointers into ptrs.
  // whole: one block per sequence (the full n x n product; B must read zero above the diagonal).
  void emit_attention(AttnKind kind, AttnOperand A, AttnOperand B, AttnOperand C, const std::map<int, std::vector<int>>& by_len,
                      std::vector<AttnCall>& out, std::vector<float*>& ptrs, bool whole = false) const {
    const int nh = c_.n_heads, hd = c_.head_dim;
    const auto row_ptr = [&](const AttnOperand& o, int s, int h, int row) {
      return const_cast<float*>(o.base) +
             (static_cast<std::size_t>(off_[static_cast<std::size_t>(s)]) + static_cast<std::size_t>(row)) *
                 static_cast<std::size_t>(o.ld) +
             static_cast<std::size_t>(h / o.div) * hd;
    };
    const auto p_ptr = [&](const AttnOperand& o, int s, int h, int n, std::size_t elem) {
      return const_cast<float*>(o.base) + poff_[static_cast<std::size_t>(s)] + static_cast<std::size_t>(h) * n * n + elem;
    };
    for (const auto& [n, seqs] : by_len) {
      const auto b = whole ? std::vector<int>{0, n} : train_causal_blocks(n);
      for (std::size_t i = 0; i + 1 < b.size(); ++i) {
        const int lo = b[i], hi = b[i + 1];
        const std::size_t at = ptrs.size();
        const int count = static_cast<int>(seqs.size()) * nh;
        AttnCall c = kind == AttnKind::Scores ? AttnCall{CUBLAS_OP_T, CUBLAS_OP_N, hi, hi - lo, hd, A.ld, B.ld, n, at, count}
                     : kind == AttnKind::Out  ? AttnCall{CUBLAS_OP_N, CUBLAS_OP_N, hd, hi - lo, hi, A.ld, n, C.ld, at, count}
                                              : AttnCall{CUBLAS_OP_N, CUBLAS_OP_T, hd, hi - lo, n - lo, A.ld, n, C.ld, at, count};
        ptrs.resize(at + 3 * static_cast<std::size_t>(count));
        float** pa = ptrs.data() + at;
        float** pb = pa + count;
        float** pc = pb + count;
        for (int s : seqs)
          for (int h = 0; h < nh; ++h, ++pa, ++pb, ++pc) {
            switch (kind) {
              case AttnKind::Scores:
                *pa = row_ptr(A, s, h, 0);
                *pb = row_ptr(B, s, h, lo);
                *pc = p_ptr(C, s, h, n, static_cast<std::size_t>(lo) * n);
                break;
              case AttnKind::Out:
                *pa = row_ptr(A, s, h, 0);
                *pb = p_ptr(B, s, h, n, static_cast<std::size_t>(lo) * n);
                *pc = row_ptr(C, s, h, lo);
                break;
              case AttnKind::Weighted:
                *pa = row_ptr(A, s, h, lo);
                *pb = p_ptr(B, s, h, n, static_cast<std::size_t>(lo) * n + static_cast<std::size_t>(lo));
                *pc = row_ptr(C, s, h, lo);
                break;
            }
          }
        c.aligned = c.lda % 4 == 0 && c.ldb % 4 == 0 && c.ldc % 4 == 0 &&
                    std::all_of(ptrs.begin() + static_cast<std::ptrdiff_t>(at), ptrs.end(),
                                [](const float* p) { return train_kernels::aligned(p); });
        out.push_back(c);
      }
    }
  }

  // Rebuilds every layer's attention calls and uploads the pointer table when the batch shape or a
  // buffer address changed since the last plan (buffers grow only, so a steady shape plans once).
  void plan_attention() {
    // Same batch shape, buffers and attention form as last time: the plan stands.
    std::vector<const void*> key;
    for (int o : off_) key.push_back(reinterpret_cast<const void*>(static_cast<std::intptr_t>(o)));
    key.push_back(reinterpret_cast<const void*>(static_cast<std::intptr_t>(fused_attention())));  // dQ's call shape
    for (const auto& a : acts_)
      for (const auto* b : {&a.y, &a.k, &a.v, &a.P, &a.attn}) key.push_back(b->data());
    for (const auto* b : {&tmp_, &dP_, &dcat_, &dk_, &dv_, &dkh_, &dvh_}) key.push_back(b->data());
    if (key == attn_key_) return;
    attn_key_ = std::move(key);
    // The fused backward writes only the dS entries it visits; the rest must read as zero.
    CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(dP_.data(), 0, dP_.size() * sizeof(float), st()));
    poff_.assign(off_.size(), 0);
    std::map<int, std::vector<int>> by_len;  // sequences grouped by length: one batched call per group and block
    for (std::size_t s = 0; s + 1 < off_.size(); ++s) {
      const int n = off_[s + 1] - off_[s];
      poff_[s + 1] = poff_[s] + static_cast<std::size_t>(c_.n_heads) * static_cast<std::size_t>(n) * static_cast<std::size_t>(n);
      by_len[n].push_back(static_cast<int>(s));
    }
    d_off_.upload(off_, st());
    d_poff_.upload(poff_, st());
    const int Dq = c_.d_q(), Dkv = c_.d_kv(), group = c_.n_heads / c_.n_kv_heads;
    const bool gqa = group != 1;
    // dK, dV per query head (summed per group afterwards) when heads share K/V.
    const AttnOperand dK{gqa ? dkh_.data() : dk_.data(), Dq}, dV{gqa ? dvh_.data() : dv_.data(), Dq};
    const AttnOperand dO{tmp_.data(), Dq}, dP{dP_.data()};
    std::vector<float*> ptrs;
    attn_.assign(layers_.size(), AttnLayer{});
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      Acts& a = acts_[l];
      AttnLayer& al = attn_[l];
      // q and dq live in the fused projection's buffers: Acts::y (ld cat_base) and dcat_ (ld ycols).
      const AttnOperand K{a.k.data(), Dkv, group}, V{a.v.data(), Dkv, group}, Q{a.y.data(), layers_[l].cat_base}, P{a.P.data()},
          O{a.attn.data(), Dq};
      // The fused attention's dQ = scale dS K is one GEMM per (sequence, head) over all n x n
      // entries (dS is zero where the kernel does not write it): 128-query causal blocks of it run
      // as 1-tile GEMMs, slower on the H200 than the full product's 1.6x FLOPs.
      emit_attention(AttnKind::Out, K, dP, {dcat_.data(), layers_[l].ycols}, by_len, al.calls[kBwdQ], ptrs, fused_attention());
      if (a.P.empty()) continue;  // fused attention: dQ is its only batched GEMM
      emit_attention(AttnKind::Scores, K, Q, P, by_len, al.calls[kFwdScores], ptrs);
      emit_attention(AttnKind::Out, V, P, O, by_len, al.calls[kFwdOut], ptrs);
      emit_attention(AttnKind::Scores, V, dO, dP, by_len, al.calls[kBwdScores], ptrs);
      emit_attention(AttnKind::Weighted, dO, P, dV, by_len, al.calls[kBwdV], ptrs);
      emit_attention(AttnKind::Weighted, Q, dP, dK, by_len, al.calls[kBwdK], ptrs);
    }
    attn_ptrs_.upload(ptrs, st());
  }

  // Profiling mark: the work enqueued since the previous mark is stage `name` (nullptr: a start).
  void stage(const char* name) {
    if (!stage_profile_) return;
    marks_.emplace_back(name, std::make_unique<Event>());
    marks_.back().second->record(st());
  }
  void drop_stages() { marks_.clear(); }

  // f(first element in P, n, count) for each run of `count` consecutive sequences of length n:
  // their P blocks are contiguous (rows of n floats, query index = row % n), so one softmax
  // launch covers the run.
  template <class F>
  void for_length_runs(F&& f) const {
    const int B = static_cast<int>(off_.size()) - 1;
    auto len = [&](int s) { return off_[static_cast<std::size_t>(s) + 1] - off_[static_cast<std::size_t>(s)]; };
    for (int s = 0; s < B;) {
      int e = s + 1;
      while (e < B && len(e) == len(s)) ++e;
      f(poff_[static_cast<std::size_t>(s)], len(s), e - s);
      s = e;
    }
  }

  // The fused attention's operands for layer l (same buffers as the materialised plan's).
  FlashTrainArgs flash_args(std::size_t l) {
    Acts& a = acts_[l];
    const int Dq = c_.d_q(), Dkv = c_.d_kv();
    const bool gqa = c_.n_heads != c_.n_kv_heads;
    FlashTrainArgs f;
    f.q = a.y.data();
    f.ldq = layers_[l].cat_base;
    f.k = a.k.data();
    f.v = a.v.data();
    f.ldkv = Dkv;
    f.o = a.attn.data();
    f.ldo = Dq;
    f.lse2 = a.lse.data();
    f.dout = tmp_.data();
    f.lddo = Dq;
    f.delta = delta_.data();
    f.ds = dP_.data();
    f.ds_off = d_poff_.data();
    f.dk = gqa ? dkh_.data() : dk_.data();
    f.dv = gqa ? dvh_.data() : dv_.data();
    f.lddkv = Dq;
    f.off = d_off_.data();
    f.batch = static_cast<int>(off_.size()) - 1;
    f.max_len = max_len_;
    f.n_heads = c_.n_heads;
    f.n_kv_heads = c_.n_kv_heads;
    f.head_dim = c_.head_dim;
    f.window = c_.sliding_window;
    f.scale = 1.0f / std::sqrt(static_cast<float>(c_.head_dim));
    f.rounded = pre_rounded();
    return f;
  }

  void attn_gemms(const std::vector<AttnCall>& calls, float alpha) {
    const float beta = 0.0f;
    for (const AttnCall& c : calls) {
      float* const* p = attn_ptrs_.data() + c.at;
      const bool strict = tf32_ && !c.aligned;
      if (strict) CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(hb(), CUBLAS_DEFAULT_MATH));
      CACHESHRINK_CUBLAS_CHECK(cublasSgemmBatched(hb(), c.ta, c.tb, c.m, c.n, c.k, &alpha, p, c.lda, p + c.count, c.ldb, &beta,
                                                  p + 2 * static_cast<std::size_t>(c.count), c.ldc, c.count));
      if (strict) CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(hb(), CUBLAS_TF32_TENSOR_OP_MATH));
    }
  }

  void norm_forward(const float* x, const DeviceBuffer<float>& w, const DeviceBuffer<float>& b, float* y, float* mean, float* rstd) {
    train_kernels::norm_forward(x, w.data(), opt(b), gpt2(), static_cast<float>(c_.norm_eps), y, gpt2() ? mean : nullptr, rstd, n_tokens_,
                                c_.hidden_size, st());
  }
  void norm_backward(const float* x, const DeviceBuffer<float>& w, const float* mean, const float* rstd, const float* dy, float* dx) {
    train_kernels::norm_backward(x, w.data(), mean, rstd, gpt2(), dy, dx, n_tokens_, c_.hidden_size, st());
  }
  void bias(float* y, int width, const DeviceBuffer<float>& b, int ld = 0) {
    if (!b.empty()) cuda::add_bias<float>(y, ld > 0 ? ld : width, n_tokens_, width, b.data(), st());
  }
  void sq_sum(const float* x, long long n, double* acc, cudaStream_t s) {
    train_kernels::sq_sum<<<std::min(grid_for(n, 256), 1024u), 256, 0, s>>>(x, n, acc);
    CACHESHRINK_CUDA_LAUNCH_CHECK("sq_sum");
  }
  void axpy(float a, const float* x, float* y, long long n, cudaStream_t s) {
    train_kernels::axpy<<<grid_for(n, 256), 256, 0, s>>>(a, x, y, n);
    CACHESHRINK_CUDA_LAUNCH_CHECK("axpy");
  }
  // RoPE in place (the backward's rotation when inverse), after adding `bias` (nullptr: none).
  void rope(float* y, int ld, int heads, bool inverse, const float* bias = nullptr, bool tf32 = false) {
    if (!c_.uses_rope()) return;
    train_kernels::rope_forward(y, ld, n_tokens_, heads, c_.head_dim, d_pos_.data(), rope_cos_.data(),
                                inverse ? rope_sin_neg_.data() : rope_sin_.data(), bias, st(), tf32);
  }
  // The fused attention's q, k, v are stored rounded to TF32 by the forward (q and k by the RoPE
  // kernel, v by one pass), so its kernels skip their in-tile rounding of them: with RoPE only.
  // (Nothing else reads them once the attention is fused: the reconstruction residuals are taken
  // before RoPE, and the backward needs no q, k, v but the attention's.)
  bool pre_rounded() const { return fused_attention() && c_.uses_rope(); }
  void run_forward(bool teacher, const train::LossOptions& lo) {
    const int N = n_tokens_, H = c_.hidden_size, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, Dq = c_.d_q(), Dkv = c_.d_kv();
    const int I = c_.intermediate_size;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    cuda::embedding<float>(d_ids_.data(), d_pos_.data(), embed_.data(), gpt2() ? pos_embed_.data() : nullptr, xs_[0].data(), N, H, st());
    stage("embedding");
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Frozen& f = layers_[l];
      Acts& a = acts_[l];
      const Slots& sl = slots_[l];
      const bool use_mla = f.mla && !teacher;
      const float* x = xs_[l].data();
      norm_forward(x, f.n1w, f.n1b, a.h.data(), a.mean1.data(), a.rstd1.data());
      stage("norm");
      // One GEMM for the stacked input projections (Frozen): q and the latents (the teacher: q).
      const int yc = f.cat_base;
      float* q = a.y.data();
      xwt(N, use_mla ? yc : Dq, H, a.h.data(), H, f.wcat.data(), H, q, yc);
      stage("gemm input proj");
      // A q/k bias is added inside the RoPE kernel unless a head norm comes between them.
      const bool rope_q_bias = c_.uses_rope() && f.qn.empty(), rope_k_bias = c_.uses_rope() && f.kn.empty();
      if (!rope_q_bias) bias(q, Dq, f.bq, yc);
      stage("bias");
      if (!f.qn.empty()) head_norm(q, yc, a.q_pre.data(), a.q_rstd.data(), nh, f.qn);
      stage("head_norm");
      rope(q, yc, nh, false, rope_q_bias ? opt(f.bq) : nullptr, pre_rounded());
      stage("rope");
      if (use_mla) {
        const int dl = f.d_latent;
        const float* ck = q + f.cat_dk;
        if (sl.joint) {
          xwt(N, Dkv, dl, ck, yc, pv(sl.up_k), dl, a.k.data(), Dkv);
          xwt(N, Dkv, dl, ck, yc, pv(sl.up_k) + static_cast<std::size_t>(Dkv) * dl, dl, a.v.data(), Dkv);
          stage("gemm up");
        } else {
          xwt(N, Dkv, dl, ck, yc, pv(sl.up_k), dl, a.k.data(), Dkv);
          xwt(N, Dkv, dl, q + f.cat_dv, yc, pv(sl.up_v), dl, a.v.data(), Dkv);
          stage("gemm up");
        }
        if (lo.recon_alpha > 0) {
          // Residuals K~ - K, V~ - V (biases cancel): K~ = c_k W_up_k^T again, then -= h Wk^T; acc_[2]
          // += their squared norms. They read only h, the latents and the up projections, which
          // nothing changes before the step ends, so they run on the side stream (set_side_stream)
          // while the main one carries on. (Not in the stacked GEMM: there the targets would be
          // kept per layer, +2 d_kv floats a token and layer, 2.1 GiB at LLaMA-2-7B shapes.)
          const Lane ln = fork();
          const float* Uk = pv(sl.up_k);
          const float* Uv = sl.joint ? Uk + static_cast<std::size_t>(Dkv) * dl : pv(sl.up_v);
          xwt(N, Dkv, dl, ck, yc, Uk, dl, a.rk.data(), Dkv, 1.0f, 0.0f, ln.g);
          xwt(N, Dkv, dl, sl.joint ? ck : q + f.cat_dv, yc, Uv, dl, a.rv.data(), Dkv, 1.0f, 0.0f, ln.g);
          xwt(N, Dkv, H, a.h.data(), H, wrow(f, f.cat_k), H, a.rk.data(), Dkv, -1.0f, 1.0f, ln.g);
          xwt(N, Dkv, H, a.h.data(), H, wrow(f, f.cat_v), H, a.rv.data(), Dkv, -1.0f, 1.0f, ln.g);
          stage("gemm recon targets");
          sq_sum(a.rk.data(), static_cast<long long>(N) * Dkv, acc_.data() + 2, ln.s);
          sq_sum(a.rv.data(), static_cast<long long>(N) * Dkv, acc_.data() + 2, ln.s);
          stage("recon loss");
          side_done();
        }
      } else {
        xwt(N, Dkv, H, a.h.data(), H, wrow(f, f.cat_k), H, a.k.data(), Dkv);
        xwt(N, Dkv, H, a.h.data(), H, wrow(f, f.cat_v), H, a.v.data(), Dkv);
        stage("gemm k/v");
      }
      if (!rope_k_bias) bias(a.k.data(), Dkv, f.bk);
      bias(a.v.data(), Dkv, f.bv);
      stage("bias");
      if (!f.kn.empty()) head_norm(a.k.data(), Dkv, a.k_pre.data(), a.k_rstd.data(), nkv, f.kn);
      stage("head_norm");
      rope(a.k.data(), Dkv, nkv, false, rope_k_bias ? opt(f.bk) : nullptr, pre_rounded());
      if (pre_rounded()) train_kernels::round_to_tf32(a.v.data(), static_cast<long long>(N) * Dkv, st());
      stage("rope");
      if (fused_attention()) {
        flash_train_forward(flash_args(l), st(), flash_kernel_);
        stage("attn fused fwd");
      } else {
        // Attention: the planned batched GEMMs (shared K/V heads read in place).
        const AttnLayer& al = attn_[l];
        attn_gemms(al.calls[kFwdScores], scale);  // S (causal blocks) = scale Q K^T
        stage("attn gemm");
        for_length_runs([&](std::size_t po, int n, int count) {
          train_kernels::softmax_forward(a.P.data() + po, static_cast<long long>(nh) * n * count, n, c_.sliding_window, st());
        });
        stage("softmax");
        attn_gemms(al.calls[kFwdOut], 1.0f);  // O = P V
        stage("attn gemm");
      }
      // x_mid = x + attn Wo^T + bo.
      xwt_plus(N, H, Dq, a.attn.data(), Dq, f.wo.data(), Dq, x, a.x_mid.data(), H);
      bias(a.x_mid.data(), H, f.bo);
      stage("gemm o_proj");
      norm_forward(a.x_mid.data(), f.n2w, f.n2b, a.h2.data(), a.mean2.data(), a.rstd2.data());
      stage("norm");
      const int guw = gpt2() ? I : 2 * I;
      xwt(N, guw, H, a.h2.data(), H, f.wgu.data(), H, a.gu.data(), guw);
      bias(a.gu.data(), guw, f.bgu);
      stage("gemm gate/up");
      if (gpt2()) train_kernels::gelu_fwd<<<row_grid(N, I), kernels::kRowThreads, 0, st()>>>(a.gu.data(), tmp_.data(), I);
      else train_kernels::swiglu_forward(a.gu.data(), tmp_.data(), N, I, st());
      CACHESHRINK_CUDA_LAUNCH_CHECK("mlp activation");
      stage("mlp activation");
      float* xo = xs_[l + 1].data();
      xwt_plus(N, H, I, tmp_.data(), I, f.wd.data(), I, a.x_mid.data(), xo, H);
      bias(xo, H, f.bd);
      stage("gemm down");
    }
    norm_forward(xs_.back().data(), fnw_, fnb_, hf_.data(), fmean_.data(), frstd_.data());
    stage("norm");
    xwt(N, c_.vocab_size, H, hf_.data(), H, head().data(), H, logits_.data(), c_.vocab_size);
    stage("gemm lm head");
    join();  // the backward reads the residuals; the host, their sums
  }

  void head_norm(float* y, int ld, float* pre, float* rstd, int heads, const DeviceBuffer<float>& w) {
    const long long warps = static_cast<long long>(n_tokens_) * heads;
    train_kernels::head_norm_fwd<<<grid_for(warps * 32, 256), 256, 0, st()>>>(y, ld, pre, rstd, n_tokens_, heads, c_.head_dim, w.data(),
                                                                              static_cast<float>(c_.norm_eps));
    CACHESHRINK_CUDA_LAUNCH_CHECK("head_norm_fwd");
  }
  void head_norm_backward(float* dy, int ld, const float* pre, const float* rstd, int heads, const DeviceBuffer<float>& w) {
    const long long warps = static_cast<long long>(n_tokens_) * heads;
    train_kernels::head_norm_bwd<<<grid_for(warps * 32, 256), 256, 0, st()>>>(dy, ld, pre, rstd, n_tokens_, heads, c_.head_dim, w.data());
    CACHESHRINK_CUDA_LAUNCH_CHECK("head_norm_bwd");
  }

  void run_backward(bool have_dz) {
    const int N = n_tokens_, H = c_.hidden_size, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, Dq = c_.d_q(), Dkv = c_.d_kv();
    const int I = c_.intermediate_size, V = c_.vocab_size;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const std::size_t NH = static_cast<std::size_t>(N) * H;
    float* dx = dx_.data();
    float* dh = dh_.data();
    CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(dx, 0, NH * sizeof(float), st()));
    if (have_dz) {
      xw(N, H, V, dz_.data(), V, head().data(), H, dh, H);
      norm_backward(xs_.back().data(), fnw_, fmean_.data(), frstd_.data(), dh, dx);
      stage("gemm lm head dX + norm bwd");
    }
    for (int l = static_cast<int>(layers_.size()) - 1; l >= lmin_; --l) {
      const Frozen& f = layers_[static_cast<std::size_t>(l)];
      Acts& a = acts_[static_cast<std::size_t>(l)];
      const Slots& sl = slots_[static_cast<std::size_t>(l)];
      // MLP branch.
      xw(N, I, H, dx, H, f.wd.data(), I, da_.data(), I);
      stage("gemm down dX");
      if (gpt2()) {
        train_kernels::gelu_bwd<<<row_grid(N, I), kernels::kRowThreads, 0, st()>>>(a.gu.data(), da_.data(), I);
        CACHESHRINK_CUDA_LAUNCH_CHECK("gelu_bwd");
        stage("mlp activation bwd");
        xw(N, H, I, da_.data(), I, f.wgu.data(), H, dh, H);
        stage("gemm gate/up dX");
      } else {
        train_kernels::swiglu_backward(a.gu.data(), da_.data(), dgu_.data(), N, I, st());
        stage("mlp activation bwd");
        xw(N, H, 2 * I, dgu_.data(), 2 * I, f.wgu.data(), H, dh, H);
        stage("gemm gate/up dX");
      }
      norm_backward(a.x_mid.data(), f.n2w, a.mean2.data(), a.rstd2.data(), dh, dx);  // dx is now d x_mid
      stage("norm bwd");
      // Attention branch.
      xw(N, Dq, H, dx, H, f.wo.data(), Dq, tmp_.data(), Dq);  // d attn
      stage("gemm o_proj dX");
      // The planned GEMMs read K, V in place and write dK, dV (per query head, dkh_/dvh_, under GQA).
      const AttnLayer& al = attn_[static_cast<std::size_t>(l)];
      join();  // the layer above's side work has read dK, dV and dcat_, which this layer rewrites
      if (fused_attention()) {
        // dK, dV (per query head under GQA) and dS; then dQ = scale dS K, the one batched GEMM left.
        flash_train_backward(flash_args(static_cast<std::size_t>(l)), N, st(), flash_kernel_);
        stage("attn fused bwd");
        attn_gemms(al.calls[kBwdQ], scale);
        stage("attn gemm");
      } else {
        attn_gemms(al.calls[kBwdScores], 1.0f);  // dP = dO V^T (causal blocks)
        stage("attn gemm");
        for_length_runs([&](std::size_t po, int n, int count) {
          train_kernels::softmax_backward(a.P.data() + po, dP_.data() + po, static_cast<long long>(nh) * n * count, n, c_.sliding_window,
                                          st());
        });
        stage("softmax bwd");
        attn_gemms(al.calls[kBwdV], 1.0f);   // dV = P^T dO
        attn_gemms(al.calls[kBwdQ], scale);  // dQ = scale dS K
        attn_gemms(al.calls[kBwdK], scale);  // dK = scale dS^T Q
        stage("attn gemm");
      }
      if (nkv != nh) {
        train_kernels::sum_groups(dkh_.data(), dk_.data(), N, nkv, nh / nkv, hd, st(), dvh_.data(), dv_.data());
        stage("sum_head_groups");
      }
      // dq sits in dcat_ (tokens, ycols) at column 0, where the fused input projection's
      // gradient is gathered: [dq | d latents | -(reconstruction residuals)] meets the stacked
      // [Wq; W_down...; Wk; Wv] in one GEMM at the end.
      const int yc = f.ycols, ylc = f.cat_base;  // row strides of dcat_ and Acts::y
      float* dq = dcat_.data();
      const float* y = a.y.data();
      rope(dq, yc, nh, true);
      rope(dk_.data(), Dkv, nkv, true);
      stage("rope");
      if (!f.qn.empty()) head_norm_backward(dq, yc, a.q_pre.data(), a.q_rstd.data(), nh, f.qn);
      if (!f.kn.empty()) head_norm_backward(dk_.data(), Dkv, a.k_pre.data(), a.k_rstd.data(), nkv, f.kn);
      stage("head_norm");
      if (f.mla) {
        const int dl = f.d_latent;
        const bool recon = !a.rk.empty() && recon_coef_ != 0.0f;
        if (recon) {
          // d recon / dK~ = coef (K~ - K) / (slots d_kv) into dK, dV; the targets K = h Wk^T
          // depend on h too: -that into the targets' columns of dcat_.
          const float w = static_cast<float>(recon_coef_ / (recon_slots_ * Dkv));
          const dim3 grid = train_kernels::vec_grid(std::min(N, 1024), Dkv, 1);
          train_kernels::recon_grad<<<grid, 256, 0, st()>>>(a.rk.data(), N, Dkv, w, dk_.data(), dq + f.cat_k, yc);
          train_kernels::recon_grad<<<grid, 256, 0, st()>>>(a.rv.data(), N, Dkv, w, dv_.data(), dq + f.cat_v, yc);
          CACHESHRINK_CUDA_LAUNCH_CHECK("recon_grad");
          stage("recon grad");
        }
        const float* ck = y + f.cat_dk;
        float* dck = dq + f.cat_dk;
        if (sl.joint) {
          const float* Uk = pv(sl.up_k);
          const float* Uv = Uk + static_cast<std::size_t>(Dkv) * dl;
          xw(N, dl, Dkv, dk_.data(), Dkv, Uk, dl, dck, yc);
          xw(N, dl, Dkv, dv_.data(), Dkv, Uv, dl, dck, yc, 1.0f, 1.0f);
        } else {
          xw(N, dl, Dkv, dk_.data(), Dkv, pv(sl.up_k), dl, dck, yc);
          xw(N, dl, Dkv, dv_.data(), Dkv, pv(sl.up_v), dl, dq + f.cat_dv, yc);
        }
        stage("gemm up bwd");
        // The trainable weights' gradients, on the side stream (nothing in the step reads them
        // before the optimizer): the up projections', then the down projections' (stacked, one
        // GEMM, then added to each).
        const Lane ln = fork();
        if (sl.joint) {
          xty(N, Dkv, dl, dk_.data(), Dkv, ck, ylc, pg(sl.up_k), 1.0f, 1.0f, ln.g);
          xty(N, Dkv, dl, dv_.data(), Dkv, ck, ylc, pg(sl.up_k) + static_cast<std::size_t>(Dkv) * dl, 1.0f, 1.0f, ln.g);
        } else {
          xty(N, Dkv, dl, dk_.data(), Dkv, ck, ylc, pg(sl.up_k), 1.0f, 1.0f, ln.g);
          xty(N, Dkv, dl, dv_.data(), Dkv, y + f.cat_dv, ylc, pg(sl.up_v), 1.0f, 1.0f, ln.g);
        }
        stage("gemm up grad");
        const int nd = sl.joint ? 1 : 2;
        const long long dn = static_cast<long long>(dl) * H;
        xty(N, nd * dl, H, dck, yc, a.h.data(), H, gdown_.data(), 1.0f, 0.0f, ln.g);
        axpy(1.0f, gdown_.data(), pg(sl.down_k), dn, ln.s);
        if (!sl.joint) axpy(1.0f, gdown_.data() + dn, pg(sl.down_v), dn, ln.s);
        stage("gemm down-proj grad");
        side_done();
        // (The lowest trained layer's input gradient reaches nothing trainable: skipped.)
        if (l != lmin_) xw(N, H, recon ? yc : f.cat_base, dq, yc, f.wcat.data(), H, dh, H);
        stage("gemm input proj dX");
      } else if (l != lmin_) {
        xw(N, H, Dq, dq, yc, f.wcat.data(), H, dh, H);
        xw(N, H, Dkv, dk_.data(), Dkv, wrow(f, f.cat_k), H, dh, H, 1.0f, 1.0f);
        xw(N, H, Dkv, dv_.data(), Dkv, wrow(f, f.cat_v), H, dh, H, 1.0f, 1.0f);
        stage("gemm input proj dX");
      }
      if (l == lmin_) break;  // nothing below needs a gradient
      norm_backward(xs_[static_cast<std::size_t>(l)].data(), f.n1w, a.mean1.data(), a.rstd1.data(), dh, dx);
      stage("norm bwd");
    }
    join();  // the optimizer reads the gradients
  }

  // The side stream (set_side_stream). fork(): the lane side work goes to, ordered after
  // everything enqueued on the main stream so far (the main stream itself when the side stream
  // is off); side_done() marks the end of the work forked since; join(): the main stream's next
  // work waits for it. One event each: a wait takes the event's latest record at the call, and
  // the main stream joins (or the side stream finishes earlier work) before the next record.
  struct Lane {
    cudaStream_t s;
    TunedGemm* g;
  };
  Lane fork() {
    if (!side_stream()) return {st(), gemm_.get()};
    fork_ev_.record(st());
    CACHESHRINK_CUDA_CHECK(cudaStreamWaitEvent(side_stream_->get(), fork_ev_.get(), 0));
    return {side_stream_->get(), side_gemm_.get()};
  }
  void side_done() {
    if (!side_stream()) return;
    join_ev_.record(side_stream_->get());
    side_pending_ = true;
  }
  void join() {
    if (!side_pending_) return;
    CACHESHRINK_CUDA_CHECK(cudaStreamWaitEvent(st(), join_ev_.get(), 0));
    side_pending_ = false;
  }

  ModelConfig c_;
  std::unique_ptr<Stream> stream_;
  std::unique_ptr<CublasHandle> blas_;
  std::unique_ptr<TunedGemm> gemm_;      // the graph's GEMMs (cublasLt, timed kernel choice)
  std::unique_ptr<Stream> side_stream_;  // set_side_stream: the off-critical-path work, its cuBLAS handle and GEMMs
  std::unique_ptr<CublasHandle> side_blas_;
  std::unique_ptr<TunedGemm> side_gemm_;
  Event fork_ev_, join_ev_;
  bool side_on_ = true, side_pending_ = false, gemm_profile_ = false;
  DeviceBuffer<float> embed_, pos_embed_, head_, fnw_, fnb_;
  model::Rope rope_;
  int rope_positions_ = 0;
  DeviceBuffer<float> rope_cos_, rope_sin_, rope_sin_neg_;
  std::vector<Frozen> layers_;
  std::vector<Slots> slots_;
  std::vector<Param> params_;
  int n_mla_ = 0, lmin_ = -1;
  bool tf32_ = false, fused_on_ = true;
  FlashKernel flash_kernel_ = FlashKernel::Auto;
  float recon_coef_ = 0;
  double recon_slots_ = 1;
  // Per-batch state.
  std::vector<int> off_;
  int n_tokens_ = 0, max_len_ = 0;
  DeviceBuffer<int> d_off_;  // off_ and poff_ on the device (the fused attention's)
  DeviceBuffer<std::size_t> d_poff_;
  long long pred_ = 0;
  DeviceBuffer<int> d_ids_, d_pos_, d_target_;
  DeviceBuffer<double> acc_;             // [0] sum nll, [1] sum KL, [2] sum of squared reconstruction residuals
  std::vector<DeviceBuffer<float>> xs_;  // residual stream: xs_[l] enters layer l, xs_[L] the final norm
  std::vector<Acts> acts_;
  // dcat_: the fused input projection's output gradient (tokens, ycols; dq at column 0); gdown_: the
  // stacked down projections' weight gradient of one layer before it is added to theirs.
  DeviceBuffer<float> logits_, teacher_logits_, dz_, hf_, fmean_, frstd_, tmp_, dx_, dh_, dcat_, dk_, dv_, dkh_, dvh_, da_, dgu_, gdown_,
      dP_, delta_;
  std::vector<std::size_t> poff_;      // each sequence's first element in a layer's P (and dP)
  std::vector<AttnLayer> attn_;        // per layer: the attention GEMM calls
  std::vector<const void*> attn_key_;  // batch offsets and buffer addresses the plan was built for
  DeviceBuffer<float*> attn_ptrs_;
  bool stage_profile_ = false;
  std::vector<std::pair<const char*, std::unique_ptr<Event>>> marks_;  // stage profile: (name or nullptr, event)
};

}  // namespace cacheshrink::cuda

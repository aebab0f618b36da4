#pragma once
// Row-wise kernels of the forward pass and their host launchers. Activations are either
// float (float32 mode) or __nv_bfloat16 (bf16 mode, "T" below); the residual stream, norm
// statistics and every reduction stay in float. Matrices are row-major with an explicit
// leading dimension `ld` (elements between rows) so fused buffers ([q | k | v],
// [gate | up]) can be addressed in place.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cacheshrink/backend/cuda/check.cuh"

namespace cacheshrink::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __float2bfloat16(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
/// Sum / max over the quad of lanes that hold one row of an mma accumulator tile (lanes 4g..4g+3).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
/// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = warp_sum(v);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `part` may still be read by a previous call
  if (lane == 0) part[w] = v;
  __syncthreads();
  if (w == 0) {
    float s = lane < static_cast<int>(blockDim.x / 32) ? part[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float part[32];
  __shared__ float total;
  v = warp_max(v);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) part[w] = v;
  __syncthreads();
  if (w == 0) {
    float s = lane < static_cast<int>(blockDim.x / 32) ? part[lane] : -INFINITY;
    s = warp_max(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

inline unsigned grid_for(long long n, int block) {
  long long g = (n + block - 1) / block;
  if (g > 65535LL * 32) g = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

namespace kernels {

// Row-wise elementwise kernels run on a 2-D grid: blockIdx.x = row, blockIdx.y = a chunk of
// kRowChunk columns, each of the kRowThreads threads handling kRowChunk / kRowThreads
// independent columns (a decode step has only batch-many rows: one block per row left most
// SMs idle and each thread walking a whole 18K-wide row, 56 us for a GELU over 7 MB).
constexpr int kRowChunk = 1024, kRowThreads = 256;
template <class F>
__device__ __forceinline__ void for_row_chunk(int width, F&& f) {
#pragma unroll
  for (int j = 0; j < kRowChunk / kRowThreads; ++j) {
    const int c = static_cast<int>(blockIdx.y) * kRowChunk + j * kRowThreads + static_cast<int>(threadIdx.x);
    if (c < width) f(c);
  }
}

// x[r, :] = table[ids[r], :] (+ pos_table[pos[r], :]); x float (rows, H).
template <class T>
__global__ void embedding(const int* ids, const int* pos, const T* table, const T* pos_table, float* x, int rows, int H) {
  const int r = blockIdx.x;
  const T* tr = table + static_cast<long long>(ids[r]) * H;
  const T* pr = pos_table ? pos_table + static_cast<long long>(pos[r]) * H : nullptr;
  float* xr = x + static_cast<long long>(r) * H;
  for_row_chunk(H, [&](int c) { xr[c] = to_f(tr[c]) + (pr ? to_f(pr[c]) : 0.0f); });
}

// One block per row. RMSNorm: y = x / sqrt(mean(x^2) + eps) * w; LayerNorm (b != nullptr or
// layer = true): y = (x - mean) / sqrt(var + eps) * w + b (biased variance, two passes). Cached:
// the row is read from global memory once into dynamic shared memory (H floats) and the later
// passes read that; otherwise (rows over 46 KB: the 48 KB default less block_sum's static
// shared memory, with room to spare) every pass reads global memory.
// xb != nullptr: first x[r, :] += xb (written back; a residual's pending bias), then the norm.
template <class T, bool Cached>
__global__ void norm_rows(float* x, int ldx, const float* xb, const float* w, const float* b, bool layer, float eps, T* y, int ldy, int H) {
  extern __shared__ float row_cache[];
  float* xr = x + static_cast<long long>(blockIdx.x) * ldx;
  T* yr = y + static_cast<long long>(blockIdx.x) * ldy;
  auto at = [&](int c) { return Cached ? row_cache[c] : xr[c]; };
  const float inv_n = 1.0f / static_cast<float>(H);
  float s = 0.0f;
#pragma unroll 4
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = xr[c];
    if (xb) {
      v += xb[c];
      xr[c] = v;  // each element is read and written by the same thread: no race with later passes
    }
    if constexpr (Cached) row_cache[c] = v;
    s += v;
  }
  float mean = 0.0f;
  if (layer) mean = block_sum(s) * inv_n;  // block_sum's barriers also publish row_cache
  else __syncthreads();
  float ss = 0.0f;
#pragma unroll 4
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    const float d = at(c) - mean;
    ss += d * d;
  }
  const float r = rsqrtf(block_sum(ss) * inv_n + eps);
#pragma unroll 4
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float v = (at(c) - mean) * r * w[c];
    if (b) v += b[c];
    yr[c] = from_f<T>(v);
  }
}

// RMSNorm of every hd-slice of columns [col0, col0 + heads*hd) of each row, in place (Qwen3
// q_norm / k_norm). One warp per (row, head).
template <class T>
__global__ void head_rms_norm(T* y, int ld, int col0, int rows, int heads, int hd, const float* w, float eps) {
  const long long warp = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= static_cast<long long>(rows) * heads) return;
  const int r = static_cast<int>(warp / heads), h = static_cast<int>(warp % heads);
  T* p = y + static_cast<long long>(r) * ld + col0 + h * hd;
  float ss = 0.0f;
  for (int d = lane; d < hd; d += 32) {
    const float v = to_f(p[d]);
    ss += v * v;
  }
  const float rs = rsqrtf(warp_sum(ss) / static_cast<float>(hd) + eps);
  for (int d = lane; d < hd; d += 32) p[d] = from_f<T>(to_f(p[d]) * rs * w[d]);
}

// RoPE, half-split layout, in place on columns [col0, col0 + heads*hd): for each head
// (x1, x2) = (x[i], x[i+half]) -> (x1 cos - x2 sin, x2 cos + x1 sin). cos/sin tables:
// (positions, half), precomputed on the host exactly as the CPU runtime does.
template <class T>
__global__ void rope(T* y, int ld, int col0, int rows, int heads, int hd, const int* pos, const float* cos_t, const float* sin_t) {
  const int half = hd / 2;
  const long long n = static_cast<long long>(rows) * heads * half;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int k = static_cast<int>(i % half);
    const long long rh = i / half;
    const int h = static_cast<int>(rh % heads), r = static_cast<int>(rh / heads);
    T* p = y + static_cast<long long>(r) * ld + col0 + h * hd;
    const float c = cos_t[static_cast<long long>(pos[r]) * half + k], s = sin_t[static_cast<long long>(pos[r]) * half + k];
    const float x1 = to_f(p[k]), x2 = to_f(p[k + half]);
    p[k] = from_f<T>(x1 * c - x2 * s);
    p[k + half] = from_f<T>(x2 * c + x1 * s);
  }
}

// y[r, c] += b[c] for c < width (y: T, leading dim ld).
template <class T>
__global__ void add_bias(T* y, int ld, int rows, int width, const float* b) {
  T* yr = y + static_cast<long long>(blockIdx.x) * ld;
  for_row_chunk(width, [&](int c) { yr[c] = from_f<T>(to_f(yr[c]) + b[c]); });
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh_f(float x) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// act[r, i] = silu(gu[r, i] + bg[i]) * (gu[r, I + i] + bu[i]); gu: (rows, 2I) = [gate | up].
template <class T>
__global__ void swiglu(const T* gu, int rows, int I, const float* bg, const float* bu, T* act) {
  const T* g = gu + static_cast<long long>(blockIdx.x) * 2 * I;
  const T* u = g + I;
  T* o = act + static_cast<long long>(blockIdx.x) * I;
  for_row_chunk(I, [&](int c) {
    float gv = to_f(g[c]), uv = to_f(u[c]);
    if (bg) gv += bg[c];
    if (bu) uv += bu[c];
    o[c] = from_f<T>(silu_f(gv) * uv);
  });
}

// y = gelu_tanh(y + b), in place; y: (rows, I).
template <class T>
__global__ void bias_gelu(T* y, int rows, int I, const float* b) {
  T* yr = y + static_cast<long long>(blockIdx.x) * I;
  for_row_chunk(I, [&](int c) {
    float v = to_f(yr[c]);
    if (b) v += b[c];
    yr[c] = from_f<T>(gelu_tanh_f(v));
  });
}

// nll[r] = logsumexp(logits[r, :]) - logits[r, target[r]] (0 where target < 0). One block per row.
__global__ void nll_rows(const float* logits, int V, const int* target, float* nll) {
  const float* lr = logits + static_cast<long long>(blockIdx.x) * V;
  float m = -INFINITY;
  for (int c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, lr[c]);
  m = block_max(m);
  float s = 0.0f;
  for (int c = threadIdx.x; c < V; c += blockDim.x) s += expf(lr[c] - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const int t = target[blockIdx.x];
    nll[blockIdx.x] = t < 0 ? 0.0f : (m + logf(s) - lr[t]);
  }
}

template <class T>
__global__ void convert(const float* in, T* out, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(in[i]);
}

// Deterministic uniform(-a, a) values from a 64-bit hash of (seed, index) (random-weight
// benchmark models; no host data).
template <class T>
__global__ void fill_uniform(T* out, long long n, unsigned long long seed, float a) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned long long z = seed * 0x9E3779B97F4A7C15ull + static_cast<unsigned long long>(i) + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    out[i] = from_f<T>((2.0f * u - 1.0f) * a);
  }
}

template <class T>
__global__ void fill_value(T* out, long long n, float v) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(v);
}

}  // namespace kernels

// ---- host launchers (all asynchronous on `s`; launch status checked) ----

/// Grid of the row-wise elementwise kernels: (rows, column chunks).
inline dim3 row_grid(int rows, int width) {
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>((width + kernels::kRowChunk - 1) / kernels::kRowChunk));
}

template <class T>
void embedding(const int* ids, const int* pos, const T* table, const T* pos_table, float* x, int rows, int H, cudaStream_t s) {
  if (rows == 0) return;
  kernels::embedding<T><<<row_grid(rows, H), kernels::kRowThreads, 0, s>>>(ids, pos, table, pos_table, x, rows, H);
  CACHESHRINK_CUDA_LAUNCH_CHECK("embedding");
}

/// x[r, :] += xb (in place), then RMSNorm (b == nullptr and !layer) or LayerNorm (layer) of each
/// row of x into y: a residual's pending bias (attention output / MLP down projection) folded into
/// the next norm's read. xb == nullptr: x is only read.
template <class T>
void bias_norm_rows(float* x, int ldx, const float* xb, const float* w, const float* b, bool layer, float eps, T* y, int ldy, int rows, int H,
                    cudaStream_t s) {
  if (rows == 0) return;
  const int block = H >= 2048 ? 512 : H >= 1024 ? 256 : 128;
  const std::size_t smem = sizeof(float) * static_cast<std::size_t>(H);
  if (smem <= 46 * 1024) kernels::norm_rows<T, true><<<rows, block, smem, s>>>(x, ldx, xb, w, b, layer, eps, y, ldy, H);
  else kernels::norm_rows<T, false><<<rows, block, 0, s>>>(x, ldx, xb, w, b, layer, eps, y, ldy, H);
  CACHESHRINK_CUDA_LAUNCH_CHECK("norm_rows");
}

/// RMSNorm (b == nullptr and !layer) or LayerNorm (layer) of each row of x into y.
template <class T>
void norm_rows(const float* x, int ldx, const float* w, const float* b, bool layer, float eps, T* y, int ldy, int rows, int H, cudaStream_t s) {
  bias_norm_rows<T>(const_cast<float*>(x), ldx, nullptr, w, b, layer, eps, y, ldy, rows, H, s);  // x is not written without xb
}

template <class T>
void head_rms_norm(T* y, int ld, int col0, int rows, int heads, int hd, const float* w, float eps, cudaStream_t s) {
  const long long threads = static_cast<long long>(rows) * heads * 32;
  if (threads == 0) return;
  kernels::head_rms_norm<T><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, s>>>(y, ld, col0, rows, heads, hd, w, eps);
  CACHESHRINK_CUDA_LAUNCH_CHECK("head_rms_norm");
}

template <class T>
void rope(T* y, int ld, int col0, int rows, int heads, int hd, const int* pos, const float* cos_t, const float* sin_t, cudaStream_t s) {
  const long long n = static_cast<long long>(rows) * heads * (hd / 2);
  if (n == 0) return;
  kernels::rope<T><<<grid_for(n, 256), 256, 0, s>>>(y, ld, col0, rows, heads, hd, pos, cos_t, sin_t);
  CACHESHRINK_CUDA_LAUNCH_CHECK("rope");
}

template <class T>
void add_bias(T* y, int ld, int rows, int width, const float* b, cudaStream_t s) {
  const long long n = static_cast<long long>(rows) * width;
  if (n == 0 || b == nullptr) return;
  kernels::add_bias<T><<<row_grid(rows, width), kernels::kRowThreads, 0, s>>>(y, ld, rows, width, b);
  CACHESHRINK_CUDA_LAUNCH_CHECK("add_bias");
}

template <class T>
void swiglu(const T* gu, int rows, int I, const float* bg, const float* bu, T* act, cudaStream_t s) {
  const long long n = static_cast<long long>(rows) * I;
  if (n == 0) return;
  kernels::swiglu<T><<<row_grid(rows, I), kernels::kRowThreads, 0, s>>>(gu, rows, I, bg, bu, act);
  CACHESHRINK_CUDA_LAUNCH_CHECK("swiglu");
}

template <class T>
void bias_gelu(T* y, int rows, int I, const float* b, cudaStream_t s) {
  const long long n = static_cast<long long>(rows) * I;
  if (n == 0) return;
  kernels::bias_gelu<T><<<row_grid(rows, I), kernels::kRowThreads, 0, s>>>(y, rows, I, b);
  CACHESHRINK_CUDA_LAUNCH_CHECK("bias_gelu");
}

inline void nll_rows(const float* logits, int rows, int V, const int* target, float* nll, cudaStream_t s) {
  if (rows == 0) return;
  kernels::nll_rows<<<rows, 256, 0, s>>>(logits, V, target, nll);
  CACHESHRINK_CUDA_LAUNCH_CHECK("nll_rows");
}

template <class T>
void convert(const float* in, T* out, long long n, cudaStream_t s) {
  if (n == 0) return;
  kernels::convert<T><<<grid_for(n, 256), 256, 0, s>>>(in, out, n);
  CACHESHRINK_CUDA_LAUNCH_CHECK("convert");
}

template <class T>
void fill_uniform(T* out, long long n, unsigned long long seed, float a, cudaStream_t s) {
  if (n == 0) return;
  kernels::fill_uniform<T><<<grid_for(n, 256), 256, 0, s>>>(out, n, seed, a);
  CACHESHRINK_CUDA_LAUNCH_CHECK("fill_uniform");
}

template <class T>
void fill_value(T* out, long long n, float v, cudaStream_t s) {
  if (n == 0) return;
  kernels::fill_value<T><<<grid_for(n, 256), 256, 0, s>>>(out, n, v);
  CACHESHRINK_CUDA_LAUNCH_CHECK("fill_value");
}

}  // namespace cacheshrink::cuda

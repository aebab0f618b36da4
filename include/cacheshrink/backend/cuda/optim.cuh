#pragma once
// The trainer's optimizer step on the GPU, float32: the same updates as the CPU code
// (optim/updates.hpp, optim/clip.hpp, MLATrainer::step) for parameters that live in device
// memory as row-major (rows, cols) buffers, each with a gradient buffer of the same shape.
//
//   Euclidean params  torch AdamW (adamw_step): decoupled decay x *= 1 - lr wd, torch's lerp
//                     form for exp_avg, bias corrections as adamw_step writes them.
//   Stiefel params    geoopt RiemannianAdam on EuclideanStiefel<float> (riemannian_adam_step):
//                     x <- projx(x); g = grad + wd x; rg = g - x sym(x^T g);
//                     m = b1 m + (1 - b1) rg; v = b2 v + (1 - b2) <rg, rg>  (one scalar);
//                     y = qf(x - lr (m / bc1) / (sqrt(v / bc2) + eps))  (diag(R) > 0);
//                     m <- m - y sym(y^T m)  (transport by projection).
//   Clipping          clip_grad_norm's semantics as MLATrainer::step uses it: the reported
//                     norm covers every parameter, the clip coefficient
//                     min(1, max_norm / (||clipped||_2 + 1e-6)) is computed over (and applied
//                     to) the Euclidean gradients only, unless clip_stiefel.
//
// Orientation. A row-major (n, p) buffer is, to cuBLAS (column-major), the (p, n) matrix
// A = X^T with leading dimension p. Every Stiefel product below is written for that view:
//   X^T Y (p, p)          = A_x A_y^T           gemm(N, T, p, p, n)
//   X S   (n, p), S (p,p)  -> memory S^T A_x     gemm(T, N, p, n, p) (N when S is symmetric)
//   Y^T Y (p, p)          = A A^T               syrk(upper, N, p, n)
//   Y R^{-1}              -> memory R^{-T} A    trsm(left, upper, T): solves R^T Z = A
// so no transposition kernel is ever needed.
//
// projx is ONE Newton-Schulz polar step x <- x (1.5 I - 0.5 x^T x) instead of an SVD: every
// step ends with a QR retraction, so x is orthonormal to float precision (||x^T x - I|| ~ 1e-7)
// when it arrives here, the step matches polar(x) = x (x^T x)^{-1/2} = x (I - E/2 + O(E^2))
// (E = x^T x - I) to second order, and it costs two GEMMs. add() refuses a Stiefel
// parameter farther than 1e-4 from the manifold (the tolerance optim::Optimizer::add documents),
// from where one step still lands within ~1e-8.
//
// The QR retraction is Cholesky QR2: G = Y^T Y = R^T R (potrf), Y <- Y R^{-1}, twice. The
// first pass leaves Q orthonormal to ~cond(Y)^2 eps; the second brings it to eps. Both R have
// a positive diagonal, so the product does too and Q is exactly qr_positive's Q (the thin QR
// with diag(R) > 0 is unique). Y = x + u with ||u||_F ~ lr is very well conditioned; a
// failed potrf (a step so large that Y lost rank) throws NumericalError naming the parameter.
//
// Batching. Stiefel parameters are stepped together: grouped by (rows, cols, step count), each
// group's GEMMs are one cublasSgemmBatched each and its elementwise work one launch per operation
// (blockIdx.y = member). The QR2 retraction of members with at most kMaxBatchedCols (320) columns
// factors every member's Gram in one launch of our chol_inverse_upper kernel (blocked Cholesky
// and triangular inverse in shared memory, one block per member) followed by a GEMM by R^{-1}
// instead of potrf + trsm: the same Q, the same float32 arithmetic class. At Qwen2.5-7B shapes
// (56 parameters of 512 x 256) this took the optimizer step from 33 to 4.6 ms
// (docs/results_cuda.md). Wider members (LLaMA-2-7B's 4096 x 1024) take one cusolverDnSpotrfBatched
// and one cublasStrsmBatched per pass for the whole chunk; their GEMMs, whose 1024 x 1024 outputs
// fill half the GPU one parameter at a time, are batched like the narrow ones. At LLaMA-2-7B shapes
// (64 such parameters) that took the optimizer step from 263 to 167 ms.
//
// Accumulation: gradient norms and <rg, rg> are summed in double (block reduction + one
// double atomicAdd per block). The moments are float, as the CPU AdamState<float>.
//
// Synchronisation: grad_norm_and_clip() syncs once (the host needs the norm); step() syncs
// once when there are Stiefel parameters (to read the Cholesky info values), plus once more
// when the batched groups' device pointer tables change (first step, new parameters, uneven
// step counts after load_state); everything else is
// asynchronous on the stream. cuBLAS runs in the handle's stream, which must be `stream`, with
// the default (full float32, no TF32) math mode forced for the duration of each call: TF32
// GEMMs would leave Q orthonormal to only ~1e-3.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/backend/cuda/solver.cuh"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/types.hpp"
#include "cacheshrink/optim/options.hpp"
#include "cacheshrink/optim/updates.hpp"

namespace cacheshrink::cuda {

namespace optim_detail {

// Kernels are `static`: internal linkage keeps a header-only kernel from being defined twice
// when several .cu units of one program include this header.
constexpr int kBlock = 256;

// Sum over the block (blockDim.x == kBlock); the result is valid in thread 0.
__device__ __forceinline__ double block_sum_double(double v) {
  __shared__ double part[kBlock / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[w] = v;
  __syncthreads();
  double s = 0.0;
  if (w == 0) {
    s = lane < kBlock / 32 ? part[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  return s;
}

#define CACHESHRINK_OPTIM_LOOP(i, n)                                                         \
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<long long>(gridDim.x) * blockDim.x)

// s = 0.5 (m + m^T), (p, p) column-major.
static __global__ void sym_kernel(const float* __restrict__ m, float* __restrict__ s, int p) {
  const long long total = static_cast<long long>(p) * p;
  CACHESHRINK_OPTIM_LOOP(t, total) {
    const int i = static_cast<int>(t % p), j = static_cast<int>(t / p);
    s[t] = 0.5f * (m[t] + m[j + static_cast<long long>(i) * p]);
  }
}

// Scalars of one adamw_step, in the float values the CPU code forms.
struct AdamWArgs {
  float decay;  // 1 - lr wd, applied when `decayed`
  bool decayed;
  float w;        // 1 - beta1: lerp weight
  bool lerp_low;  // w < 0.5: torch's lerp takes the start + w (end - start) branch
  float beta2, one_minus_beta2;
  float step_size;  // lr / bc1
  float bc2_sqrt;
  float eps;
  bool amsgrad;
};

// One element of adamw_step (adamw_kernel and the multi-tensor mt_adamw share it: same bits).
__device__ __forceinline__ void adamw_element(float* __restrict__ x, const float* __restrict__ g, float* __restrict__ m,
                                              float* __restrict__ v, float* __restrict__ vmax, long long i, const AdamWArgs& a) {
  float xi = x[i];
  if (a.decayed) xi *= a.decay;
  const float gi = g[i], mi0 = m[i];
  const float mi = a.lerp_low ? mi0 + a.w * (gi - mi0) : gi - (gi - mi0) * (1.0f - a.w);
  const float vi = v[i] * a.beta2 + a.one_minus_beta2 * (gi * gi);
  m[i] = mi;
  v[i] = vi;
  float denom;
  if (a.amsgrad) {
    const float vm = fmaxf(vmax[i], vi);
    vmax[i] = vm;
    denom = sqrtf(vm) / a.bc2_sqrt + a.eps;
  } else {
    denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
  }
  x[i] = xi + -a.step_size * (mi / denom);
}
static __global__ void adamw_kernel(float* __restrict__ x, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                                    float* __restrict__ vmax, long long n, AdamWArgs a) {
  CACHESHRINK_OPTIM_LOOP(i, n) adamw_element(x, g, m, v, vmax, i, a);
}

// Multi-tensor launches: one launch covers many parameters, each block one span (a parameter's
// element range of at most kSpan floats) of a table built when the parameter set changes; at
// 7B shapes (112 parameters) the per-parameter launches of the gradient norms, the clipping and
// AdamW cost more than their work.
constexpr long long kSpan = 32768;
struct MtTensor {
  float *x, *g, *m, *v, *vmax;
  int stiefel;
};
struct MtSpan {
  int tensor;
  long long begin, end;
};
// out[tensor] += sum over the span of g^2 (double; out zeroed by the caller).
static __global__ void __launch_bounds__(kBlock)
    mt_sq_norm(const MtSpan* __restrict__ spans, const MtTensor* __restrict__ t, double* __restrict__ out) {
  const MtSpan sp = spans[blockIdx.x];
  const float* g = t[sp.tensor].g;
  double s = 0.0;
  for (long long i = sp.begin + threadIdx.x; i < sp.end; i += kBlock) {
    const double v = g[i];
    s += v * v;
  }
  s = block_sum_double(s);
  if (threadIdx.x == 0) atomicAdd(out + sp.tensor, s);
}
// g *= c on every span's tensor (the Stiefel ones only with stiefel_too).
static __global__ void __launch_bounds__(kBlock)
    mt_scale(const MtSpan* __restrict__ spans, const MtTensor* __restrict__ t, float c, bool stiefel_too) {
  const MtSpan sp = spans[blockIdx.x];
  const MtTensor tt = t[sp.tensor];
  if (tt.stiefel && !stiefel_too) return;
  for (long long i = sp.begin + threadIdx.x; i < sp.end; i += kBlock) tt.g[i] *= c;
}
static __global__ void __launch_bounds__(kBlock) mt_adamw(const MtSpan* __restrict__ spans, const MtTensor* __restrict__ t, AdamWArgs a) {
  const MtSpan sp = spans[blockIdx.x];
  const MtTensor tt = t[sp.tensor];
  for (long long i = sp.begin + threadIdx.x; i < sp.end; i += kBlock) adamw_element(tt.x, tt.g, tt.m, tt.v, tt.vmax, i, a);
}

// m = b1 m + (1 - b1) rg;  x += -lr (m / bc1) / (sqrt(v / bc2) + eps)  (x then holds Y = x + u).
struct RadamArgs {
  float beta1, one_minus_beta1, bc1, bc2, eps, neg_lr;
};

// ---- Batched forms for a group of same-shape Stiefel parameters (blockIdx.y = member) ----
// Every pointer table holds one entry per member of the chunk being stepped.

static __global__ void copy_batched(float* const* __restrict__ dst, const float* const* __restrict__ src, long long n) {
  const float* a = src[blockIdx.y];
  float* b = dst[blockIdx.y];
  CACHESHRINK_OPTIM_LOOP(i, n) b[i] = a[i];
}

// r = g + wd x (wd may be 0: a copy with the same float result g + 0 x == g for finite x).
static __global__ void add_decay_batched(float* const* __restrict__ r, const float* const* __restrict__ g,
                                         const float* const* __restrict__ x, float wd, long long n) {
  const float* gg = g[blockIdx.y];
  const float* xx = x[blockIdx.y];
  float* rr = r[blockIdx.y];
  if (wd == 0.0f) {
    CACHESHRINK_OPTIM_LOOP(i, n) rr[i] = gg[i];
  } else {
    CACHESHRINK_OPTIM_LOOP(i, n) rr[i] = gg[i] + wd * xx[i];
  }
}

static __global__ void sym_batched(float* const* __restrict__ sym, const float* const* __restrict__ m, int p) {
  const float* mm = m[blockIdx.y];
  float* ss = sym[blockIdx.y];
  const long long total = static_cast<long long>(p) * p;
  CACHESHRINK_OPTIM_LOOP(t, total) {
    const int i = static_cast<int>(t % p), j = static_cast<int>(t / p);
    ss[t] = 0.5f * (mm[t] + mm[j + static_cast<long long>(i) * p]);
  }
}

static __global__ void __launch_bounds__(kBlock)
    sq_norm_batched(const float* const* __restrict__ a, long long n, double* __restrict__ out) {
  const float* aa = a[blockIdx.y];
  double s = 0.0;
  CACHESHRINK_OPTIM_LOOP(i, n) {
    const double v = aa[i];
    s += v * v;
  }
  s = block_sum_double(s);
  if (threadIdx.x == 0) atomicAdd(out + blockIdx.y, s);
}

static __global__ void second_moment_batched(float* const* v, float* const* vmax, const double* ci, float beta2, float one_minus_beta2,
                                             bool amsgrad, int count) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= count) return;
  const float nv = *v[m] * beta2 + one_minus_beta2 * static_cast<float>(ci[m]);
  *v[m] = nv;
  if (amsgrad) *vmax[m] = fmaxf(*vmax[m], nv);
}

static __global__ void radam_update_batched(float* const* __restrict__ x, const float* const* __restrict__ rg, float* const* __restrict__ m,
                                            float* const* __restrict__ v, long long n, RadamArgs a) {
  float* xx = x[blockIdx.y];
  const float* rr = rg[blockIdx.y];
  float* mm = m[blockIdx.y];
  const float denom = sqrtf(*v[blockIdx.y] / a.bc2) + a.eps;
  CACHESHRINK_OPTIM_LOOP(i, n) {
    const float mi = mm[i] * a.beta1 + a.one_minus_beta1 * rr[i];
    mm[i] = mi;
    xx[i] = xx[i] + a.neg_lr * ((mi / a.bc1) / denom);
  }
}

// info[2 ids[m] + pass] = src[m]: a batched potrf's devInfo values into the per-parameter slots.
static __global__ void scatter_info(const int* __restrict__ src, int* __restrict__ info, const int* __restrict__ ids, int cnt, int pass) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m < cnt) info[2 * ids[m] + pass] = src[m];
}

// Largest p whose packed upper triangle fits one block's shared memory.
constexpr int kMaxBatchedCols = 320;
constexpr int kCholThreads = 512;
constexpr int kCholPanel = 32;  // panel width of the blocked factor and inverse (one warp's lanes)
inline constexpr int chol_smem_bytes(int p) { return p * (p + 1) / 2 * static_cast<int>(sizeof(float)); }

// One block per member: the upper Cholesky factor of the (p, p) Gram G = R^T R (column-major,
// the upper triangle is read), then R^{-1} in place, written out as a full column-major (p, p)
// matrix with zeros below the diagonal. Shared memory holds R packed by columns: element (i, j),
// i <= j, at j (j + 1) / 2 + i. A pivot that is not > 0 (or NaN) records info = its 1-based column
// in info[2 slot + pass], as potrf would, and continues on 1.
//
// Both are blocked by panels of kCholPanel columns, so the block synchronises a few times per
// panel instead of two or three times per column (the unblocked version this replaces took
// ~1.2 ms per launch at p = 256, most of the optimizer step at Qwen2.5-7B shapes):
//   factor (right-looking, LAPACK potrf's order): (A) warp 0 factors the panel's diagonal block
//     unblocked (potf2); (B) one thread per later column solves the panel's rows of R there,
//     R_kk^T R(panel, j) = A(panel, j); (C) the trailing triangle takes the rank-32 update
//     A(i, j) -= sum_t R(t, i) R(t, j) in 4 x 4 register tiles.
//   inverse (trtri's blocked order, column blocks left to right; W = R^{-1}): (a) warp 0 inverts
//     the diagonal block in place (trti2); (b) one thread per row above it forms
//     S = R(0:j0, J) W_JJ in place; (c) W(0:j0, J) = -W(0:j0, 0:j0) S in 4 x 8 register tiles,
//     written after a barrier (the tiles read what they overwrite).
static __device__ __forceinline__ int packed(int i, int j) { return j * (j + 1) / 2 + i; }

static __global__ void __launch_bounds__(kCholThreads)
    chol_inverse_upper(const float* const* __restrict__ gram, float* const* __restrict__ rinv, int p, int* __restrict__ info,
                       const int* __restrict__ slot_ids, int pass) {
  constexpr int NB = kCholPanel;
  extern __shared__ float sm[];
  __shared__ int bad;
  const float* G = gram[blockIdx.x];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nt = blockDim.x;
  for (int t = tid; t < p * p; t += nt) {
    const int i = t % p, j = t / p;
    if (i <= j) sm[packed(i, j)] = G[t];
  }
  if (tid == 0) bad = 0;
  __syncthreads();
  for (int k0 = 0; k0 < p; k0 += NB) {
    const int kb = min(NB, p - k0), c0 = k0 + kb;
    if (warp == 0) {  // (A)
      for (int kk = 0; kk < kb; ++kk) {
        const int k = k0 + kk;
        float d = sm[packed(k, k)];
        const bool ok = d > 0.0f;
        if (!ok) d = 1.0f;
        const float rkk = sqrtf(d);
        __syncwarp();
        if (lane == 0) {
          sm[packed(k, k)] = rkk;
          if (!ok && bad == 0) bad = k + 1;
        }
        const bool mine = lane > kk && lane < kb;  // lane owns column k0 + lane of the block
        float rkj = 0.0f;
        if (mine) {
          rkj = sm[packed(k, k0 + lane)] / rkk;
          sm[packed(k, k0 + lane)] = rkj;
        }
        __syncwarp();
        if (mine)
          for (int i = k + 1; i <= k0 + lane; ++i) sm[packed(i, k0 + lane)] -= sm[packed(k, i)] * rkj;
        __syncwarp();
      }
    }
    __syncthreads();
    for (int j = c0 + tid; j < p; j += nt) {  // (B)
      float* col = sm + packed(k0, j);       // A(k0 + t, j), t < kb
      float x[NB];
#pragma unroll
      for (int t = 0; t < NB; ++t) {
        if (t < kb) {
          float v = col[t];
#pragma unroll
          for (int u = 0; u < t; ++u) v -= sm[packed(k0 + u, k0 + t)] * x[u];
          x[t] = v / sm[packed(k0 + t, k0 + t)];
          col[t] = x[t];
        }
      }
    }
    __syncthreads();
    const int m = p - c0;  // (C)
    if (m > 0) {
      const int nb4 = (m + 3) / 4, tiles = nb4 * (nb4 + 1) / 2;
      for (int tile = tid; tile < tiles; tile += nt) {
        int bj = static_cast<int>((sqrtf(8.0f * static_cast<float>(tile) + 1.0f) - 1.0f) * 0.5f);
        while (bj * (bj + 1) / 2 > tile) --bj;
        while ((bj + 1) * (bj + 2) / 2 <= tile) ++bj;
        const int bi = tile - bj * (bj + 1) / 2;
        const int i0 = c0 + 4 * bi, j0 = c0 + 4 * bj;
        const float *pi[4], *pj[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pi[e] = sm + packed(k0, min(i0 + e, p - 1));
          pj[e] = sm + packed(k0, min(j0 + e, p - 1));
        }
        float acc[4][4] = {};
        for (int t = 0; t < kb; ++t) {
          float a[4], b[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            a[e] = pi[e][t];
            b[e] = pj[e][t];
          }
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int f = 0; f < 4; ++f) acc[e][f] += a[e] * b[f];
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int f = 0; f < 4; ++f)
            if (i0 + e <= j0 + f && j0 + f < p) sm[packed(i0 + e, j0 + f)] -= acc[e][f];
      }
    }
    __syncthreads();
  }
  for (int j0 = 0; j0 < p; j0 += NB) {
    const int jb = min(NB, p - j0);
    if (warp == 0) {  // (a)
      for (int jj = 0; jj < jb; ++jj) {
        const int j = j0 + jj;
        const float d = 1.0f / sm[packed(j, j)];
        float v = 0.0f;
        if (lane < jj)
          for (int k = lane; k < jj; ++k) v += sm[packed(j0 + lane, j0 + k)] * sm[packed(j0 + k, j)];
        __syncwarp();
        if (lane < jj) sm[packed(j0 + lane, j)] = -d * v;
        if (lane == 0) sm[packed(j, j)] = d;
        __syncwarp();
      }
    }
    __syncthreads();
    if (j0 == 0) continue;
    for (int i = tid; i < j0; i += nt) {  // (b)
      float r[NB], o[NB];
#pragma unroll
      for (int u = 0; u < NB; ++u) r[u] = u < jb ? sm[packed(i, j0 + u)] : 0.0f;
#pragma unroll
      for (int c = 0; c < NB; ++c) {
        float v = 0.0f;
#pragma unroll
        for (int u = 0; u <= c; ++u)
          if (c < jb) v += r[u] * sm[packed(j0 + u, j0 + c)];
        o[c] = v;
      }
#pragma unroll
      for (int c = 0; c < NB; ++c)
        if (c < jb) sm[packed(i, j0 + c)] = o[c];
    }
    __syncthreads();
    // (c): tile (rg, cg) = rows 4 rg.., columns j0 + 8 cg..; at most ceil(288 / 4) * 4 = 288 <= nt tiles.
    const int rgs = (j0 + 3) / 4, cgs = (jb + 7) / 8;
    float acc[4][8] = {};
    const int rg = tid / cgs, cg = tid % cgs;
    const bool active = rg < rgs;
    if (active) {
      const int i0 = 4 * rg, cb = j0 + 8 * cg;
      for (int k = i0; k < j0; ++k) {
        float a[4], b[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = (i0 + e <= k) ? sm[packed(i0 + e, k)] : 0.0f;
#pragma unroll
        for (int f = 0; f < 8; ++f) b[f] = (8 * cg + f < jb) ? sm[packed(k, cb + f)] : 0.0f;
#pragma unroll
        for (int e = 0; e < 4; ++e)
#pragma unroll
          for (int f = 0; f < 8; ++f) acc[e][f] += a[e] * b[f];
      }
    }
    __syncthreads();
    if (active) {
      const int i0 = 4 * rg, cb = j0 + 8 * cg;
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int f = 0; f < 8; ++f)
          if (i0 + e < j0 && 8 * cg + f < jb) sm[packed(i0 + e, cb + f)] = -acc[e][f];
    }
    __syncthreads();
  }
  float* out = rinv[blockIdx.x];
  for (int t = tid; t < p * p; t += nt) {
    const int i = t % p, j = t / p;
    out[t] = i <= j ? sm[packed(i, j)] : 0.0f;
  }
  if (tid == 0 && bad != 0) info[2 * slot_ids[blockIdx.x] + pass] = bad;
}

#undef CACHESHRINK_OPTIM_LOOP

/// Forces full-float32 GEMMs and host scalars on a caller's handle for one call, and checks
/// that it runs in our stream; restores the caller's modes on exit.
class CublasModeGuard {
 public:
  CublasModeGuard(cublasHandle_t h, cudaStream_t s, const char* op) : h_(h) {
    cudaStream_t hs = nullptr;
    CACHESHRINK_CUBLAS_CHECK(cublasGetStream(h, &hs));
    CACHESHRINK_CHECK(hs == s, InvalidArgument,
                      std::string(op) + ": the cuBLAS handle is bound to another stream than the optimizer's; the steps would race");
    CACHESHRINK_CUBLAS_CHECK(cublasGetMathMode(h, &math_));
    CACHESHRINK_CUBLAS_CHECK(cublasGetPointerMode(h, &pointer_));
    CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
    CACHESHRINK_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
  }
  CublasModeGuard(const CublasModeGuard&) = delete;
  CublasModeGuard& operator=(const CublasModeGuard&) = delete;
  ~CublasModeGuard() {
    (void)cublasSetMathMode(h_, math_);
    (void)cublasSetPointerMode(h_, pointer_);
  }

 private:
  cublasHandle_t h_;
  cublasMath_t math_ = CUBLAS_DEFAULT_MATH;
  cublasPointerMode_t pointer_ = CUBLAS_POINTER_MODE_HOST;
};

}  // namespace optim_detail

/// A parameter in device memory: value and grad are row-major (rows, cols) float buffers the
/// caller owns and keeps alive while the optimizer uses them.
struct DeviceParam {
  std::string name;
  float* value = nullptr;
  float* grad = nullptr;
  int rows = 0, cols = 0;
  bool stiefel = false;  // orthonormal columns (EuclideanStiefel), rows >= cols; else Euclidean
};

/// AdamW for the Euclidean parameters and RiemannianAdam for the Stiefel ones (MLATrainer's
/// two optimizers) over device parameters, with the trainer's gradient clipping. Owns the
/// moment buffers, a cuSOLVER handle and the scratch; all work is queued on `stream`.
class DeviceOptimizer {
 public:
  /// `cublas` must be bound to `stream`; it is borrowed (math and pointer modes are set per
  /// call and restored).
  DeviceOptimizer(cudaStream_t stream, cublasHandle_t cublas, optim::AdamWOptions euclidean, optim::RiemannianAdamOptions riemannian)
      : s_(stream), blas_(cublas), solver_(stream), eu_(euclidean), ri_(riemannian) {
    eu_.validate();
    ri_.validate();
    int dev = 0;
    CACHESHRINK_CUDA_CHECK(cudaGetDevice(&dev));
    CACHESHRINK_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
    ci_.resize(1);
  }
  DeviceOptimizer(const DeviceOptimizer&) = delete;
  DeviceOptimizer& operator=(const DeviceOptimizer&) = delete;

  /// Scratch bound of the batched Stiefel path, in floats (default 2^25, 128 MiB): a group of
  /// same-shape parameters is stepped in chunks of at most max(1, floats / (rows * cols)) members.
  void set_batch_scratch_floats(std::size_t floats) {
    CACHESHRINK_CHECK(floats >= 1, InvalidArgument, "DeviceOptimizer::set_batch_scratch_floats: must be >= 1");
    batch_scratch_floats_ = floats;
  }
  std::size_t batch_scratch_floats() const { return batch_scratch_floats_; }

  /// Registers a parameter with zero moments; returns its index. A Stiefel parameter must be
  /// within 1e-4 of the manifold (max |X^T X - I|; checked here, one synchronisation).
  std::size_t add(const DeviceParam& p) {
    const std::string who = "DeviceOptimizer::add(" + p.name + ")";
    CACHESHRINK_CHECK(p.value != nullptr && p.grad != nullptr, InvalidArgument, who + ": value and grad must be device pointers, got null");
    CACHESHRINK_CHECK(p.rows >= 1 && p.cols >= 1, InvalidArgument,
                      who + ": shape (" + std::to_string(p.rows) + ", " + std::to_string(p.cols) + ") must be positive");
    CACHESHRINK_CHECK(!p.stiefel || p.rows >= p.cols, InvalidArgument,
                      who + ": Stiefel shape (" + std::to_string(p.rows) + ", " + std::to_string(p.cols) + ") needs rows >= cols");
    Slot slot;
    slot.p = p;
    const std::size_t n = numel(p);
    slot.exp_avg.resize(n);
    slot.exp_avg_sq.resize(p.stiefel ? 1 : n);
    if (amsgrad(p)) slot.max_exp_avg_sq.resize(slot.exp_avg_sq.size());
    zero_moments(slot);
    if (p.stiefel) {
      const int pc = p.cols;
      r_.reserve(n);
      pp_.reserve(2 * static_cast<std::size_t>(pc) * pc);
      check_on_manifold(p, who);
    }
    slots_.push_back(std::move(slot));
    if (p.stiefel) ++stiefel_count_;
    info_.reserve(2 * slots_.size());
    norms_.reserve(slots_.size());
    return slots_.size() - 1;
  }

  std::size_t size() const { return slots_.size(); }
  const DeviceParam& param(std::size_t i) const { return slots_.at(i).p; }

  /// Largest per-parameter step count (they are all equal unless states were loaded unevenly).
  long long steps() const {
    long long t = 0;
    for (const Slot& s : slots_) t = std::max(t, s.step);
    return t;
  }

  /// ||grad_i||_F^2 of every parameter, in add() order, accumulated in double. Synchronises.
  std::vector<double> grad_sq_norms() {
    std::vector<double> out(slots_.size(), 0.0);
    if (slots_.empty()) return out;
    CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(norms_.data(), 0, slots_.size() * sizeof(double), s_));
    build_spans();
    optim_detail::mt_sq_norm<<<static_cast<unsigned>(n_spans_all_), optim_detail::kBlock, 0, s_>>>(spans_.data(), mt_.data(),
                                                                                                   norms_.data());
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim mt_sq_norm (grad_sq_norms)");
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(out.data(), norms_.data(), out.size() * sizeof(double), cudaMemcpyDeviceToHost, s_));
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s_));
    return out;
  }

  /// grad *= coef for the Euclidean parameters, and the Stiefel ones too when include_stiefel.
  /// coef is rounded to float first, as clip_grad_norm<float> does; a factor 1 is skipped (x * 1
  /// is x, NaN included).
  void scale_grads(double coef, bool include_stiefel) {
    const float c = static_cast<float>(coef);
    if (c == 1.0f || slots_.empty()) return;
    build_spans();
    optim_detail::mt_scale<<<static_cast<unsigned>(n_spans_all_), optim_detail::kBlock, 0, s_>>>(spans_.data(), mt_.data(), c,
                                                                                                 include_stiefel);
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim mt_scale (scale_grads)");
  }

  /// MLATrainer::step's clipping: returns sqrt(sum of every gradient's squared norm) before
  /// clipping; when max_norm > 0 the clipped set (Euclidean, plus Stiefel if clip_stiefel) is
  /// scaled by min(1, max_norm / (||clipped set|| + 1e-6)), clip_grad_norm's coefficient over
  /// that set alone. A non-finite norm is returned, not thrown (the caller names the step).
  double grad_norm_and_clip(double max_norm, bool clip_stiefel) {
    const std::vector<double> sq = grad_sq_norms();
    double all = 0.0, clipped = 0.0;
    bool any = false;
    for (std::size_t i = 0; i < sq.size(); ++i) {
      all += sq[i];
      if (!slots_[i].p.stiefel || clip_stiefel) {
        clipped += sq[i];
        any = true;
      }
    }
    if (max_norm > 0.0 && any) scale_grads(std::min(1.0, max_norm / (std::sqrt(clipped) + 1e-6)), clip_stiefel);
    return std::sqrt(all);
  }

  /// One step of every parameter: AdamW at euclidean_lr, RiemannianAdam at riemannian_lr,
  /// then (options.stabilize = k > 0) geoopt's group stabilisation when some Stiefel
  /// parameter reached a multiple of k. Throws NumericalError naming the parameter when a QR
  /// retraction's Cholesky factorisation fails; the parameters are then in an unspecified
  /// state (the trainer keeps its last good checkpoint).
  void step(double euclidean_lr, double riemannian_lr) {
    CACHESHRINK_CHECK(std::isfinite(euclidean_lr) && euclidean_lr >= 0.0, InvalidArgument,
                      "DeviceOptimizer::step: euclidean_lr=" + std::to_string(euclidean_lr) + " must be finite and >= 0");
    CACHESHRINK_CHECK(std::isfinite(riemannian_lr) && riemannian_lr >= 0.0, InvalidArgument,
                      "DeviceOptimizer::step: riemannian_lr=" + std::to_string(riemannian_lr) + " must be finite and >= 0");
    // One guard (math/pointer mode) and one devInfo reset for all Stiefel parameters.
    std::optional<optim_detail::CublasModeGuard> guard;
    if (stiefel_count_ > 0) {
      guard.emplace(blas_, s_, "DeviceOptimizer::step");
      CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(info_.data(), 0, info_.size() * sizeof(int), s_));
    }
    bool due = false;
    if (stiefel_count_ > 0) batched_riemannian_adam(riemannian_lr);
    // The Euclidean parameters in one multi-tensor launch when they share a step count (always,
    // unless states were loaded unevenly); else one launch each.
    long long eu_step = -1;
    bool eu_even = true;
    for (const Slot& s : slots_)
      if (!s.p.stiefel) {
        if (eu_step >= 0 && s.step != eu_step) eu_even = false;
        eu_step = s.step;
      }
    if (eu_step >= 0 && eu_even) {
      build_spans();
      const optim_detail::AdamWArgs a = adamw_args(eu_step + 1, euclidean_lr);
      for (Slot& s : slots_)
        if (!s.p.stiefel) ++s.step;
      optim_detail::mt_adamw<<<static_cast<unsigned>(n_spans_eu_), optim_detail::kBlock, 0, s_>>>(spans_.data() + n_spans_all_, mt_.data(),
                                                                                                  a);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim mt_adamw");
    }
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (!s.p.stiefel) {
        if (!eu_even) adamw(s, euclidean_lr);
        continue;
      }
      due = due || (ri_.stabilize > 0 && s.step > 0 && s.step % ri_.stabilize == 0);
    }
    if (due)
      for (Slot& s : slots_)
        if (s.p.stiefel && s.step > 0) stabilize_one(s);
    guard.reset();
    if (stiefel_count_ > 0) check_infos();
  }

  /// Geoopt's stabilize_group alone (x <- projx(x), m <- proju(x, m) on every Stiefel
  /// parameter that has stepped).
  void stabilize() {
    if (stiefel_count_ == 0) return;
    const optim_detail::CublasModeGuard guard(blas_, s_, "DeviceOptimizer::stabilize");
    for (Slot& s : slots_)
      if (s.p.stiefel && s.step > 0) stabilize_one(s);
  }

  /// Parameter i's state in the CPU layout (column-major matrices, as AdamState<float> holds
  /// them: exp_avg (rows, cols); exp_avg_sq (rows, cols), or (1, 1) for Stiefel). Empty
  /// matrices before the first step, like the CPU optimizers. Synchronises.
  optim::AdamState<float> state(std::size_t i) const {
    const Slot& s = slots_.at(i);
    optim::AdamState<float> st;
    st.step = s.step;
    if (s.step == 0) return st;
    st.exp_avg = to_host(s.exp_avg, s.p.rows, s.p.cols);
    const int sr = s.p.stiefel ? 1 : s.p.rows, sc = s.p.stiefel ? 1 : s.p.cols;
    st.exp_avg_sq = to_host(s.exp_avg_sq, sr, sc);
    if (amsgrad(s.p)) st.max_exp_avg_sq = to_host(s.max_exp_avg_sq, sr, sc);
    return st;
  }

  /// Restores parameter i's state (a checkpoint written from state() or the CPU optimizer).
  void load_state(std::size_t i, const optim::AdamState<float>& st) {
    Slot& s = slots_.at(i);
    const std::string who = "DeviceOptimizer::load_state(" + s.p.name + ")";
    CACHESHRINK_CHECK(st.step >= 0, InvalidArgument, who + ": step=" + std::to_string(st.step) + " must be >= 0");
    if (st.step == 0 || st.exp_avg.size() == 0) {
      zero_moments(s);
      s.step = st.step;
      return;
    }
    const int sr = s.p.stiefel ? 1 : s.p.rows, sc = s.p.stiefel ? 1 : s.p.cols;
    from_host(st.exp_avg, s.p.rows, s.p.cols, s.exp_avg, who, "exp_avg");
    from_host(st.exp_avg_sq, sr, sc, s.exp_avg_sq, who, "exp_avg_sq");
    if (amsgrad(s.p)) from_host(st.max_exp_avg_sq, sr, sc, s.max_exp_avg_sq, who, "max_exp_avg_sq");
    s.step = st.step;
  }

  /// Device moment buffers of parameter i (row-major, the parameter's shape; exp_avg_sq is one
  /// float for Stiefel; max_exp_avg_sq is null without amsgrad).
  const float* exp_avg(std::size_t i) const { return slots_.at(i).exp_avg.data(); }
  const float* exp_avg_sq(std::size_t i) const { return slots_.at(i).exp_avg_sq.data(); }
  const float* max_exp_avg_sq(std::size_t i) const { return slots_.at(i).max_exp_avg_sq.data(); }

 private:
  struct Slot {
    DeviceParam p;
    long long step = 0;
    DeviceBuffer<float> exp_avg, exp_avg_sq, max_exp_avg_sq;
  };

  static std::size_t numel(const DeviceParam& p) { return static_cast<std::size_t>(p.rows) * static_cast<std::size_t>(p.cols); }
  bool amsgrad(const DeviceParam& p) const { return p.stiefel ? ri_.amsgrad : eu_.amsgrad; }
  unsigned grid(long long n) const {
    return static_cast<unsigned>(std::clamp<long long>((n + optim_detail::kBlock - 1) / optim_detail::kBlock, 1, 8LL * sms_));
  }

  // Blocks per member of a batched elementwise launch: ~8 blocks per SM over the whole batch.
  unsigned member_grid(long long n, int count) const {
    const long long cap = std::max<long long>(1, 8LL * sms_ / std::max(count, 1));
    return static_cast<unsigned>(std::clamp<long long>((n + optim_detail::kBlock - 1) / optim_detail::kBlock, 1, cap));
  }

  void zero_moments(Slot& s) {
    for (DeviceBuffer<float>* b : {&s.exp_avg, &s.exp_avg_sq, &s.max_exp_avg_sq})
      if (!b->empty()) CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(b->data(), 0, b->size() * sizeof(float), s_));
  }

  Eigen::MatrixXf to_host(const DeviceBuffer<float>& b, int rows, int cols) const {
    const std::vector<float> h = b.download(s_);
    return Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(h.data(), rows, cols);
  }
  void from_host(const linalg::Matrix<float>& m, int rows, int cols, DeviceBuffer<float>& b, const std::string& who, const char* field) {
    CACHESHRINK_CHECK(m.rows() == rows && m.cols() == cols, InvalidArgument,
                      who + ": " + field + " has shape (" + std::to_string(m.rows()) + ", " + std::to_string(m.cols()) + "), expected (" +
                          std::to_string(rows) + ", " + std::to_string(cols) + ")");
    const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> r = m;
    b.upload(r.data(), static_cast<std::size_t>(r.size()), s_);
  }

  // ---- cuBLAS on the A = X^T view (see the header comment) ----
  // C (m, n) = alpha op(A) op(B) + beta C, all column-major with the given leading dims.
  void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
            float beta, float* C, int ldc) {
    CACHESHRINK_CUBLAS_CHECK(cublasSgemm(blas_, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc));
  }

  // x <- x (1.5 I - 0.5 x^T x) on the (n, p) row-major x; uses r_ (copy of x) and pp_[0, p^2).
  void newton_schulz(float* x, int n, int p) {
    float* xtx = pp_.data();
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, p, p, n, 1.0f, x, p, x, p, 0.0f, xtx, p);  // X^T X
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(r_.data(), x, sizeof(float) * numel_of(n, p), cudaMemcpyDeviceToDevice, s_));
    // memory of X (1.5 I - 0.5 S) is 1.5 X^T - 0.5 S^T X^T: C = x (beta 1.5), B = the copy.
    gemm(CUBLAS_OP_T, CUBLAS_OP_N, p, n, p, -0.5f, xtx, p, r_.data(), p, 1.5f, x, p);
  }

  // v <- v - x sym(x^T v) (proju; x orthonormal), v (n, p) row-major; uses pp_.
  void project(const float* x, float* v, int n, int p) {
    float* xtv = pp_.data();
    float* sym = pp_.data() + static_cast<std::size_t>(p) * p;
    gemm(CUBLAS_OP_N, CUBLAS_OP_T, p, p, n, 1.0f, x, p, v, p, 0.0f, xtv, p);  // X^T V
    symmetrize(xtv, sym, p);
    gemm(CUBLAS_OP_N, CUBLAS_OP_N, p, n, p, -1.0f, sym, p, x, p, 1.0f, v, p);  // memory: V^T - sym X^T
  }

  void symmetrize(const float* m, float* s, int p) {
    const long long total = static_cast<long long>(p) * p;
    optim_detail::sym_kernel<<<grid(total), optim_detail::kBlock, 0, s_>>>(m, s, p);
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim sym_kernel");
  }

  static std::size_t numel_of(int n, int p) { return static_cast<std::size_t>(n) * static_cast<std::size_t>(p); }

  void adamw(Slot& s, double lr) {
    ++s.step;
    const optim_detail::AdamWArgs a = adamw_args(s.step, lr);
    const long long n = static_cast<long long>(numel(s.p));
    optim_detail::adamw_kernel<<<grid(n), optim_detail::kBlock, 0, s_>>>(s.p.value, s.p.grad, s.exp_avg.data(), s.exp_avg_sq.data(),
                                                                         s.max_exp_avg_sq.data(), n, a);
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim adamw_kernel");
  }
  // adamw_step's scalars for step number `step` (1-based) at learning rate lr.
  optim_detail::AdamWArgs adamw_args(long long step, double lr) const {
    const optim::AdamWOptions& o = eu_;
    optim_detail::AdamWArgs a{};
    a.decayed = o.weight_decay != 0.0;
    a.decay = static_cast<float>(1.0 - lr * o.weight_decay);
    const float b1 = static_cast<float>(o.beta1);
    a.w = 1.0f - b1;
    a.lerp_low = a.w < 0.5f;
    a.beta2 = static_cast<float>(o.beta2);
    a.one_minus_beta2 = 1.0f - a.beta2;
    const double t = static_cast<double>(step);
    const double bc1 = 1.0 - std::pow(o.beta1, t), bc2 = 1.0 - std::pow(o.beta2, t);
    a.step_size = static_cast<float>(lr / bc1);
    a.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    a.eps = static_cast<float>(o.eps);
    a.amsgrad = o.amsgrad;
    return a;
  }

  // The multi-tensor table (every parameter) and spans: [0, n_spans_all_) cover every
  // parameter, the next n_spans_eu_ the Euclidean ones again (mt_adamw's range). Rebuilt after add().
  void build_spans() {
    if (spans_built_ == slots_.size()) return;
    std::vector<optim_detail::MtTensor> t;
    std::vector<optim_detail::MtSpan> all, eu;
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      t.push_back({s.p.value, s.p.grad, s.exp_avg.data(), s.exp_avg_sq.data(), s.max_exp_avg_sq.empty() ? nullptr : s.max_exp_avg_sq.data(),
                   s.p.stiefel ? 1 : 0});
      const long long n = static_cast<long long>(numel(s.p));
      for (long long b = 0; b < n; b += optim_detail::kSpan) {
        const optim_detail::MtSpan sp{static_cast<int>(i), b, std::min(n, b + optim_detail::kSpan)};
        all.push_back(sp);
        if (!s.p.stiefel) eu.push_back(sp);
      }
    }
    n_spans_all_ = all.size();
    n_spans_eu_ = eu.size();
    all.insert(all.end(), eu.begin(), eu.end());
    mt_.upload(t, s_);
    spans_.upload(all, s_);
    spans_built_ = slots_.size();
  }

  // ---- Batched RiemannianAdam: every Stiefel parameter, grouped by (rows, cols, step), each
  // group stepped in chunks with cublasSgemmBatched and the kernels above (blockIdx.y = member).
  // Up to kMaxBatchedCols columns the Cholesky QR2 uses chol_inverse_upper and a GEMM by R^{-1}
  // in place of potrf + trsm: the same positive-diagonal Q (the thin QR with diag(R) > 0 is
  // unique), without the 2 x (potrf + trsm) launches per parameter that dominated the step at
  // 7B shapes (56 parameters of 512 x 256: ~24 of 33 ms); wider members take one batched potrf
  // and one batched trsm per pass (qr_pass_batched). Pointer tables are rebuilt and
  // uploaded only when the grouping or a scratch address changes.
  struct Chunk {
    int n = 0, p = 0, count = 0;
    long long step = 0;     // the members' common step count before this step
    std::size_t table = 0;  // offset of its 8 x count pointers in tab_, of its ids in ids_
  };

  void gemm_batched(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, float* const* A, int lda, float* const* B,
                    int ldb, float beta, float* const* C, int ldc, int count) {
    CACHESHRINK_CUBLAS_CHECK(cublasSgemmBatched(blas_, ta, tb, m, n, k, &alpha, const_cast<const float* const*>(A), lda,
                                                const_cast<const float* const*>(B), ldb, &beta, C, ldc, count));
  }

  void plan_chunks() {
    // Groups in first-appearance order; a chunk's members share scratch, so a chunk holds at
    // most batch_scratch_floats_ / (n p) members.
    std::vector<std::vector<std::size_t>> groups;
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      const Slot& s = slots_[i];
      if (!s.p.stiefel) continue;
      bool placed = false;
      for (auto& g : groups) {
        const Slot& h = slots_[g.front()];
        if (h.p.rows == s.p.rows && h.p.cols == s.p.cols && h.step == s.step) {
          g.push_back(i);
          placed = true;
          break;
        }
      }
      if (!placed) groups.push_back({i});
    }
    std::vector<Chunk> chunks;
    std::vector<std::vector<std::size_t>> members;
    std::size_t r_need = 0, pp_need = 0, ci_need = 1;
    for (const auto& g : groups) {
      const Slot& h = slots_[g.front()];
      const std::size_t np = numel(h.p), pp = 2 * static_cast<std::size_t>(h.p.cols) * h.p.cols;
      const std::size_t per = std::max<std::size_t>(1, batch_scratch_floats_ / np);
      for (std::size_t b = 0; b < g.size(); b += per) {
        const std::size_t e = std::min(g.size(), b + per);
        Chunk c;
        c.n = h.p.rows;
        c.p = h.p.cols;
        c.count = static_cast<int>(e - b);
        c.step = h.step;
        chunks.push_back(c);
        members.emplace_back(g.begin() + static_cast<std::ptrdiff_t>(b), g.begin() + static_cast<std::ptrdiff_t>(e));
        r_need = std::max(r_need, (e - b) * np);
        pp_need = std::max(pp_need, (e - b) * pp);
        ci_need = std::max(ci_need, e - b);
      }
    }
    r_.reserve(r_need);
    pp_.reserve(pp_need);
    ci_.reserve(ci_need);
    std::vector<float*> tab;
    std::vector<int> ids;
    for (std::size_t c = 0; c < chunks.size(); ++c) {
      Chunk& ch = chunks[c];
      ch.table = tab.size();
      const std::size_t cnt = static_cast<std::size_t>(ch.count), np = static_cast<std::size_t>(ch.n) * ch.p,
                        pp = static_cast<std::size_t>(ch.p) * ch.p;
      std::vector<float*> t(8 * cnt);
      for (std::size_t m = 0; m < cnt; ++m) {
        Slot& s = slots_[members[c][m]];
        t[0 * cnt + m] = s.p.value;
        t[1 * cnt + m] = s.p.grad;
        t[2 * cnt + m] = s.exp_avg.data();
        t[3 * cnt + m] = r_.data() + m * np;
        t[4 * cnt + m] = pp_.data() + 2 * m * pp;
        t[5 * cnt + m] = pp_.data() + (2 * m + 1) * pp;
        t[6 * cnt + m] = s.exp_avg_sq.data();
        t[7 * cnt + m] = ri_.amsgrad ? s.max_exp_avg_sq.data() : s.exp_avg_sq.data();
        ids.push_back(static_cast<int>(members[c][m]));
      }
      tab.insert(tab.end(), t.begin(), t.end());
      // ids_ is indexed by the same offset / 8 (one id per member, chunks in order).
    }
    if (tab != tab_host_ || ids != ids_host_) {
      tab_host_ = tab;
      ids_host_ = ids;
      if (!tab.empty()) tab_.upload(tab, s_);
      if (!ids.empty()) ids_.upload(ids, s_);
    }
    chunks_ = std::move(chunks);
    chunk_members_ = std::move(members);
  }

  void batched_riemannian_adam(double lr) {
    plan_chunks();
    const optim::RiemannianAdamOptions& o = ri_;
    std::size_t id_off = 0;
    for (std::size_t c = 0; c < chunks_.size(); ++c) {
      const Chunk& ch = chunks_[c];
      const int n = ch.n, p = ch.p, cnt = ch.count;
      const long long ne = static_cast<long long>(n) * p;
      float* const* T = tab_.data() + ch.table;
      float* const* X = T;
      float* const* Gd = T + cnt;
      float* const* M = T + 2 * cnt;
      float* const* R = T + 3 * cnt;
      float* const* S1 = T + 4 * cnt;
      float* const* S2 = T + 5 * cnt;
      float* const* V = T + 6 * cnt;
      float* const* VU = T + 7 * cnt;  // the second moment the update divides by (vmax with amsgrad)
      const int* ids = ids_.data() + id_off;
      id_off += static_cast<std::size_t>(cnt);
      for (const std::size_t i : chunk_members_[c]) ++slots_[i].step;
      const dim3 eg(member_grid(ne, cnt), static_cast<unsigned>(cnt));
      const dim3 pg(member_grid(static_cast<long long>(p) * p, cnt), static_cast<unsigned>(cnt));
      // projx: x <- x (1.5 I - 0.5 x^T x).
      gemm_batched(CUBLAS_OP_N, CUBLAS_OP_T, p, p, n, 1.0f, X, p, X, p, 0.0f, S1, p, cnt);
      optim_detail::copy_batched<<<eg, optim_detail::kBlock, 0, s_>>>(R, const_cast<const float* const*>(X), ne);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim copy_batched");
      gemm_batched(CUBLAS_OP_T, CUBLAS_OP_N, p, n, p, -0.5f, S1, p, R, p, 1.5f, X, p, cnt);
      // rg = proju(x, grad + wd x).
      optim_detail::add_decay_batched<<<eg, optim_detail::kBlock, 0, s_>>>(
          R, const_cast<const float* const*>(Gd), const_cast<const float* const*>(X), static_cast<float>(o.weight_decay), ne);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim add_decay_batched");
      project_batched(X, R, n, p, cnt, S1, S2, pg);
      // v = b2 v + (1 - b2) <rg, rg>.
      CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(ci_.data(), 0, static_cast<std::size_t>(cnt) * sizeof(double), s_));
      optim_detail::sq_norm_batched<<<eg, optim_detail::kBlock, 0, s_>>>(const_cast<const float* const*>(R), ne, ci_.data());
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim sq_norm_batched");
      const float b2 = static_cast<float>(o.beta2);
      optim_detail::second_moment_batched<<<(cnt + 127) / 128, 128, 0, s_>>>(V, T + 7 * cnt, ci_.data(), b2, 1.0f - b2, o.amsgrad, cnt);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim second_moment_batched");
      optim_detail::RadamArgs a{};
      a.beta1 = static_cast<float>(o.beta1);
      a.one_minus_beta1 = 1.0f - a.beta1;
      const double t = static_cast<double>(ch.step + 1);
      a.bc1 = static_cast<float>(1.0 - std::pow(o.beta1, t));
      a.bc2 = static_cast<float>(1.0 - std::pow(o.beta2, t));
      a.eps = static_cast<float>(o.eps);
      a.neg_lr = static_cast<float>(-lr);
      optim_detail::radam_update_batched<<<eg, optim_detail::kBlock, 0, s_>>>(X, const_cast<const float* const*>(R), M, VU, ne, a);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim radam_update_batched");
      // Retraction: Cholesky QR2, x -> R (pass 1) -> x (pass 2).
      qr_pass_batched(X, R, n, p, cnt, S1, S2, ids, 0, eg);
      qr_pass_batched(R, X, n, p, cnt, S1, S2, ids, 1, eg);
      // Transport: m <- proju(x_new, m).
      project_batched(X, M, n, p, cnt, S1, S2, pg);
    }
  }

  // v <- v - x sym(x^T v) for every member.
  void project_batched(float* const* X, float* const* Vv, int n, int p, int cnt, float* const* S1, float* const* S2, dim3 pg) {
    gemm_batched(CUBLAS_OP_N, CUBLAS_OP_T, p, p, n, 1.0f, X, p, Vv, p, 0.0f, S1, p, cnt);
    optim_detail::sym_batched<<<pg, optim_detail::kBlock, 0, s_>>>(S2, const_cast<const float* const*>(S1), p);
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim sym_batched");
    gemm_batched(CUBLAS_OP_N, CUBLAS_OP_N, p, n, p, -1.0f, S2, p, X, p, 1.0f, Vv, p, cnt);
  }

  // out <- in R^{-1} with in^T in = R^T R (R upper, diag > 0); in is left unchanged.
  void qr_pass_batched(float* const* in, float* const* out, int n, int p, int cnt, float* const* S1, float* const* S2, const int* ids,
                       int pass, dim3 eg) {
    gemm_batched(CUBLAS_OP_N, CUBLAS_OP_T, p, p, n, 1.0f, in, p, in, p, 0.0f, S1, p, cnt);
    if (p > optim_detail::kMaxBatchedCols) {
      // Too wide for the shared-memory kernel: cuSOLVER's batched potrf on every member's Gram
      // (upper: G = R^T R; devInfo scattered to the members' slots), then one batched triangular
      // solve, out^T = R^{-T} in^T (memory of in R^{-1}).
      binfo_.reserve(static_cast<std::size_t>(cnt));
      CACHESHRINK_CUSOLVER_CHECK(
          cusolverDnSpotrfBatched(solver_.get(), CUBLAS_FILL_MODE_UPPER, p, const_cast<float**>(S1), p, binfo_.data(), cnt));
      optim_detail::scatter_info<<<(cnt + 127) / 128, 128, 0, s_>>>(binfo_.data(), info_.data(), ids, cnt, pass);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim scatter_info");
      optim_detail::copy_batched<<<eg, optim_detail::kBlock, 0, s_>>>(out, const_cast<const float* const*>(in),
                                                                      static_cast<long long>(n) * p);
      CACHESHRINK_CUDA_LAUNCH_CHECK("optim copy_batched");
      const float one = 1.0f;
      CACHESHRINK_CUBLAS_CHECK(cublasStrsmBatched(blas_, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, CUBLAS_DIAG_NON_UNIT, p, n,
                                                  &one, const_cast<const float* const*>(S1), p, out, p, cnt));
      return;
    }
    const int bytes = optim_detail::chol_smem_bytes(p);
    static const bool configured = [] {
      CACHESHRINK_CUDA_CHECK(cudaFuncSetAttribute(optim_detail::chol_inverse_upper, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  optim_detail::chol_smem_bytes(optim_detail::kMaxBatchedCols)));
      return true;
    }();
    (void)configured;
    optim_detail::chol_inverse_upper<<<static_cast<unsigned>(cnt), optim_detail::kCholThreads, static_cast<std::size_t>(bytes), s_>>>(
        const_cast<const float* const*>(S1), S2, p, info_.data(), ids, pass);
    CACHESHRINK_CUDA_LAUNCH_CHECK("optim chol_inverse_upper");
    // Q^T = R^{-T} in^T: memory of in R^{-1}.
    gemm_batched(CUBLAS_OP_T, CUBLAS_OP_N, p, n, p, 1.0f, S2, p, in, p, 0.0f, out, p, cnt);
  }

  void stabilize_one(Slot& s) {
    newton_schulz(s.p.value, s.p.rows, s.p.cols);
    project(s.p.value, s.exp_avg.data(), s.p.rows, s.p.cols);
  }

  void check_infos() {
    std::vector<int> info(2 * slots_.size());
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(info.data(), info_.data(), info.size() * sizeof(int), cudaMemcpyDeviceToHost, s_));
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s_));
    for (std::size_t i = 0; i < slots_.size(); ++i)
      for (int pass = 0; pass < 2; ++pass) {
        const int v = info[2 * i + static_cast<std::size_t>(pass)];
        if (v == 0) continue;
        const Slot& s = slots_[i];
        throw NumericalError(
            "DeviceOptimizer::step(" + s.p.name + "): QR retraction at step " + std::to_string(s.step) +
            " failed: cusolverDnSpotrf of the (" + std::to_string(s.p.cols) + " x " + std::to_string(s.p.cols) + ") Gram matrix, pass " +
            std::to_string(pass + 1) + ", info = " + std::to_string(v) +
            (v < 0 ? " (bad argument)" : " (not positive definite: the step made the parameter rank-deficient; lower the Riemannian lr)"));
      }
  }

  // max |X^T X - I| <= 1e-4, or InvalidArgument (the tolerance optim::Optimizer::add documents).
  void check_on_manifold(const DeviceParam& p, const std::string& who) {
    const int pc = p.cols;
    {
      optim_detail::CublasModeGuard g(blas_, s_, "DeviceOptimizer::add");
      gemm(CUBLAS_OP_N, CUBLAS_OP_T, pc, pc, p.rows, 1.0f, p.value, pc, p.value, pc, 0.0f, pp_.data(), pc);
    }
    std::vector<float> h(static_cast<std::size_t>(pc) * pc);
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(h.data(), pp_.data(), h.size() * sizeof(float), cudaMemcpyDeviceToHost, s_));
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s_));
    double e = 0.0;
    for (int j = 0; j < pc; ++j)
      for (int i = 0; i < pc; ++i) {
        const double d = h[static_cast<std::size_t>(j) * pc + i] - (i == j ? 1.0 : 0.0);
        e = std::isnan(d) ? INFINITY : std::max(e, std::abs(d));
      }
    CACHESHRINK_CHECK(e <= 1e-4, InvalidArgument,
                      who + ": Stiefel parameter is not orthonormal: max|X^T X - I| = " + std::to_string(e) + " > 1e-4");
  }

  cudaStream_t s_;
  cublasHandle_t blas_;
  CusolverHandle solver_;
  optim::AdamWOptions eu_;
  optim::RiemannianAdamOptions ri_;
  int sms_ = 1;
  std::size_t stiefel_count_ = 0;
  std::vector<Slot> slots_;
  DeviceBuffer<float> r_;       // (n, p) scratch: x copy for Newton-Schulz, then rg
  DeviceBuffer<float> pp_;      // two (p, p) scratch matrices
  DeviceBuffer<int> info_;      // potrf devInfo, two per parameter
  DeviceBuffer<int> binfo_;     // a batched potrf's devInfo, one per chunk member
  DeviceBuffer<double> norms_;  // per-parameter squared gradient norms
  // Multi-tensor table (build_spans).
  DeviceBuffer<optim_detail::MtTensor> mt_;
  DeviceBuffer<optim_detail::MtSpan> spans_;
  std::size_t n_spans_all_ = 0, n_spans_eu_ = 0, spans_built_ = 0;
  DeviceBuffer<double> ci_;  // <rg, rg> of the Stiefel parameter(s) being stepped
  // Batched path: chunks of same-shape Stiefel parameters and their device pointer tables.
  std::vector<Chunk> chunks_;
  std::size_t batch_scratch_floats_ = std::size_t{1} << 25;
  std::vector<std::vector<std::size_t>> chunk_members_;
  std::vector<float*> tab_host_;
  std::vector<int> ids_host_;
  DeviceBuffer<float*> tab_;
  DeviceBuffer<int> ids_;
};

}  // namespace cacheshrink::cuda

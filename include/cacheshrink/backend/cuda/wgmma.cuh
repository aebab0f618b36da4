#pragma once
// Hopper (sm_90a) warpgroup MMA primitives, as inline PTX: wgmma.mma_async with A from registers
// and B from a 128-byte-swizzled shared-memory tile, its fences, and the layout those tiles use.
// The PTX here is compiled only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); kernels that use it
// guard their bodies with CACHESHRINK_WGMMA_DEVICE and the host asks wgmma_available() before
// launching them (a binary built without sm_90a, or another card, runs the mma.sync kernels).
//
// Shared-memory tiles (PTX ISA, "Shared Memory Matrix Layout", 128B swizzle): a (64 rows, W)
// bf16 tile is stored as W / 64 column blocks of 64 rows x 128 bytes; inside a block, the 16-byte
// chunk c (8 elements) of row r sits at r * 128 + ((c ^ (r % 8)) * 16). Every block starts on a
// 1024-byte boundary (the swizzle repeats every 8 rows), so descriptors need no base offset.
// The same bytes serve both operand orders:
//  - K-major B (keys x head_dim rows, e.g. K in S = Q K^T): stride between 8-row groups (SBO)
//    1024 bytes; a k-step of 16 elements advances the start address by 32 bytes inside a block;
//  - MN-major B (e.g. V in O = P V, head_dim contiguous): SBO 1024 bytes between 8-key groups,
//    LBO = 64 * 128 bytes between 64-wide head_dim blocks; a k-step of 16 keys is +2048 bytes.
// Register fragments (PTX ISA, "wgmma .m64nNk16"): warp w of the warpgroup holds rows 16w..16w+15
// of A and D in exactly the m16n8k16 layouts of mma.cuh, so S's accumulators rounded to bf16 are
// the A operand of P V, as in the mma.sync kernels.
//
// TF32 (wgmma .tf32, k = 8): both operands must be K-major (no transposed forms). A float32 tile
// (R rows, W floats) uses the same bytes-level layout: W / 32 column blocks of R rows x 128 bytes,
// 16-byte chunk c (4 floats) of row r at r * 128 + ((c ^ (r % 8)) * 16) inside its block
// (sw128_offset_rows); a k-step of 8 floats is again +32 bytes inside a block.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CACHESHRINK_WGMMA_DEVICE 1
#endif

namespace cacheshrink::cuda::kernels {

/// Byte offset of 16-byte chunk c (c = column / 8) of row r in a swizzled (64, W) tile.
__device__ __forceinline__ int sw128_offset(int r, int c) { return (c >> 3) * (64 * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4); }
/// The same for a tile of R rows (column blocks R * 128 bytes apart).
template <int R>
__device__ __forceinline__ int sw128_offset_rows(int r, int c) {
  return (c >> 3) * (R * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}
/// The dynamic shared memory rounded up to the 1024-byte boundary the swizzled tiles need (kernels
/// size their dynamic shared memory with 1024 bytes of slack for it).
__device__ __forceinline__ unsigned char* smem_align_1024(unsigned char* raw) {
  return raw + ((1024 - static_cast<unsigned>(__cvta_generic_to_shared(raw)) % 1024) % 1024);
}
/// Float index of element (r, col) in a swizzled float32 (R, W) tile.
template <int R>
__device__ __forceinline__ int sw128_index_f32(int r, int col) {
  return (col >> 5) * (R * 32) + r * 32 + ((((col >> 2) & 7) ^ (r & 7)) << 2) + (col & 3);
}

/// Makes this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to the
/// async proxy that wgmma reads operands through; a barrier then publishes them to the warpgroup.
/// (Compiled for every architecture so that kernels can call it outside the sm_90a guard; a no-op
/// before sm_90, where nothing reads through that proxy.)
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// wgmma_probe writes 1 when this binary carries sm_90a code for the device it runs on.
static __global__ void wgmma_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

#if defined(CACHESHRINK_WGMMA_DEVICE)

/// Matrix descriptor of a 128B-swizzled operand starting at `smem` (PTX ISA, "Matrix Descriptor
/// Format"): start address, leading and stride byte offsets (all >> 4), swizzle mode 1 = 128B.
__device__ __forceinline__ std::uint64_t sw128_desc(const void* smem, unsigned lbo_bytes, unsigned sbo_bytes) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  return static_cast<std::uint64_t>((a & 0x3FFFF) >> 4) | (static_cast<std::uint64_t>((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<std::uint64_t>((sbo_bytes & 0x3FFFF) >> 4) << 32) | (std::uint64_t{1} << 62);
}

/// `desc` moved `bytes` (a multiple of 16) further into shared memory: the start address is the
/// descriptor's low 14 bits (address >> 4), and shared addresses stay below 256 KB, so no carry
/// reaches the other fields.
__device__ __forceinline__ std::uint64_t sw128_desc_add(std::uint64_t desc, int bytes) {
  return desc + static_cast<std::uint64_t>(bytes >> 4);
}

/// Orders this thread's earlier register writes (accumulators, A fragments) before the
/// warpgroup's next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/// Pins registers in program order against the (operand-free) wgmma fences and waits: after a
/// wgmma_wait, so that accumulators are not read before it (the compiler sees the wgmma asm as
/// writing them at issue); before a wgmma_fence, so that accumulator and A-fragment writes (the
/// rescale of O, the packing of P) are not moved past it.
template <int M, int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
}
template <int M, int N>
__device__ __forceinline__ void wgmma_fence_operands(unsigned (&r)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// D (64 x N, float; this warp's rows as N / 8 m16n8 tiles d[j]) = A (64 x 16, bf16) * B (16 x N,
// bf16 shared memory) + (scale_d ? D : 0).
// _rs: A in registers; _ss: A from shared memory (K-major descriptor). _tb: B is MN-major
// (transposed); otherwise K-major.
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[8][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[8][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], std::uint64_t desc_a, std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n128k16_rs_tb(float (&d)[16][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%"
      "35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

// D (64 x N, float) = A (64 x 8, tf32, shared memory, K-major) * B (8 x N, tf32, shared memory,
// K-major) + (scale_d ? D : 0). The float32 bits are read as TF32 (low 13 mantissa bits
// ignored): callers round the tiles first (cvt.rna) where truncation would bias the result.
__device__ __forceinline__ void wgmma_m64n32k8_tf32_ss(float (&d)[4][4], std::uint64_t desc_a, std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
      "%16, %17, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n64k8_tf32_ss(float (&d)[8][4], std::uint64_t desc_a, std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "%32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// D (64 x N, float) += A (64 x 8, tf32 in registers: this warp's rows in the m16n8k8 tf32 A layout
// of mma.cuh) * B (8 x N, tf32, shared memory, K-major), (scale_d ? D : 0) as above.
__device__ __forceinline__ void wgmma_m64n32k8_tf32_rs(float (&d)[4][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
      "{%16,%17,%18,%19}, %20, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n64k8_tf32_rs(float (&d)[8][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
      "{%32,%33,%34,%35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n128k8_tf32_rs(float (&d)[16][4], const unsigned (&a)[4], std::uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%"
      "35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "{%64,%65,%66,%67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
        "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
        "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
        "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
        "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
        "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
        "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

#endif  // CACHESHRINK_WGMMA_DEVICE

}  // namespace cacheshrink::cuda::kernels

namespace cacheshrink::cuda {

/// Which tensor-core kernel an attention entry point runs (flash_attention, flash_train_forward,
/// flash_train_backward): Auto takes the wgmma kernel where it exists (this binary has sm_90a
/// code for the device and the head_dim is one it is built for), else the mma.sync one.
enum class FlashKernel { Auto, MmaSync, Wgmma };

/// True when the current device runs this binary's sm_90a code (the wgmma kernels); probed once
/// per device. A binary without sm_90a code, or a card that cannot run it, answers false.
inline bool wgmma_available() {
  static std::mutex mu;
  static std::vector<int> known;  // per device: -1 unknown, 0, 1
  int dev = 0;
  CACHESHRINK_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(known.size()) <= dev) known.resize(static_cast<std::size_t>(dev) + 1, -1);
  if (known[static_cast<std::size_t>(dev)] < 0) {
    DeviceBuffer<int> flag(1);
    CACHESHRINK_CUDA_CHECK(cudaMemset(flag.data(), 0, sizeof(int)));
    kernels::wgmma_probe<<<1, 1>>>(flag.data());
    const cudaError_t launched = cudaGetLastError();  // no image for this device: not available
    int host = 0;
    if (launched == cudaSuccess) CACHESHRINK_CUDA_CHECK(cudaMemcpy(&host, flag.data(), sizeof(int), cudaMemcpyDeviceToHost));
    known[static_cast<std::size_t>(dev)] = launched == cudaSuccess && host == 1 ? 1 : 0;
  }
  return known[static_cast<std::size_t>(dev)] == 1;
}

}  // namespace cacheshrink::cuda

#pragma once
// Tensor-core and async-copy primitives shared by the attention kernels (attention.cuh,
// decode.cuh, flash_train.cuh), as inline PTX for sm_80+: cp.async 16-byte copies, mma.sync m16n8k16
// (bf16 in, float accumulate) and m16n8k8 (tf32 in), ldmatrix.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace cacheshrink::cuda::kernels {

// cp.async (sm_80+) through inline PTX: 16 bytes global -> shared, zero-filling what lies past
// src_bytes. (cuda_pipeline.h would drag libcu++'s ::cuda namespace into users' code.)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
/// 4-byte cp.async (.ca), zero-filling what lies past src_bytes (0 or 4).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// mma.sync m16n8k16 (bf16 in, float accumulate) and ldmatrix, through inline PTX. Fragment
// layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"): with g = lane / 4, t = lane % 4,
//   A (16 x 16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16 x 8, col):  b0 = (2t..2t+1, g), b1 = (2t+8..2t+9, g)
//   C (16 x 8):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// so the C fragments of two adjacent 8-column tiles are, rounded to bf16, the A fragment of the
// 16 x 16 block they form: P never leaves the registers.
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
// mma.sync m16n8k8 (tf32 in, float accumulate). Fragment layouts (PTX ISA, "Matrix fragments for
// mma.m16n8k8", .tf32), g = lane / 4, t = lane % 4:
//   A (16 x 8, row): a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)
//   B (8 x 8, col):  b0 = (t, g), b1 = (t+4, g)
//   C (16 x 8):      c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// A C tile becomes the A operand of a product over its 8 columns as {c0, c2, c1, c3} when the
// k index is permuted (slot t = column 2t, slot t+4 = column 2t+1); the B operand's rows are read
// in that order (b0 = row 2t, b1 = row 2t+1).
__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/// x rounded to TF32 (10 mantissa bits, round to nearest, ties away), as the operand bits.
__device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

/// 2^x by the SFU's ex2.approx.ftz (relative error ~2^-22, denormal results flushed to 0, 2^-inf = 0):
/// exp2f without fast-math adds a range reduction around the same instruction.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (lower 16 bits)
  return *reinterpret_cast<const unsigned*>(&v);
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}

/// Online softmax: rescales an m16n8 accumulator row block (rows g and g + 8 of each 16 x 8
/// tile, see the fragment layout above) by the rows' alpha when their running max moves.
template <int N>
__device__ __forceinline__ void rescale_rows(float (&o)[N][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    o[j][0] *= alpha[0];
    o[j][1] *= alpha[0];
    o[j][2] *= alpha[1];
    o[j][3] *= alpha[1];
  }
}

}  // namespace cacheshrink::cuda::kernels

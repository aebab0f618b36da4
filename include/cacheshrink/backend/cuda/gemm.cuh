#pragma once
// Row-major GEMMs of the forward pass through cuBLAS (column-major underneath).
//
//   Y (rows, out; leading dim ldy) = alpha * X (rows, in; ldx) * W^T + beta * Y,
//   W (out, in) row-major, HF orientation.
//
// Column-major view: Y^T = W * X^T, with W's memory being the column-major (in, out) matrix
// W^T, hence op(A) = T. float32 mode: cublasSgemm (no TF32: the handle keeps the default math
// mode). bf16 mode: cublasGemmEx with bf16 inputs, float32 accumulation (CUBLAS_COMPUTE_32F)
// and a bf16 or float32 output.
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <type_traits>

#include "cacheshrink/backend/cuda/check.cuh"

namespace cacheshrink::cuda {

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else static_assert(sizeof(T) == 0, "cuda_data_type: float or __nv_bfloat16 only");
}

/// Y = alpha * X W^T + beta * Y (row-major; see the header comment). TIn is the type of X and
/// W; TOut of Y. float/float uses cublasSgemm, bf16 inputs use cublasGemmEx (fp32 accumulate).
template <class TIn, class TOut>
void gemm_xwt(cublasHandle_t h, int rows, int out, int in, const TIn* X, int ldx, const TIn* W, int ldw, TOut* Y, int ldy,
              float alpha = 1.0f, float beta = 0.0f) {
  if (rows == 0 || out == 0) return;
  if constexpr (std::is_same_v<TIn, float> && std::is_same_v<TOut, float>) {
    CACHESHRINK_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, W, ldw, X, ldx, &beta, Y, ldy));
  } else {
    CACHESHRINK_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, W, cuda_data_type<TIn>(), ldw, X,
                                          cuda_data_type<TIn>(), ldx, &beta, Y, cuda_data_type<TOut>(), ldy, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
  }
}

/// Column-major strided-batched GEMM, C_i = alpha * op(A_i) op(B_i) + beta * C_i for
/// i < count (A_i = A + i * sA, ...). float uses fp32 math; bf16 inputs/outputs accumulate in
/// fp32. Used by the latent decode path (per-head absorption of W_uk and W_uv).
template <class T>
void gemm_cm_strided_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha,
                             const T* A, int lda, long long sA, const T* B, int ldb, long long sB, float beta, T* C, int ldc,
                             long long sC, int count) {
  if (m == 0 || n == 0 || count == 0) return;
  CACHESHRINK_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, A, cuda_data_type<T>(), lda, sA, B, cuda_data_type<T>(),
                                                      ldb, sB, &beta, C, cuda_data_type<T>(), ldc, sC, count, CUBLAS_COMPUTE_32F,
                                                      CUBLAS_GEMM_DEFAULT));
}

}  // namespace cacheshrink::cuda

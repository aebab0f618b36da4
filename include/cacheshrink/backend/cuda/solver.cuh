#pragma once
// cuSOLVER on the device: a checked handle bound to a stream and the symmetric
// eigendecomposition the calibrated initialisation needs (float64, all pairs). Every status is
// checked and turned into a cacheshrink::Error whose message names the call; a failed
// factorisation (devInfo != 0) is a NumericalError naming the matrix size.
#include <cusolverDn.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/core/error.hpp"

namespace cacheshrink::cuda {

/// A cuSOLVER call failed.
class CusolverError : public Error {
 public:
  using Error::Error;
};

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_INVALID_WORKSPACE: return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default: return "CUSOLVER_STATUS_<other>";
  }
}

inline void check_cusolver(cusolverStatus_t s, const char* op, const char* file, int line) {
  if (s != CUSOLVER_STATUS_SUCCESS)
    throw CusolverError(std::string("cuSOLVER error in ") + op + " (" + file + ":" + std::to_string(line) + "): " + cusolver_status_name(s));
}

}  // namespace cacheshrink::cuda

/// Checks a cuSOLVER call; the message names the call's source text.
#define CACHESHRINK_CUSOLVER_CHECK(expr) ::cacheshrink::cuda::check_cusolver((expr), #expr, __FILE__, __LINE__)

namespace cacheshrink::cuda {

/// cuSOLVER dense handle bound to a stream.
class CusolverHandle {
 public:
  explicit CusolverHandle(cudaStream_t s) {
    CACHESHRINK_CUSOLVER_CHECK(cusolverDnCreate(&h_));
    CACHESHRINK_CUSOLVER_CHECK(cusolverDnSetStream(h_, s));
  }
  CusolverHandle(const CusolverHandle&) = delete;
  CusolverHandle& operator=(const CusolverHandle&) = delete;
  ~CusolverHandle() {
    if (h_) (void)cusolverDnDestroy(h_);
  }
  cusolverDnHandle_t get() const { return h_; }

 private:
  cusolverDnHandle_t h_ = nullptr;
};

/// Every eigenpair of the symmetric (n x n) column-major matrix `a` (lower triangle read), in
/// place: on return `a` holds the eigenvectors as columns and `w` the eigenvalues, ascending
/// (LAPACK order). cusolverDnXsyevd (64-bit API, float64); `work` and `info` are scratch reused
/// across calls. Synchronises the stream.
class SymmetricEigen {
 public:
  SymmetricEigen() { CACHESHRINK_CUSOLVER_CHECK(cusolverDnCreateParams(&params_)); }
  SymmetricEigen(const SymmetricEigen&) = delete;
  SymmetricEigen& operator=(const SymmetricEigen&) = delete;
  ~SymmetricEigen() {
    if (params_) (void)cusolverDnDestroyParams(params_);
  }

  void operator()(cusolverDnHandle_t h, cudaStream_t s, int n, double* a, double* w) {
    std::size_t dev_bytes = 0, host_bytes = 0;
    CACHESHRINK_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(h, params_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F, a, n,
                                                           CUDA_R_64F, w, CUDA_R_64F, &dev_bytes, &host_bytes));
    work_.reserve(std::max<std::size_t>(1, dev_bytes));
    host_work_.resize(std::max<std::size_t>(1, host_bytes));
    info_.reserve(1);
    CACHESHRINK_CUSOLVER_CHECK(cusolverDnXsyevd(h, params_, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F, a, n, CUDA_R_64F, w,
                                                CUDA_R_64F, work_.data(), dev_bytes, host_work_.data(), host_bytes, info_.data()));
    int info = 0;
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(&info, info_.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s));
    if (info != 0)
      throw NumericalError("cusolverDnXsyevd on a (" + std::to_string(n) + " x " + std::to_string(n) + ") matrix failed: info = " +
                           std::to_string(info) + (info < 0 ? " (bad argument)" : " (no convergence)"));
  }

 private:
  cusolverDnParams_t params_ = nullptr;
  DeviceBuffer<char> work_;
  std::vector<char> host_work_;
  DeviceBuffer<int> info_;
};

}  // namespace cacheshrink::cuda

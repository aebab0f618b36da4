#pragma once
// Host-side status checks for CUDA runtime and cuBLAS calls. Device code never throws; every
// status is checked here and turned into a cacheshrink::Error subclass whose message names
// the operation (and the file:line of the call).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "cacheshrink/core/error.hpp"

namespace cacheshrink::cuda {

/// A CUDA runtime call failed (allocation, copy, launch, synchronisation).
class CudaError : public Error {
 public:
  using Error::Error;
};

/// A cuBLAS call failed.
class CublasError : public Error {
 public:
  using Error::Error;
};

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}

inline void check_cuda(cudaError_t e, const char* op, const char* file, int line) {
  if (e != cudaSuccess)
    throw CudaError(std::string("CUDA error in ") + op + " (" + file + ":" + std::to_string(line) + "): " + cudaGetErrorName(e) + ": " +
                    cudaGetErrorString(e));
}

inline void check_cublas(cublasStatus_t s, const char* op, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CublasError(std::string("cuBLAS error in ") + op + " (" + file + ":" + std::to_string(line) + "): " + cublas_status_name(s));
}

/// Number of usable CUDA devices; 0 (never an exception) when there is no driver or device.
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" status
    return 0;
  }
  return n;
}

}  // namespace cacheshrink::cuda

/// Checks a CUDA runtime call; the message names the call's source text.
#define CACHESHRINK_CUDA_CHECK(expr) ::cacheshrink::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
/// Checks a cuBLAS call.
#define CACHESHRINK_CUBLAS_CHECK(expr) ::cacheshrink::cuda::check_cublas((expr), #expr, __FILE__, __LINE__)
/// Checks the launch of the kernel named `name` (configuration errors surface here).
#define CACHESHRINK_CUDA_LAUNCH_CHECK(name) ::cacheshrink::cuda::check_cuda(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)

#pragma once
// RAII owners for device memory (plain cudaMalloc, never managed memory), streams, events
// and the cuBLAS handle. Move-only; destructors never throw.
#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "cacheshrink/backend/cuda/check.cuh"

namespace cacheshrink::cuda {

/// `n` elements of T in device memory.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  /// Reallocates (contents lost) when `n` differs from the current size.
  void resize(std::size_t n) {
    if (n == n_) return;
    release();
    if (n == 0) return;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw CudaError("cudaMalloc of " + std::to_string(n * sizeof(T)) + " bytes failed: " + cudaGetErrorString(e));
    }
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  /// Grows (contents lost) when fewer than `n` elements are held; never shrinks.
  void reserve(std::size_t n) {
    if (n > n_) resize(n);
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

  void upload(const T* host, std::size_t n, cudaStream_t s = nullptr) {
    resize(n);
    if (n) CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, s));
    if (n) CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  void upload(const std::vector<T>& v, cudaStream_t s = nullptr) { upload(v.data(), v.size(), s); }
  std::vector<T> download(cudaStream_t s = nullptr) const {
    std::vector<T> v(n_);
    if (n_) {
      CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, s));
      CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    return v;
  }

 private:
  void release() noexcept {
    if (p_) (void)cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

class Stream {
 public:
  Stream() { CACHESHRINK_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }
  cudaStream_t get() const { return s_; }
  void synchronize() const { CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { CACHESHRINK_CUDA_CHECK(cudaEventCreate(&e_)); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (e_) (void)cudaEventDestroy(e_);
  }
  void record(cudaStream_t s) { CACHESHRINK_CUDA_CHECK(cudaEventRecord(e_, s)); }
  void synchronize() { CACHESHRINK_CUDA_CHECK(cudaEventSynchronize(e_)); }
  /// Milliseconds from `start` to this event (both recorded and complete).
  float elapsed_since(const Event& start) const {
    float ms = 0;
    CACHESHRINK_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

/// Page-locked host memory (cudaHostAlloc): staging for host -> device copies at the link's
/// rate (pageable copies run at a fraction of it). Move-only.
template <class T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(std::size_t n) {
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, n * sizeof(T), cudaHostAllocDefault);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw CudaError("cudaHostAlloc of " + std::to_string(n * sizeof(T)) + " bytes failed: " + cudaGetErrorString(e));
    }
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      if (p_) (void)cudaFreeHost(p_);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~PinnedBuffer() {
    if (p_) (void)cudaFreeHost(p_);
  }
  T* data() { return p_; }
  std::size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// cuBLAS handle bound to a stream. Pointer mode host (alpha/beta are host scalars).
class CublasHandle {
 public:
  explicit CublasHandle(cudaStream_t s) {
    CACHESHRINK_CUBLAS_CHECK(cublasCreate(&h_));
    CACHESHRINK_CUBLAS_CHECK(cublasSetStream(h_, s));
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle() {
    if (h_) (void)cublasDestroy(h_);
  }
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

}  // namespace cacheshrink::cuda

#pragma once
// Nccl: GPU collectives over NCCL, bootstrapped through MPI (rank 0 creates the ncclUniqueId,
// MPI_Bcast hands it to the others, every rank calls ncclCommInitRank on its own GPU).
//
//   dist::MpiSession mpi(&argc, &argv);
//   dist::Nccl nccl(dist::Mpi{});            // GPU = node-local rank (mod the GPUs visible)
//   nccl.allreduce_sum_device(d_grad, n);    // device buffers, on nccl.stream()
//   nccl.allreduce_sum(h_buf, n);            // host buffers (Communicator concept): staged
//
// Include from .cu units only (like cacheshrink/cuda.hpp); needs CUDA, NCCL and MPI
// (CMake: CACHESHRINK_WITH_NCCL, targets NCCL::nccl and MPI::MPI_CXX). Every NCCL/CUDA/MPI call
// is checked and a failure throws dist::CommError / cuda::CudaError naming the call.
// Status: compiled in CI; not yet run on two GPUs (docs/scaling.md).
#ifndef __CUDACC__
#error "cacheshrink/dist/nccl.cuh is for .cu translation units (compile with nvcc); CPU code uses dist::Mpi"
#endif
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <memory>
#include <string>

#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/dist/mpi.hpp"

namespace cacheshrink::dist {

inline void check_nccl(ncclResult_t r, const char* op, ncclComm_t comm = nullptr) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  std::string msg = std::string("NCCL error in ") + op + ": " + ncclGetErrorString(r);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') msg += std::string(" (") + last + ")";
  }
  throw CommError(msg);
}

#define CACHESHRINK_NCCL_CUDA(call) ::cacheshrink::cuda::check_cuda((call), #call, __FILE__, __LINE__)

class Nccl {
 public:
  /// Collective over the ranks of `mpi`; device < 0 picks the node-local rank modulo the visible
  /// GPUs (one process per GPU, the usual mpirun layout).
  explicit Nccl(const Mpi& mpi, int device = -1) : s_(std::make_shared<State>()) {
    s_->mpi = mpi;
    if (device < 0) {
      MPI_Comm local;
      check_mpi(MPI_Comm_split_type(mpi.handle(), MPI_COMM_TYPE_SHARED, mpi.rank(), MPI_INFO_NULL, &local), "MPI_Comm_split_type(shared)");
      int local_rank = 0;
      const int rc = MPI_Comm_rank(local, &local_rank);
      MPI_Comm_free(&local);
      check_mpi(rc, "MPI_Comm_rank(node-local)");
      int n = 0;
      CACHESHRINK_NCCL_CUDA(cudaGetDeviceCount(&n));
      if (n < 1) throw CommError("dist::Nccl: no CUDA device visible on rank " + std::to_string(mpi.rank()));
      device = local_rank % n;
    }
    s_->device = device;
    CACHESHRINK_NCCL_CUDA(cudaSetDevice(device));
    ncclUniqueId id{};
    if (mpi.rank() == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    mpi.broadcast_bytes(&id, sizeof id, 0);
    check_nccl(ncclCommInitRank(&s_->comm, mpi.size(), id, mpi.rank()), "ncclCommInitRank");
    CACHESHRINK_NCCL_CUDA(cudaStreamCreateWithFlags(&s_->stream, cudaStreamNonBlocking));
  }

  int rank() const { return s_->mpi.rank(); }
  int size() const { return s_->mpi.size(); }
  int device() const { return s_->device; }
  cudaStream_t stream() const { return s_->stream; }
  ncclComm_t handle() const { return s_->comm; }
  const Mpi& mpi() const { return s_->mpi; }

  // Device buffers: enqueued on stream() (asynchronous; synchronize() or the next host call waits).
  void allreduce_sum_device(float* d, std::size_t n) const { allreduce_dev(d, n, ncclFloat32, "ncclAllReduce(float, sum)"); }
  void allreduce_sum_device(double* d, std::size_t n) const { allreduce_dev(d, n, ncclFloat64, "ncclAllReduce(double, sum)"); }
  void broadcast_device(float* d, std::size_t n, int root) const { bcast_dev(d, n, ncclFloat32, root, "ncclBroadcast(float)"); }
  void broadcast_device(double* d, std::size_t n, int root) const { bcast_dev(d, n, ncclFloat64, root, "ncclBroadcast(double)"); }
  void synchronize() const { CACHESHRINK_NCCL_CUDA(cudaStreamSynchronize(s_->stream)); }

  // Host buffers (the Communicator concept, used by the CPU conversion and trainer): copied to a
  // device staging buffer, reduced by NCCL, copied back.
  void allreduce_sum(float* h, std::size_t n) const { host_op(h, n, [&](float* d) { allreduce_sum_device(d, n); }); }
  void allreduce_sum(double* h, std::size_t n) const { host_op(h, n, [&](double* d) { allreduce_sum_device(d, n); }); }
  void broadcast(float* h, std::size_t n, int root) const { host_op(h, n, [&](float* d) { broadcast_device(d, n, root); }); }
  void broadcast(double* h, std::size_t n, int root) const { host_op(h, n, [&](double* d) { broadcast_device(d, n, root); }); }
  void barrier() const {
    synchronize();
    s_->mpi.barrier();
  }

 private:
  struct State {
    Mpi mpi{MPI_COMM_WORLD};
    int device = 0;
    ncclComm_t comm = nullptr;
    cudaStream_t stream = nullptr;
    void* staging = nullptr;
    std::size_t staging_bytes = 0;
    ~State() {  // no throw from a destructor: statuses ignored on teardown
      if (staging) cudaFree(staging);
      if (stream) cudaStreamDestroy(stream);
      if (comm) ncclCommDestroy(comm);
    }
  };

  template <class T>
  void allreduce_dev(T* d, std::size_t n, ncclDataType_t t, const char* op) const {
    check_nccl(ncclAllReduce(d, d, n, t, ncclSum, s_->comm, s_->stream), op, s_->comm);
  }
  template <class T>
  void bcast_dev(T* d, std::size_t n, ncclDataType_t t, int root, const char* op) const {
    if (root < 0 || root >= size()) throw InvalidArgument(std::string(op) + ": root " + std::to_string(root) + " outside [0, " + std::to_string(size()) + ")");
    check_nccl(ncclBroadcast(d, d, n, t, root, s_->comm, s_->stream), op, s_->comm);
  }
  template <class T, class F>
  void host_op(T* h, std::size_t n, F&& f) const {
    if (n == 0) return;
    const std::size_t bytes = n * sizeof(T);
    if (bytes > s_->staging_bytes) {
      if (s_->staging) CACHESHRINK_NCCL_CUDA(cudaFree(s_->staging));
      s_->staging = nullptr;
      s_->staging_bytes = 0;
      CACHESHRINK_NCCL_CUDA(cudaMalloc(&s_->staging, bytes));
      s_->staging_bytes = bytes;
    }
    T* d = static_cast<T*>(s_->staging);
    CACHESHRINK_NCCL_CUDA(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s_->stream));
    f(d);
    CACHESHRINK_NCCL_CUDA(cudaMemcpyAsync(h, d, bytes, cudaMemcpyDeviceToHost, s_->stream));
    synchronize();
  }

  std::shared_ptr<State> s_;
};
static_assert(Communicator<Nccl>);

}  // namespace cacheshrink::dist

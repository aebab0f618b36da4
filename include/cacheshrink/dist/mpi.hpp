#pragma once
// Mpi: the CPU communicator over MPI (OpenMPI from Debian: openmpi-bin, libopenmpi-dev).
//
//   int main(int argc, char** argv) {
//     cacheshrink::dist::MpiSession mpi(&argc, &argv);   // MPI_Init_thread ... MPI_Finalize
//     cacheshrink::dist::Mpi comm;                        // MPI_COMM_WORLD
//     auto m = compression::convert(model, opts, calib, &report, comm);
//   }
//
// Every MPI call is checked; a failure throws dist::CommError naming the call and MPI's text
// (the communicators use MPI_ERRORS_RETURN so errors come back instead of aborting).
// Include only where MPI's headers exist (CMake: CACHESHRINK_WITH_MPI, target MPI::MPI_CXX).
#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <string>

#include "cacheshrink/dist/comm.hpp"

namespace cacheshrink::dist {

inline void check_mpi(int rc, const char* op) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw CommError(std::string("MPI error in ") + op + ": " + (len > 0 ? std::string(text, static_cast<std::size_t>(len)) : "code " + std::to_string(rc)));
}

/// True when a launcher (mpirun/mpiexec of OpenMPI, MPICH's Hydra, PMIx-based srun) started
/// this process; programs that also run alone (the CLI) initialise MPI only then.
inline bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

/// Scoped MPI_Init_thread (FUNNELED: only the main thread calls MPI) / MPI_Finalize. Does
/// nothing when MPI was already initialised by someone else (then they finalise it).
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv) {
    int inited = 0;
    check_mpi(MPI_Initialized(&inited), "MPI_Initialized");
    if (inited) return;
    int provided = 0;
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owner_ = true;
    check_mpi(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler(MPI_COMM_WORLD)");
  }
  ~MpiSession() {
    if (!owner_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();  // no throw from a destructor; nothing useful to do on failure
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  /// Ends every rank of MPI_COMM_WORLD (after an error on one rank, so the others do not wait
  /// forever in a collective).
  [[noreturn]] static void abort_all(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    std::abort();
  }

 private:
  bool owner_ = false;
};

/// CPU collectives over an MPI communicator (default MPI_COMM_WORLD; MPI must be initialised).
class Mpi {
 public:
  Mpi() : Mpi(MPI_COMM_WORLD) {}
  explicit Mpi(MPI_Comm comm) : comm_(comm) {
    int inited = 0;
    check_mpi(MPI_Initialized(&inited), "MPI_Initialized");
    if (!inited) throw CommError("dist::Mpi: MPI is not initialised (create a dist::MpiSession first, or run without MPI: dist::Single)");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm handle() const { return comm_; }

  void allreduce_sum(double* x, std::size_t n) const { allreduce(x, n, MPI_DOUBLE, "MPI_Allreduce(double, sum)"); }
  void allreduce_sum(float* x, std::size_t n) const { allreduce(x, n, MPI_FLOAT, "MPI_Allreduce(float, sum)"); }
  void broadcast(double* x, std::size_t n, int root) const { bcast(x, n, MPI_DOUBLE, root, "MPI_Bcast(double)"); }
  void broadcast(float* x, std::size_t n, int root) const { bcast(x, n, MPI_FLOAT, root, "MPI_Bcast(float)"); }
  void broadcast_bytes(void* x, std::size_t n, int root) const { bcast(static_cast<char*>(x), n, MPI_BYTE, root, "MPI_Bcast(bytes)"); }
  void barrier() const { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

 private:
  // MPI counts are int: long buffers go in chunks (a 7B layer's Gram is 16.7M doubles, fine,
  // but a flattened gradient of a 70B conversion can pass 2^31).
  static constexpr std::size_t kChunk = static_cast<std::size_t>(std::numeric_limits<int>::max() / 2);

  template <class T>
  void allreduce(T* x, std::size_t n, MPI_Datatype t, const char* op) const {
    if (size_ == 1) return;
    for (std::size_t i = 0; i < n; i += kChunk) {
      const int c = static_cast<int>(std::min(kChunk, n - i));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, x + i, c, t, MPI_SUM, comm_), op);
    }
  }
  template <class T>
  void bcast(T* x, std::size_t n, MPI_Datatype t, int root, const char* op) const {
    if (root < 0 || root >= size_) throw InvalidArgument(std::string(op) + ": root " + std::to_string(root) + " outside [0, " + std::to_string(size_) + ")");
    if (size_ == 1) return;
    for (std::size_t i = 0; i < n; i += kChunk) {
      const int c = static_cast<int>(std::min(kChunk, n - i));
      check_mpi(MPI_Bcast(x + i, c, t, root, comm_), op);
    }
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};
static_assert(Communicator<Mpi>);

}  // namespace cacheshrink::dist

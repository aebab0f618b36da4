#pragma once
// Multi-process runs of the CLI (docs/scaling.md): `mpirun -np N cacheshrink convert|train ...`.
// Built with MPI (CACHESHRINK_WITH_MPI) and started by a launcher, main() initialises MPI and
// cli::comm() is that world (dist::Mpi); otherwise it is dist::Single and nothing changes.
// Ranks above 0 print nothing on stdout and write no files; convert and train share their work,
// the other subcommands run on rank 0 alone. An error on any rank ends all ranks (MPI_Abort),
// so none waits forever in a collective.
#include <cacheshrink/dist/comm.hpp>
#include <cstdio>
#include <memory>
#ifdef CACHESHRINK_WITH_MPI
#include <cacheshrink/dist/mpi.hpp>
#endif

namespace cacheshrink::cli {

inline dist::AnyComm& comm_slot() {
  static dist::AnyComm c;
  return c;
}

/// The communicator of this run (dist::Single unless started by mpirun with MPI built in).
inline const dist::AnyComm& comm() { return comm_slot(); }

/// Lives for main(): MPI_Init/MPI_Finalize when a launcher started the program.
class MpiLaunch {
 public:
  MpiLaunch(int* argc, char*** argv) {
#ifdef CACHESHRINK_WITH_MPI
    if (!dist::launched_by_mpi()) return;
    session_ = std::make_unique<dist::MpiSession>(argc, argv);
    comm_slot() = dist::Mpi{};
    if (comm().rank() != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) std::fprintf(stderr, "warning: could not silence stdout\n");
#else
    (void)argc;
    (void)argv;
#endif
  }
  ~MpiLaunch() { comm_slot() = dist::AnyComm{}; }
  MpiLaunch(const MpiLaunch&) = delete;
  MpiLaunch& operator=(const MpiLaunch&) = delete;

 private:
#ifdef CACHESHRINK_WITH_MPI
  std::unique_ptr<dist::MpiSession> session_;
#endif
};

/// After printing an error: with several ranks, end them all with `code`.
inline void abort_other_ranks(int code) {
#ifdef CACHESHRINK_WITH_MPI
  if (comm().size() > 1) {
    std::fflush(stderr);
    dist::MpiSession::abort_all(code);
  }
#else
  (void)code;
#endif
}

}  // namespace cacheshrink::cli

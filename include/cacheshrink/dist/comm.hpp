#pragma once
// Communicator policies for running one job as several processes (ranks).
//
//   Single  one process; every collective is a no-op (the default everywhere, no dependency)
//   Mpi     CPU collectives over MPI (cacheshrink/dist/mpi.hpp; needs MPI, CACHESHRINK_WITH_MPI)
//   Nccl    GPU collectives over NCCL, bootstrapped through MPI (cacheshrink/dist/nccl.cuh; .cu only)
//
// A communicator is a cheap value (a handle); collectives are blocking and must be called by
// every rank in the same order. allreduce_sum leaves the same sum on every rank; with the
// commutative sum of the implementations we use (OpenMPI recursive doubling / ring, NCCL ring)
// the bits agree too, so ranks that feed it identical inputs stay identical afterwards.
#include <algorithm>
#include <concepts>
#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "cacheshrink/core/error.hpp"

namespace cacheshrink::dist {

/// An MPI or NCCL call failed; the message names the operation and the library's error text.
class CommError : public Error {
 public:
  using Error::Error;
};

template <class C>
concept Communicator = requires(const C& c, double* d, float* f, std::size_t n, int root) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  c.allreduce_sum(d, n);  // in place, host buffers
  c.allreduce_sum(f, n);
  c.broadcast(d, n, root);  // in place, from root to every rank
  c.broadcast(f, n, root);
  c.barrier();
};

/// One process: rank 0 of 1; collectives leave the buffers as they are.
struct Single {
  int rank() const { return 0; }
  int size() const { return 1; }
  void allreduce_sum(double*, std::size_t) const {}
  void allreduce_sum(float*, std::size_t) const {}
  void broadcast(double*, std::size_t, int) const {}
  void broadcast(float*, std::size_t, int) const {}
  void barrier() const {}
};
static_assert(Communicator<Single>);

/// Any communicator behind one type (a virtual call per collective), for programs that choose
/// at run time, like the CLI (dist::Mpi under mpirun, dist::Single otherwise): the templates
/// it feeds are then instantiated once. Default: Single.
class AnyComm {
 public:
  AnyComm() : AnyComm(Single{}) {}
  template <Communicator C>
    requires(!std::same_as<std::remove_cvref_t<C>, AnyComm>)
  AnyComm(C c) : p_(std::make_shared<const Impl<C>>(std::move(c))) {}  // NOLINT(google-explicit-constructor): a communicator converts

  int rank() const { return p_->rank(); }
  int size() const { return p_->size(); }
  void allreduce_sum(double* x, std::size_t n) const { p_->allreduce_sum(x, n); }
  void allreduce_sum(float* x, std::size_t n) const { p_->allreduce_sum(x, n); }
  void broadcast(double* x, std::size_t n, int root) const { p_->broadcast(x, n, root); }
  void broadcast(float* x, std::size_t n, int root) const { p_->broadcast(x, n, root); }
  void barrier() const { p_->barrier(); }

 private:
  struct Base {
    virtual ~Base() = default;
    virtual int rank() const = 0;
    virtual int size() const = 0;
    virtual void allreduce_sum(double*, std::size_t) const = 0;
    virtual void allreduce_sum(float*, std::size_t) const = 0;
    virtual void broadcast(double*, std::size_t, int) const = 0;
    virtual void broadcast(float*, std::size_t, int) const = 0;
    virtual void barrier() const = 0;
  };
  template <class C>
  struct Impl final : Base {
    explicit Impl(C c) : c_(std::move(c)) {}
    int rank() const override { return c_.rank(); }
    int size() const override { return c_.size(); }
    void allreduce_sum(double* x, std::size_t n) const override { c_.allreduce_sum(x, n); }
    void allreduce_sum(float* x, std::size_t n) const override { c_.allreduce_sum(x, n); }
    void broadcast(double* x, std::size_t n, int root) const override { c_.broadcast(x, n, root); }
    void broadcast(float* x, std::size_t n, int root) const override { c_.broadcast(x, n, root); }
    void barrier() const override { c_.barrier(); }
    C c_;
  };
  std::shared_ptr<const Base> p_;
};
static_assert(Communicator<AnyComm>);

/// Rank r's contiguous share [first, second) of n items split over `size` ranks: sizes differ
/// by at most one, lower ranks take the larger shares, an empty share when n < size.
inline std::pair<std::size_t, std::size_t> shard_range(std::size_t n, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size)
    throw InvalidArgument("shard_range: rank " + std::to_string(rank) + " outside a communicator of size " + std::to_string(size));
  const std::size_t p = static_cast<std::size_t>(size), r = static_cast<std::size_t>(rank);
  const std::size_t base = n / p, extra = n % p;
  const std::size_t first = r * base + std::min(r, extra);
  return {first, first + base + (r < extra ? 1 : 0)};
}

}  // namespace cacheshrink::dist

// dist::Nccl (issue #11, GPU half), run by CTest as `mpiexec -n 2 test_nccl`: collectives
// against closed-form results, and sharded conversion with NCCL as communicator against the
// one-process conversion. Needs one GPU per rank; skips (passes with a message) otherwise.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/dist/nccl.cuh>
#include <cacheshrink/linalg/principal_angles.hpp>
#include <cstdio>
#include <random>
#include <vector>

#include "test_support.hpp"

using namespace cacheshrink;

namespace {

bool enough_gpus(const dist::Mpi& mpi) {
  // The smallest device count over the ranks decides for all (no rank may skip alone).
  double fewest = -static_cast<double>(cuda::device_count());
  dist::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &fewest, 1, MPI_DOUBLE, MPI_MAX, mpi.handle()), "MPI_Allreduce(max)");
  return -fewest >= mpi.size();
}

}  // namespace

TEST_CASE("nccl: collectives on host and device buffers") {
  const dist::Mpi mpi;
  if (!enough_gpus(mpi)) {
    if (mpi.rank() == 0) MESSAGE("skipped: fewer CUDA devices than ranks (" << cuda::device_count() << " < " << mpi.size() << ")");
    return;
  }
  const dist::Nccl nccl(mpi);
  const int P = nccl.size(), r = nccl.rank();
  const std::size_t n = 1000;
  std::vector<double> h(n);
  for (std::size_t i = 0; i < n; ++i) h[i] = (r + 1) * 0.5 + static_cast<double>(i);
  nccl.allreduce_sum(h.data(), n);
  double err = 0;
  for (std::size_t i = 0; i < n; ++i) err = std::max(err, std::abs(h[i] - (0.25 * P * (P + 1) + static_cast<double>(P) * static_cast<double>(i))));
  CHECK(err == 0.0);

  std::vector<float> f(n, static_cast<float>(r + 7));
  float* d = nullptr;
  CACHESHRINK_NCCL_CUDA(cudaMalloc(&d, n * sizeof(float)));
  CACHESHRINK_NCCL_CUDA(cudaMemcpy(d, f.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  nccl.broadcast_device(d, n, P - 1);
  nccl.synchronize();
  CACHESHRINK_NCCL_CUDA(cudaMemcpy(f.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
  CACHESHRINK_NCCL_CUDA(cudaFree(d));
  CHECK(std::all_of(f.begin(), f.end(), [&](float x) { return x == static_cast<float>(P - 1 + 7); }));
  nccl.barrier();
}

TEST_CASE("nccl: sharded calibration gives the one-process latent bases") {
  const dist::Mpi mpi;
  if (!enough_gpus(mpi)) return;
  const dist::Nccl nccl(mpi);
  const auto m = model::load_model(test::model_dir("tiny-gpt2"));
  std::mt19937_64 rng(11);
  std::vector<std::vector<int>> calib(7);
  for (auto& s : calib) {
    s.resize(12 + rng() % 29);
    for (int& t : s) t = static_cast<int>(rng() % static_cast<std::uint64_t>(m.config.vocab_size));
  }
  compression::ConvertOptions o;
  o.compression_ratio = 4.0;
  const auto md = compression::convert(m, o, calib, nullptr, nccl);
  const auto ms = compression::convert(m, o, calib);
  double worst = 0;
  for (int l = 0; l < m.config.n_layers; ++l) {
    const linalg::Matrix<double> a = md.weights.layers[l].mla->w_up_k->cast<double>(), b = ms.weights.layers[l].mla->w_up_k->cast<double>();
    worst = std::max(worst, linalg::principal_angles(a, b).maxCoeff());
  }
  if (nccl.rank() == 0) std::printf("[nccl %d ranks] tiny-gpt2 convert: max principal angle %.3e rad\n", nccl.size(), worst);
  CHECK(worst < 1e-6);
}

int main(int argc, char** argv) {
  dist::MpiSession session(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  doctest::Context ctx(argc, argv);
  if (rank != 0) ctx.setOption("out", "/dev/null");
  int rc = ctx.run();
  if (ctx.shouldExit()) return rc;
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return rc;
}

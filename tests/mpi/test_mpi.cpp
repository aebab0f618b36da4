// Multi-process parity (issue #11), run by CTest as `mpiexec -n 2 test_mpi`: sharded
// calibration and data-parallel fine-tuning over dist::Mpi must reproduce the one-process
// results, which every rank recomputes itself with dist::Single in the same run.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/dist/mpi.hpp>
#include <cacheshrink/linalg/principal_angles.hpp>
#include <cacheshrink/model/weights.hpp>
#include <cacheshrink/train/trainer.hpp>
#include <cstdio>
#include <random>

#include "test_support.hpp"

using namespace cacheshrink;

namespace {

std::vector<std::vector<int>> random_seqs(int vocab, int count, int min_len, int max_len, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int>> s(static_cast<std::size_t>(count));
  for (auto& t : s) {
    t.resize(static_cast<std::size_t>(min_len + static_cast<int>(rng() % static_cast<std::uint64_t>(max_len - min_len + 1))));
    for (int& id : t) id = static_cast<int>(rng() % static_cast<std::uint64_t>(vocab));
  }
  return s;
}

double max_angle(const MatrixRf& a, const MatrixRf& b) {
  const linalg::Matrix<double> x = a.cast<double>(), y = b.cast<double>();
  return linalg::principal_angles(x, y).maxCoeff();
}

}  // namespace

TEST_CASE("mpi: sharded calibration gives the one-process latent bases") {
  const dist::Mpi comm;
  REQUIRE_MESSAGE(comm.size() >= 2, "run with mpiexec -n 2 (or more): one rank would compare a run with itself");
  for (const char* name : {"tiny-gpt2", "tiny-llama3"}) {
    CAPTURE(name);
    const auto m = model::load_model(test::model_dir(name));
    // 7 sequences: the shards differ in size (4 and 3 for two ranks).
    const auto calib = random_seqs(m.config.vocab_size, 7, 12, 40, 11);
    compression::ConvertOptions o;
    o.compression_ratio = 4.0;
    o.calibration_batch = 2;
    compression::ConversionReport rd, rs;
    const auto md = compression::convert(m, o, calib, &rd, comm);
    const auto ms = compression::convert(m, o, calib, &rs);  // dist::Single reference
    CHECK(rd.calibration_tokens == rs.calibration_tokens);
    double worst = 0, worst_down = 0;
    for (int l = 0; l < m.config.n_layers; ++l) {
      const auto& a = *md.weights.layers[l].mla;
      const auto& b = *ms.weights.layers[l].mla;
      worst = std::max({worst, max_angle(*a.w_up_k, *b.w_up_k), max_angle(*a.w_up_v, *b.w_up_v)});
      worst_down = std::max({worst_down, static_cast<double>((a.w_down_k - b.w_down_k).cwiseAbs().maxCoeff()),
                             static_cast<double>((a.w_down_v - b.w_down_v).cwiseAbs().maxCoeff())});
    }
    if (comm.rank() == 0)
      std::printf("[mpi %d ranks] %s convert: max principal angle %.3e rad, max |dW_down| %.3e\n", comm.size(), name, worst, worst_down);
    CHECK(worst < 1e-6);
    CHECK(worst_down < 1e-5);

    // The comparison discriminates: the Gram of one rank's shard alone gives other bases.
    const auto [first, last] = dist::shard_range(calib.size(), 0, comm.size());
    const std::vector<std::vector<int>> part(calib.begin() + static_cast<long>(first), calib.begin() + static_cast<long>(last));
    const auto mp = compression::convert(m, o, part);
    double part_angle = 0;
    for (int l = 0; l < m.config.n_layers; ++l)
      part_angle = std::max(part_angle, max_angle(*mp.weights.layers[l].mla->w_up_k, *ms.weights.layers[l].mla->w_up_k));
    CHECK(part_angle > 1e-3);
  }
}

TEST_CASE("mpi: data-parallel training with global batch 4 follows the one-process batch-4 trajectory") {
  const dist::Mpi comm;
  REQUIRE(comm.size() >= 2);
  const auto base = model::load_model(test::model_dir("tiny-llama3"));
  compression::ConvertOptions co;
  co.compression_ratio = 2.0;
  co.method = "separate";
  co.use_calibration = false;
  const auto converted = compression::convert(base, co, {});
  // 29 sequences: an epoch ends with a one-sequence batch (an empty share on rank 1).
  const auto seqs = random_seqs(base.config.vocab_size, 29, 4, 24, 5);
  train::TrainOptions o;
  o.batch_size = 4;
  o.epochs = 3;
  o.max_steps = 20;
  o.max_length = 32;
  o.euclidean_lr = 2e-3;
  o.riemannian_lr = 2e-3;
  o.warmup_steps = 0;
  o.schedule = "constant";
  o.recon_alpha = 0.3;  // LM (mean over predicted tokens) + recon (mean over tokens): both weightings matter
  o.max_grad_norm = 0.5;
  o.ortho_every = 0;

  // Scalar double: the parity measured is then that of the algorithm (shares, weights, sums), not
  // float32 rounding, which Adam amplifies at this lr (docs/scaling.md gives the float32 number).
  auto run = [&]<class S>(S, auto c, int batch) {
    auto mm = converted;
    auto oo = o;
    oo.batch_size = batch;
    train::MLATrainer<S, decltype(c)> t(mm, oo, c);
    auto stats = t.train(seqs);
    std::vector<linalg::Matrix<double>> params;
    for (const auto& p : t.graph().params()) params.emplace_back(p.value.template cast<double>());
    return std::make_pair(params, stats);
  };
  const auto [pd, sd] = run(double{}, comm, 4);
  const auto [ps, ss] = run(double{}, dist::Single{}, 4);
  const auto [p2, s2] = run(double{}, dist::Single{}, 2);  // what one rank alone would see
  REQUIRE(pd.size() == ps.size());
  REQUIRE(sd.steps.size() == 20);
  REQUIRE(ss.steps.size() == 20);
  double diff = 0, moved = 0, diff_b2 = 0, loss_diff = 0;
  for (std::size_t i = 0; i < pd.size(); ++i) {
    diff = std::max(diff, (pd[i] - ps[i]).cwiseAbs().maxCoeff());
    diff_b2 = std::max(diff_b2, (p2[i] - ps[i]).cwiseAbs().maxCoeff());
  }
  for (std::size_t s = 0; s < 20; ++s) {
    loss_diff = std::max(loss_diff, std::abs(sd.steps[s].loss - ss.steps[s].loss));
    CHECK(sd.steps[s].tokens == ss.steps[s].tokens);
  }
  moved = std::abs(ss.steps.front().loss - ss.steps.back().loss);
  // Every rank must hold the same parameters: compare a checksum's min and max over ranks.
  double sum = 0;
  for (const auto& p : pd) sum += p.sum();
  double lo = -sum, hi = sum;
  dist::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_DOUBLE, MPI_MAX, comm.handle()), "MPI_Allreduce(max)");
  dist::check_mpi(MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_DOUBLE, MPI_MAX, comm.handle()), "MPI_Allreduce(max)");
  if (comm.rank() == 0)
    std::printf("[mpi %d ranks] train 20 steps, global batch 4: max |param - 1-process| %.3e, max |loss diff| %.3e; "
                "1-process batch 2 vs 4: %.3e; loss %.4f -> %.4f\n",
                comm.size(), diff, loss_diff, diff_b2, ss.steps.front().loss, ss.steps.back().loss);
  CHECK(diff < 1e-5);
  CHECK(loss_diff < 1e-5);
  CHECK(diff_b2 > 1e-4);  // the tolerance separates the right batching from a wrong one
  CHECK(moved > 0);
  CHECK(-lo == hi);       // bitwise-equal checksums on all ranks
}

int main(int argc, char** argv) {
  dist::MpiSession mpi(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  doctest::Context ctx(argc, argv);
  if (rank != 0) ctx.setOption("out", "/dev/null");  // one report; failures still count below
  int rc = ctx.run();
  if (ctx.shouldExit()) return rc;
  MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return rc;
}

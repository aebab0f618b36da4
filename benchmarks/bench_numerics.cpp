// Numerical core timings: Stiefel retractions (QR / Cayley / polar), one RiemannianAdam step,
// and randomized vs exact truncated SVD (error reported as a counter), float32 on CPU.
//   ./bench_numerics --benchmark_min_time=0.05
#include <benchmark/benchmark.h>

#include <random>

#include "cacheshrink/linalg/linalg.hpp"
#include "cacheshrink/manifold/stiefel.hpp"
#include "cacheshrink/optim/optimizer.hpp"

namespace mf = cacheshrink::manifold;
namespace la = cacheshrink::linalg;
namespace optim = cacheshrink::optim;
using Mat = la::Matrix<float>;

namespace {

Mat gaussian(Eigen::Index r, Eigen::Index c, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Mat g(r, c);
  for (Eigen::Index j = 0; j < c; ++j)
    for (Eigen::Index i = 0; i < r; ++i) g(i, j) = normal(rng);
  return g;
}

// n in 128..4096, p = n/4 and n/16.
void stiefel_sizes(benchmark::internal::Benchmark* b) {
  for (long n : {128, 256, 512, 1024, 2048, 4096})
    for (long div : {4, 16}) b->Args({n, n / div});
  b->Unit(benchmark::kMillisecond);
}

template <class M>
void bm_retraction(benchmark::State& state) {
  const Eigen::Index n = state.range(0), p = state.range(1);
  std::mt19937_64 rng(1);
  const M m;
  const Mat x = m.random(n, p, rng);
  const Mat u = m.proju(x, Mat(1e-2f * gaussian(n, p, rng)));
  for (auto _ : state) {
    Mat y = m.retr(x, u);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["n"] = double(n);
  state.counters["p"] = double(p);
}

void BM_RetractQr(benchmark::State& s) { bm_retraction<mf::EuclideanStiefel<float>>(s); }
void BM_RetractCayley(benchmark::State& s) { bm_retraction<mf::CanonicalStiefel<float>>(s); }
void BM_RetractPolar(benchmark::State& s) {
  bm_retraction<mf::Stiefel<float, mf::EuclideanMetric, mf::PolarRetraction>>(s);
}

void BM_RiemannianAdamStep(benchmark::State& state) {
  const Eigen::Index n = state.range(0), p = state.range(1);
  std::mt19937_64 rng(2);
  const mf::EuclideanStiefel<float> st;
  Mat x = st.random(n, p, rng);
  const Mat g = gaussian(n, p, rng);
  optim::RiemannianAdamUpdate upd;
  upd.options.lr = 1e-4;
  optim::RiemannianAdam<float> opt(upd);
  opt.add("x", x, g, st);
  for (auto _ : state) {
    opt.step();
    benchmark::DoNotOptimize(x.data());
  }
  state.counters["n"] = double(n);
  state.counters["p"] = double(p);
}

BENCHMARK(BM_RetractQr)->Apply(stiefel_sizes);
BENCHMARK(BM_RetractCayley)->Apply(stiefel_sizes);
BENCHMARK(BM_RetractPolar)->Apply(stiefel_sizes);
BENCHMARK(BM_RiemannianAdamStep)->Apply(stiefel_sizes);

// (n, n) float matrix with singular values 0.9^j, rank k = 32 approximation.
// Counter rel_err = ||A - U S V^T||_F / ||A - A_k||_F (1 = optimal, Eckart-Young).
Mat decaying(Eigen::Index n, std::mt19937_64& rng) {
  Eigen::HouseholderQR<Mat> qu(gaussian(n, n, rng)), qv(gaussian(n, n, rng));
  la::Vector<float> s(n);
  for (Eigen::Index j = 0; j < n; ++j) s(j) = std::pow(0.9f, float(j));
  return Mat(qu.householderQ()) * s.asDiagonal() * Mat(qv.householderQ()).transpose();
}

double optimal_tail(Eigen::Index n, Eigen::Index k) {
  double t = 0;
  for (Eigen::Index j = k; j < n; ++j) t += std::pow(0.81, double(j));
  return std::sqrt(t);
}

void BM_SvdExact(benchmark::State& state) {
  const Eigen::Index n = state.range(0), k = 32;
  std::mt19937_64 rng(3);
  const Mat a = decaying(n, rng);
  la::SvdResult<float> r;
  for (auto _ : state) {
    r = la::truncated_svd(a, k);
    benchmark::DoNotOptimize(r.s.data());
  }
  state.counters["rel_err"] = double((a - r.reconstruct()).norm()) / optimal_tail(n, k);
}

void BM_SvdRandomized(benchmark::State& state) {
  const Eigen::Index n = state.range(0), k = 32;
  const int q = static_cast<int>(state.range(1));
  std::mt19937_64 rng(3);
  const Mat a = decaying(n, rng);
  la::SvdResult<float> r;
  for (auto _ : state) {
    r = la::randomized_svd(a, k, {.oversampling = 10, .power_iterations = q, .seed = 1});
    benchmark::DoNotOptimize(r.s.data());
  }
  state.counters["rel_err"] = double((a - r.reconstruct()).norm()) / optimal_tail(n, k);
  state.counters["q"] = q;
}

BENCHMARK(BM_SvdExact)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SvdRandomized)
    ->ArgsProduct({{256, 512, 1024}, {0, 2}})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

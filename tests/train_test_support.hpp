#pragma once
// Shared by test_train.cpp (gradient checks) and test_trainer.cpp (optimizer steps, training
// runs, checkpoints): random matrices, a directional finite-difference checker and a full-loss FD
// check; the seven fixture cases and random batches are train_cases.hpp's (shared with the GPU tests).
#include <doctest/doctest.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/train/train.hpp>
#include <random>

#include "test_support.hpp"
#include "train_cases.hpp"
#include "train_convert.hpp"

namespace cacheshrink::test::train_support {

using train::ops::MatR;
using train::ops::Vec;
using MatD = MatR<double>;
using VecD = Vec<double>;

inline MatD randn(int r, int c, std::mt19937_64& rng, double s = 1.0) {
  std::normal_distribution<double> nd(0.0, s);
  MatD m(r, c);
  for (int i = 0; i < r; ++i)
    for (int j = 0; j < c; ++j) m(i, j) = nd(rng);
  return m;
}
inline VecD randv(int n, std::mt19937_64& rng, double s = 1.0, double mean = 0.0) {
  std::normal_distribution<double> nd(mean, s);
  VecD v(n);
  for (int i = 0; i < n; ++i) v(i) = nd(rng);
  return v;
}

/// Checks the analytic input gradient dx of f at x (f(x) = <dy, y(x)>) along random directions.
template <class F, class G>
void check_op(const char* name, const MatD& x, F&& f, G&& analytic_dx, std::mt19937_64& rng, int dirs = 3) {
  const MatD dx = analytic_dx(x);
  for (int d = 0; d < dirs; ++d) {
    MatD D = randn(static_cast<int>(x.rows()), static_cast<int>(x.cols()), rng);
    D /= D.norm();
    const double eps = 1e-5;
    const double num = (f(MatD(x + eps * D)) - f(MatD(x - eps * D))) / (2 * eps);
    const double ana = (dx.array() * D.array()).sum();
    INFO(name << " direction " << d << ": analytic " << ana << " numeric " << num);
    CHECK(std::abs(ana - num) <= 1e-6 * std::max(1.0, std::abs(ana)));
  }
}

/// The case's fixture from the test fixtures (train_convert.hpp).
inline model::Model converted(const Case& cs) { return converted(cacheshrink::test::fixtures() / "models", cs); }

/// Directional FD check of the full loss w.r.t. every parameter of the graph.
inline void check_full_loss(train::TrainGraph<double>& g, const std::vector<std::vector<int>>& seqs, const train::LossOptions& lo,
                     const MatD* teacher, int dirs, std::uint64_t seed) {
  g.zero_grad();
  g.forward_backward(seqs, lo, 1.0, teacher);
  std::mt19937_64 rng(seed);
  for (auto& p : g.params()) {
    const linalg::Matrix<double> grad = p.grad;
    for (int d = 0; d < dirs; ++d) {
      linalg::Matrix<double> D(p.value.rows(), p.value.cols());
      std::normal_distribution<double> nd;
      for (Eigen::Index i = 0; i < D.size(); ++i) D.data()[i] = nd(rng);
      D /= D.norm();
      const double eps = 1e-5;
      const linalg::Matrix<double> x0 = p.value;
      p.value = x0 + eps * D;
      const double lp = g.forward_backward(seqs, lo, 0.0, teacher).total;
      p.value = x0 - eps * D;
      const double lm = g.forward_backward(seqs, lo, 0.0, teacher).total;
      p.value = x0;
      const double num = (lp - lm) / (2 * eps);
      const double ana = (grad.array() * D.array()).sum();
      INFO(p.name << " dir " << d << ": analytic " << ana << " numeric " << num);
      CHECK(std::abs(ana - num) <= 2e-6 * std::abs(ana) + 1e-9);
    }
  }
}

}  // namespace cacheshrink::test::train_support

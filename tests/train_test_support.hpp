#pragma once
// Shared by test_train.cpp (gradient checks) and test_trainer.cpp (optimizer steps, training
// runs, checkpoints): random matrices, a directional finite-difference checker, the seven
// fixture conversions the training tests use and a full-loss FD check.
#include <doctest/doctest.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/train/train.hpp>
#include <random>

#include "test_support.hpp"

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

struct Case {
  const char* model;
  const char* method;
  int group = 0;        // xkv group size (0: default)
  int skip = 0;         // xkv early layers kept original
  int window = 0;       // > 0: override the sliding window to exercise the mask
};

inline model::Model converted(const Case& cs) {
  auto m = model::load_model(cacheshrink::test::model_dir(cs.model));
  compression::ConvertOptions o;
  o.compression_ratio = 2.0;
  o.method = cs.method;
  o.use_calibration = false;
  if (cs.group) o.cross_layer_group_size = cs.group;
  if (cs.skip) {
    o.xkv_skip_early_layers = cs.skip;
    o.keep_early_layers_original = true;
  }
  auto mm = compression::convert(m, o, {});
  if (cs.window) mm.config.sliding_window = cs.window;
  return mm;
}

inline std::vector<std::vector<int>> random_seqs(int vocab, std::vector<int> lens, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int>> s;
  for (int n : lens) {
    std::vector<int> t(static_cast<std::size_t>(n));
    for (auto& id : t) id = static_cast<int>(rng() % static_cast<std::uint64_t>(vocab));
    s.push_back(std::move(t));
  }
  return s;
}

inline const std::vector<Case> kCases = {
    {"tiny-gpt2", "separate"},          {"tiny-llama2", "joint"},      {"tiny-llama3", "xkv", 2},
    {"tiny-qwen2", "xkv", 0, 1},        {"tiny-mistral", "xkv", 0, 0, 5}, {"tiny-mqa", "separate"},
    {"tiny-qwen3", "joint"},
};

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

#pragma once
// Streaming second-moment statistics for calibrated initialization.
//
// Calibration streams activation batches X_b (rows = tokens, cols = d) and needs the top
// eigenvectors of  G = sum_b X_b^T X_b  (or of the centered scatter  sum (x - mu)(x - mu)^T)
// without keeping any X_b. Batches may be float32; everything is accumulated in float64
// because d^2 sums over ~10^5..10^7 tokens lose digits quickly in float32.
//
// Centering uses a shift: with c = the mean of the first batch, we accumulate
// Gc = sum (x - c)(x - c)^T and sc = sum (x - c); then scatter = Gc - sc sc^T / n. This
// avoids the cancellation of the textbook  sum x x^T - n mu mu^T  when |mu| >> spread.
#include <cstdint>
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/eigen.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

enum class Centering { None, Mean };

/// Top-k eigenpairs of an accumulated statistic plus how much of its trace they capture.
struct PrincipalSubspace {
  Vector<double> values;   // (k) eigenvalues, descending
  Matrix<double> vectors;  // (d, k) orthonormal eigenvectors
  Vector<double> energy;   // (k) energy(r) = (values(0) + ... + values(r)) / trace
  double trace = 0.0;      // trace of the statistic
};

class GramAccumulator {
 public:
  explicit GramAccumulator(Eigen::Index dim, Centering centering = Centering::None)
      : dim_(dim), centering_(centering) {
    CACHESHRINK_CHECK(dim >= 1, InvalidArgument,
                      "GramAccumulator: dim must be >= 1, got " + std::to_string(dim));
    gram_.setZero(dim, dim);
    sum_.setZero(dim);
    shift_.setZero(dim);
  }

  Eigen::Index dim() const { return dim_; }
  std::int64_t count() const { return count_; }
  Centering centering() const { return centering_; }

  /// batch: (rows, dim), float or double; converted to float64 before accumulating.
  template <class Derived>
  void add(const Eigen::MatrixBase<Derived>& batch) {
    CACHESHRINK_CHECK(batch.cols() == dim_, InvalidArgument,
                      "GramAccumulator::add: batch has " + std::to_string(batch.cols()) +
                          " columns, expected dim=" + std::to_string(dim_));
    if (batch.rows() == 0) return;
    Matrix<double> x = batch.template cast<double>();  // (rows, dim)
    if (centering_ == Centering::Mean) {
      if (count_ == 0) shift_ = x.colwise().mean().transpose();
      x.rowwise() -= shift_.transpose();
    }
    // Only the lower triangle is updated; statistic() mirrors it.
    gram_.selfadjointView<Eigen::Lower>().rankUpdate(x.transpose());
    sum_ += x.colwise().sum().transpose();
    count_ += batch.rows();
  }

  /// Mean of all rows seen so far, (dim).
  Vector<double> mean() const {
    CACHESHRINK_CHECK(count_ > 0, InvalidArgument, "GramAccumulator::mean: no rows added");
    return shift_ + sum_ / static_cast<double>(count_);
  }

  /// The matrix whose eigenvectors calibration uses, (dim, dim), symmetric:
  ///   Centering::None -> sum x x^T;   Centering::Mean -> sum (x - mu)(x - mu)^T.
  Matrix<double> statistic() const {
    Matrix<double> s = gram_.selfadjointView<Eigen::Lower>();
    if (centering_ == Centering::Mean && count_ > 0)
      s.noalias() -= (sum_ * sum_.transpose()) / static_cast<double>(count_);
    return s;
  }

  /// statistic() / count: the (uncentered) second moment or the (population) covariance.
  Matrix<double> covariance() const {
    CACHESHRINK_CHECK(count_ > 0, InvalidArgument, "GramAccumulator::covariance: no rows added");
    return statistic() / static_cast<double>(count_);
  }

  /// Top-k eigenvectors of statistic() and the cumulative captured-trace fraction per rank.
  PrincipalSubspace top_k(Eigen::Index k) const {
    CACHESHRINK_CHECK(count_ > 0, InvalidArgument, "GramAccumulator::top_k: no rows added");
    const Matrix<double> s = statistic();
    SymmetricEigenResult<double> eig = symmetric_eigen(s, k);
    PrincipalSubspace out;
    out.trace = s.trace();
    out.values = std::move(eig.values);
    out.vectors = std::move(eig.vectors);
    out.energy.resize(out.values.size());
    double acc = 0.0;
    for (Eigen::Index i = 0; i < out.values.size(); ++i) {
      acc += out.values(i);
      out.energy(i) = out.trace > 0.0 ? acc / out.trace : 0.0;
    }
    return out;
  }

  /// Adds another accumulator's rows (e.g. from another thread); same dim and centering.
  void merge(const GramAccumulator& other) {
    CACHESHRINK_CHECK(other.dim_ == dim_ && other.centering_ == centering_, InvalidArgument,
                      "GramAccumulator::merge: dim/centering mismatch");
    if (other.count_ == 0) return;
    if (count_ == 0) {
      *this = other;
      return;
    }
    if (centering_ == Centering::None) {
      gram_ += other.gram_;
      sum_ += other.sum_;
    } else {
      // Re-express other's sums around our shift: x - c = (x - c') + (c' - c), delta = c' - c.
      const Vector<double> delta = other.shift_ - shift_;
      const double m = static_cast<double>(other.count_);
      Matrix<double> g = other.gram_.selfadjointView<Eigen::Lower>();
      g += other.sum_ * delta.transpose() + delta * other.sum_.transpose() +
           m * delta * delta.transpose();
      gram_ += g;  // only the lower triangle is ever read
      sum_ += other.sum_ + m * delta;
    }
    count_ += other.count_;
  }

 private:
  Eigen::Index dim_;
  Centering centering_;
  std::int64_t count_ = 0;
  Matrix<double> gram_;  // (dim, dim), lower triangle valid: sum (x - shift)(x - shift)^T
  Vector<double> sum_;   // (dim): sum (x - shift)
  Vector<double> shift_; // (dim): zero for Centering::None
};

}  // namespace cacheshrink::linalg

#pragma once
// R^{n x p} as a (flat) manifold: every operation is the identity / plain addition, and
// component_inner is elementwise, so RiemannianAdam on Euclidean parameters is exactly Adam
// (with L2 weight decay), as in geoopt with its default Euclidean manifold.
#include <cmath>
#include <random>
#include <string_view>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/manifold/concept.hpp"

namespace cacheshrink::manifold {

template <RealScalar Scalar_>
class Euclidean {
 public:
  using Scalar = Scalar_;
  using Mat = Matrix<Scalar>;

  static constexpr std::string_view name() { return "Euclidean"; }

  Mat projx(const Mat& x) const { return x; }
  Mat proju(const Mat& /*x*/, const Mat& u) const { return u; }
  Mat egrad2rgrad(const Mat& /*x*/, const Mat& g) const { return g; }
  Mat retr(const Mat& x, const Mat& u) const { return x + u; }
  Mat transp(const Mat& /*x*/, const Mat& /*y*/, const Mat& v) const { return v; }
  std::pair<Mat, Mat> retr_transp(const Mat& x, const Mat& u, const Mat& v) const {
    return {x + u, v};
  }
  Scalar inner(const Mat& /*x*/, const Mat& u, const Mat& v) const {
    return u.cwiseProduct(v).sum();
  }
  Mat component_inner(const Mat& /*x*/, const Mat& u) const { return u.cwiseProduct(u); }

  /// Standard normal entries.
  Mat random(Eigen::Index rows, Eigen::Index cols, Rng& rng) const {
    std::normal_distribution<double> normal(0.0, 1.0);
    Mat x(rows, cols);
    for (Eigen::Index j = 0; j < cols; ++j)
      for (Eigen::Index i = 0; i < rows; ++i) x(i, j) = static_cast<Scalar>(normal(rng));
    return x;
  }

  CheckResult check_shape(Eigen::Index rows, Eigen::Index cols) const {
    if (rows < 0 || cols < 0) return {false, 0.0, "Euclidean: negative shape"};
    return {};
  }
  CheckResult check_point(const Mat& x, Tolerance = {}) const {
    if (!x.allFinite()) return {false, INFINITY, "Euclidean: point has non-finite entries"};
    return {};
  }
  CheckResult check_vector(const Mat& x, const Mat& u, Tolerance = {}) const {
    if (u.rows() != x.rows() || u.cols() != x.cols())
      return {false, INFINITY,
              "Euclidean: vector shape " + detail::shape_str(u.rows(), u.cols()) +
                  " != point shape " + detail::shape_str(x.rows(), x.cols())};
    if (!u.allFinite()) return {false, INFINITY, "Euclidean: vector has non-finite entries"};
    return {};
  }
};

}  // namespace cacheshrink::manifold

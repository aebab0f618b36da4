#pragma once
// Truncated SVD (exact: Eigen's divide-and-conquer BDCSVD) and randomized SVD
// (Halko, Martinsson, Tropp 2011, Alg. 4.4: Gaussian sketch with oversampling, power
// iterations with re-orthonormalization after every multiplication, then an exact SVD of the
// small projected matrix).
//
// Shapes: a (m, n); result u (m, k), s (k) descending, v (n, k); a ~= u diag(s) v^T.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/qr.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

template <class Scalar>
struct SvdResult {
  Matrix<Scalar> u;  // (m, k), orthonormal columns
  Vector<Scalar> s;  // (k), descending, >= 0
  Matrix<Scalar> v;  // (n, k), orthonormal columns

  /// u diag(s) v^T, (m, n).
  Matrix<Scalar> reconstruct() const { return u * s.asDiagonal() * v.transpose(); }
};

namespace detail {
inline void check_rank(Eigen::Index k, Eigen::Index m, Eigen::Index n, const char* who) {
  CACHESHRINK_CHECK(k >= 1 && k <= std::min(m, n), InvalidArgument,
                    std::string(who) + ": rank k=" + std::to_string(k) +
                        " must be in [1, min(rows, cols)] = [1, " +
                        std::to_string(std::min(m, n)) + "] for a (" + std::to_string(m) +
                        " x " + std::to_string(n) + ") matrix");
}
}  // namespace detail

/// Exact rank-k truncated SVD (k = 0 means full thin SVD). BDCSVD falls back to one-sided
/// Jacobi below 16 columns, so small problems are as accurate as JacobiSVD.
template <class Derived>
SvdResult<typename Derived::Scalar> truncated_svd(const Eigen::MatrixBase<Derived>& a,
                                                  Eigen::Index k = 0) {
  using Scalar = typename Derived::Scalar;
  const Eigen::Index m = a.rows(), n = a.cols();
  if (k == 0) k = std::min(m, n);
  detail::check_rank(k, m, n, "truncated_svd");
  Eigen::BDCSVD<Matrix<Scalar>> svd(a.derived(), Eigen::ComputeThinU | Eigen::ComputeThinV);
  CACHESHRINK_CHECK(svd.info() == Eigen::Success, NumericalError,
                    "truncated_svd: BDCSVD did not converge on a (" + std::to_string(m) + " x " +
                        std::to_string(n) + ") matrix");
  SvdResult<Scalar> out;
  out.u = svd.matrixU().leftCols(k);
  out.s = svd.singularValues().head(k);
  out.v = svd.matrixV().leftCols(k);
  return out;
}

struct RandomizedSvdOptions {
  Eigen::Index oversampling = 10;  // extra sketch columns p; Halko recommends 5..10
  int power_iterations = 2;        // q; each one multiplies by (A A^T) and re-orthonormalizes
  std::uint64_t seed = 0;          // the Gaussian test matrix comes from mt19937_64(seed)
};

/// Randomized rank-k SVD. Sketch width l = min(k + oversampling, min(m, n)).
/// Cost O(m n l (2q + 2)) + O((m + n) l^2) instead of O(m n min(m, n)).
/// With q power iterations, with probability >= 1 - 6 p^-p (Halko Eq. 1.9 + Thm. 9.2):
///   ||A - Q Q^T A||_2 <= (1 + 11 sqrt(k + p) sqrt(min(m, n)))^(1/(2q+1)) sigma_{k+1}.
template <class Derived>
SvdResult<typename Derived::Scalar> randomized_svd(const Eigen::MatrixBase<Derived>& a,
                                                   Eigen::Index k,
                                                   const RandomizedSvdOptions& opt = {}) {
  using Scalar = typename Derived::Scalar;
  const Eigen::Index m = a.rows(), n = a.cols();
  detail::check_rank(k, m, n, "randomized_svd");
  CACHESHRINK_CHECK(opt.oversampling >= 0, InvalidArgument,
                    "randomized_svd: oversampling must be >= 0, got " +
                        std::to_string(opt.oversampling));
  CACHESHRINK_CHECK(opt.power_iterations >= 0, InvalidArgument,
                    "randomized_svd: power_iterations must be >= 0, got " +
                        std::to_string(opt.power_iterations));
  const Eigen::Index l = std::min(k + opt.oversampling, std::min(m, n));

  std::mt19937_64 rng(opt.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<Scalar> omega(n, l);  // (n, l) Gaussian test matrix
  for (Eigen::Index j = 0; j < l; ++j)
    for (Eigen::Index i = 0; i < n; ++i) omega(i, j) = static_cast<Scalar>(normal(rng));

  // Q: (m, l) orthonormal basis of range(A Omega); re-orthonormalize after every product so
  // the small singular directions are not lost to rounding (Halko Alg. 4.4).
  Matrix<Scalar> q = orthonormalize(Matrix<Scalar>(a.derived() * omega));
  for (int it = 0; it < opt.power_iterations; ++it) {
    Matrix<Scalar> z = orthonormalize(Matrix<Scalar>(a.derived().transpose() * q));  // (n, l)
    q = orthonormalize(Matrix<Scalar>(a.derived() * z));
  }
  Matrix<Scalar> b = q.transpose() * a.derived();  // (l, n)
  SvdResult<Scalar> small = truncated_svd(b, k);
  small.u = q * small.u;  // (m, k)
  return small;
}

}  // namespace cacheshrink::linalg

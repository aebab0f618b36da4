#pragma once
// Symmetric eigendecomposition, eigenvalues in descending order (the order the calibration
// code wants: the top-k eigenvectors of a covariance are its first k columns).
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

template <class Scalar>
struct SymmetricEigenResult {
  Vector<Scalar> values;   // (k), descending
  Matrix<Scalar> vectors;  // (d, k), orthonormal columns; vectors.col(i) pairs with values(i)
};

/// Top-k eigenpairs of the symmetric matrix s (d, d); only the lower triangle is read.
/// k = 0 means all d. Each eigenvector's sign is fixed so that its largest-magnitude entry is
/// positive, which makes results reproducible across Eigen versions and platforms.
template <class Derived>
SymmetricEigenResult<typename Derived::Scalar> symmetric_eigen(
    const Eigen::MatrixBase<Derived>& s, Eigen::Index k = 0) {
  using Scalar = typename Derived::Scalar;
  const Eigen::Index d = s.rows();
  CACHESHRINK_CHECK(s.rows() == s.cols(), InvalidArgument,
                    "symmetric_eigen: expected a square matrix, got (" + std::to_string(s.rows()) +
                        " x " + std::to_string(s.cols()) + ")");
  if (k == 0) k = d;
  CACHESHRINK_CHECK(k >= 1 && k <= d, InvalidArgument,
                    "symmetric_eigen: k=" + std::to_string(k) + " must be in [1, " +
                        std::to_string(d) + "]");
  Eigen::SelfAdjointEigenSolver<Matrix<Scalar>> es(s.derived(), Eigen::ComputeEigenvectors);
  CACHESHRINK_CHECK(es.info() == Eigen::Success, NumericalError,
                    "symmetric_eigen: eigensolver did not converge on a (" + std::to_string(d) +
                        " x " + std::to_string(d) + ") matrix");
  SymmetricEigenResult<Scalar> out;
  out.values = es.eigenvalues().reverse().head(k);  // Eigen returns ascending
  out.vectors = es.eigenvectors().rowwise().reverse().leftCols(k);
  for (Eigen::Index j = 0; j < k; ++j) {
    Eigen::Index imax = 0;
    out.vectors.col(j).cwiseAbs().maxCoeff(&imax);
    if (out.vectors(imax, j) < Scalar(0)) out.vectors.col(j) = -out.vectors.col(j);
  }
  return out;
}

}  // namespace cacheshrink::linalg

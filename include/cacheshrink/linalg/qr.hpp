#pragma once
// Thin QR with a sign convention that makes the factorisation unique: diag(R) >= 0.
// This is the Stiefel QR retraction's building block (geoopt flips columns of Q by
// sign(sign(diag R) + 0.5), i.e. a zero diagonal entry counts as positive; we do the same).
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

template <class Scalar>
struct QrResult {
  Matrix<Scalar> q;  // (n, p), orthonormal columns
  Matrix<Scalar> r;  // (p, p), upper triangular, diag >= 0
};

/// a: (n, p) with n >= p. Householder QR, then columns of Q / rows of R flipped so that
/// diag(R) >= 0. For full-rank a the result is the unique thin QR with positive diagonal.
template <class Derived>
QrResult<typename Derived::Scalar> qr_positive(const Eigen::MatrixBase<Derived>& a) {
  using Scalar = typename Derived::Scalar;
  const Eigen::Index n = a.rows(), p = a.cols();
  CACHESHRINK_CHECK(n >= p, InvalidArgument,
                    "qr_positive: expected rows >= cols, got (" + std::to_string(n) + ", " +
                        std::to_string(p) + ")");
  Eigen::HouseholderQR<Matrix<Scalar>> qr(a.derived());
  QrResult<Scalar> out;
  out.q = qr.householderQ() * Matrix<Scalar>::Identity(n, p);
  out.r = qr.matrixQR().topRows(p).template triangularView<Eigen::Upper>();
  for (Eigen::Index j = 0; j < p; ++j) {
    if (out.r(j, j) < Scalar(0)) {
      out.q.col(j) = -out.q.col(j);
      out.r.row(j) = -out.r.row(j);
    }
  }
  return out;
}

/// Only the Q factor of qr_positive (what the retraction needs).
template <class Derived>
Matrix<typename Derived::Scalar> orthonormalize(const Eigen::MatrixBase<Derived>& a) {
  return qr_positive(a).q;
}

}  // namespace cacheshrink::linalg

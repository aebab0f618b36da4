#pragma once
// Polar factor: the orthonormal matrix closest to a in Frobenius norm.
// a = U S V^T (thin SVD)  =>  polar(a) = U V^T. Computed as a = Q R (thin QR, O(n p^2)), then
// the small SVD R = Ur S V^T (O(p^3)), polar = Q Ur V^T; this equals U V^T from the SVD of a
// and is what geoopt's Stiefel.projx returns (unique when a has full column rank).
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/qr.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

template <class Derived>
Matrix<typename Derived::Scalar> polar(const Eigen::MatrixBase<Derived>& a) {
  using Scalar = typename Derived::Scalar;
  if (a.rows() < a.cols()) {
    Matrix<Scalar> t = a.transpose();
    return polar(t).transpose();
  }
  const QrResult<Scalar> qr = qr_positive(a);
  Eigen::BDCSVD<Matrix<Scalar>> svd(qr.r, Eigen::ComputeFullU | Eigen::ComputeFullV);
  CACHESHRINK_CHECK(svd.info() == Eigen::Success, NumericalError,
                    "polar: SVD of the (" + std::to_string(a.cols()) + " x " +
                        std::to_string(a.cols()) + ") R factor did not converge");
  return qr.q * (svd.matrixU() * svd.matrixV().transpose());
}

}  // namespace cacheshrink::linalg

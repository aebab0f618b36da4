#pragma once
// Principal angles between the column spaces of a (n, ka) and b (n, kb), ascending, k =
// min(ka, kb) of them. Small angles come from sines (Knyazev & Argentati 2002): acos of a
// cosine near 1 only resolves angles down to ~sqrt(eps) ~ 1e-8, which is too coarse for
// subspace-equality tests at 1e-6..1e-12.
#include <algorithm>
#include <cmath>
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/qr.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::linalg {

template <class DerivedA, class DerivedB>
Vector<typename DerivedA::Scalar> principal_angles(const Eigen::MatrixBase<DerivedA>& a,
                                                   const Eigen::MatrixBase<DerivedB>& b) {
  using Scalar = typename DerivedA::Scalar;
  CACHESHRINK_CHECK(a.rows() == b.rows(), InvalidArgument,
                    "principal_angles: row counts differ (" + std::to_string(a.rows()) + " vs " +
                        std::to_string(b.rows()) + ")");
  Matrix<Scalar> qa = orthonormalize(a), qb = orthonormalize(b);
  if (qa.cols() < qb.cols()) std::swap(qa, qb);  // qb: the smaller subspace, k columns
  const Eigen::Index k = qb.cols();
  Matrix<Scalar> c = qa.transpose() * qb;  // (ka, k): cosines are its singular values
  Eigen::JacobiSVD<Matrix<Scalar>> svd_cos(c);
  Matrix<Scalar> r = qb - qa * c;  // (n, k): component of span(b) outside span(a); sines
  Eigen::JacobiSVD<Matrix<Scalar>> svd_sin(r);
  Vector<Scalar> cosines = svd_cos.singularValues();  // descending -> angles ascending
  Vector<Scalar> sines = svd_sin.singularValues();    // descending -> angles descending
  Vector<Scalar> angles(k);
  const Scalar half = Scalar(1) / std::sqrt(Scalar(2));
  for (Eigen::Index i = 0; i < k; ++i) {
    const Scalar cs = std::min(cosines(i), Scalar(1));
    const Scalar sn = std::min(sines(k - 1 - i), Scalar(1));
    angles(i) = cs > half ? std::asin(sn) : std::acos(cs);
  }
  return angles;
}

}  // namespace cacheshrink::linalg

#pragma once
// Dense matrix aliases shared by linalg/, manifold/ and optim/. Everything is column-major
// Eigen with dynamic sizes; Scalar is float or double.
#include <Eigen/Dense>
#include <type_traits>

namespace cacheshrink::linalg {

template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// float or double: the scalar types the numerical core is instantiated and tested for.
template <class T>
concept RealScalar = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace cacheshrink::linalg

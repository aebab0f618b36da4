#pragma once
// Eigen aliases used across the CPU runtime. Activations and weights are row-major so a
// token's features are contiguous and HF weights (out, in) map without transposition.
#include <Eigen/Core>

namespace cacheshrink {

template <class Scalar>
using MatrixR = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Scalar>
using VectorX = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

using MatrixRf = MatrixR<float>;
using VectorXf = VectorX<float>;
using MatrixRd = MatrixR<double>;

}  // namespace cacheshrink

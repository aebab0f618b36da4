#pragma once
// Global gradient-norm clipping with torch.nn.utils.clip_grad_norm_ semantics (norm_type 2):
//   total = sqrt(sum_i ||g_i||_F^2);  coef = min(1, max_norm / (total + 1e-6));  g_i *= coef.
// Like torch, the gradients are always multiplied by coef (a no-op factor 1 when not clipped).
// The norm is accumulated in float64 also for float gradients.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <span>
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::optim {

/// Returns the total norm before clipping. error_if_nonfinite: throw NumericalError when the
/// total norm is NaN/inf (torch's flag); otherwise such gradients are scaled like torch does.
template <class Scalar>
double clip_grad_norm(std::span<linalg::Matrix<Scalar>* const> grads, double max_norm,
                      bool error_if_nonfinite = false) {
  CACHESHRINK_CHECK(max_norm > 0.0, InvalidArgument,
                    "clip_grad_norm: max_norm must be > 0, got " + std::to_string(max_norm));
  double sq = 0.0;
  for (const auto* g : grads)
    if (g != nullptr) sq += g->template cast<double>().squaredNorm();
  const double total = std::sqrt(sq);
  CACHESHRINK_CHECK(!error_if_nonfinite || std::isfinite(total), NumericalError,
                    "clip_grad_norm: total gradient norm is non-finite");
  const double coef = std::min(1.0, max_norm / (total + 1e-6));
  for (auto* g : grads)
    if (g != nullptr) *g *= static_cast<Scalar>(coef);
  return total;
}

template <class Scalar>
double clip_grad_norm(std::initializer_list<linalg::Matrix<Scalar>*> grads, double max_norm,
                      bool error_if_nonfinite = false) {
  return clip_grad_norm<Scalar>(std::span<linalg::Matrix<Scalar>* const>(grads.begin(), grads.size()),
                                max_norm, error_if_nonfinite);
}

}  // namespace cacheshrink::optim

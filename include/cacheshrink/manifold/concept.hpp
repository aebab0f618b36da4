#pragma once
// The Manifold concept: what an optimizer needs from a constraint set embedded in R^{n x p}.
//
// A model M (stateless; shapes come from the arguments) provides, for x on M and u, v in the
// tangent space T_x M:
//   projx(x)               a point of M near x (for Stiefel the polar factor U V^T);
//   proju(x, u)            orthogonal projection of an ambient u onto T_x M;
//   egrad2rgrad(x, g)      Riemannian gradient for the model's metric, from the Euclidean one;
//   retr(x, u)             retraction R_x(u);
//   transp(x, y, v)        vector transport of v in T_x to T_y;
//   retr_transp(x, u, v)   (R_x(u), v transported along that step) in one call;
//   inner(x, u, v)         the metric <u, v>_x;
//   component_inner(x, u)  what Adam's second moment accumulates: a (1, 1) matrix <u, u>_x for
//                          a matrix manifold, the elementwise square u .* u for Euclidean;
//   random(rows, cols, rng) a random point;
//   check_point / check_vector / check_shape  membership tests with tolerances.
//
// Axioms every model satisfies (manifold/check_axioms.hpp tests them over seeded random
// trials; tests/test_manifold.cpp runs it for every model, float and double):
//   (A1) projx(x) is on M; projx(projx(x)) = projx(x); projx(x) = x for x on M.
//   (A2) proju(x, u) is tangent; proju(x, proju(x, u)) = proju(x, u).
//   (A3) egrad2rgrad(x, g) is tangent and <egrad2rgrad(x, g), w>_x = <g, w>_F for every
//        tangent w (the definition of the Riemannian gradient).
//   (A4) retr(x, 0) = x; retr(x, u) is on M; d/dt retr(x, t u) at t = 0 equals u.
//   (A5) transp(x, y, v) is tangent at y; retr_transp(x, u, v) = (retr(x, u), w) with w
//        tangent at retr(x, u), and w = v when u = 0.
//   (A6) inner is symmetric and positive definite on T_x M.
// For Stiefel St(n, p) = {x in R^{n x p} : x^T x = I_p}, T_x = {u : x^T u + u^T x = 0}.
#include <concepts>
#include <random>
#include <string>
#include <string_view>
#include <utility>

#include "cacheshrink/linalg/types.hpp"

namespace cacheshrink::manifold {

using linalg::Matrix;
using linalg::RealScalar;

/// Outcome of a membership check: ok, the measured error (max abs entry of the residual) and a
/// message that says what failed.
struct CheckResult {
  bool ok = true;
  double error = 0.0;
  std::string reason;
  explicit operator bool() const { return ok; }
};

/// Residual r passes when max|r| <= atol + rtol * reference (geoopt's allclose against zero
/// uses reference 0, so effectively atol). Defaults are geoopt's (1e-5, 1e-5).
struct Tolerance {
  double atol = 1e-5;
  double rtol = 1e-5;
};

using Rng = std::mt19937_64;

template <class M>
concept Manifold =
    requires { typename M::Scalar; } && RealScalar<typename M::Scalar> &&
    requires(const M& m, const Matrix<typename M::Scalar>& x, const Matrix<typename M::Scalar>& u,
             Rng& rng, Eigen::Index rows, Tolerance tol) {
      { M::name() } -> std::convertible_to<std::string_view>;
      { m.projx(x) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.proju(x, u) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.egrad2rgrad(x, u) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.retr(x, u) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.transp(x, x, u) } -> std::same_as<Matrix<typename M::Scalar>>;
      {
        m.retr_transp(x, u, u)
        } -> std::same_as<std::pair<Matrix<typename M::Scalar>, Matrix<typename M::Scalar>>>;
      { m.inner(x, u, u) } -> std::same_as<typename M::Scalar>;
      { m.component_inner(x, u) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.random(rows, rows, rng) } -> std::same_as<Matrix<typename M::Scalar>>;
      { m.check_shape(rows, rows) } -> std::same_as<CheckResult>;
      { m.check_point(x, tol) } -> std::same_as<CheckResult>;
      { m.check_vector(x, u, tol) } -> std::same_as<CheckResult>;
    };

namespace detail {
inline std::string shape_str(Eigen::Index r, Eigen::Index c) {
  return "(" + std::to_string(r) + " x " + std::to_string(c) + ")";
}
}  // namespace detail

}  // namespace cacheshrink::manifold

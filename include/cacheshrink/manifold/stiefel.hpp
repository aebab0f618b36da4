#pragma once
// Stiefel manifold St(n, p) = { x in R^{n x p} : x^T x = I_p }, n >= p, with policies:
//
//   Metric      EuclideanMetric  <u, v>_x = tr(u^T v)        rgrad = g - x sym(x^T g)
//               CanonicalMetric  <u, v>_x = tr(u^T (I - x x^T / 2) v)   rgrad = g - x g^T x
//   Retraction  QrRetraction     R_x(u) = qf(x + u), diag(R) made >= 0 (geoopt EuclideanStiefel)
//               PolarRetraction  R_x(u) = polar(x + u) = (x + u)(I + u^T u)^{-1/2} for tangent u
//               CayleyRetraction R_x(u) = (I - A/2)^{-1} (I + A/2) x,
//                                A = P u x^T - x (P u)^T,  P = I - x x^T / 2  (so A x = u)
//
// Transport: QR and polar transport by projection onto T_y (geoopt's EuclideanStiefel);
// Cayley's retr_transp applies the same orthogonal Cayley map Q to v, which keeps v tangent
// and preserves its norm (Q is orthogonal, so y^T Q v = x^T v). transp(x, y, v) alone only
// knows y and so projects for every retraction.
//
// EuclideanStiefel<S> = Stiefel<S, EuclideanMetric, QrRetraction> reproduces
// geoopt.Stiefel(canonical=False) (tests/test_geoopt.cpp checks whole trajectories).
// CanonicalStiefel<S> = Stiefel<S, CanonicalMetric, CayleyRetraction>. Note: geoopt's
// CanonicalStiefel builds A = u x^T - x u^T, for which d/dt R_x(t u) = u + x x^T u != u on
// tangent u; we use the P-corrected A (Wen & Yin 2013; Li et al. 2020) so that axiom A4 holds.
//
// Cayley is evaluated in low-rank form: A = U V^T with U = [P u, x], V = [x, -P u] (n x 2p),
// and (I - A/2)^{-1}(I + A/2) = I + U (I_{2p} - V^T U / 2)^{-1} V^T, so a step costs
// O(n p^2 + p^3), never an n x n solve.
#include <cmath>
#include <limits>
#include <random>
#include <string_view>
#include <type_traits>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/polar.hpp"
#include "cacheshrink/linalg/qr.hpp"
#include "cacheshrink/manifold/concept.hpp"

namespace cacheshrink::manifold {

struct EuclideanMetric {};
struct CanonicalMetric {};
struct QrRetraction {};
struct PolarRetraction {};
struct CayleyRetraction {};

template <class T>
concept StiefelMetric = std::is_same_v<T, EuclideanMetric> || std::is_same_v<T, CanonicalMetric>;
template <class T>
concept StiefelRetraction = std::is_same_v<T, QrRetraction> ||
                            std::is_same_v<T, PolarRetraction> ||
                            std::is_same_v<T, CayleyRetraction>;

template <class Scalar_, class Metric_ = EuclideanMetric, class Retraction_ = QrRetraction>
class Stiefel {
  static_assert(RealScalar<Scalar_>, "Stiefel<Scalar, ...>: Scalar must be float or double");
  static_assert(StiefelMetric<Metric_>,
                "Stiefel<Scalar, Metric, ...>: Metric must be EuclideanMetric or CanonicalMetric");
  static_assert(StiefelRetraction<Retraction_>,
                "Stiefel<Scalar, Metric, Retraction>: Retraction must be QrRetraction, "
                "PolarRetraction or CayleyRetraction");

 public:
  using Scalar = Scalar_;
  using Metric = Metric_;
  using Retraction = Retraction_;
  using Mat = Matrix<Scalar>;

  static constexpr std::string_view name() {
    if constexpr (std::is_same_v<Metric, EuclideanMetric>) {
      if constexpr (std::is_same_v<Retraction, QrRetraction>) return "Stiefel(euclidean, qr)";
      if constexpr (std::is_same_v<Retraction, PolarRetraction>) return "Stiefel(euclidean, polar)";
      if constexpr (std::is_same_v<Retraction, CayleyRetraction>) return "Stiefel(euclidean, cayley)";
    } else {
      if constexpr (std::is_same_v<Retraction, QrRetraction>) return "Stiefel(canonical, qr)";
      if constexpr (std::is_same_v<Retraction, PolarRetraction>) return "Stiefel(canonical, polar)";
      if constexpr (std::is_same_v<Retraction, CayleyRetraction>) return "Stiefel(canonical, cayley)";
    }
  }

  /// Polar factor U V^T of x's thin SVD: the closest point of St(n, p) in Frobenius norm.
  Mat projx(const Mat& x) const { return linalg::polar(x); }

  /// u - x sym(x^T u): orthogonal projection onto T_x (for either metric the tangent space
  /// is the same set; this is the Euclidean-orthogonal projector).
  Mat proju(const Mat& x, const Mat& u) const {
    const Mat xtu = x.transpose() * u;  // (p, p)
    const Mat sym = Scalar(0.5) * (xtu + xtu.transpose());
    return u - x * sym;
  }

  Mat egrad2rgrad(const Mat& x, const Mat& g) const {
    if constexpr (std::is_same_v<Metric, EuclideanMetric>) {
      return proju(x, g);
    } else {
      return g - x * (g.transpose() * x);  // canonical: g - x g^T x (Edelman et al. 1998)
    }
  }

  Mat retr(const Mat& x, const Mat& u) const {
    if constexpr (std::is_same_v<Retraction, QrRetraction>) {
      return linalg::qr_positive(x + u).q;
    } else if constexpr (std::is_same_v<Retraction, PolarRetraction>) {
      return linalg::polar(x + u);
    } else {
      const Cayley c(x, u);
      return c.apply(x);
    }
  }

  Mat transp(const Mat& /*x*/, const Mat& y, const Mat& v) const { return proju(y, v); }

  std::pair<Mat, Mat> retr_transp(const Mat& x, const Mat& u, const Mat& v) const {
    if constexpr (std::is_same_v<Retraction, CayleyRetraction>) {
      const Cayley c(x, u);
      return {c.apply(x), c.apply(v)};
    } else {
      Mat y = retr(x, u);
      Mat w = proju(y, v);
      return {std::move(y), std::move(w)};
    }
  }

  Scalar inner(const Mat& x, const Mat& u, const Mat& v) const {
    if constexpr (std::is_same_v<Metric, EuclideanMetric>) {
      return u.cwiseProduct(v).sum();
    } else {
      const Mat xtu = x.transpose() * u, xtv = x.transpose() * v;
      return u.cwiseProduct(v).sum() - Scalar(0.5) * xtu.cwiseProduct(xtv).sum();
    }
  }

  /// One number per matrix: geoopt's component_inner for a 2-d manifold is <u, u>_x with
  /// keepdim, so Adam's second moment is a single scalar per Stiefel parameter.
  Mat component_inner(const Mat& x, const Mat& u) const {
    Mat out(1, 1);
    out(0, 0) = inner(x, u, u);
    return out;
  }

  /// Haar-distributed point: Q of a Gaussian (rows, cols) matrix with diag(R) > 0.
  Mat random(Eigen::Index rows, Eigen::Index cols, Rng& rng) const {
    const CheckResult shape = check_shape(rows, cols);
    CACHESHRINK_CHECK(shape.ok, InvalidArgument, "Stiefel::random: " + shape.reason);
    std::normal_distribution<double> normal(0.0, 1.0);
    Mat g(rows, cols);
    for (Eigen::Index j = 0; j < cols; ++j)
      for (Eigen::Index i = 0; i < rows; ++i) g(i, j) = static_cast<Scalar>(normal(rng));
    return linalg::qr_positive(g).q;
  }

  CheckResult check_shape(Eigen::Index rows, Eigen::Index cols) const {
    if (cols < 1 || rows < cols)
      return {false, INFINITY,
              "Stiefel: shape " + detail::shape_str(rows, cols) + " needs rows >= cols >= 1"};
    return {};
  }

  /// max |x^T x - I| <= atol (geoopt's allclose against zero).
  CheckResult check_point(const Mat& x, Tolerance tol = {}) const {
    CheckResult r = check_shape(x.rows(), x.cols());
    if (!r.ok) return r;
    if (!x.allFinite()) return {false, INFINITY, "Stiefel: point has non-finite entries"};
    Mat e = x.transpose() * x;
    e.diagonal().array() -= Scalar(1);
    r.error = static_cast<double>(e.cwiseAbs().maxCoeff());
    if (r.error > tol.atol) {
      r.ok = false;
      r.reason = "Stiefel: max|X^T X - I| = " + std::to_string(r.error) + " > atol " +
                 std::to_string(tol.atol);
    }
    return r;
  }

  /// max |x^T u + u^T x| <= atol.
  CheckResult check_vector(const Mat& x, const Mat& u, Tolerance tol = {}) const {
    if (u.rows() != x.rows() || u.cols() != x.cols())
      return {false, INFINITY,
              "Stiefel: vector shape " + detail::shape_str(u.rows(), u.cols()) +
                  " != point shape " + detail::shape_str(x.rows(), x.cols())};
    if (!u.allFinite()) return {false, INFINITY, "Stiefel: vector has non-finite entries"};
    const Mat xtu = x.transpose() * u;
    CheckResult r;
    r.error = static_cast<double>((xtu + xtu.transpose()).cwiseAbs().maxCoeff());
    if (r.error > tol.atol) {
      r.ok = false;
      r.reason = "Stiefel: max|X^T U + U^T X| = " + std::to_string(r.error) + " > atol " +
                 std::to_string(tol.atol);
    }
    return r;
  }

 private:
  // The Cayley map Q = I + U M^{-1} V^T with M = I_{2p} - V^T U / 2 (see the header comment).
  struct Cayley {
    Mat u_big;  // (n, 2p) = [P u, x]
    Mat v_big;  // (n, 2p) = [x, -P u]
    Eigen::PartialPivLU<Mat> lu;

    Cayley(const Mat& x, const Mat& u) {
      const Eigen::Index n = x.rows(), p = x.cols();
      const Mat pu = u - Scalar(0.5) * (x * (x.transpose() * u));  // (n, p)
      u_big.resize(n, 2 * p);
      v_big.resize(n, 2 * p);
      u_big << pu, x;
      v_big << x, -pu;
      Mat m = -Scalar(0.5) * (v_big.transpose() * u_big);  // (2p, 2p)
      m.diagonal().array() += Scalar(1);
      lu.compute(m);
    }
    Mat apply(const Mat& w) const { return w + u_big * lu.solve(v_big.transpose() * w); }
  };
};

template <class Scalar>
using EuclideanStiefel = Stiefel<Scalar, EuclideanMetric, QrRetraction>;
template <class Scalar>
using CanonicalStiefel = Stiefel<Scalar, CanonicalMetric, CayleyRetraction>;

static_assert(Manifold<EuclideanStiefel<double>>);
static_assert(Manifold<CanonicalStiefel<float>>);

}  // namespace cacheshrink::manifold

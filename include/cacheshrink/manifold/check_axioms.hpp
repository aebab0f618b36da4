#pragma once
// Public invariant checker for Manifold models (in the spirit of Ceres' manifold test
// helpers): draws seeded random points and tangent vectors and measures every axiom listed
// in manifold/concept.hpp. Use it for new models:
//
//   auto report = check_axioms(EuclideanStiefel<float>{}, {.trials = 1000, .seed = 7});
//   CHECK_MESSAGE(report.ok(), report.summary());
//
// Errors are max-abs residuals, tangent vectors have unit Frobenius norm scaled by a random
// factor in [0.05, 2]; default tolerances scale with the type's epsilon and max_rows.
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cacheshrink/manifold/concept.hpp"

namespace cacheshrink::manifold {

template <class Scalar>
struct AxiomTolerances {
  double algebraic;   // membership, idempotence, retr(x, 0) = x, transport tangency, Riesz
  double derivative;  // | (R(h u) - R(-h u)) / 2h - u |, central difference
  double fd_step;     // h of that central difference

  /// Algebraic residuals grow like eps * n (n x n products), so the bound is
  /// 20 eps max(max_rows, 8); the derivative bound covers O(h^2) truncation + O(eps / h).
  static AxiomTolerances defaults(Eigen::Index max_rows = 24) {
    constexpr double eps = std::numeric_limits<Scalar>::epsilon();
    const double algebraic = 20.0 * eps * static_cast<double>(std::max<Eigen::Index>(max_rows, 8));
    if constexpr (std::is_same_v<Scalar, float>)
      return {algebraic, 5e-3, 2e-2};
    else
      return {algebraic, 5e-9, 1e-5};
  }
};

struct AxiomCheckOptions {
  int trials = 1000;
  std::uint64_t seed = 0;
  Eigen::Index max_rows = 24;  // n drawn in [1, max_rows], p in [1, n]
};

struct AxiomReport {
  int trials = 0;
  double point = 0;          // A1: membership of projx / retr / random
  double projx_idem = 0;     // A1: projx(projx(x)) - projx(x), projx(x on M) - x
  double tangent = 0;        // A2/A3/A5: membership of proju / egrad2rgrad / transports
  double proju_idem = 0;     // A2
  double riesz = 0;          // A3: <rgrad, w>_x - <g, w>_F (relative to |g| |w|)
  double retr_zero = 0;      // A4: retr(x, 0) - x
  double retr_deriv = 0;     // A4: central-difference derivative - u
  double transp_zero = 0;    // A5: retr_transp(x, 0, v).second - v
  double retr_consistent = 0;  // A5: retr_transp(x, u, v).first - retr(x, u)
  double inner_sym = 0;      // A6: <u, v> - <v, u>
  double inner_min = INFINITY;  // A6: min <u, u> over unit-norm u (must be > 0)
  std::vector<std::string> failures;

  bool ok() const { return failures.empty(); }
  std::string summary() const {
    std::ostringstream s;
    s << "trials=" << trials << " point=" << point << " projx_idem=" << projx_idem
      << " tangent=" << tangent << " proju_idem=" << proju_idem << " riesz=" << riesz
      << " retr_zero=" << retr_zero << " retr_deriv=" << retr_deriv
      << " transp_zero=" << transp_zero << " retr_consistent=" << retr_consistent
      << " inner_sym=" << inner_sym << " inner_min=" << inner_min;
    for (const auto& f : failures) s << "\n  FAIL " << f;
    return s.str();
  }
};

template <Manifold M>
AxiomReport check_axioms(const M& m, AxiomCheckOptions opt,
                         AxiomTolerances<typename M::Scalar> tol);

/// check_axioms with AxiomTolerances<Scalar>::defaults(opt.max_rows).
template <Manifold M>
AxiomReport check_axioms(const M& m, AxiomCheckOptions opt = {}) {
  return check_axioms(m, opt, AxiomTolerances<typename M::Scalar>::defaults(opt.max_rows));
}

template <Manifold M>
AxiomReport check_axioms(const M& m, AxiomCheckOptions opt,
                         AxiomTolerances<typename M::Scalar> tol) {
  using Scalar = typename M::Scalar;
  using Mat = Matrix<Scalar>;
  Rng rng(opt.seed);
  std::uniform_int_distribution<Eigen::Index> rows_dist(1, std::max<Eigen::Index>(1, opt.max_rows));
  std::uniform_real_distribution<double> scale_dist(0.05, 2.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto gaussian = [&](Eigen::Index r, Eigen::Index c) {
    Mat g(r, c);
    for (Eigen::Index j = 0; j < c; ++j)
      for (Eigen::Index i = 0; i < r; ++i) g(i, j) = static_cast<Scalar>(normal(rng));
    return g;
  };
  auto maxabs = [](const Mat& a) {
    return a.size() == 0 ? 0.0 : static_cast<double>(a.cwiseAbs().maxCoeff());
  };
  const Tolerance mtol{tol.algebraic, 0.0};
  AxiomReport rep;
  rep.trials = opt.trials;
  auto fail = [&](int trial, Eigen::Index n, Eigen::Index p, const std::string& what, double v,
                  double bound) {
    if (rep.failures.size() < 20) {
      std::ostringstream s;
      s << M::name() << " trial " << trial << " shape (" << n << " x " << p << "): " << what
        << " = " << v << " > " << bound;
      rep.failures.push_back(s.str());
    }
  };
  auto point_err = [&](const Mat& x) {
    const CheckResult r = m.check_point(x, mtol);
    return r.error;
  };
  auto tangent_err = [&](const Mat& x, const Mat& u) { return m.check_vector(x, u, mtol).error; };

  for (int t = 0; t < opt.trials; ++t) {
    const Eigen::Index n = rows_dist(rng);
    const Eigen::Index p = std::uniform_int_distribution<Eigen::Index>(1, n)(rng);
    auto track = [&](double& slot, double v, double bound, const char* what) {
      slot = std::max(slot, v);
      if (!(v <= bound)) fail(t, n, p, what, v, bound);
    };
    const Mat x = m.random(n, p, rng);
    track(rep.point, point_err(x), tol.algebraic, "random point membership");

    // A1: projx of a perturbed point.
    const Mat z = x + Scalar(0.3) * gaussian(n, p);
    const Mat px = m.projx(z);
    track(rep.point, point_err(px), tol.algebraic, "projx membership");
    track(rep.projx_idem, maxabs(m.projx(px) - px), tol.algebraic, "projx idempotence");
    track(rep.projx_idem, maxabs(m.projx(x) - x), tol.algebraic, "projx(x) = x on M");

    // A2: projection onto the tangent space.
    const Mat amb = gaussian(n, p);
    Mat u = m.proju(x, amb);
    track(rep.tangent, tangent_err(x, u), tol.algebraic, "proju tangency");
    track(rep.proju_idem, maxabs(m.proju(x, u) - u), tol.algebraic, "proju idempotence");
    const Scalar unorm = u.norm();
    if (unorm > Scalar(1e-3)) u *= static_cast<Scalar>(scale_dist(rng)) / unorm;
    Mat w = m.proju(x, gaussian(n, p));

    // A3: Riesz identity of the Riemannian gradient.
    const Mat g = gaussian(n, p);
    const Mat rg = m.egrad2rgrad(x, g);
    track(rep.tangent, tangent_err(x, rg), tol.algebraic, "egrad2rgrad tangency");
    const double riesz = std::abs(static_cast<double>(m.inner(x, rg, w)) -
                                  static_cast<double>(g.cwiseProduct(w).sum())) /
                         std::max(1.0, static_cast<double>(g.norm() * w.norm()));
    track(rep.riesz, riesz, tol.algebraic, "<rgrad, w>_x - <g, w>");

    // A4: retraction.
    const Mat zero = Mat::Zero(n, p);
    track(rep.retr_zero, maxabs(m.retr(x, zero) - x), tol.algebraic, "retr(x, 0) - x");
    const Mat y = m.retr(x, u);
    track(rep.point, point_err(y), tol.algebraic, "retr membership");
    const Scalar h = static_cast<Scalar>(tol.fd_step);
    const Mat fd = (m.retr(x, h * u) - m.retr(x, -h * u)) / (Scalar(2) * h);
    track(rep.retr_deriv, maxabs(fd - u) / std::max(1.0, static_cast<double>(u.norm())),
          tol.derivative, "d/dt retr(x, t u) - u");

    // A5: transport.
    track(rep.tangent, tangent_err(y, m.transp(x, y, w)), tol.algebraic, "transp tangency");
    const auto [y2, w2] = m.retr_transp(x, u, w);
    track(rep.retr_consistent, maxabs(y2 - y), tol.algebraic, "retr_transp.first - retr");
    track(rep.tangent, tangent_err(y2, w2), tol.algebraic, "retr_transp tangency");
    const auto [y0, w0] = m.retr_transp(x, zero, w);
    track(rep.transp_zero, maxabs(w0 - w), tol.algebraic, "retr_transp(x, 0, w).second - w");

    // A6: metric.
    const double iuw = static_cast<double>(m.inner(x, u, w));
    const double iwu = static_cast<double>(m.inner(x, w, u));
    track(rep.inner_sym, std::abs(iuw - iwu) / std::max(1.0, std::abs(iuw)), tol.algebraic,
          "<u, w> - <w, u>");
    const Scalar wn = w.norm();
    if (wn > Scalar(1e-3)) {
      const double iww = static_cast<double>(m.inner(x, w / wn, w / wn));
      rep.inner_min = std::min(rep.inner_min, iww);
      if (!(iww > 0.25)) fail(t, n, p, "<w, w> for unit w (positive definite)", -iww, -0.25);
    }
  }
  return rep;
}

}  // namespace cacheshrink::manifold

// Optimizers, schedules and clipping against hand float64 recomputations of the reference
// formulas (PyTorch docs / geoopt), plus long-run invariants of RiemannianAdam on Stiefel.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cacheshrink/linalg/principal_angles.hpp"
#include "cacheshrink/manifold/stiefel.hpp"
#include "cacheshrink/optim/optim.hpp"

namespace mf = cacheshrink::manifold;
namespace optim = cacheshrink::optim;
using cacheshrink::linalg::Matrix;

namespace {

template <class Scalar>
Matrix<Scalar> gaussian(Eigen::Index r, Eigen::Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<Scalar> g(r, c);
  for (Eigen::Index j = 0; j < c; ++j)
    for (Eigen::Index i = 0; i < r; ++i) g(i, j) = static_cast<Scalar>(normal(rng));
  return g;
}

// Random symmetric matrix with a prescribed spectrum: returns (A, Q) with A = Q diag(lam) Q^T.
std::pair<Matrix<double>, Matrix<double>> spectral_matrix(const Eigen::VectorXd& lam,
                                                          std::mt19937_64& rng) {
  const Eigen::Index n = lam.size();
  Eigen::HouseholderQR<Matrix<double>> qr(gaussian<double>(n, n, rng));
  const Matrix<double> q = qr.householderQ();
  return {q * lam.asDiagonal() * q.transpose(), q};
}

}  // namespace

TEST_CASE_TEMPLATE("RiemannianAdam keeps X on Stiefel over 10,000 steps of a random quadratic",
                   Scalar, float, double) {
  // f(X) = 0.5 tr(X^T A X) + tr(B^T X), grad = A X + B; A indefinite so the iterate keeps moving.
  std::mt19937_64 rng(21);
  const Eigen::Index n = 24, p = 6;
  const Matrix<double> a0 = gaussian<double>(n, n, rng);
  const Matrix<Scalar> a = (0.5 * (a0 + a0.transpose())).template cast<Scalar>();
  const Matrix<Scalar> b = gaussian<Scalar>(n, p, rng);
  const mf::EuclideanStiefel<Scalar> st;
  Matrix<Scalar> x = st.random(n, p, rng);
  Matrix<Scalar> g = Matrix<Scalar>::Zero(n, p);
  optim::RiemannianAdamUpdate upd;
  upd.options.lr = 1e-2;
  upd.options.weight_decay = 1e-3;
  optim::RiemannianAdam<Scalar> opt(upd);
  opt.add("x", x, g, st);
  for (int s = 0; s < 10000; ++s) {
    g = a * x + b;
    opt.step();
  }
  const Matrix<Scalar> e = x.transpose() * x - Matrix<Scalar>::Identity(p, p);
  const double err = static_cast<double>(e.cwiseAbs().maxCoeff());
  const double bound = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  MESSAGE("orthonormality error after 10000 steps: " << err << " (bound " << bound << ")");
  CHECK(err < bound);
  CHECK(opt.param(0).state.step == 10000);
  CHECK(opt.param(0).state.exp_avg_sq.size() == 1);  // one second-moment scalar per matrix
}

TEST_CASE("RiemannianAdam converges on the Brockett cost to the dominant eigenspace") {
  // min -0.5 tr(X^T A X) over St(n, p): minimizers span the top-p eigenvectors of A.
  std::mt19937_64 rng(4);
  const Eigen::Index n = 40, p = 6;
  Eigen::VectorXd lam(n);
  // Top p eigenvalues in [9, 10], the rest in [1, 5]: a gap of 4 separates the eigenspace.
  for (Eigen::Index i = 0; i < n; ++i)
    lam(i) = i < p ? 10.0 - static_cast<double>(i) / p
                   : 5.0 - 4.0 * static_cast<double>(i - p) / static_cast<double>(n - p - 1);
  const auto [a, q] = spectral_matrix(lam, rng);
  const double f_star = -0.5 * lam.head(p).sum();

  auto run = [&](auto manifold_model, const char* label) {
    Matrix<double> x = mf::EuclideanStiefel<double>{}.random(n, p, rng);
    Matrix<double> g = Matrix<double>::Zero(n, p);
    optim::RiemannianAdamUpdate upd;
    upd.options.lr = 0.05;
    upd.options.stabilize = 25;
    optim::RiemannianAdam<double> opt(upd);
    opt.add("x", x, g, manifold_model);
    const int steps = 3000;
    const optim::Schedule sched = optim::make_schedule("cosine", upd.options.lr, 50, steps);
    const double f0 = -0.5 * (x.transpose() * a * x).trace();
    for (int s = 0; s < steps; ++s) {
      g = -a * x;
      opt.step(sched.lr(s));
    }
    const double f = -0.5 * (x.transpose() * a * x).trace();
    const double angle =
        cacheshrink::linalg::principal_angles(x, Matrix<double>(q.leftCols(p))).maxCoeff();
    MESSAGE(std::string(label) << ": f0 " << f0 << " -> f " << f << " (f* " << f_star
                  << "), max principal angle to the top-" << p << " eigenspace " << angle);
    CHECK(std::abs(f - f_star) / std::abs(f_star) < 1e-10);
    CHECK(angle < 1e-6);
  };
  run(mf::EuclideanStiefel<double>{}, "Euclidean-metric Stiefel (QR)");
  run(mf::CanonicalStiefel<double>{}, "canonical Stiefel (Cayley)");
}

TEST_CASE_TEMPLATE("AdamW matches a hand float64 recomputation of PyTorch's formula", Scalar,
                   float, double) {
  // PyTorch docs: theta <- theta (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
  // mhat = m / (1 - b1^t); vhat = v / (1 - b2^t) (max over time with amsgrad);
  // theta <- theta - lr mhat / (sqrt(vhat) + eps).
  for (bool amsgrad : {false, true}) {
    CAPTURE(amsgrad);
    std::mt19937_64 rng(8);
    const Eigen::Index r = 7, c = 5;
    Matrix<double> ref = gaussian<double>(r, c, rng);
    Matrix<Scalar> x = ref.cast<Scalar>();
    ref = x.template cast<double>();
    Matrix<Scalar> g(r, c);
    optim::AdamWUpdate upd;
    upd.options = {.lr = 3e-3, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1,
                   .amsgrad = amsgrad};
    optim::AdamW<Scalar> opt(upd);
    opt.add("w", x, g);
    std::vector<double> m(r * c, 0.0), v(r * c, 0.0), vmax(r * c, 0.0);
    const auto sched = optim::LinearWarmupDecay{3e-3, 5, 40};
    for (int t = 1; t <= 40; ++t) {
      g = gaussian<Scalar>(r, c, rng) * Scalar(t % 3 == 0 ? 5 : 1);
      const double lr = sched.lr(t - 1) + 1e-4;
      opt.step(lr);
      for (Eigen::Index k = 0; k < r * c; ++k) {
        const double gk = static_cast<double>(g(k));
        double& th = ref(k);
        th = th * (1.0 - lr * 0.1);
        m[k] = 0.8 * m[k] + 0.2 * gk;
        v[k] = 0.95 * v[k] + 0.05 * gk * gk;
        vmax[k] = std::max(vmax[k], v[k]);
        const double mhat = m[k] / (1.0 - std::pow(0.8, t));
        const double vhat = (amsgrad ? vmax[k] : v[k]) / (1.0 - std::pow(0.95, t));
        th -= lr * mhat / (std::sqrt(vhat) + 1e-6);
      }
    }
    const double err = (x.template cast<double>() - ref).cwiseAbs().maxCoeff() /
                       ref.cwiseAbs().maxCoeff();
    const double bound = std::is_same_v<Scalar, float> ? 1e-5 : 1e-13;
    MESSAGE("AdamW max rel error vs float64 formula: " << err);
    CHECK(err < bound);
  }
}

TEST_CASE("RiemannianAdam on Euclidean parameters is geoopt's Adam (L2 weight decay)") {
  std::mt19937_64 rng(2);
  const Eigen::Index r = 6, c = 3;
  Matrix<double> x = gaussian<double>(r, c, rng), ref = x, g(r, c);
  optim::RiemannianAdamUpdate upd;
  upd.options = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.05,
                 .amsgrad = true, .stabilize = 3};
  optim::RiemannianAdam<double> opt(upd);
  opt.add("w", x, g);  // Euclidean by default
  Matrix<double> m = Matrix<double>::Zero(r, c), v = m, vmax = m;
  for (int t = 1; t <= 30; ++t) {
    g = gaussian<double>(r, c, rng);
    opt.step();
    const Matrix<double> gg = g + 0.05 * ref;
    m = 0.9 * m + 0.1 * gg;
    v = 0.99 * v + 0.01 * gg.cwiseProduct(gg);
    vmax = vmax.cwiseMax(v);
    const Matrix<double> mhat = m / (1.0 - std::pow(0.9, t));
    const Matrix<double> vhat = vmax / (1.0 - std::pow(0.99, t));
    ref -= 1e-2 * mhat.cwiseQuotient((vhat.cwiseSqrt().array() + 1e-8).matrix());
  }
  CHECK((x - ref).cwiseAbs().maxCoeff() < 1e-13);
  CHECK(opt.param(0).state.exp_avg_sq.rows() == r);  // elementwise second moment
}

TEST_CASE("SGD with momentum / nesterov matches torch.optim.SGD by hand") {
  for (bool nesterov : {false, true}) {
    std::mt19937_64 rng(6);
    Matrix<double> x = gaussian<double>(4, 4, rng), ref = x, g(4, 4);
    optim::SgdUpdate upd;
    upd.options = {.lr = 0.1, .momentum = 0.9, .dampening = 0.0, .weight_decay = 0.01,
                   .nesterov = nesterov};
    optim::Sgd<double> opt(upd);
    opt.add("w", x, g);
    Matrix<double> buf;
    for (int t = 1; t <= 20; ++t) {
      g = gaussian<double>(4, 4, rng);
      opt.step();
      const Matrix<double> d = g + 0.01 * ref;
      buf = t == 1 ? d : Matrix<double>(0.9 * buf + d);
      ref -= 0.1 * (nesterov ? Matrix<double>(d + 0.9 * buf) : buf);
    }
    CHECK((x - ref).cwiseAbs().maxCoeff() < 1e-13);
  }
}

TEST_CASE("Riemannian SGD stays on Stiefel and decreases the Brockett cost") {
  std::mt19937_64 rng(12);
  const Eigen::Index n = 20, p = 3;
  Eigen::VectorXd lam = Eigen::VectorXd::LinSpaced(n, 5.0, 1.0);
  const auto [a, q] = spectral_matrix(lam, rng);
  const mf::EuclideanStiefel<double> st;
  Matrix<double> x = st.random(n, p, rng), g(n, p);
  optim::SgdUpdate upd;
  upd.options.lr = 0.05;
  upd.options.momentum = 0.5;
  optim::Sgd<double> opt(upd);
  opt.add("x", x, g, st);
  for (int t = 0; t < 2000; ++t) {
    g = -a * x;
    opt.step();
  }
  CHECK(st.check_point(x, {1e-12, 0}).ok);
  CHECK(-0.5 * (x.transpose() * a * x).trace() == doctest::Approx(-0.5 * lam.head(p).sum()).epsilon(1e-8));
}

TEST_CASE("learning-rate schedules follow the HF formulas") {
  const optim::LinearWarmupDecay lin{2.0, 10, 110};
  CHECK(lin.lr(0) == 0.0);
  CHECK(lin.lr(5) == doctest::Approx(1.0));
  CHECK(lin.lr(10) == doctest::Approx(2.0));
  CHECK(lin.lr(60) == doctest::Approx(1.0));
  CHECK(lin.lr(110) == 0.0);
  CHECK(lin.lr(500) == 0.0);
  const optim::CosineWarmupDecay cosine{2.0, 10, 110};
  CHECK(cosine.lr(5) == doctest::Approx(1.0));
  CHECK(cosine.lr(10) == doctest::Approx(2.0));
  CHECK(cosine.lr(35) == doctest::Approx(1.0 + std::sqrt(0.5)));  // progress 1/4: (1+cos(pi/4))/2
  CHECK(cosine.lr(60) == doctest::Approx(1.0));
  CHECK(cosine.lr(110) == doctest::Approx(0.0));
  const optim::LinearWarmupDecay no_warmup{1.0, 0, 4};
  CHECK(no_warmup.lr(0) == 1.0);
  CHECK(no_warmup.lr(1) == 0.75);
  CHECK(optim::make_schedule("constant", 0.3, 5, 10).lr(7) == 0.3);
  CHECK(optim::make_schedule("linear", 1.0, 0, 4).lr(2) == 0.5);
  CHECK_THROWS_AS(optim::make_schedule("step", 1.0, 0, 4), cacheshrink::InvalidArgument);
  CHECK_THROWS_AS(optim::make_schedule("linear", 1.0, -1, 4), cacheshrink::InvalidArgument);
}

TEST_CASE("clip_grad_norm follows torch.nn.utils.clip_grad_norm_") {
  Matrix<float> g1(1, 2), g2(2, 1);
  g1 << 3.0f, 0.0f;
  g2 << 0.0f, 4.0f;  // total norm 5
  const double total = optim::clip_grad_norm<float>({&g1, &g2}, 1.0);
  CHECK(total == doctest::Approx(5.0));
  const double coef = 1.0 / (5.0 + 1e-6);
  CHECK(g1(0, 0) == doctest::Approx(3.0 * coef).epsilon(1e-7));
  CHECK(g2(1, 0) == doctest::Approx(4.0 * coef).epsilon(1e-7));
  Matrix<double> h(1, 1);
  h << 0.5;
  CHECK(optim::clip_grad_norm<double>({&h}, 1.0) == 0.5);
  CHECK(h(0, 0) == 0.5);  // below max_norm: factor exactly 1
  h(0, 0) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(optim::clip_grad_norm<double>({&h}, 1.0, true), cacheshrink::NumericalError);
  CHECK_THROWS_AS(optim::clip_grad_norm<double>({&h}, 0.0), cacheshrink::InvalidArgument);
}

TEST_CASE("optimizer front door: validation, shapes, frozen parameters") {
  optim::RiemannianAdamUpdate bad;
  bad.options.beta1 = 1.0;
  CHECK_THROWS_WITH_AS((void)optim::RiemannianAdam<double>{bad}, doctest::Contains("beta1"),
                       cacheshrink::InvalidArgument);
  optim::AdamWUpdate bad_lr;
  bad_lr.options.lr = -1.0;
  CHECK_THROWS_AS((void)optim::AdamW<float>{bad_lr}, cacheshrink::InvalidArgument);
  optim::RiemannianAdam<double> opt;
  Matrix<double> wide = Matrix<double>::Zero(2, 5), gw = wide;
  CHECK_THROWS_WITH_AS(opt.add("wide", wide, gw, mf::EuclideanStiefel<double>{}),
                       doctest::Contains("wide"), cacheshrink::InvalidArgument);
  Matrix<double> x = Matrix<double>::Identity(4, 2), gx = Matrix<double>::Zero(3, 2);
  CHECK_THROWS_AS(opt.add("x", x, gx), cacheshrink::InvalidArgument);
  Matrix<double> y = Matrix<double>::Ones(2, 2), gy = Matrix<double>::Ones(2, 2);
  const std::size_t i = opt.add("y", y, gy);
  opt.set_grad(i, nullptr);
  opt.step();
  CHECK(y == Matrix<double>::Ones(2, 2));
  CHECK(opt.param(i).state.step == 0);
}

// Manifold axioms over >= 1000 seeded random trials per model and scalar type, plus
// comparisons of each retraction / projection with an independent closed form.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <random>

#include "cacheshrink/manifold/any_manifold.hpp"
#include "cacheshrink/manifold/check_axioms.hpp"
#include "cacheshrink/manifold/euclidean.hpp"
#include "cacheshrink/manifold/stiefel.hpp"

namespace mf = cacheshrink::manifold;
using cacheshrink::linalg::Matrix;

namespace {

template <class M>
void run_axioms(const M& m, std::uint64_t seed, int trials = 1000) {
  mf::AxiomCheckOptions opt;
  opt.trials = trials;
  opt.seed = seed;
  opt.max_rows = 16;
  const mf::AxiomReport rep = mf::check_axioms(m, opt);
  MESSAGE(std::string(M::name()) << std::string(std::is_same_v<typename M::Scalar, float> ? " <float> " : " <double> ")
                    << rep.summary());
  CHECK_MESSAGE(rep.ok(), rep.summary());
  CHECK(rep.trials == trials);
}

template <class Scalar>
Matrix<Scalar> gaussian(Eigen::Index r, Eigen::Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<Scalar> g(r, c);
  for (Eigen::Index j = 0; j < c; ++j)
    for (Eigen::Index i = 0; i < r; ++i) g(i, j) = static_cast<Scalar>(normal(rng));
  return g;
}

// geoopt's CanonicalStiefel Cayley map, A = u x^T - x u^T, without the P correction. Its
// derivative at 0 is u + x x^T u, so the axiom checker must reject it.
struct UncorrectedCayley : mf::EuclideanStiefel<double> {
  static constexpr std::string_view name() { return "UncorrectedCayley"; }
  Mat retr(const Mat& x, const Mat& u) const {
    const Eigen::Index n = x.rows();
    const Mat a = u * x.transpose() - x * u.transpose();
    const Mat id = Mat::Identity(n, n);
    return (id - 0.5 * a).partialPivLu().solve((id + 0.5 * a) * x);
  }
  std::pair<Mat, Mat> retr_transp(const Mat& x, const Mat& u, const Mat& v) const {
    Mat y = retr(x, u);
    return {y, proju(y, v)};
  }
};

}  // namespace

TEST_CASE_TEMPLATE("manifold axioms hold over 1000 random trials", Scalar, float, double) {
  run_axioms(mf::Euclidean<Scalar>{}, 11);
  run_axioms(mf::EuclideanStiefel<Scalar>{}, 12);
  run_axioms(mf::CanonicalStiefel<Scalar>{}, 13);
  run_axioms(mf::Stiefel<Scalar, mf::EuclideanMetric, mf::PolarRetraction>{}, 14);
  run_axioms(mf::Stiefel<Scalar, mf::EuclideanMetric, mf::CayleyRetraction>{}, 15);
  run_axioms(mf::Stiefel<Scalar, mf::CanonicalMetric, mf::QrRetraction>{}, 16);
  run_axioms(mf::AnyManifold<Scalar>{mf::CanonicalStiefel<Scalar>{}}, 17, 200);  // a wrapper
}

TEST_CASE("the axiom checker rejects a retraction with the wrong derivative") {
  mf::AxiomCheckOptions opt;
  opt.trials = 50;
  opt.seed = 3;
  const mf::AxiomReport rep = mf::check_axioms(UncorrectedCayley{}, opt);
  CHECK_FALSE(rep.ok());
  CHECK(rep.retr_deriv > 1e-2);
}

TEST_CASE("Stiefel operations match independent closed forms (double)") {
  std::mt19937_64 rng(5);
  const mf::EuclideanStiefel<double> st;
  for (int trial = 0; trial < 50; ++trial) {
    const Eigen::Index n = 3 + trial % 17, p = 1 + trial % std::min<Eigen::Index>(n, 7);
    const Matrix<double> x = st.random(n, p, rng);
    const Matrix<double> u = st.proju(x, gaussian<double>(n, p, rng));
    const Matrix<double> idp = Matrix<double>::Identity(p, p);

    // projx = U V^T of a JacobiSVD of the input.
    const Matrix<double> z = gaussian<double>(n, p, rng);
    Eigen::JacobiSVD<Matrix<double>> svd(z, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Matrix<double> uv = svd.matrixU() * svd.matrixV().transpose();
    CHECK((st.projx(z) - uv).cwiseAbs().maxCoeff() < 1e-12);

    // QR retraction: y upper-triangularizes x + u with a positive diagonal, y R = x + u.
    const Matrix<double> y = st.retr(x, u);
    const Matrix<double> r = y.transpose() * (x + u);
    CHECK((y * r - (x + u)).cwiseAbs().maxCoeff() < 1e-12);
    for (Eigen::Index i = 0; i < p; ++i) {
      CHECK(r(i, i) > 0.0);
      for (Eigen::Index j = 0; j < i; ++j) CHECK(std::abs(r(i, j)) < 1e-12);
    }

    // Polar retraction = (x + u)(I + u^T u)^{-1/2} for tangent u.
    const mf::Stiefel<double, mf::EuclideanMetric, mf::PolarRetraction> pol;
    Eigen::SelfAdjointEigenSolver<Matrix<double>> es(idp + u.transpose() * u);
    const Matrix<double> inv_sqrt = es.operatorInverseSqrt();
    CHECK((pol.retr(x, u) - (x + u) * inv_sqrt).cwiseAbs().maxCoeff() < 1e-12);

    // Cayley retraction = dense (I - A/2)^{-1} (I + A/2) x with A = P u x^T - x (P u)^T.
    const mf::CanonicalStiefel<double> can;
    const Matrix<double> idn = Matrix<double>::Identity(n, n);
    const Matrix<double> pu = (idn - 0.5 * x * x.transpose()) * u;
    const Matrix<double> a = pu * x.transpose() - x * pu.transpose();
    const Matrix<double> q = (idn - 0.5 * a).partialPivLu().solve(idn + 0.5 * a);
    CHECK((can.retr(x, u) - q * x).cwiseAbs().maxCoeff() < 1e-12);
    const Matrix<double> v = st.proju(x, gaussian<double>(n, p, rng));
    const auto [y2, v2] = can.retr_transp(x, u, v);
    CHECK((v2 - q * v).cwiseAbs().maxCoeff() < 1e-12);
    CHECK(std::abs(v2.norm() - v.norm()) < 1e-12);  // Cayley transport is isometric

    // Canonical metric: tr(u^T (I - x x^T / 2) v).
    const double ref = (u.transpose() * (idn - 0.5 * x * x.transpose()) * v).trace();
    CHECK(std::abs(can.inner(x, u, v) - ref) < 1e-12);
  }
}

TEST_CASE_TEMPLATE("membership checks accept points/vectors and reject violations", Scalar, float,
                   double) {
  std::mt19937_64 rng(9);
  const mf::EuclideanStiefel<Scalar> st;
  const Matrix<Scalar> x = st.random(10, 4, rng);
  CHECK(st.check_point(x).ok);
  Matrix<Scalar> bad = x;
  bad(0, 0) += Scalar(1e-3);
  const mf::CheckResult r = st.check_point(bad);
  CHECK_FALSE(r.ok);
  CHECK(r.reason.find("X^T X") != std::string::npos);
  CHECK(st.check_vector(x, st.proju(x, gaussian<Scalar>(10, 4, rng))).ok);
  CHECK_FALSE(st.check_vector(x, x).ok);  // x^T x + x^T x = 2 I
  CHECK_FALSE(st.check_vector(x, Matrix<Scalar>::Zero(9, 4)).ok);
  CHECK_FALSE(st.check_shape(3, 4).ok);
  CHECK_THROWS_AS(st.random(3, 4, rng), cacheshrink::InvalidArgument);
  Matrix<Scalar> nan = x;
  nan(1, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  CHECK_FALSE(st.check_point(nan).ok);
  CHECK_FALSE(mf::Euclidean<Scalar>{}.check_point(nan).ok);
}

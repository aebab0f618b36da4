// linalg: QR with positive diagonal, polar, exact/randomized SVD (Halko bound), symmetric
// eigendecomposition, streaming Gram/covariance, principal angles. References are JacobiSVD
// (a different algorithm from the BDCSVD the code uses) and matrices with known spectra.
#include <doctest/doctest.h>

#include <cmath>
#include <random>

#include "cacheshrink/linalg/linalg.hpp"

namespace la = cacheshrink::linalg;
using la::Matrix;
using la::Vector;

namespace {

template <class Scalar>
Matrix<Scalar> gaussian(Eigen::Index r, Eigen::Index c, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Matrix<Scalar> g(r, c);
  for (Eigen::Index j = 0; j < c; ++j)
    for (Eigen::Index i = 0; i < r; ++i) g(i, j) = static_cast<Scalar>(normal(rng));
  return g;
}

Matrix<double> random_orthonormal(Eigen::Index n, Eigen::Index k, std::mt19937_64& rng) {
  Eigen::HouseholderQR<Matrix<double>> qr(gaussian<double>(n, k, rng));
  return qr.householderQ() * Matrix<double>::Identity(n, k);
}

// A = U diag(sigma) V^T with random orthonormal U (m, r), V (n, r).
Matrix<double> with_spectrum(Eigen::Index m, Eigen::Index n, const Vector<double>& sigma,
                             std::mt19937_64& rng) {
  const Eigen::Index r = sigma.size();
  return random_orthonormal(m, r, rng) * sigma.asDiagonal() *
         random_orthonormal(n, r, rng).transpose();
}

double spectral_norm(const Matrix<double>& a) {
  Eigen::JacobiSVD<Matrix<double>> svd(a);
  return svd.singularValues()(0);
}

}  // namespace

TEST_CASE_TEMPLATE("qr_positive and polar", Scalar, float, double) {
  std::mt19937_64 rng(1);
  const double tol = std::is_same_v<Scalar, float> ? 2e-5 : 1e-13;
  for (int t = 0; t < 40; ++t) {
    const Eigen::Index n = 2 + t, p = 1 + t % (n - 1);
    const Matrix<Scalar> a = gaussian<Scalar>(n, p, rng);
    const la::QrResult<Scalar> qr = la::qr_positive(a);
    CHECK(static_cast<double>((qr.q * qr.r - a).cwiseAbs().maxCoeff()) < tol * n);
    CHECK(static_cast<double>((qr.q.transpose() * qr.q - Matrix<Scalar>::Identity(p, p))
                                  .cwiseAbs()
                                  .maxCoeff()) < tol * n);
    for (Eigen::Index i = 0; i < p; ++i) {
      CHECK(qr.r(i, i) >= Scalar(0));
      for (Eigen::Index j = 0; j < i; ++j) CHECK(qr.r(i, j) == Scalar(0));
    }
    Eigen::JacobiSVD<Matrix<double>> svd(a.template cast<double>(),
                                         Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Matrix<double> uv = svd.matrixU() * svd.matrixV().transpose();
    CHECK(((la::polar(a).template cast<double>() - uv).cwiseAbs().maxCoeff()) < 50 * tol * n);
    const Matrix<Scalar> at = a.transpose();  // wide input: polar of the transpose
    CHECK(((la::polar(at).template cast<double>() - uv.transpose()).cwiseAbs().maxCoeff()) <
          50 * tol * n);
  }
  CHECK_THROWS_AS(la::qr_positive(Matrix<Scalar>(Matrix<Scalar>::Zero(2, 3))),
                  cacheshrink::InvalidArgument);
}

TEST_CASE("truncated_svd matches JacobiSVD and Eckart-Young") {
  std::mt19937_64 rng(2);
  const Matrix<double> a = gaussian<double>(60, 35, rng);
  Eigen::JacobiSVD<Matrix<double>> ref(a);
  for (Eigen::Index k : {1, 5, 20, 35}) {
    const la::SvdResult<double> s = la::truncated_svd(a, k);
    CHECK(s.u.cols() == k);
    CHECK((s.s - ref.singularValues().head(k)).cwiseAbs().maxCoeff() < 1e-12);
    const double err = spectral_norm(a - s.reconstruct());
    const double expect = k < 35 ? ref.singularValues()(k) : 0.0;
    CHECK(std::abs(err - expect) < 1e-11);
  }
  CHECK_THROWS_AS(la::truncated_svd(a, 36), cacheshrink::InvalidArgument);
  CHECK_THROWS_AS(la::truncated_svd(a, -1), cacheshrink::InvalidArgument);
}

TEST_CASE("randomized_svd stays within the Halko bound and finds the top subspace") {
  std::mt19937_64 rng(3);
  const Eigen::Index m = 200, n = 120, k = 10, over = 10;
  struct Spectrum {
    const char* name;
    double (*sigma)(int);
  };
  const Spectrum spectra[] = {
      {"exponential 0.8^j", [](int j) { return std::pow(0.8, j); }},
      {"polynomial j^-2", [](int j) { return 1.0 / ((j + 1.0) * (j + 1.0)); }},
      {"slow j^-0.5", [](int j) { return 1.0 / std::sqrt(j + 1.0); }},
  };
  for (const Spectrum& sp : spectra) {
    Vector<double> sigma(n);
    for (int j = 0; j < n; ++j) sigma(j) = sp.sigma(j);
    const Matrix<double> a = with_spectrum(m, n, sigma, rng);
    const la::SvdResult<double> exact = la::truncated_svd(a, k);
    for (int q : {0, 1, 2}) {
      for (std::uint64_t seed : {1u, 2u, 3u}) {
        la::RandomizedSvdOptions opt;
        opt.oversampling = over;
        opt.power_iterations = q;
        opt.seed = seed;
        const la::SvdResult<double> r = la::randomized_svd(a, k, opt);
        // ||A - U S V^T|| <= sigma_{k+1} + ||(I - QQ^T) A||, the latter bounded by
        // (1 + 11 sqrt(k + p) sqrt(min(m, n)))^(1/(2q+1)) sigma_{k+1} (Halko Eq. 1.9, Thm. 9.2).
        const double factor =
            std::pow(1.0 + 11.0 * std::sqrt(double(k + over)) * std::sqrt(double(n)),
                     1.0 / (2.0 * q + 1.0));
        const double bound = (1.0 + factor) * sigma(k);
        const double err = spectral_norm(a - r.reconstruct());
        const std::string name = sp.name;
        CAPTURE(name);
        CAPTURE(q);
        CHECK(err <= bound);
        CHECK(err >= sigma(k) * (1.0 - 1e-9));  // no rank-k approximation beats Eckart-Young
        if (seed == 1)
          MESSAGE(name << " q=" << q << ": error/sigma_{k+1} = " << err / sigma(k) << " (bound "
                          << bound / sigma(k) << ")");
        if (q == 2 && sp.sigma(0) / sp.sigma(k + over) > 5.0) {
          const double angle = la::principal_angles(r.u, exact.u).maxCoeff();
          CHECK(angle < (sp.sigma(k + over) < 1e-2 * sp.sigma(k) ? 1e-6 : 1e-2));
          CHECK((r.s - exact.s).cwiseAbs().maxCoeff() < 1e-3 * sigma(0));
        }
      }
    }
  }
  // Determinism: same seed, same answer.
  const Matrix<double> a = gaussian<double>(40, 30, rng);
  CHECK(la::randomized_svd(a, 5, {.seed = 9}).s == la::randomized_svd(a, 5, {.seed = 9}).s);
  CHECK_THROWS_AS(la::randomized_svd(a, 5, {.oversampling = -1}), cacheshrink::InvalidArgument);
}

TEST_CASE("symmetric_eigen: descending, sign-fixed, known spectrum") {
  std::mt19937_64 rng(4);
  const Eigen::Index d = 30;
  Vector<double> lam = Vector<double>::LinSpaced(d, -3.0, 12.0);
  const Matrix<double> q = random_orthonormal(d, d, rng);
  const Matrix<double> s = q * lam.asDiagonal() * q.transpose();
  const la::SymmetricEigenResult<double> e = la::symmetric_eigen(s, 5);
  REQUIRE(e.values.size() == 5);
  for (int i = 0; i < 5; ++i) {
    CHECK(e.values(i) == doctest::Approx(lam(d - 1 - i)).epsilon(1e-12));
    CHECK((s * e.vectors.col(i) - e.values(i) * e.vectors.col(i)).norm() < 1e-11);
    Eigen::Index imax;
    e.vectors.col(i).cwiseAbs().maxCoeff(&imax);
    CHECK(e.vectors(imax, i) > 0.0);
    CHECK(std::abs(std::abs(e.vectors.col(i).dot(q.col(d - 1 - i))) - 1.0) < 1e-10);
  }
  CHECK_THROWS_AS(la::symmetric_eigen(Matrix<double>(Matrix<double>::Zero(3, 2))),
                  cacheshrink::InvalidArgument);
}

TEST_CASE("GramAccumulator top-k equals the SVD of the stacked float32 activations") {
  std::mt19937_64 rng(5);
  const Eigen::Index d = 48, k = 8, rows = 2000;
  // Activations with a decaying spectrum and a large mean offset (like real hidden states).
  Vector<double> scales(d);
  for (Eigen::Index j = 0; j < d; ++j) scales(j) = 3.0 * std::pow(0.85, double(j));
  const Matrix<double> basis = random_orthonormal(d, d, rng);
  const Matrix<double> offset = 4.0 * gaussian<double>(1, d, rng);
  const Matrix<float> x =
      ((gaussian<double>(rows, d, rng) * scales.asDiagonal() * basis.transpose()).rowwise() +
       offset.row(0))
          .cast<float>();
  const Matrix<double> xd = x.cast<double>();

  for (la::Centering c : {la::Centering::None, la::Centering::Mean}) {
    la::GramAccumulator acc(d, c);
    Eigen::Index start = 0, b = 0;
    while (start < rows) {  // uneven batches, including an empty one
      const Eigen::Index len = std::min<Eigen::Index>(rows - start, (b * 37) % 300);
      acc.add(x.middleRows(start, len));
      start += len;
      ++b;
    }
    CHECK(acc.count() == rows);
    Matrix<double> ref = xd;
    if (c == la::Centering::Mean) ref.rowwise() -= xd.colwise().mean();
    Eigen::JacobiSVD<Matrix<double>> svd(ref, Eigen::ComputeThinV);
    const la::PrincipalSubspace ps = acc.top_k(k);
    const double angle =
        la::principal_angles(ps.vectors, Matrix<double>(svd.matrixV().leftCols(k))).maxCoeff();
    MESSAGE(std::string(c == la::Centering::Mean ? "centered" : "uncentered")
            << ": max principal angle Gram vs stacked SVD = " << angle);
    CHECK(angle < 1e-6);
    const Vector<double> sv2 = svd.singularValues().array().square();
    for (Eigen::Index i = 0; i < k; ++i)
      CHECK(ps.values(i) == doctest::Approx(sv2(i)).epsilon(1e-10));
    CHECK(ps.trace == doctest::Approx(sv2.sum()).epsilon(1e-10));
    CHECK(ps.energy(k - 1) == doctest::Approx(sv2.head(k).sum() / sv2.sum()).epsilon(1e-10));
    for (Eigen::Index i = 1; i < k; ++i) CHECK(ps.energy(i) >= ps.energy(i - 1));
    CHECK((acc.mean() - xd.colwise().mean().transpose()).cwiseAbs().maxCoeff() < 1e-12);
    const Matrix<double> cov_ref = ref.transpose() * ref / double(rows);
    CHECK((acc.covariance() - cov_ref).cwiseAbs().maxCoeff() < 1e-10 * cov_ref.cwiseAbs().maxCoeff());

    // Merging two halves equals streaming everything.
    la::GramAccumulator h1(d, c), h2(d, c);
    h1.add(x.topRows(700));
    h2.add(x.bottomRows(rows - 700));
    h1.merge(h2);
    CHECK((h1.statistic() - acc.statistic()).cwiseAbs().maxCoeff() <
          1e-10 * acc.statistic().cwiseAbs().maxCoeff());
  }
  la::GramAccumulator acc(d);
  CHECK_THROWS_AS(acc.top_k(2), cacheshrink::InvalidArgument);
  CHECK_THROWS_WITH_AS(acc.add(Matrix<float>(Matrix<float>::Zero(3, d + 1))),
                       doctest::Contains("expected dim=48"), cacheshrink::InvalidArgument);
  CHECK_THROWS_AS(la::GramAccumulator(0), cacheshrink::InvalidArgument);
}

TEST_CASE("principal_angles resolves tiny and large angles") {
  for (double theta : {1e-10, 1e-7, 0.3, 1.2, 1.5707963267948966}) {
    Matrix<double> a = Matrix<double>::Zero(5, 2), b = Matrix<double>::Zero(5, 2);
    a(0, 0) = 1.0;
    a(1, 1) = 1.0;
    b(0, 0) = 1.0;
    b(1, 1) = std::cos(theta);
    b(2, 1) = std::sin(theta);
    const Vector<double> ang = la::principal_angles(a, b);
    CHECK(ang(0) == doctest::Approx(0.0));
    CHECK(std::abs(ang(1) - theta) < 1e-15 + 1e-12 * theta);
  }
}

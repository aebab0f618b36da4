// Reproduces float64 geoopt 0.5.1 RiemannianAdam runs on Stiefel(canonical=False) recorded in
// tests/fixtures/data/geoopt_riemannian_adam_trajectories.json: X after recorded steps within
// 1e-10 max abs, loss before every step within 1e-10 relative.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cacheshrink/manifold/stiefel.hpp"
#include "cacheshrink/optim/optimizer.hpp"

using cacheshrink::linalg::Matrix;
using Mat = Matrix<double>;
namespace manifold = cacheshrink::manifold;
namespace optim = cacheshrink::optim;

namespace {

nlohmann::json load_fixture() {
  const std::string path =
      std::string(CACHESHRINK_FIXTURES_DIR) + "/data/geoopt_riemannian_adam_trajectories.json";
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.good(), "cannot open " << path);
  return nlohmann::json::parse(in);
}

Mat to_matrix(const nlohmann::json& rows) {
  const auto n = static_cast<Eigen::Index>(rows.size());
  const auto p = static_cast<Eigen::Index>(rows.at(0).size());
  Mat m(n, p);
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index j = 0; j < p; ++j) m(i, j) = rows.at(i).at(j).get<double>();
  return m;
}

}  // namespace

TEST_CASE("geoopt RiemannianAdam trajectories are reproduced in float64") {
  const nlohmann::json fx = load_fixture();
  CHECK(fx.at("geoopt_version").get<std::string>() == "0.5.1");
  const auto& cases = fx.at("cases");
  REQUIRE(cases.size() == 3);
  int case_index = 0;
  for (const auto& c : cases) {
    CAPTURE(case_index);
    const std::string loss = c.at("loss").get<std::string>();
    const Mat a = to_matrix(c.at("A"));
    const Mat target = to_matrix(c.at("target"));
    Mat x = to_matrix(c.at("X0"));
    REQUIRE(x.rows() == c.at("n").get<int>());
    REQUIRE(x.cols() == c.at("p").get<int>());
    // f(X) = -0.5 tr(X^T A X), grad -0.5 (A + A^T) X;  f(X) = sum (X - T)^2, grad 2 (X - T).
    auto f = [&](const Mat& y) -> double {
      if (loss == "brockett") return -0.5 * (y.transpose() * a * y).trace();
      return (y - target).squaredNorm();
    };
    auto egrad = [&](const Mat& y) -> Mat {
      if (loss == "brockett") return -0.5 * ((a + a.transpose()) * y);
      return 2.0 * (y - target);
    };
    REQUIRE((loss == "brockett" || loss == "fit"));

    optim::RiemannianAdamUpdate upd;
    upd.options.lr = c.at("lr").get<double>();
    upd.options.weight_decay = c.at("wd").get<double>();
    upd.options.amsgrad = c.at("amsgrad").get<bool>();
    upd.options.stabilize = c.at("stabilize").is_null() ? 0 : c.at("stabilize").get<int>();
    optim::RiemannianAdam<double> opt(upd);
    Mat g = Mat::Zero(x.rows(), x.cols());
    opt.add("x", x, g, manifold::EuclideanStiefel<double>{});

    const auto& losses = c.at("losses_before_each_step");
    const int steps = c.at("steps").get<int>();
    REQUIRE(static_cast<int>(losses.size()) == steps);
    const auto& recorded = c.at("X_after_steps");
    double worst_loss = 0.0, worst_x = 0.0;
    int checked = 0;
    for (int s = 1; s <= steps; ++s) {
      const double ref = losses.at(s - 1).get<double>();
      const double rel = std::abs(f(x) - ref) / std::max(1e-300, std::abs(ref));
      worst_loss = std::max(worst_loss, rel);
      CHECK_MESSAGE(rel <= 1e-10, "case " << case_index << " loss before step " << s);
      g = egrad(x);
      opt.step();
      const std::string key = std::to_string(s);
      if (recorded.contains(key)) {
        const double err = (x - to_matrix(recorded.at(key))).cwiseAbs().maxCoeff();
        worst_x = std::max(worst_x, err);
        CHECK_MESSAGE(err <= 1e-10, "case " << case_index << " X after step " << s);
        ++checked;
      }
    }
    CHECK(checked == static_cast<int>(recorded.size()));
    Mat e = x.transpose() * x - Mat::Identity(x.cols(), x.cols());
    MESSAGE("case " << case_index << " (" << loss << ", amsgrad=" << upd.options.amsgrad
                    << ", stabilize=" << upd.options.stabilize << "): max rel loss err "
                    << worst_loss << ", max |X - X_geoopt| " << worst_x
                    << ", final |X^T X - I| " << e.cwiseAbs().maxCoeff());
    ++case_index;
  }
}

TEST_CASE("a perturbed optimizer does not reproduce geoopt (the comparison can fail)") {
  const nlohmann::json fx = load_fixture();
  const auto& c = fx.at("cases").at(0);
  const Mat a = to_matrix(c.at("A"));
  Mat x = to_matrix(c.at("X0"));
  optim::RiemannianAdamUpdate upd;
  upd.options.lr = c.at("lr").get<double>();
  upd.options.eps = 1e-6;  // a different eps must move the trajectory beyond 1e-10
  optim::RiemannianAdam<double> opt(upd);
  Mat g;
  opt.add("x", x, g = Mat::Zero(x.rows(), x.cols()), manifold::EuclideanStiefel<double>{});
  for (int s = 1; s <= 10; ++s) {
    g = -a * x;
    opt.step();
  }
  const double err = (x - to_matrix(c.at("X_after_steps").at("10"))).cwiseAbs().maxCoeff();
  CHECK(err > 1e-10);
}

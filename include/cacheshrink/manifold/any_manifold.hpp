#pragma once
// A closed set of manifold models behind one value type, so a trainer can keep parameters on
// different manifolds (Stiefel up-projections, Euclidean down-projections) in one list.
// Dispatch is a std::visit per call: one branch per optimizer step per parameter, negligible
// next to the O(n p^2) manifold work.
#include <string_view>
#include <variant>

#include "cacheshrink/manifold/concept.hpp"
#include "cacheshrink/manifold/euclidean.hpp"
#include "cacheshrink/manifold/stiefel.hpp"

namespace cacheshrink::manifold {

template <RealScalar Scalar_>
class AnyManifold {
 public:
  using Scalar = Scalar_;
  using Mat = Matrix<Scalar>;
  using Variant =
      std::variant<Euclidean<Scalar>, EuclideanStiefel<Scalar>, CanonicalStiefel<Scalar>,
                   Stiefel<Scalar, EuclideanMetric, PolarRetraction>,
                   Stiefel<Scalar, EuclideanMetric, CayleyRetraction>>;

  AnyManifold() = default;
  template <class M>
    requires std::is_constructible_v<Variant, M>
  AnyManifold(M m) : v_(std::move(m)) {}  // NOLINT(google-explicit-constructor)

  const Variant& variant() const { return v_; }
  bool is_euclidean() const { return std::holds_alternative<Euclidean<Scalar>>(v_); }

  static constexpr std::string_view name() { return "AnyManifold"; }
  std::string_view model_name() const {
    return std::visit([](const auto& m) { return std::decay_t<decltype(m)>::name(); }, v_);
  }

#define CACHESHRINK_ANY_MANIFOLD_FORWARD(ret, fn, params, args) \
  ret fn params const {                                           \
    return std::visit([&](const auto& m) -> ret { return m.fn args; }, v_); \
  }
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, projx, (const Mat& x), (x))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, proju, (const Mat& x, const Mat& u), (x, u))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, egrad2rgrad, (const Mat& x, const Mat& g), (x, g))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, retr, (const Mat& x, const Mat& u), (x, u))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, transp, (const Mat& x, const Mat& y, const Mat& v),
                                   (x, y, v))
  std::pair<Mat, Mat> retr_transp(const Mat& x, const Mat& u, const Mat& v) const {
    return std::visit([&](const auto& m) { return m.retr_transp(x, u, v); }, v_);
  }
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Scalar, inner, (const Mat& x, const Mat& u, const Mat& v),
                                   (x, u, v))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, component_inner, (const Mat& x, const Mat& u), (x, u))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(Mat, random, (Eigen::Index r, Eigen::Index c, Rng& rng),
                                   (r, c, rng))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(CheckResult, check_shape, (Eigen::Index r, Eigen::Index c),
                                   (r, c))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(CheckResult, check_point, (const Mat& x, Tolerance tol = {}),
                                   (x, tol))
  CACHESHRINK_ANY_MANIFOLD_FORWARD(CheckResult, check_vector,
                                   (const Mat& x, const Mat& u, Tolerance tol = {}), (x, u, tol))
#undef CACHESHRINK_ANY_MANIFOLD_FORWARD

 private:
  Variant v_;
};

static_assert(Manifold<AnyManifold<double>>);

}  // namespace cacheshrink::manifold

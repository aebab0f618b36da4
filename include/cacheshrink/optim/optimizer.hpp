#pragma once
// Optimizer<Scalar, UpdatePolicy>: a parameter group (several matrices, each on its own
// manifold, each with its own state) driven by one update policy. The optimizer does not own
// parameters or gradients: add() stores pointers, which must outlive the optimizer (the
// trainer owns weights and gradient buffers, allocated once).
//
//   Matrix<float> wuk = ..., gwuk = ..., wdk = ..., gwdk = ...;
//   optim::RiemannianAdam<float> opt({.options = {.lr = 1e-4, .stabilize = 10}});
//   opt.add("layer0.wuk", wuk, gwuk, manifold::EuclideanStiefel<float>{});
//   opt.add("layer0.wdk", wdk, gwdk);  // Euclidean: plain Adam
//   for (step...) { fill grads; clip_grad_norm(...); opt.step(schedule.lr(step)); }
#include <concepts>
#include <string>
#include <vector>

#include "cacheshrink/manifold/any_manifold.hpp"
#include "cacheshrink/optim/updates.hpp"

namespace cacheshrink::optim {

using manifold::AnyManifold;
using linalg::RealScalar;

/// What Optimizer needs from an update policy (see optim/updates.hpp for the three models).
template <class P, class Scalar>
concept UpdatePolicy = requires(const P& p, const AnyManifold<Scalar>& m, Matrix<Scalar>& x,
                                const Matrix<Scalar>& g,
                                typename P::template State<Scalar>& s, double lr) {
  { p.lr() } -> std::convertible_to<double>;
  p.validate();
  p.update(m, x, g, s, lr);
  { p.stabilize_due(s) } -> std::convertible_to<bool>;
  p.stabilize(m, x, s);
};

template <RealScalar Scalar_, class Update_>
class Optimizer {
  static_assert(UpdatePolicy<Update_, Scalar_>,
                "Optimizer<Scalar, Update>: Update must be an update policy such as "
                "RiemannianAdamUpdate, AdamWUpdate or SgdUpdate (include optim/updates.hpp)");

 public:
  using Scalar = Scalar_;
  using Update = Update_;
  using Mat = Matrix<Scalar>;
  using State = typename Update::template State<Scalar>;

  struct Param {
    std::string name;
    Mat* value = nullptr;       // (n, p), updated in place
    const Mat* grad = nullptr;  // (n, p) Euclidean gradient; nullptr = skip (like grad None)
    AnyManifold<Scalar> manifold;
    State state;
  };

  explicit Optimizer(Update update = {}) : update_(std::move(update)) { update_.validate(); }

  /// Registers a parameter; checks the value is on the manifold's shape (and on the manifold
  /// up to 1e-4 for Stiefel, since the first step re-projects anyway). Returns its index.
  std::size_t add(std::string name, Mat& value, const Mat& grad,
                  AnyManifold<Scalar> m = manifold::Euclidean<Scalar>{}) {
    const manifold::CheckResult shape = m.check_shape(value.rows(), value.cols());
    CACHESHRINK_CHECK(shape.ok, InvalidArgument,
                      "Optimizer::add(" + name + "): " + shape.reason);
    CACHESHRINK_CHECK(grad.rows() == value.rows() && grad.cols() == value.cols(), InvalidArgument,
                      "Optimizer::add(" + name + "): gradient shape " +
                          manifold::detail::shape_str(grad.rows(), grad.cols()) +
                          " != parameter shape " +
                          manifold::detail::shape_str(value.rows(), value.cols()));
    params_.push_back(Param{std::move(name), &value, &grad, std::move(m), State{}});
    return params_.size() - 1;
  }

  /// One step of every parameter with a gradient, at the policy's own lr.
  void step() { step(update_.lr()); }

  /// One step at learning rate lr (from a schedule). Stabilization (RiemannianAdam's
  /// `stabilize`) runs over the whole group after the step, as geoopt's stabilize_group.
  void step(double lr) {
    bool stabilize = false;
    for (Param& p : params_) {
      if (p.grad == nullptr) continue;
      update_.update(p.manifold, *p.value, *p.grad, p.state, lr);
      stabilize = stabilize || update_.stabilize_due(p.state);
    }
    if (stabilize)
      for (Param& p : params_) update_.stabilize(p.manifold, *p.value, p.state);
  }

  /// Points a parameter at a different gradient buffer (or nullptr to freeze it).
  void set_grad(std::size_t i, const Mat* grad) { params_.at(i).grad = grad; }

  std::size_t size() const { return params_.size(); }
  Param& param(std::size_t i) { return params_.at(i); }
  const Param& param(std::size_t i) const { return params_.at(i); }
  const Update& update() const { return update_; }
  Update& update() { return update_; }

 private:
  Update update_;
  std::vector<Param> params_;
};

template <class Scalar>
using RiemannianAdam = Optimizer<Scalar, RiemannianAdamUpdate>;
template <class Scalar>
using AdamW = Optimizer<Scalar, AdamWUpdate>;
template <class Scalar>
using Sgd = Optimizer<Scalar, SgdUpdate>;

}  // namespace cacheshrink::optim

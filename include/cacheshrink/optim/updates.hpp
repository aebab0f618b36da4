#pragma once
// Update policies (ensmallen style): a policy holds its options and knows its per-parameter
// State and how to update one parameter matrix on its manifold. Optimizer<Scalar, Policy>
// (optim/optimizer.hpp) runs a policy over a list of parameters; the free functions below
// are the same math for callers that keep their own state.
//
//   RiemannianAdamUpdate  geoopt.optim.RiemannianAdam, step for one parameter:
//     x  <- projx(x)                              (re-projection for numerical stability)
//     g  <- g + wd x;  rg <- egrad2rgrad(x, g)
//     m  <- b1 m + (1 - b1) rg
//     v  <- b2 v + (1 - b2) component_inner(x, rg)   (one scalar per Stiefel matrix,
//                                                     elementwise for Euclidean = Adam)
//     vmax <- max(vmax, v) if amsgrad
//     d  <- (m / bc1) / (sqrt(v / bc2) + eps),  bc_i = 1 - b_i^t
//     (x, m) <- retr_transp(x, -lr d, m)
//   AdamWUpdate           torch.optim.AdamW (decoupled weight decay); ignores the manifold.
//   SgdUpdate             geoopt.optim.RiemannianSGD; on Euclidean it is torch.optim.SGD.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cacheshrink/manifold/concept.hpp"
#include "cacheshrink/optim/options.hpp"

namespace cacheshrink::optim {

using linalg::Matrix;
using manifold::Manifold;

template <class Scalar>
struct AdamState {
  std::int64_t step = 0;
  Matrix<Scalar> exp_avg;         // (n, p) first moment, tangent at x for Riemannian Adam
  Matrix<Scalar> exp_avg_sq;      // shape of component_inner: (1, 1) Stiefel, (n, p) Euclidean
  Matrix<Scalar> max_exp_avg_sq;  // same shape, amsgrad only
};

template <class Scalar>
struct SgdState {
  std::int64_t step = 0;
  Matrix<Scalar> momentum_buffer;  // (n, p), empty until the first step with momentum > 0
};

namespace detail {
// a / b where b is either a (1, 1) "one scalar per matrix" or has a's shape.
template <class Scalar>
Matrix<Scalar> broadcast_div(const Matrix<Scalar>& a, const Matrix<Scalar>& b) {
  if (b.rows() == 1 && b.cols() == 1 && (a.rows() != 1 || a.cols() != 1))
    return a / b(0, 0);
  return a.cwiseQuotient(b);
}
}  // namespace detail

/// One geoopt RiemannianAdam step on parameter x with Euclidean gradient grad.
template <Manifold M>
void riemannian_adam_step(const M& m, Matrix<typename M::Scalar>& x,
                          const Matrix<typename M::Scalar>& grad,
                          AdamState<typename M::Scalar>& s, const RiemannianAdamOptions& o,
                          double lr) {
  using Scalar = typename M::Scalar;
  using Mat = Matrix<Scalar>;
  CACHESHRINK_CHECK(grad.rows() == x.rows() && grad.cols() == x.cols(), InvalidArgument,
                    "riemannian_adam_step: gradient shape " +
                        manifold::detail::shape_str(grad.rows(), grad.cols()) +
                        " != parameter shape " + manifold::detail::shape_str(x.rows(), x.cols()));
  const Scalar b1 = static_cast<Scalar>(o.beta1), b2 = static_cast<Scalar>(o.beta2);
  ++s.step;
  x = m.projx(x);
  Mat g = grad;
  if (o.weight_decay != 0.0) g += static_cast<Scalar>(o.weight_decay) * x;
  const Mat rg = m.egrad2rgrad(x, g);
  const Mat ci = m.component_inner(x, rg);
  if (s.step == 1 || s.exp_avg.size() == 0) {
    s.exp_avg = Mat::Zero(x.rows(), x.cols());
    s.exp_avg_sq = Mat::Zero(ci.rows(), ci.cols());
    if (o.amsgrad) s.max_exp_avg_sq = Mat::Zero(ci.rows(), ci.cols());
  }
  s.exp_avg = s.exp_avg * b1 + (Scalar(1) - b1) * rg;
  s.exp_avg_sq = s.exp_avg_sq * b2 + (Scalar(1) - b2) * ci;
  const Scalar bc1 = static_cast<Scalar>(1.0 - std::pow(o.beta1, static_cast<double>(s.step)));
  const Scalar bc2 = static_cast<Scalar>(1.0 - std::pow(o.beta2, static_cast<double>(s.step)));
  Mat denom;
  if (o.amsgrad) {
    s.max_exp_avg_sq = s.max_exp_avg_sq.cwiseMax(s.exp_avg_sq);
    denom = (s.max_exp_avg_sq / bc2).cwiseSqrt();
  } else {
    denom = (s.exp_avg_sq / bc2).cwiseSqrt();
  }
  denom.array() += static_cast<Scalar>(o.eps);
  const Mat direction = detail::broadcast_div<Scalar>(s.exp_avg / bc1, denom);
  auto [y, m_new] = m.retr_transp(x, static_cast<Scalar>(-lr) * direction, s.exp_avg);
  x = std::move(y);
  s.exp_avg = std::move(m_new);
}

/// geoopt's stabilize_group for one parameter: x <- projx(x), m <- proju(x, m).
template <Manifold M>
void riemannian_adam_stabilize(const M& m, Matrix<typename M::Scalar>& x,
                               AdamState<typename M::Scalar>& s) {
  if (s.step == 0) return;
  x = m.projx(x);
  s.exp_avg = m.proju(x, s.exp_avg);
}

/// One torch.optim.AdamW step (single-tensor code path, decoupled weight decay).
template <class Scalar>
void adamw_step(Matrix<Scalar>& x, const Matrix<Scalar>& grad, AdamState<Scalar>& s,
                const AdamWOptions& o, double lr) {
  using Mat = Matrix<Scalar>;
  CACHESHRINK_CHECK(grad.rows() == x.rows() && grad.cols() == x.cols(), InvalidArgument,
                    "adamw_step: gradient shape " +
                        manifold::detail::shape_str(grad.rows(), grad.cols()) +
                        " != parameter shape " + manifold::detail::shape_str(x.rows(), x.cols()));
  if (s.step == 0 || s.exp_avg.size() == 0) {
    s.exp_avg = Mat::Zero(x.rows(), x.cols());
    s.exp_avg_sq = Mat::Zero(x.rows(), x.cols());
    if (o.amsgrad) s.max_exp_avg_sq = Mat::Zero(x.rows(), x.cols());
  }
  ++s.step;
  const Scalar b1 = static_cast<Scalar>(o.beta1), b2 = static_cast<Scalar>(o.beta2);
  if (o.weight_decay != 0.0) x *= static_cast<Scalar>(1.0 - lr * o.weight_decay);
  // torch lerp_(end, w): start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
  const Scalar w = Scalar(1) - b1;
  if (w < Scalar(0.5))
    s.exp_avg = s.exp_avg + w * (grad - s.exp_avg);
  else
    s.exp_avg = grad - (grad - s.exp_avg) * (Scalar(1) - w);
  s.exp_avg_sq = s.exp_avg_sq * b2 + (Scalar(1) - b2) * grad.cwiseProduct(grad);
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(s.step));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(s.step));
  const Scalar step_size = static_cast<Scalar>(lr / bc1);
  const Scalar bc2_sqrt = static_cast<Scalar>(std::sqrt(bc2));
  Mat denom;
  if (o.amsgrad) {
    s.max_exp_avg_sq = s.max_exp_avg_sq.cwiseMax(s.exp_avg_sq);
    denom = s.max_exp_avg_sq.cwiseSqrt() / bc2_sqrt;
  } else {
    denom = s.exp_avg_sq.cwiseSqrt() / bc2_sqrt;
  }
  denom.array() += static_cast<Scalar>(o.eps);
  x += -step_size * s.exp_avg.cwiseQuotient(denom);
}

/// One geoopt RiemannianSGD step (torch.optim.SGD on Euclidean parameters).
template <Manifold M>
void sgd_step(const M& m, Matrix<typename M::Scalar>& x, const Matrix<typename M::Scalar>& grad,
              SgdState<typename M::Scalar>& s, const SgdOptions& o, double lr) {
  using Scalar = typename M::Scalar;
  using Mat = Matrix<Scalar>;
  CACHESHRINK_CHECK(grad.rows() == x.rows() && grad.cols() == x.cols(), InvalidArgument,
                    "sgd_step: gradient shape " +
                        manifold::detail::shape_str(grad.rows(), grad.cols()) +
                        " != parameter shape " + manifold::detail::shape_str(x.rows(), x.cols()));
  ++s.step;
  Mat g = grad;
  if (o.weight_decay != 0.0) g += static_cast<Scalar>(o.weight_decay) * x;
  g = m.egrad2rgrad(x, g);
  if (o.momentum > 0.0) {
    const Scalar mu = static_cast<Scalar>(o.momentum);
    if (s.momentum_buffer.size() == 0)
      s.momentum_buffer = g;  // torch: buf = clone(d_p) on the first step
    else
      s.momentum_buffer = s.momentum_buffer * mu + static_cast<Scalar>(1.0 - o.dampening) * g;
    const Mat d = o.nesterov ? Mat(g + mu * s.momentum_buffer) : s.momentum_buffer;
    auto [y, buf] = m.retr_transp(x, static_cast<Scalar>(-lr) * d, s.momentum_buffer);
    x = std::move(y);
    s.momentum_buffer = std::move(buf);
  } else {
    x = m.retr(x, static_cast<Scalar>(-lr) * g);
  }
}

// ---- policies --------------------------------------------------------------------------------

struct RiemannianAdamUpdate {
  RiemannianAdamOptions options;
  template <class Scalar>
  using State = AdamState<Scalar>;

  double lr() const { return options.lr; }
  void validate() const { options.validate(); }
  template <Manifold M>
  void update(const M& m, Matrix<typename M::Scalar>& x, const Matrix<typename M::Scalar>& g,
              State<typename M::Scalar>& s, double lr) const {
    riemannian_adam_step(m, x, g, s, options, lr);
  }
  /// Group-level stabilization is due after a step that brought some parameter to step k.
  template <class Scalar>
  bool stabilize_due(const State<Scalar>& s) const {
    return options.stabilize > 0 && s.step > 0 && s.step % options.stabilize == 0;
  }
  template <Manifold M>
  void stabilize(const M& m, Matrix<typename M::Scalar>& x, State<typename M::Scalar>& s) const {
    riemannian_adam_stabilize(m, x, s);
  }
};

struct AdamWUpdate {
  AdamWOptions options;
  template <class Scalar>
  using State = AdamState<Scalar>;

  double lr() const { return options.lr; }
  void validate() const { options.validate(); }
  template <Manifold M>
  void update(const M& /*m*/, Matrix<typename M::Scalar>& x, const Matrix<typename M::Scalar>& g,
              State<typename M::Scalar>& s, double lr) const {
    adamw_step(x, g, s, options, lr);
  }
  template <class Scalar>
  bool stabilize_due(const State<Scalar>&) const { return false; }
  template <Manifold M>
  void stabilize(const M&, Matrix<typename M::Scalar>&, State<typename M::Scalar>&) const {}
};

struct SgdUpdate {
  SgdOptions options;
  template <class Scalar>
  using State = SgdState<Scalar>;

  double lr() const { return options.lr; }
  void validate() const { options.validate(); }
  template <Manifold M>
  void update(const M& m, Matrix<typename M::Scalar>& x, const Matrix<typename M::Scalar>& g,
              State<typename M::Scalar>& s, double lr) const {
    sgd_step(m, x, g, s, options, lr);
  }
  template <class Scalar>
  bool stabilize_due(const State<Scalar>&) const { return false; }
  template <Manifold M>
  void stabilize(const M&, Matrix<typename M::Scalar>&, State<typename M::Scalar>&) const {}
};

}  // namespace cacheshrink::optim

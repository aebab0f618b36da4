#pragma once
// Hyper-parameters of the update policies, with validation that names the offending option.
#include <cmath>
#include <string>

#include "cacheshrink/core/error.hpp"

namespace cacheshrink::optim {

namespace detail {
inline void check_option(bool ok, const char* who, const char* option, double value,
                         const char* expected) {
  CACHESHRINK_CHECK(ok, InvalidArgument,
                    std::string(who) + ": option " + option + "=" + std::to_string(value) +
                        " is invalid, expected " + expected);
}
inline void check_adam_like(const char* who, double lr, double beta1, double beta2, double eps,
                            double weight_decay) {
  check_option(std::isfinite(lr) && lr >= 0.0, who, "lr", lr, "a finite value >= 0");
  check_option(beta1 >= 0.0 && beta1 < 1.0, who, "beta1", beta1, "0 <= beta1 < 1");
  check_option(beta2 >= 0.0 && beta2 < 1.0, who, "beta2", beta2, "0 <= beta2 < 1");
  check_option(eps >= 0.0, who, "eps", eps, ">= 0");
  check_option(std::isfinite(weight_decay) && weight_decay >= 0.0, who, "weight_decay",
               weight_decay, "a finite value >= 0");
}
}  // namespace detail

/// geoopt.optim.RiemannianAdam's arguments (defaults identical).
struct RiemannianAdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // L2: added to the Euclidean gradient before projection
  bool amsgrad = false;
  int stabilize = 0;          // every k steps re-project points and moments; 0 = never (None)

  void validate() const {
    detail::check_adam_like("RiemannianAdam", lr, beta1, beta2, eps, weight_decay);
    detail::check_option(stabilize >= 0, "RiemannianAdam", "stabilize", stabilize,
                         ">= 0 (0 disables it)");
  }
};

/// torch.optim.AdamW's arguments (defaults identical, including weight_decay = 1e-2).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // decoupled: x *= 1 - lr * weight_decay before the Adam step
  bool amsgrad = false;

  void validate() const { detail::check_adam_like("AdamW", lr, beta1, beta2, eps, weight_decay); }
};

/// torch.optim.SGD / geoopt.optim.RiemannianSGD arguments.
struct SgdOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;  // L2, added to the Euclidean gradient
  bool nesterov = false;

  void validate() const {
    detail::check_option(std::isfinite(lr) && lr >= 0.0, "Sgd", "lr", lr, "a finite value >= 0");
    detail::check_option(momentum >= 0.0, "Sgd", "momentum", momentum, ">= 0");
    detail::check_option(weight_decay >= 0.0, "Sgd", "weight_decay", weight_decay, ">= 0");
    detail::check_option(!nesterov || (momentum > 0.0 && dampening == 0.0), "Sgd", "nesterov",
                         nesterov ? 1.0 : 0.0, "momentum > 0 and dampening = 0 with nesterov");
  }
};

}  // namespace cacheshrink::optim

#pragma once
// Learning-rate schedules as multipliers of a base lr, evaluated at the optimizer step index
// t = 0, 1, ... (the value used for the (t+1)-th optimizer step), matching HF transformers'
// LambdaLR-based schedules:
//   Constant            f(t) = 1
//   LinearWarmupDecay   get_linear_schedule_with_warmup:
//                       f(t) = t / max(1, W) for t < W, else max(0, (T - t) / max(1, T - W))
//   CosineWarmupDecay   get_cosine_schedule_with_warmup (num_cycles = 0.5):
//                       f(t) = t / max(1, W) for t < W, else
//                       max(0, (1 + cos(pi * 2 c * (t - W) / max(1, T - W))) / 2)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>
#include <variant>

#include "cacheshrink/core/error.hpp"

namespace cacheshrink::optim {

struct ConstantSchedule {
  double base_lr = 1e-3;
  double lr(std::int64_t /*step*/) const { return base_lr; }
};

struct LinearWarmupDecay {
  double base_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  double lr(std::int64_t t) const {
    const auto w = static_cast<double>(warmup_steps), T = static_cast<double>(total_steps);
    const auto s = static_cast<double>(t);
    if (t < warmup_steps) return base_lr * s / std::max(1.0, w);
    return base_lr * std::max(0.0, (T - s) / std::max(1.0, T - w));
  }
};

struct CosineWarmupDecay {
  double base_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  double num_cycles = 0.5;
  double lr(std::int64_t t) const {
    const auto w = static_cast<double>(warmup_steps), T = static_cast<double>(total_steps);
    const auto s = static_cast<double>(t);
    if (t < warmup_steps) return base_lr * s / std::max(1.0, w);
    const double progress = (s - w) / std::max(1.0, T - w);
    return base_lr *
           std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
  }
};

/// Runtime choice of schedule (e.g. from a --lr-schedule flag).
class Schedule {
 public:
  using Variant = std::variant<ConstantSchedule, LinearWarmupDecay, CosineWarmupDecay>;
  Schedule() = default;
  template <class S>
    requires std::is_constructible_v<Variant, S>
  Schedule(S s) : v_(std::move(s)) {}  // NOLINT(google-explicit-constructor)

  double lr(std::int64_t step) const {
    return std::visit([&](const auto& s) { return s.lr(step); }, v_);
  }
  const Variant& variant() const { return v_; }

 private:
  Variant v_;
};

/// "constant" | "linear" | "cosine" -> Schedule; anything else throws InvalidArgument.
inline Schedule make_schedule(std::string_view kind, double base_lr, std::int64_t warmup_steps,
                              std::int64_t total_steps) {
  CACHESHRINK_CHECK(warmup_steps >= 0 && total_steps >= 1, InvalidArgument,
                    "make_schedule: need warmup_steps >= 0 and total_steps >= 1, got " +
                        std::to_string(warmup_steps) + ", " + std::to_string(total_steps));
  if (kind == "constant") return ConstantSchedule{base_lr};
  if (kind == "linear") return LinearWarmupDecay{base_lr, warmup_steps, total_steps};
  if (kind == "cosine") return CosineWarmupDecay{base_lr, warmup_steps, total_steps};
  throw InvalidArgument("make_schedule: unknown schedule '" + std::string(kind) +
                        "', expected one of constant, linear, cosine");
}

}  // namespace cacheshrink::optim

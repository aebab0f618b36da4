#pragma once
// Row-wise CPU kernels of the forward pass: norms, activations, RoPE.
// x: (tokens, features) row-major; all statistics in float like HF's float32 eager path.
#include <cmath>
#include <vector>

#include "cacheshrink/core/config.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/tensor.hpp"

namespace cacheshrink::model {

/// y = x / sqrt(mean(x^2) + eps) * w, per row.
inline void rms_norm(const MatrixRf& x, const VectorXf& w, float eps, MatrixRf& y) {
  y.resize(x.rows(), x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const float ms = x.row(i).squaredNorm() / static_cast<float>(x.cols());
    const float r = 1.0f / std::sqrt(ms + eps);
    y.row(i) = (x.row(i) * r).cwiseProduct(w.transpose());
  }
}

/// y = (x - mean) / sqrt(var + eps) * w + b, per row (biased variance).
inline void layer_norm(const MatrixRf& x, const VectorXf& w, const VectorXf& b, float eps, MatrixRf& y) {
  y.resize(x.rows(), x.cols());
  const float inv_n = 1.0f / static_cast<float>(x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const float mean = x.row(i).sum() * inv_n;
    const auto centered = x.row(i).array() - mean;
    const float var = centered.square().sum() * inv_n;
    const float r = 1.0f / std::sqrt(var + eps);
    y.row(i) = ((centered * r) * w.transpose().array() + b.transpose().array()).matrix();
  }
}

inline void apply_norm(const ModelConfig& c, const MatrixRf& x, const VectorXf& w, const VectorXf& b, MatrixRf& y) {
  if (c.family == Family::Gpt2) layer_norm(x, w, b, static_cast<float>(c.norm_eps), y);
  else rms_norm(x, w, static_cast<float>(c.norm_eps), y);
}

/// RMSNorm of every head_dim slice of every row (Qwen3's q_norm / k_norm).
inline void head_rms_norm(MatrixRf& x, int head_dim, const VectorXf& w, float eps) {
  const int heads = static_cast<int>(x.cols()) / head_dim;
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (int h = 0; h < heads; ++h) {
      auto seg = x.row(i).segment(h * head_dim, head_dim);
      const float r = 1.0f / std::sqrt(seg.squaredNorm() / static_cast<float>(head_dim) + eps);
      seg = (seg * r).cwiseProduct(w.transpose());
    }
}

inline float gelu_tanh(float x) {
  constexpr float k = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

/// RoPE tables: inverse frequencies as HF computes them (float32), with the rope_scaling
/// variants the supported configs use.
class Rope {
 public:
  Rope() = default;
  explicit Rope(const ModelConfig& c) : head_dim_(c.head_dim) {
    if (head_dim_ > 1024 || head_dim_ % 2 != 0) throw ConfigError(c.source + ": RoPE needs an even head_dim <= 1024");
    const int half = head_dim_ / 2;
    inv_freq_.resize(half);
    for (int i = 0; i < half; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim_);
      inv_freq_[i] = 1.0f / std::pow(static_cast<float>(c.rope_theta), e);
    }
    const auto& s = c.rope_scaling;
    if (s.type == "linear") {
      for (auto& f : inv_freq_) f /= static_cast<float>(s.factor);
    } else if (s.type == "llama3") {
      const double low_wavelen = s.original_max_position / s.low_freq_factor;
      const double high_wavelen = s.original_max_position / s.high_freq_factor;
      for (auto& f : inv_freq_) {
        const double wavelen = 2.0 * M_PI / f;
        if (wavelen > low_wavelen) {
          f = static_cast<float>(f / s.factor);
        } else if (wavelen >= high_wavelen) {
          const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
          f = static_cast<float>((1.0 - smooth) * f / s.factor + smooth * f);
        }
      }
    }
  }

  /// cos/sin for one position, half-split layout (entries i and i + half share a frequency).
  void angles(int pos, float* cos_out, float* sin_out) const {
    const int half = head_dim_ / 2;
    for (int i = 0; i < half; ++i) {
      const float a = static_cast<float>(pos) * inv_freq_[i];
      cos_out[i] = static_cast<float>(std::cos(static_cast<double>(a)));
      sin_out[i] = static_cast<float>(std::sin(static_cast<double>(a)));
    }
  }

  /// Rotates every head of row `row` of x at position `pos`: x*cos + rotate_half(x)*sin.
  /// cos/sin come from a per-position table grown on demand (not thread-safe, like the
  /// Transformer that owns this object).
  void apply_row(float* row, int heads, int pos) const {
    const int half = head_dim_ / 2;
    if (pos >= table_positions_) grow(pos + 1);
    const float* c = cos_.data() + static_cast<std::size_t>(pos) * half;
    const float* s = sin_.data() + static_cast<std::size_t>(pos) * half;
    for (int h = 0; h < heads; ++h) {
      float* x = row + h * head_dim_;
      for (int i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }

  int head_dim() const { return head_dim_; }
  const std::vector<float>& inv_freq() const { return inv_freq_; }

 private:
  void grow(int positions) const {
    const int half = head_dim_ / 2;
    const int n = std::max(positions, 2 * table_positions_);
    cos_.resize(static_cast<std::size_t>(n) * half);
    sin_.resize(static_cast<std::size_t>(n) * half);
    for (int p = table_positions_; p < n; ++p)
      angles(p, cos_.data() + static_cast<std::size_t>(p) * half, sin_.data() + static_cast<std::size_t>(p) * half);
    table_positions_ = n;
  }

  int head_dim_ = 0;
  std::vector<float> inv_freq_;
  mutable std::vector<float> cos_, sin_;  // (positions, head_dim / 2)
  mutable int table_positions_ = 0;
};

}  // namespace cacheshrink::model

#pragma once
// Training kernels: one explicit forward (that keeps what its backward needs) and one explicit
// backward per op, llm.c style, templated on Scalar (float for training, double for the
// finite-difference checks). Activations are row-major (tokens, features). Every backward
// ACCUMULATES into its input gradient (dx += ...), so residual branches just add up.
//
// Math (per row; r = 1/sqrt(stat + eps)):
//   RMSNorm    y = x r w,                 dx = r (g - x r^2 <x, g> / n),              g = dy * w
//   LayerNorm  y = xh w + b, xh = (x-mu) r, dx = r (g - mean(g) - xh mean(g * xh))
//   RoPE       y = R(pos) x (a rotation);  dx = R(pos)^T dy  (same rotation with -sin)
//   attention  S = q k^T / sqrt(d), P = softmax(S + mask), o = P v
//              dP = do v^T, dv = P^T do, dS = P * (dP - rowsum(P * dP)), dq = dS k / sqrt(d),
//              dk = dS^T q / sqrt(d); GQA/MQA: query head h reads KV head h / group, so dk, dv
//              of a KV head sum over its query heads.
//   GELU-tanh  d/du 0.5 u (1 + tanh(a)), a = c (u + 0.044715 u^3)
//              = 0.5 (1 + t) + 0.5 u (1 - t^2) c (1 + 3 * 0.044715 u^2)
//   SwiGLU     a = silu(g) u: dg = da u s (1 + g (1 - s)), du = da silu(g), s = sigmoid(g)
//   CE         L = sum_t w (lse(z_t) - z_t[y_t]); dz = w (softmax(z_t) - onehot(y_t))
//   KL_T       L = sum_t w sum_v p_t (log p_t - log q_t), p/q = softmax(teacher/T), softmax(z/T);
//              dz = (w / T) (q - p)
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cacheshrink/core/tensor.hpp"
#include "cacheshrink/model/layers.hpp"

namespace cacheshrink::train::ops {

template <class S>
using MatR = MatrixR<S>;
template <class S>
using Vec = VectorX<S>;

// ---- RMSNorm ---------------------------------------------------------------------------------
/// y = x / sqrt(mean(x^2) + eps) * w per row; rstd (rows) kept for the backward.
template <class S>
void rms_norm_forward(const MatR<S>& x, const Vec<S>& w, S eps, MatR<S>& y, Vec<S>& rstd) {
  y.resize(x.rows(), x.cols());
  rstd.resize(x.rows());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const S r = S(1) / std::sqrt(x.row(i).squaredNorm() / static_cast<S>(x.cols()) + eps);
    rstd(i) = r;
    y.row(i) = (x.row(i) * r).cwiseProduct(w.transpose());
  }
}
template <class S>
void rms_norm_backward(const MatR<S>& x, const Vec<S>& w, const Vec<S>& rstd, const MatR<S>& dy, MatR<S>& dx) {
  const S n = static_cast<S>(x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const S r = rstd(i);
    const auto g = dy.row(i).cwiseProduct(w.transpose());
    const S xg = x.row(i).dot(g);
    dx.row(i) += r * g - (r * r * r * xg / n) * x.row(i);
  }
}

// ---- LayerNorm -------------------------------------------------------------------------------
template <class S>
void layer_norm_forward(const MatR<S>& x, const Vec<S>& w, const Vec<S>& b, S eps, MatR<S>& y, Vec<S>& mean, Vec<S>& rstd) {
  y.resize(x.rows(), x.cols());
  mean.resize(x.rows());
  rstd.resize(x.rows());
  const S inv_n = S(1) / static_cast<S>(x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const S mu = x.row(i).sum() * inv_n;
    const auto c = x.row(i).array() - mu;
    const S r = S(1) / std::sqrt(c.square().sum() * inv_n + eps);
    mean(i) = mu;
    rstd(i) = r;
    y.row(i) = ((c * r) * w.transpose().array() + b.transpose().array()).matrix();
  }
}
template <class S>
void layer_norm_backward(const MatR<S>& x, const Vec<S>& w, const Vec<S>& mean, const Vec<S>& rstd, const MatR<S>& dy, MatR<S>& dx) {
  const S inv_n = S(1) / static_cast<S>(x.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const S r = rstd(i);
    const auto xh = ((x.row(i).array() - mean(i)) * r).eval();
    const auto g = (dy.row(i).array() * w.transpose().array()).eval();
    const S mg = g.sum() * inv_n, mgx = (g * xh).sum() * inv_n;
    dx.row(i).array() += r * (g - mg - xh * mgx);
  }
}

// ---- per-head RMSNorm (Qwen3 q_norm / k_norm), in place ---------------------------------------
/// x (rows, heads*hd) is normalised per head slice; x_in keeps the input, rstd (rows*heads).
template <class S>
void head_rms_norm_forward(MatR<S>& x, int hd, const Vec<S>& w, S eps, MatR<S>& x_in, Vec<S>& rstd) {
  x_in = x;
  const int heads = static_cast<int>(x.cols()) / hd;
  rstd.resize(x.rows() * heads);
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (int h = 0; h < heads; ++h) {
      auto seg = x.row(i).segment(h * hd, hd);
      const S r = S(1) / std::sqrt(seg.squaredNorm() / static_cast<S>(hd) + eps);
      rstd(i * heads + h) = r;
      seg = (seg * r).cwiseProduct(w.transpose());
    }
}
/// dx (in place): on entry the gradient w.r.t. the output, on exit w.r.t. the input.
template <class S>
void head_rms_norm_backward(const MatR<S>& x_in, int hd, const Vec<S>& w, const Vec<S>& rstd, MatR<S>& d) {
  const int heads = static_cast<int>(x_in.cols()) / hd;
  for (Eigen::Index i = 0; i < x_in.rows(); ++i)
    for (int h = 0; h < heads; ++h) {
      const S r = rstd(i * heads + h);
      const auto x = x_in.row(i).segment(h * hd, hd);
      auto dseg = d.row(i).segment(h * hd, hd);
      const Vec<S> g = dseg.transpose().cwiseProduct(w);
      const S xg = x.dot(g.transpose());
      dseg = r * g.transpose() - (r * r * r * xg / static_cast<S>(hd)) * x;
    }
}

// ---- RoPE ------------------------------------------------------------------------------------
/// cos/sin tables (positions, head_dim/2) computed exactly like the runtime (float angles).
template <class S>
struct RopeTable {
  MatR<S> cos, sin;
  int half = 0;
  void ensure(const model::Rope& rope, int positions) {
    half = rope.head_dim() / 2;
    if (cos.rows() >= positions) return;
    cos.resize(positions, half);
    sin.resize(positions, half);
    std::vector<float> c(static_cast<std::size_t>(half)), s(static_cast<std::size_t>(half));
    for (int p = 0; p < positions; ++p) {
      rope.angles(p, c.data(), s.data());
      for (int i = 0; i < half; ++i) {
        cos(p, i) = static_cast<S>(c[static_cast<std::size_t>(i)]);
        sin(p, i) = static_cast<S>(s[static_cast<std::size_t>(i)]);
      }
    }
  }
  /// Rotates every head of one row at position pos; inverse = true applies R^T (the backward).
  void apply(S* row, int heads, int pos, bool inverse) const {
    const S* c = cos.row(pos).data();
    const S* s = sin.row(pos).data();
    const S sg = inverse ? S(-1) : S(1);
    for (int h = 0; h < heads; ++h) {
      S* x = row + h * 2 * half;
      for (int i = 0; i < half; ++i) {
        const S x1 = x[i], x2 = x[i + half], si = sg * s[i];
        x[i] = x1 * c[i] - x2 * si;
        x[i + half] = x2 * c[i] + x1 * si;
      }
    }
  }
};

// ---- causal (optionally sliding-window) attention of one packed sequence ----------------------
/// q: (n, nh*hd), k/v: (n, nkv*hd) blocks of one sequence at positions 0..n-1; window > 0 keeps
/// keys j > i - window. P (nh matrices (n, n)) keeps the probabilities for the backward.
template <class S, class QB, class KB, class VB, class OB>
void attention_forward(const QB& q, const KB& k, const VB& v, int nh, int nkv, int hd, int window, std::vector<MatR<S>>& P, OB&& out) {
  const int n = static_cast<int>(q.rows());
  const int group = nh / nkv;
  const S scale = S(1) / std::sqrt(static_cast<S>(hd));
  P.resize(static_cast<std::size_t>(nh));
  for (int h = 0; h < nh; ++h) {
    const int kvh = h / group;
    auto& Ph = P[static_cast<std::size_t>(h)];
    Ph.resize(n, n);
    Ph.noalias() = (q.middleCols(h * hd, hd) * scale) * k.middleCols(kvh * hd, hd).transpose();
    for (int i = 0; i < n; ++i) {
      const int a = window > 0 ? std::max(0, i - window + 1) : 0;
      auto row = Ph.row(i);
      S m = -std::numeric_limits<S>::infinity();
      for (int j = a; j <= i; ++j) m = std::max(m, row[j]);
      S sum = 0;
      for (int j = 0; j < n; ++j) {
        const S e = (j >= a && j <= i) ? std::exp(row[j] - m) : S(0);
        row[j] = e;
        sum += e;
      }
      row *= S(1) / sum;
    }
    out.middleCols(h * hd, hd).noalias() = Ph * v.middleCols(kvh * hd, hd);
  }
}

/// Accumulates dq, dk, dv (blocks of the sequence) from dout.
template <class S, class QB, class KB, class VB, class DOB, class DQB, class DKB, class DVB>
void attention_backward(const QB& q, const KB& k, const VB& v, int nh, int nkv, int hd, const std::vector<MatR<S>>& P, const DOB& dout,
                        DQB&& dq, DKB&& dk, DVB&& dv, MatR<S>& scratch) {
  const int n = static_cast<int>(q.rows());
  const int group = nh / nkv;
  const S scale = S(1) / std::sqrt(static_cast<S>(hd));
  for (int h = 0; h < nh; ++h) {
    const int kvh = h / group;
    const auto& Ph = P[static_cast<std::size_t>(h)];
    const auto dO = dout.middleCols(h * hd, hd);
    dv.middleCols(kvh * hd, hd).noalias() += Ph.transpose() * dO;
    auto& dS = scratch;
    dS.resize(n, n);
    dS.noalias() = dO * v.middleCols(kvh * hd, hd).transpose();  // dP
    for (int i = 0; i < n; ++i) {
      const S rs = Ph.row(i).dot(dS.row(i));
      dS.row(i) = Ph.row(i).cwiseProduct((dS.row(i).array() - rs).matrix());
    }
    dq.middleCols(h * hd, hd).noalias() += scale * (dS * k.middleCols(kvh * hd, hd));
    dk.middleCols(kvh * hd, hd).noalias() += scale * (dS.transpose() * q.middleCols(h * hd, hd));
  }
}

// ---- activations -----------------------------------------------------------------------------
template <class S>
S gelu_tanh(S x) {
  constexpr S c = static_cast<S>(0.7978845608028654);
  return S(0.5) * x * (S(1) + std::tanh(c * (x + static_cast<S>(0.044715) * x * x * x)));
}
template <class S>
S gelu_tanh_grad(S x) {
  constexpr S c = static_cast<S>(0.7978845608028654);
  constexpr S k = static_cast<S>(0.044715);
  const S t = std::tanh(c * (x + k * x * x * x));
  return S(0.5) * (S(1) + t) + S(0.5) * x * (S(1) - t * t) * c * (S(1) + S(3) * k * x * x);
}
template <class S>
S sigmoid(S x) {
  return S(1) / (S(1) + std::exp(-x));
}
template <class S>
S silu(S x) {
  return x / (S(1) + std::exp(-x));
}
template <class S>
S silu_grad(S x) {
  const S s = sigmoid(x);
  return s * (S(1) + x * (S(1) - s));
}

// ---- losses on logits ------------------------------------------------------------------------
/// Cross-entropy of row t of z against target[t] (< 0: not scored). Returns sum of the losses
/// (in double); dz row t = weight * (softmax - onehot), rows without a target are zero.
template <class S>
double cross_entropy(const MatR<S>& z, const std::vector<int>& target, S weight, MatR<S>* dz) {
  double total = 0;
  if (dz) dz->setZero(z.rows(), z.cols());
  for (Eigen::Index t = 0; t < z.rows(); ++t) {
    const int y = target[static_cast<std::size_t>(t)];
    if (y < 0) continue;
    const auto row = z.row(t);
    const S m = row.maxCoeff();
    const S sum = (row.array() - m).exp().sum();
    total += static_cast<double>(m) + std::log(static_cast<double>(sum)) - static_cast<double>(row(y));
    if (dz) {
      dz->row(t) = ((row.array() - m).exp() * (weight / sum)).matrix();
      (*dz)(t, y) -= weight;
    }
  }
  return total;
}

/// KL(softmax(teacher/T) || softmax(z/T)) summed over rows (double); dz += weight/T (q - p).
template <class S>
double kl_temperature(const MatR<S>& z, const MatR<S>& teacher, S T, S weight, MatR<S>* dz) {
  double total = 0;
  Vec<S> lp, lq;
  for (Eigen::Index t = 0; t < z.rows(); ++t) {
    lp = teacher.row(t).transpose() / T;
    lq = z.row(t).transpose() / T;
    const S mp = lp.maxCoeff(), mq = lq.maxCoeff();
    lp.array() -= mp + std::log((lp.array() - mp).exp().sum());
    lq.array() -= mq + std::log((lq.array() - mq).exp().sum());
    const auto p = lp.array().exp();
    total += static_cast<double>((p * (lp.array() - lq.array())).sum());
    if (dz) dz->row(t).array() += (weight / T) * (lq.array().exp() - p).transpose();
  }
  return total;
}

}  // namespace cacheshrink::train::ops

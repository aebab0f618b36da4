#pragma once
// TrainGraph<Scalar>: the training forward (keeping activations) and backward of a converted
// model, for every supported family, over packed batches (each sequence's real tokens only,
// positions 0..n-1; padded batches are packed by their mask first, see pack_padded).
//
// Trainable parameters are the compression matrices only, kept as column-major
// linalg::Matrix<Scalar> with a gradient buffer each (what optim::Optimizer registers):
//   per MLA layer  w_down_k (d_latent, hidden), w_down_v (d_latent, hidden; not for joint)
//   per basis      w_up_k, w_up_v (d_kv, d_latent) on the Stiefel manifold; xkv layers of a
//                  group share one parameter (their gradients add up); joint keeps the stacked
//                  [w_up_k; w_up_v] (2 d_kv, d_latent) as ONE Stiefel parameter, because the
//                  conversion makes the two jointly orthonormal.
// Frozen weights are copied once into Scalar (so a double graph checks gradients exactly).
//
// Losses (alpha = recon_alpha; N_pred = tokens with a next token; N = real tokens):
//   LM        mean over N_pred of -log softmax(z_t)[y_{t+1}]
//   recon     mean over MLA layers of (MSE(K~, K) + MSE(V~, V)) / 2, MSE averaged over N * d_kv
//             (ReconNorm::Tokens). ReconNorm::Padded divides the same sum over real tokens by
//             B * T_max * d_kv instead (B sequences, T_max the longest): the denominator of the
//             original's F.mse_loss over its padded (B, T_max, d_kv) tensor, i.e. the Tokens term
//             times N / (B * T_max). Padding positions themselves add no term (the original's do).
//             K = h Wk^T + bk and V = h Wv^T + bv: the ORIGINAL projections applied to the same
//             attention input h the MLA layer sees in this forward (after the input norm),
//             before k-norm and RoPE; K~ = c_k Wuk^T + bk likewise (biases cancel). The target
//             depends on h, and so on the compressed layers below: its gradient is included
//             (no stop-gradient), so the loss is differentiated exactly.
//   total     (1 - alpha) LM + alpha recon
//   distill   alpha_d T^2 KL(softmax(z_teacher/T) || softmax(z/T)) + (1 - alpha_d) LM, the KL
//             averaged over all N real tokens; teacher = the same model with the original K/V.
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/linalg/types.hpp"
#include "cacheshrink/model/layers.hpp"
#include "cacheshrink/model/weights.hpp"
#include "cacheshrink/train/ops.hpp"

namespace cacheshrink::train {

/// Normalisation of the reconstruction MSE of one batch (see the file comment).
enum class ReconNorm {
  Tokens,  // sum over the N real tokens / (N d_kv)
  Padded   // sum over the N real tokens / (B T_max d_kv): the original's padded mean, without padding terms
};

inline const char* recon_norm_name(ReconNorm r) { return r == ReconNorm::Padded ? "padded" : "tokens"; }

/// "tokens" | "padded"; anything else throws InvalidArgument naming `option` and the allowed values.
inline ReconNorm parse_recon_norm(const std::string& s, const std::string& option = "recon_norm") {
  if (s == "tokens") return ReconNorm::Tokens;
  if (s == "padded") return ReconNorm::Padded;
  throw InvalidArgument("train: option " + option + "='" + s + "' is invalid, expected one of: tokens, padded");
}

struct LossOptions {
  double recon_alpha = 0.0;  // weight of the reconstruction loss; 0 = pure LM
  bool distill = false;      // distillation from the original model (exclusive with recon_alpha > 0)
  double distill_alpha = 0.9;
  double temperature = 2.0;
  ReconNorm recon_norm = ReconNorm::Tokens;  // denominator of the reconstruction mean
  void validate() const {
    if (!(recon_alpha >= 0.0 && recon_alpha <= 1.0))
      throw InvalidArgument("recon_alpha must be in [0, 1] (got " + std::to_string(recon_alpha) + ")");
    if (distill && recon_alpha > 0.0)
      throw InvalidArgument("distillation and reconstruction losses are mutually exclusive: pass recon_alpha = 0 with distill, or "
                            "distill = false with recon_alpha > 0");
    if (distill && !(distill_alpha >= 0.0 && distill_alpha <= 1.0)) throw InvalidArgument("distill_alpha must be in [0, 1]");
    if (distill && !(temperature > 0.0)) throw InvalidArgument("distillation temperature must be > 0");
  }
};

struct LossParts {
  double total = 0, lm = 0, recon = 0, kl = 0;
  long long tokens = 0, predicted = 0;
};

/// Packs a padded batch (ids, mask (1 = real), both batch*T) into sequences of real tokens.
inline std::vector<std::vector<int>> pack_padded(std::span<const int> ids, std::span<const int> mask, int batch, int T) {
  if (static_cast<int>(ids.size()) != batch * T || static_cast<int>(mask.size()) != batch * T)
    throw InvalidArgument("pack_padded: ids and mask must both hold batch*T entries");
  std::vector<std::vector<int>> seqs(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < T; ++t)
      if (mask[static_cast<std::size_t>(b * T + t)]) seqs[static_cast<std::size_t>(b)].push_back(ids[static_cast<std::size_t>(b * T + t)]);
  return seqs;
}

/// Writes a training graph's compression parameters into m's MLA weights (float): slots[l] are
/// layer l's parameter indices (TrainGraph::Slots), value(i) parameter i as a float matrix. The up
/// projections get fresh shared objects (one per xkv group, shared again by its layers), so copies
/// of the model made before training keep their own bases. Shared by TrainGraph and
/// cuda::TrainGraph.
template <class SlotsT, class Value>
void write_back_mla(model::Model& m, const std::vector<SlotsT>& slots, int dkv, Value&& value) {
  std::map<int, std::pair<std::shared_ptr<MatrixRf>, std::shared_ptr<MatrixRf>>> ups;
  for (std::size_t l = 0; l < slots.size() && l < m.weights.layers.size(); ++l) {
    auto& lw = m.weights.layers[l];
    const SlotsT& sl = slots[l];
    if (!lw.mla || sl.down_k < 0) continue;
    auto& a = *lw.mla;
    a.w_down_k = value(sl.down_k);
    auto it = ups.find(sl.up_k);
    if (it == ups.end()) {
      std::shared_ptr<MatrixRf> uk, uv;
      if (sl.joint) {
        const linalg::Matrix<float> u = value(sl.up_k);
        uk = std::make_shared<MatrixRf>(u.topRows(dkv));
        uv = std::make_shared<MatrixRf>(u.bottomRows(dkv));
      } else {
        uk = std::make_shared<MatrixRf>(value(sl.up_k));
        uv = std::make_shared<MatrixRf>(value(sl.up_v));
      }
      it = ups.emplace(sl.up_k, std::make_pair(uk, uv)).first;
    }
    a.w_up_k = it->second.first;
    a.w_up_v = it->second.second;
    if (!sl.joint) a.w_down_v = value(sl.down_v);
  }
}

template <linalg::RealScalar Scalar_>
class TrainGraph {
 public:
  using Scalar = Scalar_;
  using S = Scalar_;
  using MatR = MatrixR<S>;
  using Vec = VectorX<S>;
  using Mat = linalg::Matrix<S>;

  struct Param {
    std::string name;
    Mat value, grad;
    bool stiefel = false;
  };
  /// Indices into params() of a layer's compression matrices (-1: none).
  struct Slots {
    int down_k = -1, down_v = -1, up_k = -1, up_v = -1;
    bool joint = false;  // up_k is the stacked [Wuk; Wuv]
  };

  explicit TrainGraph(const model::Model& m) : c_(m.config) {
    const auto& W = m.weights;
    embed_ = W.embed.cast<S>();
    pos_embed_ = W.pos_embed.cast<S>();
    fnw_ = W.final_norm_w.cast<S>();
    fnb_ = W.final_norm_b.cast<S>();
    if (W.lm_head.size()) head_ = W.lm_head.cast<S>();
    if (c_.uses_rope()) rope_ = model::Rope(c_);
    const int L = c_.n_layers, dkv = c_.d_kv();
    layers_.resize(static_cast<std::size_t>(L));
    slots_.assign(static_cast<std::size_t>(L), Slots{});
    // Count parameters first: params_ never reallocates after construction (optimizers keep
    // pointers into it).
    std::map<const MatrixRf*, int> up_index;
    std::vector<std::pair<const model::MlaLayer*, int>> todo;
    for (int l = 0; l < L; ++l) {
      const auto& lw = W.layers[static_cast<std::size_t>(l)];
      auto& f = layers_[static_cast<std::size_t>(l)];
      f.n1w = lw.norm1_w.cast<S>();
      f.n1b = lw.norm1_b.cast<S>();
      f.n2w = lw.norm2_w.cast<S>();
      f.n2b = lw.norm2_b.cast<S>();
      f.wq = lw.wq.cast<S>();
      f.wk = lw.wk.cast<S>();
      f.wv = lw.wv.cast<S>();
      f.wo = lw.wo.cast<S>();
      f.bq = lw.bq.cast<S>();
      f.bk = lw.bk.cast<S>();
      f.bv = lw.bv.cast<S>();
      f.bo = lw.bo.cast<S>();
      f.qn = lw.q_norm.cast<S>();
      f.kn = lw.k_norm.cast<S>();
      f.wg = lw.w_gate.cast<S>();
      f.wu = lw.w_up.cast<S>();
      f.wd = lw.w_down.cast<S>();
      f.bg = lw.b_gate.cast<S>();
      f.bu = lw.b_up.cast<S>();
      f.bd = lw.b_down.cast<S>();
      f.has_original_kv = lw.wk.rows() == dkv && lw.wv.rows() == dkv;
      if (!lw.mla) {
        if (!f.has_original_kv) throw InvalidArgument("train: layer " + std::to_string(l) + " has neither MLA weights nor k_proj/v_proj");
        continue;
      }
      const auto& a = *lw.mla;
      if (a.method != CompressionMethod::Separate && a.method != CompressionMethod::Xkv && a.method != CompressionMethod::Joint)
        throw InvalidArgument(std::string("train: layer ") + std::to_string(l) + " uses compression method '" +
                              compression_method_name(a.method) + "', which training does not support yet (separate, xkv, joint)");
      f.mla = true;
      ++n_mla_;
    }
    std::size_t count = 0;
    for (int l = 0; l < L; ++l) {
      const auto& lw = W.layers[static_cast<std::size_t>(l)];
      if (!lw.mla) continue;
      const bool joint = lw.mla->method == CompressionMethod::Joint;
      count += joint ? 1 : 2;
      if (joint) ++count;
      else if (!up_index.count(lw.mla->w_up_k.get())) {
        up_index[lw.mla->w_up_k.get()] = -1;
        count += 2;
      }
    }
    up_index.clear();
    params_.reserve(count);
    auto add = [&](std::string name, const MatrixRf& v, bool stiefel) {
      Param p;
      p.name = std::move(name);
      p.value = v.cast<S>();
      p.grad = Mat::Zero(v.rows(), v.cols());
      p.stiefel = stiefel;
      params_.push_back(std::move(p));
      return static_cast<int>(params_.size()) - 1;
    };
    for (int l = 0; l < L; ++l) {
      const auto& lw = W.layers[static_cast<std::size_t>(l)];
      if (!lw.mla) continue;
      const auto& a = *lw.mla;
      auto& sl = slots_[static_cast<std::size_t>(l)];
      const std::string p = "layers." + std::to_string(l) + ".";
      if (lmin_ < 0) lmin_ = l;
      sl.down_k = add(p + "w_down_k", a.w_down_k, false);
      if (a.method == CompressionMethod::Joint) {
        sl.joint = true;
        MatrixRf up(2 * dkv, a.d_latent);
        up << *a.w_up_k, *a.w_up_v;
        sl.up_k = add(p + "w_up_kv", up, true);
        continue;
      }
      sl.down_v = add(p + "w_down_v", a.w_down_v, false);
      auto it = up_index.find(a.w_up_k.get());
      if (it != up_index.end()) {
        sl.up_k = it->second;
        sl.up_v = it->second + 1;
      } else {
        const std::string u = a.group >= 0 ? "groups." + std::to_string(a.group) + "." : p;
        sl.up_k = add(u + "w_up_k", *a.w_up_k, true);
        sl.up_v = add(u + "w_up_v", *a.w_up_v, true);
        up_index[a.w_up_k.get()] = sl.up_k;
      }
    }
    if (n_mla_ == 0) throw InvalidArgument("train: the model has no MLA layers (convert it first)");
    if (params_.size() != count) throw Error("train: internal parameter count mismatch");
  }

  const ModelConfig& config() const { return c_; }
  std::vector<Param>& params() { return params_; }
  const std::vector<Param>& params() const { return params_; }
  const Slots& slots(int l) const { return slots_[static_cast<std::size_t>(l)]; }
  int n_mla_layers() const { return n_mla_; }
  /// True when every MLA layer still has its original K/V projections (needed by recon/distill).
  bool has_original_kv() const {
    for (const auto& f : layers_)
      if (f.mla && !f.has_original_kv) return false;
    return true;
  }
  /// Logits of the last forward (tokens, vocab).
  const MatR& logits() const { return logits_; }

  void zero_grad() {
    for (auto& p : params_) p.grad.setZero();
  }

  /// Writes the current parameter values back into the model's MLA weights (write_back_mla).
  void write_back(model::Model& m) const {
    write_back_mla(m, slots_, c_.d_kv(),
                   [&](int i) -> linalg::Matrix<float> { return params_[static_cast<std::size_t>(i)].value.template cast<float>(); });
  }

  /// Teacher logits: the same model with the original K/V projections everywhere (no storage
  /// for a backward is needed, but the activation buffers are reused).
  MatR teacher_logits(std::span<const std::vector<int>> seqs) {
    if (!has_original_kv())
      throw InvalidArgument("distillation needs the original k_proj/v_proj weights of every MLA layer (the teacher), but they are "
                            "missing (save MLA models with store_original_weights / --store-original-weights)");
    run_forward(seqs, /*teacher=*/true, LossOptions{});
    return logits_;
  }

  /// Forward with loss. With `backward_scale` > 0 the loss gradient (times backward_scale) is
  /// then propagated and ACCUMULATED into every parameter's grad. `teacher`: (tokens, vocab)
  /// logits of the teacher, needed when lo.distill.
  LossParts forward_backward(std::span<const std::vector<int>> seqs, const LossOptions& lo, double backward_scale = 0.0,
                             const MatR* teacher = nullptr) {
    lo.validate();
    if ((lo.recon_alpha > 0 || lo.distill) && !has_original_kv())
      throw InvalidArgument(std::string(lo.distill ? "distillation" : "reconstruction") +
                            " loss needs the original k_proj/v_proj weights of every MLA layer, but they are missing (a saved MLA "
                            "model keeps them only when saved with store_original_weights / --store-original-weights)");
    if (lo.distill && teacher == nullptr) throw InvalidArgument("forward_backward: distillation needs teacher logits");
    const bool grad = backward_scale > 0.0;
    recon_coef_ = grad ? static_cast<S>(backward_scale * lo.recon_alpha / n_mla_) : S(0);
    LossParts lp = run_forward(seqs, false, lo);
    const int N = static_cast<int>(logits_.rows());
    if (lo.distill && (teacher->rows() != N || teacher->cols() != logits_.cols()))
      throw InvalidArgument("forward_backward: teacher logits have the wrong shape");
    // Loss on logits.
    std::vector<int> target(static_cast<std::size_t>(N), -1);
    for (std::size_t s = 0; s + 1 < off_.size(); ++s)
      for (int t = off_[s]; t + 1 < off_[s + 1]; ++t) target[static_cast<std::size_t>(t)] = seqs[s][static_cast<std::size_t>(t - off_[s] + 1)];
    long long pred = 0;
    for (int t : target) pred += t >= 0;
    lp.tokens = N;
    lp.predicted = pred;
    const double w_lm = lo.distill ? 1.0 - lo.distill_alpha : 1.0 - lo.recon_alpha;
    const bool need_dz = grad && (w_lm > 0 || lo.distill);
    const S lm_w = pred > 0 ? static_cast<S>(backward_scale * w_lm / static_cast<double>(pred)) : S(0);
    const double ce = ops::cross_entropy<S>(logits_, target, lm_w, need_dz ? &dz_ : nullptr);
    lp.lm = pred > 0 ? ce / static_cast<double>(pred) : 0.0;
    if (lo.distill) {
      const S T = static_cast<S>(lo.temperature);
      const S kw = static_cast<S>(backward_scale * lo.distill_alpha * lo.temperature * lo.temperature / N);
      if (need_dz && dz_.rows() != N) dz_.setZero(N, logits_.cols());
      lp.kl = ops::kl_temperature<S>(logits_, *teacher, T, kw, need_dz ? &dz_ : nullptr) / N;
      lp.total = lo.distill_alpha * lo.temperature * lo.temperature * lp.kl + w_lm * lp.lm;
    } else {
      lp.total = w_lm * lp.lm + lo.recon_alpha * lp.recon;
    }
    if (grad) run_backward(need_dz);
    return lp;
  }

  /// Logits of the training forward without loss (for parity tests).
  const MatR& forward_logits(std::span<const std::vector<int>> seqs) {
    run_forward(seqs, false, LossOptions{});
    return logits_;
  }

 private:
  struct Frozen {
    Vec n1w, n1b, n2w, n2b;
    MatR wq, wk, wv, wo;
    Vec bq, bk, bv, bo, qn, kn;
    MatR wg, wu, wd;
    Vec bg, bu, bd;
    bool mla = false, has_original_kv = false;
  };
  struct Acts {
    MatR x_in, h, q_pre, q, ck, cv, k_pre, k, v, rk, rv, attn, x_mid, h2, g_pre, u_pre;
    Vec mean1, rstd1, mean2, rstd2, q_rstd, k_rstd;
    std::vector<std::vector<MatR>> P;  // [seq][head] (n, n)
  };

  bool gpt2() const { return c_.family == Family::Gpt2; }

  void norm_forward(const MatR& x, const Vec& w, const Vec& b, MatR& y, Vec& mean, Vec& rstd) const {
    const S eps = static_cast<S>(c_.norm_eps);
    if (gpt2()) ops::layer_norm_forward<S>(x, w, b, eps, y, mean, rstd);
    else ops::rms_norm_forward<S>(x, w, eps, y, rstd);
  }
  void norm_backward(const MatR& x, const Vec& w, const Vec& mean, const Vec& rstd, const MatR& dy, MatR& dx) const {
    if (gpt2()) ops::layer_norm_backward<S>(x, w, mean, rstd, dy, dx);
    else ops::rms_norm_backward<S>(x, w, rstd, dy, dx);
  }
  void rope_rows(MatR& m, int heads, bool inverse) const {
    if (!c_.uses_rope()) return;
    for (std::size_t s = 0; s + 1 < off_.size(); ++s)
      for (int t = off_[s]; t < off_[s + 1]; ++t) rope_tab_.apply(m.row(t).data(), heads, t - off_[s], inverse);
  }
  const Mat& pv(int i) const { return params_[static_cast<std::size_t>(i)].value; }
  Mat& pg(int i) { return params_[static_cast<std::size_t>(i)].grad; }

  LossParts run_forward(std::span<const std::vector<int>> seqs, bool teacher, const LossOptions& lo) {
    const int B = static_cast<int>(seqs.size());
    if (B == 0) throw InvalidArgument("train forward: empty batch");
    off_.assign(static_cast<std::size_t>(B) + 1, 0);
    int maxlen = 0;
    for (int s = 0; s < B; ++s) {
      const auto& t = seqs[static_cast<std::size_t>(s)];
      if (t.empty()) throw InvalidArgument("train forward: sequence " + std::to_string(s) + " has no tokens");
      if (gpt2() && static_cast<int>(t.size()) > c_.max_position)
        throw InvalidArgument("train forward: sequence " + std::to_string(s) + " is longer than max_position_embeddings " +
                              std::to_string(c_.max_position));
      for (int id : t)
        if (id < 0 || id >= c_.vocab_size)
          throw InvalidArgument("train forward: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                std::to_string(c_.vocab_size) + ")");
      off_[static_cast<std::size_t>(s) + 1] = off_[static_cast<std::size_t>(s)] + static_cast<int>(t.size());
      maxlen = std::max(maxlen, static_cast<int>(t.size()));
    }
    if (c_.uses_rope()) rope_tab_.ensure(rope_, maxlen);
    // Token slots the reconstruction mean divides by: N, or B * T_max for ReconNorm::Padded.
    recon_slots_ = lo.recon_norm == ReconNorm::Padded ? static_cast<double>(B) * maxlen : static_cast<double>(off_.back());
    const int N = off_.back(), H = c_.hidden_size, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, dkv = c_.d_kv();
    const S eps = static_cast<S>(c_.norm_eps);
    LossParts lp;
    acts_.resize(layers_.size());
    MatR x(N, H);
    for (int s = 0; s < B; ++s)
      for (int i = 0; i < off_[static_cast<std::size_t>(s) + 1] - off_[static_cast<std::size_t>(s)]; ++i) {
        const int r = off_[static_cast<std::size_t>(s)] + i;
        x.row(r) = embed_.row(seqs[static_cast<std::size_t>(s)][static_cast<std::size_t>(i)]);
        if (gpt2()) x.row(r) += pos_embed_.row(i);
      }
    double recon_sum = 0;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Frozen& f = layers_[l];
      Acts& a = acts_[l];
      const Slots& sl = slots_[l];
      const bool use_mla = f.mla && !teacher;
      a.x_in = x;
      norm_forward(x, f.n1w, f.n1b, a.h, a.mean1, a.rstd1);
      a.q.noalias() = a.h * f.wq.transpose();
      if (f.bq.size()) a.q.rowwise() += f.bq.transpose();
      if (f.qn.size()) ops::head_rms_norm_forward<S>(a.q, hd, f.qn, eps, a.q_pre, a.q_rstd);
      rope_rows(a.q, nh, false);
      if (use_mla) {
        a.ck.noalias() = a.h * pv(sl.down_k).transpose();
        if (sl.joint) {
          a.k.noalias() = a.ck * pv(sl.up_k).topRows(dkv).transpose();
          a.v.noalias() = a.ck * pv(sl.up_k).bottomRows(dkv).transpose();
        } else {
          a.cv.noalias() = a.h * pv(sl.down_v).transpose();
          a.k.noalias() = a.ck * pv(sl.up_k).transpose();
          a.v.noalias() = a.cv * pv(sl.up_v).transpose();
        }
        if (lo.recon_alpha > 0) {
          // Residuals K~ - K, V~ - V (biases cancel).
          a.rk = a.k;
          a.rk.noalias() -= a.h * f.wk.transpose();
          a.rv = a.v;
          a.rv.noalias() -= a.h * f.wv.transpose();
          const double nk = recon_slots_ * dkv;
          recon_sum += 0.5 * (static_cast<double>(a.rk.squaredNorm()) / nk + static_cast<double>(a.rv.squaredNorm()) / nk);
        } else {
          a.rk.resize(0, 0);
          a.rv.resize(0, 0);
        }
      } else {
        a.k.noalias() = a.h * f.wk.transpose();
        a.v.noalias() = a.h * f.wv.transpose();
      }
      if (f.bk.size()) a.k.rowwise() += f.bk.transpose();
      if (f.bv.size()) a.v.rowwise() += f.bv.transpose();
      if (f.kn.size()) ops::head_rms_norm_forward<S>(a.k, hd, f.kn, eps, a.k_pre, a.k_rstd);
      rope_rows(a.k, nkv, false);
      a.attn.resize(N, nh * hd);
      a.P.resize(static_cast<std::size_t>(B));
      for (int s = 0; s < B; ++s) {
        const int r0 = off_[static_cast<std::size_t>(s)], n = off_[static_cast<std::size_t>(s) + 1] - r0;
        ops::attention_forward<S>(a.q.middleRows(r0, n), a.k.middleRows(r0, n), a.v.middleRows(r0, n), nh, nkv, hd, c_.sliding_window,
                                  a.P[static_cast<std::size_t>(s)], a.attn.middleRows(r0, n));
      }
      x.noalias() += a.attn * f.wo.transpose();
      if (f.bo.size()) x.rowwise() += f.bo.transpose();
      a.x_mid = x;
      norm_forward(x, f.n2w, f.n2b, a.h2, a.mean2, a.rstd2);
      if (gpt2()) {
        a.u_pre.noalias() = a.h2 * f.wu.transpose();
        a.u_pre.rowwise() += f.bu.transpose();
        x.noalias() += a.u_pre.unaryExpr([](S t) { return ops::gelu_tanh(t); }) * f.wd.transpose();
      } else {
        a.g_pre.noalias() = a.h2 * f.wg.transpose();
        a.u_pre.noalias() = a.h2 * f.wu.transpose();
        if (f.bg.size()) a.g_pre.rowwise() += f.bg.transpose();
        if (f.bu.size()) a.u_pre.rowwise() += f.bu.transpose();
        tmp_ = a.g_pre.unaryExpr([](S t) { return ops::silu(t); }).cwiseProduct(a.u_pre);
        x.noalias() += tmp_ * f.wd.transpose();
      }
      if (f.bd.size()) x.rowwise() += f.bd.transpose();
    }
    x_final_ = std::move(x);
    norm_forward(x_final_, fnw_, fnb_, hf_, fmean_, frstd_);
    logits_.noalias() = hf_ * head().transpose();
    lp.recon = n_mla_ > 0 ? recon_sum / n_mla_ : 0.0;
    return lp;
  }

  const MatR& head() const { return head_.size() ? head_ : embed_; }

  void run_backward(bool have_dz) {
    const int N = off_.back(), H = c_.hidden_size, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads, dkv = c_.d_kv();
    const int B = static_cast<int>(off_.size()) - 1;
    MatR dx = MatR::Zero(N, H);
    if (have_dz) {
      MatR dhf;
      dhf.noalias() = dz_ * head();
      norm_backward(x_final_, fnw_, fmean_, frstd_, dhf, dx);
    }
    MatR dh(N, H), dq(N, nh * hd), dk(N, dkv), dv(N, dkv), dattn, da, dmid, scratch, dc;
    for (int l = static_cast<int>(layers_.size()) - 1; l >= lmin_; --l) {
      const Frozen& f = layers_[static_cast<std::size_t>(l)];
      Acts& a = acts_[static_cast<std::size_t>(l)];
      const Slots& sl = slots_[static_cast<std::size_t>(l)];
      // MLP branch: x_out = x_mid + mlp(norm2(x_mid)).
      da.noalias() = dx * f.wd;  // (N, inter)
      if (gpt2()) {
        da.array() *= a.u_pre.unaryExpr([](S t) { return ops::gelu_tanh_grad(t); }).array();
        dh.noalias() = da * f.wu;
      } else {
        // a = silu(g) u
        MatR dg = da.cwiseProduct(a.u_pre).cwiseProduct(a.g_pre.unaryExpr([](S t) { return ops::silu_grad(t); }));
        da.array() *= a.g_pre.unaryExpr([](S t) { return ops::silu(t); }).array();
        dh.noalias() = dg * f.wg;
        dh.noalias() += da * f.wu;
      }
      dmid = dx;
      norm_backward(a.x_mid, f.n2w, a.mean2, a.rstd2, dh, dmid);
      // Attention branch: x_mid = x_in + attn Wo^T + bo.
      dattn.noalias() = dmid * f.wo;  // (N, nh*hd)
      dq.setZero();
      dk.setZero();
      dv.setZero();
      for (int s = 0; s < B; ++s) {
        const int r0 = off_[static_cast<std::size_t>(s)], n = off_[static_cast<std::size_t>(s) + 1] - r0;
        ops::attention_backward<S>(a.q.middleRows(r0, n), a.k.middleRows(r0, n), a.v.middleRows(r0, n), nh, nkv, hd,
                                   a.P[static_cast<std::size_t>(s)], dattn.middleRows(r0, n), dq.middleRows(r0, n), dk.middleRows(r0, n),
                                   dv.middleRows(r0, n), scratch);
      }
      rope_rows(dq, nh, true);
      rope_rows(dk, nkv, true);
      if (f.qn.size()) ops::head_rms_norm_backward<S>(a.q_pre, hd, f.qn, a.q_rstd, dq);
      if (f.kn.size()) ops::head_rms_norm_backward<S>(a.k_pre, hd, f.kn, a.k_rstd, dk);
      dh.noalias() = dq * f.wq;
      if (f.mla) {
        if (a.rk.size()) {
          // d recon / dK~ = coef * (K~ - K) / (slots d_kv)  (0.5 * 2 of the mean of the two MSEs;
          // slots = N, or B * T_max with ReconNorm::Padded: the same constant as the forward)
          const S w = recon_coef_ / static_cast<S>(recon_slots_ * dkv);
          dk.noalias() += w * a.rk;
          dv.noalias() += w * a.rv;
          // The target K = h Wk^T depends on h too.
          dh.noalias() -= (w * a.rk) * f.wk;
          dh.noalias() -= (w * a.rv) * f.wv;
        }
        if (sl.joint) {
          const auto Uk = pv(sl.up_k).topRows(dkv);
          const auto Uv = pv(sl.up_k).bottomRows(dkv);
          pg(sl.up_k).topRows(dkv).noalias() += dk.transpose() * a.ck;
          pg(sl.up_k).bottomRows(dkv).noalias() += dv.transpose() * a.ck;
          dc.noalias() = dk * Uk;
          dc.noalias() += dv * Uv;
          pg(sl.down_k).noalias() += dc.transpose() * a.h;
          dh.noalias() += dc * pv(sl.down_k);
        } else {
          pg(sl.up_k).noalias() += dk.transpose() * a.ck;
          pg(sl.up_v).noalias() += dv.transpose() * a.cv;
          dc.noalias() = dk * pv(sl.up_k);
          pg(sl.down_k).noalias() += dc.transpose() * a.h;
          dh.noalias() += dc * pv(sl.down_k);
          dc.noalias() = dv * pv(sl.up_v);
          pg(sl.down_v).noalias() += dc.transpose() * a.h;
          dh.noalias() += dc * pv(sl.down_v);
        }
      } else {
        dh.noalias() += dk * f.wk;
        dh.noalias() += dv * f.wv;
      }
      if (l == lmin_) break;  // nothing below needs a gradient
      dx = dmid;
      norm_backward(a.x_in, f.n1w, a.mean1, a.rstd1, dh, dx);
    }
  }

  ModelConfig c_;
  MatR embed_, pos_embed_, head_;
  Vec fnw_, fnb_;
  model::Rope rope_;
  ops::RopeTable<S> rope_tab_;
  std::vector<Frozen> layers_;
  std::vector<Slots> slots_;
  std::vector<Param> params_;
  int n_mla_ = 0, lmin_ = -1;
  S recon_coef_ = 0;
  double recon_slots_ = 1;  // denominator (in tokens) of the last forward's reconstruction mean
  // Per-batch buffers.
  std::vector<int> off_;
  std::vector<Acts> acts_;
  MatR x_final_, hf_, logits_, dz_, tmp_;
  Vec fmean_, frstd_;
};

}  // namespace cacheshrink::train

#pragma once
// Data-parallel helpers for MLATrainer<Scalar, Comm> (trainer.hpp).
//
// Every rank holds the whole data set in the same (seeded) order and so the same global
// micro-batches; rank r trains on its contiguous share (dist::shard_range) of each. The losses
// of graph.hpp are means over the micro-batch: LM over the N_pred predicted tokens, recon and KL
// over the N real tokens. A rank's forward_backward normalises by ITS counts, so each share is
// re-weighted to make the ranks' gradients SUM to the gradient of the whole micro-batch:
//   A = (1 - alpha) N_pred,r / N_pred      (LM part)      alpha = recon_alpha, or distill_alpha
//   B = alpha N_r / N                      (recon / KL part)
//   backward_scale' = s (A + B),  alpha' = B / (A + B)
// then lm_w = s (1-alpha) / N_pred and the recon/KL coefficient s alpha / N, as for one process
// with the whole micro-batch (s = 1/grad_accum). With ReconNorm::Padded the recon mean divides by
// slots = sequences x longest sequence instead of N, so its share is B = alpha slots_r / slots
// (slots_r: the rank's sequences x its longest one), giving the coefficient s alpha / slots. The summed gradients are all-reduced, so
// clipping sees the global norm and every rank takes the same optimizer step.
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/dist/comm.hpp"
#include "cacheshrink/train/graph.hpp"

namespace cacheshrink::train {

/// This rank's part of one global micro-batch.
struct DataShare {
  std::span<const std::vector<int>> seqs;  // the rank's sequences (may be empty)
  LossOptions loss;                        // alpha' (see above); the caller's options for one rank
  double scale = 1.0;                      // backward_scale'
  double lm_weight = 1.0;                  // N_pred,r / N_pred: the rank's share of the LM mean
  double token_weight = 1.0;               // N_r / N: its share of the recon / KL means (slots_r / slots: padded recon)
};

inline DataShare data_share(std::span<const std::vector<int>> micro, const LossOptions& lo, double scale, int rank, int size) {
  DataShare d;
  d.loss = lo;
  d.scale = scale;
  if (size == 1) {
    d.seqs = micro;
    return d;
  }
  const auto [first, last] = dist::shard_range(micro.size(), rank, size);
  d.seqs = micro.subspan(first, last - first);
  double pred = 0, n = 0, pred_r = 0, n_r = 0, tmax = 0, tmax_r = 0;
  for (std::size_t i = 0; i < micro.size(); ++i) {
    const double len = static_cast<double>(micro[i].size());
    n += len;
    pred += len > 0 ? len - 1 : 0;
    tmax = std::max(tmax, len);
    if (i >= first && i < last) {
      n_r += len;
      pred_r += len > 0 ? len - 1 : 0;
      tmax_r = std::max(tmax_r, len);
    }
  }
  if (d.seqs.empty() || pred <= 0 || n <= 0) {
    d.lm_weight = d.token_weight = 0;
    return d;
  }
  d.lm_weight = pred_r / pred;
  d.token_weight = n_r / n;
  if (!lo.distill && lo.recon_norm == ReconNorm::Padded)
    d.token_weight = (static_cast<double>(last - first) * tmax_r) / (static_cast<double>(micro.size()) * tmax);
  const double alpha = lo.distill ? lo.distill_alpha : lo.recon_alpha;
  const double a = (1.0 - alpha) * d.lm_weight, b = alpha * d.token_weight;
  d.scale = scale * (a + b);
  const double alpha_r = a + b > 0 ? b / (a + b) : alpha;
  (lo.distill ? d.loss.distill_alpha : d.loss.recon_alpha) = alpha_r;
  return d;
}

/// After the rank's micro-batches: sums every parameter gradient and the step's loss parts
/// over the ranks (one all-reduce each), recomputes the total loss from the global parts and
/// throws NumericalError on every rank alike when it is not finite. No-op on one rank.
template <class Graph, dist::Communicator Comm, class Stats>
void allreduce_step(Graph& g, const Comm& comm, const LossOptions& lo, Stats& st) {
  if (comm.size() == 1) return;
  using S = typename Graph::Scalar;
  std::size_t n = 0;
  for (auto& p : g.params()) n += static_cast<std::size_t>(p.grad.size());
  std::vector<S> buf(n);
  std::size_t off = 0;
  for (auto& p : g.params()) {
    std::copy(p.grad.data(), p.grad.data() + p.grad.size(), buf.data() + off);
    off += static_cast<std::size_t>(p.grad.size());
  }
  comm.allreduce_sum(buf.data(), n);
  off = 0;
  for (auto& p : g.params()) {
    std::copy(buf.data() + off, buf.data() + off + p.grad.size(), p.grad.data());
    off += static_cast<std::size_t>(p.grad.size());
  }
  double parts[4] = {st.lm, st.recon, st.kl, static_cast<double>(st.tokens)};
  comm.allreduce_sum(parts, 4);
  st.lm = parts[0];
  st.recon = parts[1];
  st.kl = parts[2];
  st.tokens = static_cast<long long>(std::llround(parts[3]));
  if (lo.distill) st.loss = lo.distill_alpha * lo.temperature * lo.temperature * st.kl + (1.0 - lo.distill_alpha) * st.lm;
  else st.loss = (1.0 - lo.recon_alpha) * st.lm + lo.recon_alpha * st.recon;
  if (!std::isfinite(st.loss))
    throw NumericalError("train: non-finite loss at step " + std::to_string(st.step) + " (lm " + std::to_string(st.lm) + ", recon " +
                         std::to_string(st.recon) + ", kl " + std::to_string(st.kl) + ", summed over " + std::to_string(comm.size()) +
                         " ranks); the model keeps the last good weights");
}

}  // namespace cacheshrink::train

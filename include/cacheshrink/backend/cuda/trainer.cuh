#pragma once
// cuda::MLATrainer: train::MLATrainer on the GPU. The same options, loss, schedules, batching,
// shuffling (train::train_loop), logging and checkpoint format (train::write_checkpoint: a GPU
// checkpoint resumes on the CPU and the other way round); each optimizer step runs on the device:
// cuda::TrainGraph's forward + backward for every micro-batch (distillation's teacher included),
// then cuda::DeviceOptimizer's gradient clipping, AdamW and RiemannianAdam steps. One process,
// one GPU (no communicator). train() writes the trained compression weights back into the model.
//
//   auto m = compression::convert(model::load_model(dir), {...}, calib);  // keeps wk/wv in memory
//   train::TrainOptions o;  o.recon_alpha = 0.3;
//   cuda::MLATrainer t(m, o);
//   t.graph().set_tf32(true);                    // optional: TF32 tensor cores for the graph
//   auto stats = t.train(train::encode_texts(tok, train::load_texts(file), o.max_length));
#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "cacheshrink/backend/cuda/optim.cuh"
#include "cacheshrink/backend/cuda/train.cuh"
#include "cacheshrink/train/trainer.hpp"

namespace cacheshrink::cuda {

class MLATrainer {
 public:
  /// `m` is updated in place (its MLA weights) at the end of train() and by write_back().
  MLATrainer(model::Model& m, train::TrainOptions o)
      : m_(m), o_(validated(std::move(o))), g_(m), opt_(g_.stream(), g_.blas(), adamw_options(o_), radam_options(o_)) {
    train::require_original_kv(o_, g_.has_original_kv());
    for (auto& p : g_.params()) opt_.add(DeviceParam{p.name, p.value.data(), p.grad.data(), p.rows, p.cols, p.stiefel});
  }
  MLATrainer(const MLATrainer&) = delete;
  MLATrainer& operator=(const MLATrainer&) = delete;

  TrainGraph& graph() { return g_; }
  DeviceOptimizer& optimizer() { return opt_; }
  const train::TrainOptions& options() const { return o_; }

  /// Optimizer steps of a full run over n sequences.
  long total_steps(std::size_t n) const { return train::total_steps(o_, n); }

  /// One optimizer step over the given micro-batches at step index t of a run of `total` steps
  /// (train::MLATrainer::step on the device). Returns its stats; synchronises at the end.
  train::StepStats step(const std::vector<std::vector<std::vector<int>>>& micro, long t, long total) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto sched_e = optim::make_schedule(o_.schedule, o_.euclidean_lr, o_.warmup_steps, total);
    const auto sched_r = optim::make_schedule(o_.schedule, o_.riemannian_lr, o_.warmup_steps, total);
    g_.zero_grad();
    train::StepStats st;
    st.step = t + 1;
    const double scale = 1.0 / static_cast<double>(micro.size());
    for (const auto& mb : micro) {
      if (mb.empty()) continue;
      const train::LossParts lp = g_.forward_backward(mb, o_.loss(), scale);
      if (!std::isfinite(lp.total))
        throw NumericalError("cuda train: non-finite loss at step " + std::to_string(t + 1) + " (lm " + std::to_string(lp.lm) + ", recon " +
                             std::to_string(lp.recon) + ", kl " + std::to_string(lp.kl) + ")");
      st.loss += scale * lp.total;
      st.lm += scale * lp.lm;
      st.recon += scale * lp.recon;
      st.kl += scale * lp.kl;
      st.tokens += lp.tokens;
    }
    st.grad_norm = opt_.grad_norm_and_clip(o_.max_grad_norm, o_.clip_stiefel);
    if (!std::isfinite(st.grad_norm))
      throw NumericalError("cuda train: non-finite gradient norm at step " + std::to_string(t + 1) + "; the parameters were not updated");
    st.lr_euclidean = sched_e.lr(t);
    st.lr_riemannian = sched_r.lr(t);
    opt_.step(st.lr_euclidean, st.lr_riemannian);
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(g_.stream()));
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return st;
  }

  /// Max over Stiefel parameters of ||U^T U - I||_F (downloaded, computed in double).
  double ortho_error() const {
    double e = 0;
    const auto& ps = g_.params();
    for (std::size_t i = 0; i < ps.size(); ++i)
      if (ps[i].stiefel) {
        const linalg::Matrix<double> u = g_.value(i).cast<double>();
        e = std::max(e, (u.transpose() * u - linalg::Matrix<double>::Identity(u.cols(), u.cols())).norm());
      }
    return e;
  }

  /// Trains on token sequences (each cut to max_length) and writes the result into the model.
  train::TrainStats train(std::vector<std::vector<int>> seqs) {
    train::TrainStats stats = train::train_loop(
        std::move(seqs), o_, resume_, true, [&](const auto& micro, long t, long total) { return step(micro, t, total); },
        [&] { return ortho_error(); },
        [&](const train::DataPosition& at) {
          const std::filesystem::path dir = std::filesystem::path(o_.checkpoint_dir) / ("step-" + std::to_string(at.step));
          Host h = download();
          train::write_checkpoint<float>(dir, at, h.params());
          checkpoints_.push_back(dir);
          train::prune_checkpoints(checkpoints_, o_.keep_last_checkpoints);
        });
    resume_.reset();
    write_back();
    return stats;
  }

  /// Copies the current compression parameters into the model.
  void write_back() { g_.write_back(m_); }

  /// Loads a checkpoint (DIR/step-N of this trainer or of train::MLATrainer): parameters,
  /// optimizer states and the data position; the next train() with the same sequences and
  /// options continues the same trajectory.
  void load_checkpoint(const std::filesystem::path& dir) {
    Host h;  // shaped like the parameters (read_checkpoint checks the shapes), filled from the files
    for (const auto& p : g_.params()) {
      h.names.push_back(p.name);
      h.values.emplace_back(p.rows, p.cols);
      h.states.emplace_back();
    }
    const train::DataPosition at = train::read_checkpoint<float>(dir, h.params());
    for (std::size_t i = 0; i < h.values.size(); ++i) {
      g_.set_value(i, h.values[i]);
      opt_.load_state(i, h.states[i]);
    }
    resume_ = at;
  }

 private:
  // Host copies of the parameters and optimizer states (the checkpoint's layout).
  struct Host {
    std::vector<std::string> names;
    std::vector<linalg::Matrix<float>> values;
    std::vector<optim::AdamState<float>> states;
    std::vector<train::CheckpointParam<float>> params() {
      std::vector<train::CheckpointParam<float>> ps;
      for (std::size_t i = 0; i < values.size(); ++i) ps.push_back({names[i], &values[i], &states[i]});
      return ps;
    }
  };
  Host download() const {
    Host h;
    const auto& ps = g_.params();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      h.names.push_back(ps[i].name);
      h.values.push_back(g_.value(i));
      h.states.push_back(opt_.state(i));
    }
    return h;
  }
  static train::TrainOptions validated(train::TrainOptions o) {
    o.validate();
    return o;
  }
  static optim::AdamWOptions adamw_options(const train::TrainOptions& o) {
    optim::AdamWOptions a;
    a.lr = o.euclidean_lr;
    a.weight_decay = o.euclidean_weight_decay;
    return a;
  }
  static optim::RiemannianAdamOptions radam_options(const train::TrainOptions& o) {
    optim::RiemannianAdamOptions r;
    r.lr = o.riemannian_lr;
    r.weight_decay = o.riemannian_weight_decay;
    return r;
  }

  model::Model& m_;
  train::TrainOptions o_;
  TrainGraph g_;
  DeviceOptimizer opt_;
  std::optional<train::DataPosition> resume_;
  std::vector<std::filesystem::path> checkpoints_;
};

}  // namespace cacheshrink::cuda

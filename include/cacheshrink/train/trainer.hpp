#pragma once
// MLATrainer<Scalar>: fine-tunes the compression parameters of a converted model.
//
//   auto m = compression::convert(model::load_model(dir), {...}, calib);  // keeps wk/wv in memory
//   train::TrainOptions o;  o.recon_alpha = 0.3;
//   train::MLATrainer<float> t(m, o);
//   auto stats = t.train(train::encode_texts(tok, train::load_texts(file), o.max_length));
//   stats.save_json("stats.json");               // m now holds the trained MLA weights
//
// Per optimizer step: for each of grad_accum micro-batches of batch_size sequences, the
// training forward/backward (graph.hpp) with loss scaled by 1/grad_accum accumulates gradients;
// then the gradient norm of the Euclidean parameters (w_down_*) is clipped (torch semantics;
// the Stiefel gradients are left alone, as in the original trainer.py, unless clip_stiefel),
// w_down_* take an AdamW step (decoupled weight decay euclidean_weight_decay) and w_up_* a
// RiemannianAdam step on the Euclidean-metric Stiefel manifold (weight decay
// riemannian_weight_decay), each at its own learning rate. The default schedule is constant,
// which is what the original MLATrainer does: its TrainingConfig declares warmup_steps = 100
// and lr_scheduler_type = "linear" but train() never creates a scheduler. "linear" gives HF
// get_linear_schedule_with_warmup (the first step runs at lr 0 when warmup > 0).
// Sequences are shuffled every epoch with a seeded std::mt19937_64 and our own Fisher-Yates,
// so a seed gives the same trajectory on every platform.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "cacheshrink/compression/calibration.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/progress.hpp"
#include "cacheshrink/dist/comm.hpp"
#include "cacheshrink/io/file.hpp"
#include "cacheshrink/manifold/euclidean.hpp"
#include "cacheshrink/manifold/stiefel.hpp"
#include "cacheshrink/optim/optim.hpp"
#include "cacheshrink/train/data_parallel.hpp"
#include "cacheshrink/train/graph.hpp"

namespace cacheshrink::train {

struct TrainOptions {
  double euclidean_lr = 1e-5;   // w_down_* (AdamW)
  double riemannian_lr = 1e-4;  // w_up_* (RiemannianAdam on Stiefel)
  int epochs = 3;
  int batch_size = 4;
  int max_length = 512;  // tokens per sequence (used by encode_texts and checked by train)
  int grad_accum = 1;
  double max_grad_norm = 1.0;  // <= 0: no clipping
  double euclidean_weight_decay = 0.01;
  double riemannian_weight_decay = 0.0;
  int warmup_steps = 100;             // used by the linear and cosine schedules only
  std::string schedule = "constant";  // constant (the original's effective behaviour) | linear | cosine
  bool clip_stiefel = false;  // false: max_grad_norm clips the w_down_* gradients only (as the original); true: all
  int log_every = 10;
  int ortho_every = 100;
  double recon_alpha = 0.0;
  // Denominator of the per-batch reconstruction mean: "tokens" (real tokens x d_kv) or "padded"
  // (batch x longest sequence x d_kv, the original's F.mse_loss over its padded tensor, so the term
  // is scaled by n_real / (batch * T_max); padding positions themselves add no term, unlike the
  // original's). Gradients are scaled the same way.
  std::string recon_norm = "tokens";
  bool distill = false;
  double distill_alpha = 0.9;
  double temperature = 2.0;
  std::uint64_t seed = 42;
  bool shuffle = true;
  long max_steps = 0;  // > 0: stop after this many optimizer steps (the schedule still spans all)
  bool progress = false;
  bool verbose = false;  // print a log line every log_every steps
  std::string checkpoint_dir;  // non-empty with checkpoint_every > 0: DIR/step-N/ every N steps
  int checkpoint_every = 0;
  int keep_last_checkpoints = 2;  // older step-N folders are removed

  LossOptions loss() const { return {recon_alpha, distill, distill_alpha, temperature, parse_recon_norm(recon_norm)}; }
  void validate() const {
    auto bad = [](const std::string& opt, const std::string& expected, double v) {
      throw InvalidArgument("train: option " + opt + "=" + std::to_string(v) + " is invalid, expected " + expected);
    };
    if (!(euclidean_lr >= 0)) bad("euclidean_lr", ">= 0", euclidean_lr);
    if (!(riemannian_lr >= 0)) bad("riemannian_lr", ">= 0", riemannian_lr);
    if (epochs < 1) bad("epochs", ">= 1", epochs);
    if (batch_size < 1) bad("batch_size", ">= 1", batch_size);
    if (max_length < 2) bad("max_length", ">= 2", max_length);
    if (grad_accum < 1) bad("grad_accum", ">= 1", grad_accum);
    if (warmup_steps < 0) bad("warmup_steps", ">= 0", warmup_steps);
    if (log_every < 1) bad("log_every", ">= 1", log_every);
    if (ortho_every < 0) bad("ortho_every", ">= 0", ortho_every);
    if (!(euclidean_weight_decay >= 0)) bad("euclidean_weight_decay", ">= 0", euclidean_weight_decay);
    if (!(riemannian_weight_decay >= 0)) bad("riemannian_weight_decay", ">= 0", riemannian_weight_decay);
    if (checkpoint_every < 0) bad("checkpoint_every", ">= 0", checkpoint_every);
    if (keep_last_checkpoints < 1) bad("keep_last_checkpoints", ">= 1", keep_last_checkpoints);
    (void)parse_recon_norm(recon_norm);  // InvalidArgument: "option recon_norm='x' is invalid, expected one of: tokens, padded"
    loss().validate();
  }
};

struct StepStats {
  long step = 0;  // 1-based optimizer step
  int epoch = 0;
  double loss = 0, lm = 0, recon = 0, kl = 0;
  double lr_euclidean = 0, lr_riemannian = 0;
  double grad_norm = 0;      // of all compression parameters, before clipping
  double ortho_error = -1;   // max ||U^T U - I||_F over Stiefel parameters (on ortho steps), else -1
  long long tokens = 0;      // real tokens in the step
  double seconds = 0;        // wall time of the step
};

struct TrainStats {
  std::vector<StepStats> steps;
  long long tokens = 0;
  double seconds = 0;
  double tokens_per_second = 0;
  double final_ortho_error = 0;
  int sequences = 0;

  nlohmann::json to_json() const {
    nlohmann::json s = nlohmann::json::array();
    for (const auto& t : steps)
      s.push_back({{"step", t.step},
                   {"epoch", t.epoch},
                   {"loss", t.loss},
                   {"lm_loss", t.lm},
                   {"recon_loss", t.recon},
                   {"kl_loss", t.kl},
                   {"lr_euclidean", t.lr_euclidean},
                   {"lr_riemannian", t.lr_riemannian},
                   {"grad_norm", t.grad_norm},
                   {"ortho_error", t.ortho_error},
                   {"tokens", t.tokens},
                   {"seconds", t.seconds}});
    return {{"steps", s},
            {"tokens", tokens},
            {"seconds", seconds},
            {"tokens_per_second", tokens_per_second},
            {"final_ortho_error", final_ortho_error},
            {"sequences", sequences}};
  }
  void save_json(const std::filesystem::path& path) const {
    const std::string text = to_json().dump(1) + "\n";
    io::atomic_write(path, [&](std::ofstream& f) { f << text; });
  }
};

/// Training texts from a file: the paragraph rule of compression::paragraphs (lines, stripped,
/// > 100 characters, not starting with '='); the first `count` (0 = all).
inline std::vector<std::string> load_texts(const std::filesystem::path& file, std::size_t count = 0) {
  auto texts = compression::paragraphs(io::read_text_file(file), count);
  if (texts.empty()) throw InvalidArgument(file.string() + ": no training paragraphs (lines longer than 100 characters)");
  return texts;
}

/// Tokenizes texts, cut to max_length tokens; sequences shorter than min_tokens are dropped
/// (default 11: the original TextDataset keeps an encoding only when it has more than 10 tokens).
inline std::vector<std::vector<int>> encode_texts(const tokenizer::Tokenizer& tok, const std::vector<std::string>& texts, int max_length,
                                                  std::size_t min_tokens = 11) {
  auto seqs = compression::encode_calibration(tok, texts, max_length);
  min_tokens = std::max<std::size_t>(min_tokens, 2);
  std::erase_if(seqs, [&](const auto& s) { return s.size() < min_tokens; });
  return seqs;
}

/// A trainer's check at construction: the reconstruction and distillation losses need the
/// original K/V projections of every MLA layer (`has`).
inline void require_original_kv(const TrainOptions& o, bool has) {
  if ((o.recon_alpha > 0 || o.distill) && !has)
    throw InvalidArgument(std::string(o.distill ? "distillation" : "reconstruction") +
                          " loss needs the original k_proj/v_proj weights of every MLA layer, but the model lacks them (a saved MLA "
                          "model keeps them only when saved with --store-original-weights; or convert and train in one run)");
}

/// Where a run stands in its data: written into checkpoints, read back to resume.
struct DataPosition {
  long step = 0;
  int epoch = 0;
  std::size_t pos = 0;                // next sequence of the epoch's order
  std::mt19937_64 rng_epoch_start;    // the shuffle generator at the start of that epoch
  std::size_t sequences = 0;          // training sequences of the run (checked on resume)
};

/// Optimizer steps of a full run over n sequences.
inline long total_steps(const TrainOptions& o, std::size_t n) {
  const long per_epoch = static_cast<long>((n + static_cast<std::size_t>(o.batch_size) - 1) / static_cast<std::size_t>(o.batch_size));
  const long steps = (per_epoch + o.grad_accum - 1) / o.grad_accum;
  return std::max(1L, steps * o.epochs);
}

/// The training loop shared by MLATrainer (CPU) and cuda::MLATrainer: cuts sequences to
/// max_length and drops those under 2 tokens, shuffles every epoch (seeded Fisher-Yates), forms
/// grad_accum micro-batches of batch_size sequences and calls step(micro, t, total) -> StepStats;
/// ortho() every ortho_every steps; logs and shows progress on `lead` (rank 0); calls
/// checkpoint(DataPosition) every checkpoint_every steps when checkpoint_dir is set. Starts from
/// `resume` when given (a checkpoint of the same data and options).
template <class Step, class Ortho, class Checkpoint>
TrainStats train_loop(std::vector<std::vector<int>> seqs, const TrainOptions& o, std::optional<DataPosition> resume, bool lead, Step&& step,
                      Ortho&& ortho, Checkpoint&& checkpoint) {
  for (auto& s : seqs)
    if (static_cast<int>(s.size()) > o.max_length) s.resize(static_cast<std::size_t>(o.max_length));
  std::erase_if(seqs, [](const auto& s) { return s.size() < 2; });
  if (seqs.empty()) throw InvalidArgument("train: no training sequence with at least 2 tokens");
  TrainStats stats;
  stats.sequences = static_cast<int>(seqs.size());
  const long total = total_steps(o, seqs.size());
  const long run_steps = o.max_steps > 0 ? std::min(total, o.max_steps) : total;
  std::mt19937_64 rng(o.seed);
  std::vector<std::size_t> order(seqs.size());
  long t = 0;
  int epoch0 = 0;
  std::size_t pos0 = 0;
  if (resume) {
    t = resume->step;
    epoch0 = resume->epoch;
    pos0 = resume->pos;
    rng = resume->rng_epoch_start;
    if (resume->sequences != seqs.size())
      throw InvalidArgument("train: the checkpoint was taken with " + std::to_string(resume->sequences) + " training sequences, got " +
                            std::to_string(seqs.size()) + " (resume with the same data and options)");
  }
  Progress bar("train", run_steps, "steps", o.progress && lead);
  const auto t0 = std::chrono::steady_clock::now();
  for (int epoch = epoch0; epoch < o.epochs && t < run_steps; ++epoch) {
    const std::mt19937_64 rng_epoch_start = rng;
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (o.shuffle)
      for (std::size_t i = order.size() - 1; i > 0; --i) {
        const std::size_t j = static_cast<std::size_t>(rng() % (i + 1));
        std::swap(order[i], order[j]);
      }
    std::size_t pos = epoch == epoch0 ? pos0 : 0;
    while (pos < order.size() && t < run_steps) {
      std::vector<std::vector<std::vector<int>>> micro;
      for (int a = 0; a < o.grad_accum && pos < order.size(); ++a) {
        std::vector<std::vector<int>> mb;
        for (int b = 0; b < o.batch_size && pos < order.size(); ++b) mb.push_back(seqs[order[pos++]]);
        micro.push_back(std::move(mb));
      }
      StepStats st = step(micro, t, total);
      st.epoch = epoch;
      ++t;
      if (o.ortho_every > 0 && (t % o.ortho_every == 0 || t == run_steps)) st.ortho_error = ortho();
      stats.tokens += st.tokens;
      if (o.verbose && lead && (t % o.log_every == 0 || t == run_steps))
        std::fprintf(stderr, "step %ld/%ld epoch %d loss %.4f (lm %.4f recon %.5f kl %.4f) lr %.2e/%.2e |g| %.3f%s\n", t, run_steps, epoch,
                     st.loss, st.lm, st.recon, st.kl, st.lr_euclidean, st.lr_riemannian, st.grad_norm,
                     st.ortho_error >= 0 ? (" ortho " + std::to_string(st.ortho_error)).c_str() : "");
      stats.steps.push_back(st);
      bar.update(t, static_cast<double>(stats.tokens), "tok");
      if (lead && !o.checkpoint_dir.empty() && o.checkpoint_every > 0 && t % o.checkpoint_every == 0)
        checkpoint(DataPosition{t, epoch, pos, rng_epoch_start, seqs.size()});
    }
  }
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats.tokens_per_second = stats.seconds > 0 ? static_cast<double>(stats.tokens) / stats.seconds : 0;
  stats.final_ortho_error = ortho();
  return stats;
}

/// One parameter of a training checkpoint: value and optimizer state (float64 on disk, in the
/// CPU layout). Writing reads through the pointers; reading fills them, the value's current
/// shape being the expected one.
template <class Scalar>
struct CheckpointParam {
  std::string name;
  linalg::Matrix<Scalar>* value;
  optim::AdamState<Scalar>* state;
};

/// Writes a checkpoint folder DIR (checkpoint.json + state.bin) via DIR.tmp renamed into place.
template <class Scalar>
void write_checkpoint(const std::filesystem::path& dir, const DataPosition& r, std::span<const CheckpointParam<Scalar>> ps) {
  namespace fs = std::filesystem;
  fs::create_directories(dir.parent_path());
  fs::path tmp = dir;
  tmp += ".tmp";
  fs::remove_all(tmp);
  fs::create_directory(tmp);
  nlohmann::json params = nlohmann::json::array();
  std::string bin;
  auto put = [&](const linalg::Matrix<Scalar>& m) {
    const linalg::Matrix<double> d = m.template cast<double>();
    bin.append(reinterpret_cast<const char*>(d.data()), static_cast<std::size_t>(d.size()) * sizeof(double));
  };
  for (const auto& p : ps) {
    const auto& st = *p.state;
    put(*p.value);
    if (st.step > 0) {
      put(st.exp_avg);
      put(st.exp_avg_sq);
    }
    params.push_back({{"name", p.name}, {"rows", p.value->rows()}, {"cols", p.value->cols()}, {"opt_step", st.step},
                      {"sq_rows", st.exp_avg_sq.rows()}, {"sq_cols", st.exp_avg_sq.cols()}});
  }
  std::ostringstream rs;
  rs << r.rng_epoch_start;
  const nlohmann::json meta{{"format", "cacheshrink-train-checkpoint"}, {"step", r.step}, {"epoch", r.epoch}, {"pos", r.pos},
                            {"sequences", r.sequences}, {"rng", rs.str()}, {"params", params}};
  io::atomic_write(tmp / "state.bin", [&](std::ofstream& f) { f.write(bin.data(), static_cast<std::streamsize>(bin.size())); });
  io::atomic_write(tmp / "checkpoint.json", [&](std::ofstream& f) { f << meta.dump(1) << "\n"; });
  fs::remove_all(dir);
  fs::rename(tmp, dir);
}

/// Reads a checkpoint folder written by write_checkpoint into ps (names and shapes must match);
/// returns the data position to resume from.
template <class Scalar>
DataPosition read_checkpoint(const std::filesystem::path& dir, std::span<const CheckpointParam<Scalar>> ps) {
  const auto meta_path = dir / "checkpoint.json";
  auto meta = nlohmann::json::parse(io::read_text_file(meta_path), nullptr, false);
  if (meta.is_discarded() || meta.value("format", "") != "cacheshrink-train-checkpoint")
    throw FormatError(meta_path.string() + ": not a cacheshrink training checkpoint");
  if (meta["params"].size() != ps.size())
    throw FormatError(meta_path.string() + ": checkpoint has " + std::to_string(meta["params"].size()) + " parameters, the model " +
                      std::to_string(ps.size()));
  const std::string bin = io::read_text_file(dir / "state.bin");
  std::size_t off = 0;
  auto read = [&](linalg::Matrix<Scalar>& m, Eigen::Index r, Eigen::Index c) {
    const std::size_t n = static_cast<std::size_t>(r * c);
    if (off + n * sizeof(double) > bin.size()) throw FormatError((dir / "state.bin").string() + ": truncated");
    linalg::Matrix<double> d(r, c);
    std::memcpy(d.data(), bin.data() + off, n * sizeof(double));
    off += n * sizeof(double);
    m = d.template cast<Scalar>();
  };
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const auto& e = meta["params"][i];
    auto& v = *ps[i].value;
    if (e.value("name", "") != ps[i].name || e.value("rows", -1L) != v.rows() || e.value("cols", -1L) != v.cols())
      throw FormatError(meta_path.string() + ": parameter " + std::to_string(i) + " is '" + e.value("name", "") +
                        "' with another shape than the model's '" + ps[i].name + "'");
    auto& st = *ps[i].state;
    read(v, v.rows(), v.cols());
    st.step = e.value("opt_step", 0L);
    if (st.step > 0) {
      read(st.exp_avg, v.rows(), v.cols());
      read(st.exp_avg_sq, e.value("sq_rows", 1L), e.value("sq_cols", 1L));
    }
  }
  DataPosition r;
  r.step = meta.value("step", 0L);
  r.epoch = meta.value("epoch", 0);
  r.pos = meta.value("pos", std::size_t{0});
  r.sequences = meta.value("sequences", std::size_t{0});
  std::istringstream rs(meta.value("rng", std::string()));
  rs >> r.rng_epoch_start;
  if (!rs) throw FormatError(meta_path.string() + ": bad rng state");
  return r;
}

/// Keeps the last `keep` of the checkpoint folders written in this run (oldest removed).
inline void prune_checkpoints(std::vector<std::filesystem::path>& written, int keep) {
  while (static_cast<int>(written.size()) > keep) {
    std::error_code ec;
    std::filesystem::remove_all(written.front(), ec);
    written.erase(written.begin());
  }
}

/// Comm_: dist::Single (one process) or a communicator (dist::Mpi, dist::Nccl) for data-parallel
/// training: micro-batches are split over the ranks and gradients summed (data_parallel.hpp);
/// only rank 0 logs and writes checkpoints. Every rank passes the same model, options and data.
template <linalg::RealScalar Scalar_, dist::Communicator Comm_ = dist::Single>
class MLATrainer {
 public:
  using Scalar = Scalar_;
  using Comm = Comm_;
  using Graph = TrainGraph<Scalar>;
  using Mat = linalg::Matrix<Scalar>;

  /// `m` is updated in place (its MLA weights) at the end of train() and by write_back().
  MLATrainer(model::Model& m, TrainOptions o, Comm comm = {}) : m_(m), o_(std::move(o)), g_(m), comm_(std::move(comm)) {
    o_.validate();
    require_original_kv(o_, g_.has_original_kv());
    optim::AdamWOptions ao;
    ao.lr = o_.euclidean_lr;
    ao.weight_decay = o_.euclidean_weight_decay;
    optim::RiemannianAdamOptions ro;
    ro.lr = o_.riemannian_lr;
    ro.weight_decay = o_.riemannian_weight_decay;
    adamw_ = optim::AdamW<Scalar>(optim::AdamWUpdate{ao});
    radam_ = optim::RiemannianAdam<Scalar>(optim::RiemannianAdamUpdate{ro});
    for (auto& p : g_.params()) {
      if (p.stiefel) radam_.add(p.name, p.value, p.grad, manifold::EuclideanStiefel<Scalar>{});
      else adamw_.add(p.name, p.value, p.grad, manifold::Euclidean<Scalar>{});
    }
  }
  MLATrainer(const MLATrainer&) = delete;
  MLATrainer& operator=(const MLATrainer&) = delete;

  Graph& graph() { return g_; }
  const Comm& comm() const { return comm_; }
  const TrainOptions& options() const { return o_; }
  optim::AdamW<Scalar>& euclidean_optimizer() { return adamw_; }
  optim::RiemannianAdam<Scalar>& riemannian_optimizer() { return radam_; }

  /// Optimizer steps of a full run over n sequences.
  long total_steps(std::size_t n) const { return train::total_steps(o_, n); }

  /// One optimizer step over the given micro-batches (each a list of sequences) at step index
  /// t (0-based, for the schedules) of a run of total_steps steps. Returns its stats.
  StepStats step(const std::vector<std::vector<std::vector<int>>>& micro, long t, long total) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto sched_e = optim::make_schedule(o_.schedule, o_.euclidean_lr, o_.warmup_steps, total);
    const auto sched_r = optim::make_schedule(o_.schedule, o_.riemannian_lr, o_.warmup_steps, total);
    g_.zero_grad();
    StepStats st;
    st.step = t + 1;
    const double scale = 1.0 / static_cast<double>(micro.size());
    for (const auto& mb : micro) {
      // This rank's share of the micro-batch, weighted so the ranks' gradients sum to the whole one's.
      const DataShare share = data_share(mb, o_.loss(), scale, comm_.rank(), comm_.size());
      if (share.seqs.empty()) continue;
      std::span<const std::vector<int>> seqs = share.seqs;
      MatrixR<Scalar> teacher;
      if (o_.distill) teacher = g_.teacher_logits(seqs);
      const LossParts lp = g_.forward_backward(seqs, share.loss, share.scale, o_.distill ? &teacher : nullptr);
      if (!std::isfinite(lp.total) && comm_.size() == 1)
        throw NumericalError("train: non-finite loss at step " + std::to_string(t + 1) + " (lm " + std::to_string(lp.lm) + ", recon " +
                             std::to_string(lp.recon) + ", kl " + std::to_string(lp.kl) + "); the model keeps the last good weights");
      st.loss += scale * lp.total;
      st.lm += scale * lp.lm * share.lm_weight;
      st.recon += scale * lp.recon * share.token_weight;
      st.kl += scale * lp.kl * share.token_weight;
      st.tokens += lp.tokens;
    }
    allreduce_step(g_, comm_, o_.loss(), st);
    std::vector<Mat*> clipped;  // the original clips the Euclidean parameters only (trainer.py, "Clip gradients for Euclidean params only")
    double sq = 0;
    for (auto& p : g_.params()) {
      sq += p.grad.template cast<double>().squaredNorm();
      if (!p.stiefel || o_.clip_stiefel) clipped.push_back(&p.grad);
    }
    st.grad_norm = std::sqrt(sq);
    if (o_.max_grad_norm > 0 && !clipped.empty()) optim::clip_grad_norm<Scalar>(std::span<Mat* const>(clipped), o_.max_grad_norm);
    if (!std::isfinite(st.grad_norm))
      throw NumericalError("train: non-finite gradient norm at step " + std::to_string(t + 1) + "; the model keeps the last good weights");
    st.lr_euclidean = sched_e.lr(t);
    st.lr_riemannian = sched_r.lr(t);
    adamw_.step(st.lr_euclidean);
    radam_.step(st.lr_riemannian);
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return st;
  }

  /// Max over Stiefel parameters of ||U^T U - I||_F (computed in double).
  double ortho_error() const {
    double e = 0;
    for (const auto& p : g_.params())
      if (p.stiefel) {
        const linalg::Matrix<double> u = p.value.template cast<double>();
        e = std::max(e, (u.transpose() * u - linalg::Matrix<double>::Identity(u.cols(), u.cols())).norm());
      }
    return e;
  }

  /// Trains on token sequences (each cut to max_length) and writes the result into the model.
  TrainStats train(std::vector<std::vector<int>> seqs) {
    TrainStats stats = train_loop(
        std::move(seqs), o_, resume_, comm_.rank() == 0, [&](const auto& micro, long t, long total) { return step(micro, t, total); },
        [&] { return ortho_error(); },
        [&](const DataPosition& at) { save_checkpoint_at(std::filesystem::path(o_.checkpoint_dir) / ("step-" + std::to_string(at.step)), at); });
    resume_.reset();  // consumed (kept if the run threw: a retry starts from the checkpoint again)
    write_back();
    return stats;
  }

  /// Copies the current compression parameters into the model.
  void write_back() { g_.write_back(m_); }

  /// Loads a checkpoint written during train() (DIR/step-N): parameters, optimizer states and
  /// the data position; the next train() call with the same sequences and options continues
  /// the same trajectory.
  void load_checkpoint(const std::filesystem::path& dir) { resume_ = read_checkpoint<Scalar>(dir, checkpoint_params()); }

 private:
  /// The parameters with their optimizer states, in the graph's order (the checkpoint's).
  std::vector<CheckpointParam<Scalar>> checkpoint_params() {
    std::vector<CheckpointParam<Scalar>> ps;
    std::size_t ie = 0, ir = 0;
    for (auto& p : g_.params()) ps.push_back({p.name, &p.value, p.stiefel ? &radam_.param(ir++).state : &adamw_.param(ie++).state});
    return ps;
  }

  /// Writes DIR (via a temporary folder renamed into place) and prunes old step-N folders.
  void save_checkpoint_at(const std::filesystem::path& dir, const DataPosition& r) {
    write_checkpoint<Scalar>(dir, r, checkpoint_params());
    checkpoints_.push_back(dir);
    prune_checkpoints(checkpoints_, o_.keep_last_checkpoints);
  }

  model::Model& m_;
  TrainOptions o_;
  Graph g_;
  optim::AdamW<Scalar> adamw_;
  optim::RiemannianAdam<Scalar> radam_;
  std::optional<DataPosition> resume_;
  std::vector<std::filesystem::path> checkpoints_;
  Comm comm_;
};

}  // namespace cacheshrink::train

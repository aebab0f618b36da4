#pragma once
// `cacheshrink train`: fine-tune the compression of an MLA model (a saved MLA directory, or a
// plain HF model converted first with --ratio/--method) on a text file, then save it.
//
//   cacheshrink train --model DIR --data FILE --recon-alpha 0.3 [--recon-norm tokens|padded] [--distill] [--epochs 3]
//       [--batch-size 4] [--max-length 512] [--euclidean-lr ..] [--riemannian-lr ..] [--device cpu|cuda [--tf32]] --out DIR2
//
// --plot-loss FILE.svg draws the per-step curves (pipeline/loss_plot.hpp); `cacheshrink plot-loss
// STATS.json --out FILE.svg` draws them from a stats file written earlier. --json prints a summary.
//
// The subcommand runs from its CLI11 callback and ends the parse with CLI::Success (exit 0) or,
// after printing "error: ...", CLI::RuntimeError(2), so main() needs only add_train_command(app).
#include <CLI/CLI.hpp>
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/pipeline/loss_plot.hpp>
#include <cacheshrink/pipeline/save_load.hpp>
#include <cacheshrink/train/train.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli_cuda.hpp"
#include "cli_dist.hpp"

namespace cacheshrink::cli {

struct TrainCommand {
  std::string model_dir, data, out, stats, resume;
  train::TrainOptions o;
  long paragraphs = 0;
  compression::ConvertOptions co;
  std::string calibration;
  int n_calib = 128, calib_len = 512;
  bool no_calibration = false, overwrite = false, quiet = false;
  std::string device = "cpu";  // --device cpu|cuda
  bool tf32 = false;
  std::string plot_loss;  // --plot-loss FILE.svg
  int plot_smooth = 0;
  bool json = false;
  CLI::Option* ratio_opt = nullptr;
  CLI::Option* method_opt = nullptr;
};

/// Runs the training command; returns the process exit status.
inline int run_train(TrainCommand& c) {
  namespace fs = std::filesystem;
  const bool gpu = c.device == "cuda";  // checked before any conversion work
  if (c.tf32 && !gpu) throw InvalidArgument("--tf32 applies to --device cuda");
  if (gpu && comm().size() > 1) throw InvalidArgument("--device cuda trains in one process on one GPU; run it without mpirun");
  if (gpu) require_gpu();
  auto m = pipeline::load_any(c.model_dir);
  bool has_mla = false;
  for (const auto& lw : m.weights.layers) has_mla = has_mla || lw.mla.has_value();
  auto tok = tokenizer::Tokenizer::from_directory(c.model_dir);
  double ratio = c.co.compression_ratio;
  if (!has_mla) {
    // Plain HF model: convert first (K/V stay in memory, so reconstruction/distillation work).
    std::vector<std::vector<int>> calib;
    c.co.use_calibration = !c.no_calibration;
    c.co.verbose = !c.quiet;
    if (c.co.use_calibration) {
      const std::string file = c.calibration.empty() ? c.data : c.calibration;
      calib = compression::encode_calibration(tok, compression::paragraphs(io::read_text_file(file), static_cast<std::size_t>(c.n_calib)),
                                              c.calib_len);
      if (calib.empty()) throw InvalidArgument("--calibration " + file + ": no paragraph longer than 100 characters");
    }
    compression::ConversionReport rep;
    m = compression::convert(m, c.co, calib, &rep, comm());  // mpirun: calibration sharded over the ranks
    if (!c.quiet && !c.json)
      std::printf("converted: %s, d_latent %d of d_kv %d, cache %zu -> %zu numbers per token\n", compression_method_name(rep.method), rep.d_latent,
                  rep.d_kv, rep.cache_floats_per_token_original, rep.cache_floats_per_token_mla);
  } else {
    if ((c.ratio_opt && c.ratio_opt->count()) || (c.method_opt && c.method_opt->count()))
      throw InvalidArgument("--ratio/--method apply to plain HF models; " + c.model_dir + " is already an MLA model");
    ratio = 0;
  }
  if (fs::exists(c.out) && !c.overwrite) throw IoError(c.out + ": output directory exists (pass --overwrite to replace it)");
  const auto texts = train::load_texts(c.data, static_cast<std::size_t>(c.paragraphs));
  const auto seqs = train::encode_texts(tok, texts, c.o.max_length);
  c.o.progress = !c.quiet;
  c.o.verbose = !c.quiet;
  auto report = [&](long steps) {
    if (!c.quiet && !c.json)
      std::printf("training on %zu sequences (%zu paragraphs of %s), %ld steps, loss %s%s\n", seqs.size(), texts.size(), c.data.c_str(), steps,
                  c.o.distill ? "distillation" : (c.o.recon_alpha > 0 ? "LM + reconstruction" : "LM"),
                  gpu ? (c.tf32 ? ", on the GPU (TF32)" : ", on the GPU") : "");
  };
  train::TrainStats stats;
  if (gpu) {
    report(train::total_steps(c.o, seqs.size()));
    stats = train_on_gpu(m, c.o, seqs, c.resume, c.tf32);
  } else {
    train::MLATrainer<float, dist::AnyComm> tr(m, c.o, comm());  // mpirun: data parallel (docs/scaling.md)
    report(tr.total_steps(seqs.size()));
    if (!c.resume.empty()) tr.load_checkpoint(c.resume);
    stats = tr.train(seqs);
  }
  if (comm().rank() != 0) return 0;  // rank 0 saves and reports
  pipeline::SaveOptions so;
  so.store_original_weights = c.co.store_original_weights;
  so.overwrite = c.overwrite;
  so.compression_ratio = ratio;
  pipeline::save_mla_model(m, c.out, so);
  const fs::path stats_path = c.stats.empty() ? fs::path(c.out) / "train_stats.json" : fs::path(c.stats);
  stats.save_json(stats_path);
  const auto& last = stats.steps.back();
  std::string plot_written;
  if (!c.plot_loss.empty()) {
    // The model and stats are saved already; a plot that cannot be written only warns.
    try {
      pipeline::write_loss_plot(pipeline::loss_history(stats.to_json()), c.plot_loss,
                                {.title = fs::path(c.out).filename().string(), .smooth = c.plot_smooth});
      plot_written = c.plot_loss;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "warning: --plot-loss: %s\n", e.what());
    }
  }
  if (c.json) {
    const nlohmann::json j{{"out", c.out},
                           {"stats", stats_path.string()},
                           {"loss_plot", plot_written.empty() ? nlohmann::json() : nlohmann::json(plot_written)},
                           {"steps", stats.steps.size()},
                           {"tokens", stats.tokens},
                           {"seconds", stats.seconds},
                           {"tokens_per_second", stats.tokens_per_second},
                           {"final_ortho_error", stats.final_ortho_error},
                           {"last", {{"loss", last.loss}, {"lm_loss", last.lm}, {"recon_loss", last.recon}, {"kl_loss", last.kl}}}};
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  if (!plot_written.empty()) std::printf("loss plot: %s\n", plot_written.c_str());
  std::printf("trained %zu steps, %lld tokens in %.1f s (%.0f tokens/s); last loss %.4f (lm %.4f, recon %.5f, kl %.4f); ortho error %.2e\n",
              stats.steps.size(), stats.tokens, stats.seconds, stats.tokens_per_second, last.loss, last.lm, last.recon, last.kl,
              stats.final_ortho_error);
  std::printf("saved: %s (stats: %s)\n", c.out.c_str(), stats_path.string().c_str());
  return 0;
}

/// Registers `train` on the application.
inline CLI::App* add_train_command(CLI::App& app) {
  auto c = std::make_shared<TrainCommand>();
  auto* t = app.add_subcommand("train", "Fine-tune the MLA compression (W_down AdamW, W_up RiemannianAdam on Stiefel) on a text file");
  t->add_option("--model", c->model_dir, "Saved MLA model, or a plain HF model to convert first (--ratio/--method)")->required();
  t->add_option("--data", c->data, "Training text: paragraphs = lines longer than 100 characters, not starting with '='")->required();
  t->add_option("--out", c->out, "Directory for the trained MLA model")->required();
  t->add_option("--paragraphs", c->paragraphs, "Use the first N paragraphs (0: all)")->capture_default_str()->check(CLI::NonNegativeNumber);
  t->add_option("--recon-alpha", c->o.recon_alpha, "Reconstruction loss weight: (1-a) LM + a mean MSE(K~,K),(V~,V)")
      ->capture_default_str()->check(CLI::Range(0.0, 1.0));
  t->add_option("--recon-norm", c->o.recon_norm,
                "Reconstruction mean per batch: tokens (over real tokens) | padded (over batch x longest sequence, the Python "
                "original's F.mse_loss denominator; padding adds no term)")
      ->capture_default_str()->check(CLI::IsMember({"tokens", "padded"}));
  t->add_flag("--distill", c->o.distill, "Distillation from the original model (alpha 0.9, T 2); excludes --recon-alpha > 0");
  t->add_option("--epochs", c->o.epochs, "Epochs")->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--batch-size", c->o.batch_size, "Sequences per micro-batch")->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--max-length", c->o.max_length, "Tokens per sequence (max)")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  t->add_option("--grad-accum", c->o.grad_accum, "Micro-batches per optimizer step")->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--euclidean-lr", c->o.euclidean_lr, "AdamW lr of W_down")->capture_default_str();
  t->add_option("--riemannian-lr", c->o.riemannian_lr, "RiemannianAdam lr of W_up")->capture_default_str();
  t->add_option("--lr-schedule", c->o.schedule, "constant (as the Python MLATrainer, which creates no scheduler) | linear | cosine")
      ->capture_default_str()->check(CLI::IsMember({"constant", "linear", "cosine"}));
  t->add_option("--warmup-steps", c->o.warmup_steps, "Warmup steps of the linear and cosine schedules")->capture_default_str();
  t->add_option("--max-grad-norm", c->o.max_grad_norm, "Gradient-norm clipping of W_down (0: off)")->capture_default_str();
  t->add_flag("--clip-stiefel", c->o.clip_stiefel, "Clip the W_up gradients too (one global norm over all)");
  t->add_option("--max-steps", c->o.max_steps, "Stop after N optimizer steps (0: all)")->capture_default_str();
  t->add_option("--seed", c->o.seed, "Shuffling seed")->capture_default_str();
  t->add_option("--checkpoint-dir", c->o.checkpoint_dir, "Write DIR/step-N checkpoints (parameters, optimizer state, data position)");
  t->add_option("--checkpoint-every", c->o.checkpoint_every, "Checkpoint every N steps (0: never)")->capture_default_str();
  t->add_option("--keep-checkpoints", c->o.keep_last_checkpoints, "Keep the last N checkpoints")->capture_default_str();
  t->add_option("--resume", c->resume, "Resume from a checkpoint folder (same model, data and options)");
  t->add_option("--device", c->device, "cpu | cuda (one GPU: cuda::MLATrainer, float32; checkpoints interchangeable with cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  t->add_flag("--tf32", c->tf32, "--device cuda: the training graph's GEMMs on TF32 tensor cores (the optimizer stays float32)");
  t->add_option("--stats", c->stats, "Write the training stats JSON here (default: OUT/train_stats.json)");
  t->add_option("--plot-loss", c->plot_loss, "Write the loss curves (losses, learning rates, gradient norm per step) to this SVG file");
  t->add_option("--plot-smooth", c->plot_smooth, "--plot-loss: also draw the mean of the total loss over the last N steps (0: off)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  t->add_flag("--json", c->json, "Print a JSON summary instead of text (progress and log lines still go to stderr)");
  c->ratio_opt = t->add_option("--ratio", c->co.compression_ratio, "Plain HF model: KV compression ratio")->capture_default_str();
  c->method_opt = t->add_option("--method", c->co.method, "Plain HF model: separate | xkv | joint | auto")
                      ->capture_default_str()->check(CLI::IsMember({"separate", "xkv", "joint", "auto"}));
  t->add_option("--calibration", c->calibration, "Plain HF model: calibration text (default: --data)");
  t->add_option("--calibration-samples", c->n_calib, "Calibration paragraphs")->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--calibration-length", c->calib_len, "Tokens per calibration paragraph")->capture_default_str()->check(CLI::PositiveNumber);
  t->add_flag("--no-calibration", c->no_calibration, "Plain HF model: initialise from the weights alone (SVD)");
  t->add_flag("--store-original-weights", c->co.store_original_weights, "Keep the original K/V projections in the saved model");
  t->add_flag("--overwrite", c->overwrite, "Replace --out if it exists");
  t->add_flag("--quiet", c->quiet, "No progress, log lines or conversion report");
  t->callback([c]() {
    int rc = 0;
    try {
      rc = run_train(*c);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      abort_other_ranks(2);
      throw CLI::RuntimeError(2);
    }
    if (rc != 0) throw CLI::RuntimeError(rc);
    throw CLI::Success();
  });
  return t;
}

/// Registers `plot-loss`: the loss curves of a stats JSON written by `train` (or TrainStats::save_json).
inline CLI::App* add_plot_loss_command(CLI::App& app) {
  struct Args {
    std::string stats, out, title;
    int smooth = 0;
  };
  auto a = std::make_shared<Args>();
  auto* p = app.add_subcommand("plot-loss", "Plot the loss curves of a training stats JSON (from `train`) as an SVG file");
  p->add_option("stats", a->stats, "Training stats JSON (train's OUT/train_stats.json or --stats)")->required();
  p->add_option("--out", a->out, "SVG file to write")->required();
  p->add_option("--title", a->title, "Prefix of the panel titles (default: the stats file's folder name)");
  p->add_option("--smooth", a->smooth, "Also draw the mean of the total loss over the last N steps (0: off)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  p->callback([a]() {
    try {
      const auto h = pipeline::load_loss_history(a->stats);
      const std::string title = a->title.empty() ? std::filesystem::absolute(a->stats).parent_path().filename().string() : a->title;
      pipeline::write_loss_plot(h, a->out, {.title = title, .smooth = a->smooth});
      std::printf("loss plot: %s (%zu steps, loss %.4f -> %.4f)\n", a->out.c_str(), h.step.size(), h.loss.front(), h.loss.back());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      throw CLI::RuntimeError(2);
    }
    throw CLI::Success();
  });
  return p;
}

}  // namespace cacheshrink::cli

// Example: fine-tune the compression of a converted model with the reconstruction loss or with
// distillation, then evaluate it and plot the loss curves.
//
//   finetune [MODEL_DIR] [recon|distill] [STEPS] [OUT_SVG]
//
// Defaults: the embedded tiny LLaMA-3 (GQA: "auto" picks xkv), reconstruction, 12 optimizer
// steps, the loss plot in the temporary directory. Only W_down (AdamW) and W_up (RiemannianAdam on
// the Stiefel manifold) train; every other weight stays frozen. Exits non-zero when W_up left the
// manifold, the weights did not change, or the perplexity became non-finite.
//
// The two losses need different extra memory (besides the original K/V projections, which
// both keep, 2 d_kv x hidden per converted layer):
//   reconstruction  (1-a) LM + a mean_l (MSE(K~_l, K_l) + MSE(V~_l, V_l)) / 2: per converted layer
//                   the residuals K~ - K and V~ - V, 2 x tokens x d_kv numbers, are kept for the
//                   backward.
//   distillation    0.9 T^2 KL(teacher || student) + 0.1 LM at T = 2: the teacher's logits,
//                   tokens x vocab numbers, plus one more forward per micro-batch (the teacher is
//                   the same model run with its original K/V projections, not a second copy).
// The program prints both sizes for its batch.
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
#include <cacheshrink/pipeline/loss_plot.hpp>
#include <cacheshrink/train/train.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

namespace {
double perplexity_of(const model::Model& m, const std::vector<int>& ids) {
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    pipeline::PerplexityOptions po;  // windows of 256 tokens
    po.max_windows = 4;
    return pipeline::perplexity(tf, ids, po).perplexity;
  });
}
}  // namespace

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const std::string loss = argc > 2 ? argv[2] : "recon";
  const long steps = argc > 3 ? std::stol(argv[3]) : 12;
  const std::filesystem::path svg_path = argc > 4 ? std::filesystem::path(argv[4]) : std::filesystem::temp_directory_path() / "finetune_loss.svg";
  if (loss != "recon" && loss != "distill") throw InvalidArgument("loss must be recon or distill, got '" + loss + "'");

  // 1. Convert with calibration (2x, auto). convert() keeps the original K/V projections in
  //    memory (LayerWeights::wk/wv): both losses compare against them.
  const model::Model original = model::load_model(model_dir);
  auto tok = tokenizer::Tokenizer::from_directory(model_dir);
  const auto valid = io::read_text_file(fixtures + "/data/wikitext2_valid.txt");
  compression::ConvertOptions co;
  co.compression_ratio = 2.0;
  model::Model m = compression::convert(original, co, compression::encode_calibration(tok, compression::paragraphs(valid, 32), 128));

  // 2. Training data: WikiText-2 validation paragraphs, 128 tokens at most; evaluation: the test ids.
  train::TrainOptions o;
  o.max_length = 128;
  o.batch_size = 4;
  o.epochs = 1;
  o.max_steps = steps;
  o.euclidean_lr = 1e-4;  // 10x the defaults: a dozen steps should visibly move
  o.riemannian_lr = 1e-3;
  o.ortho_every = 4;
  if (loss == "recon") o.recon_alpha = 0.3;
  else o.distill = true;
  const auto seqs = train::encode_texts(tok, train::load_texts(fixtures + "/data/wikitext2_valid.txt", 4 * static_cast<std::size_t>(steps)), o.max_length);
  const auto test_ids = io::read_ids_u16(fixtures + "/data/wikitext2_test.ids.u16");

  // 3. The extra memory of each loss for one micro-batch of this run (float32 numbers).
  long long tokens = 0;
  for (std::size_t i = 0; i < seqs.size() && i < static_cast<std::size_t>(o.batch_size); ++i) tokens += static_cast<long long>(seqs[i].size());
  int n_mla = 0;
  for (const auto& l : m.weights.layers) n_mla += l.mla.has_value();
  const int d_kv = m.config.d_kv();
  std::printf("micro-batch of %lld tokens: reconstruction keeps %lld numbers of residuals (2 x tokens x d_kv %d x %d layers), "
              "distillation %lld numbers of teacher logits (tokens x vocab %d) and runs a second forward\n",
              tokens, 2LL * tokens * d_kv * n_mla, d_kv, n_mla, tokens * m.config.vocab_size, m.config.vocab_size);

  const double before = perplexity_of(m, test_ids);
  const MatrixRf wu_before = *m.weights.layers.back().mla->w_up_k;  // a copy: train() updates m in place

  // 4. Train. m's W_down and W_up are written back at the end of train().
  train::MLATrainer<float> trainer(m, o);
  const auto stats = trainer.train(seqs);
  const double after = perplexity_of(m, test_ids);
  const double moved = (*m.weights.layers.back().mla->w_up_k - wu_before).norm();

  std::printf("%s, %s loss: %zu steps, loss %.4f -> %.4f (lm %.4f -> %.4f, %s %.5f -> %.5f)\n", model_dir.c_str(), loss.c_str(),
              stats.steps.size(), stats.steps.front().loss, stats.steps.back().loss, stats.steps.front().lm, stats.steps.back().lm,
              loss == "recon" ? "recon" : "kl", loss == "recon" ? stats.steps.front().recon : stats.steps.front().kl,
              loss == "recon" ? stats.steps.back().recon : stats.steps.back().kl);
  std::printf("perplexity (4 windows of 256 test tokens): %.3f after conversion, %.3f after fine-tuning\n", before, after);
  std::printf("W_up moved by %.3e (Frobenius); orthonormality error ||U^T U - I||_F = %.2e\n", moved, stats.final_ortho_error);

  // 5. The loss curves as an SVG picture (the same as `cacheshrink train --plot-loss`).
  pipeline::write_loss_plot(pipeline::loss_history(stats.to_json()), svg_path, {.title = loss, .smooth = 0});
  std::printf("loss plot: %s\n", svg_path.c_str());

  const bool ok = stats.final_ortho_error < 1e-4 && moved > 0 && std::isfinite(after) &&
                  static_cast<long>(stats.steps.size()) == std::min<long>(steps, trainer.total_steps(seqs.size()));
  std::printf("fine-tuning checks %s\n", ok ? "passed" : "FAILED");
  return ok ? 0 : 1;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

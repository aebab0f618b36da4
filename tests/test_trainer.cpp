// Fine-tuning, steps and runs: one training step in double against hand-written AdamW /
// RiemannianAdam math, trainer parity with the optimizers driven directly, orthonormality after
// training, determinism, stats JSON, bad input and checkpoint resume (gradients: test_train.cpp).
#include "train_test_support.hpp"

using namespace cacheshrink;
using namespace cacheshrink::test::train_support;

TEST_CASE("one training step in double equals hand-written AdamW / RiemannianAdam math; loss recomputed by the runtime") {
  auto m = converted({"tiny-llama3", "xkv", 2});
  train::TrainOptions o;
  o.recon_alpha = 0.3;
  o.warmup_steps = 0;
  o.euclidean_lr = 1e-3;
  o.riemannian_lr = 1e-2;
  o.max_grad_norm = 0.5;
  train::MLATrainer<double> tr(m, o);
  auto& g = tr.graph();
  const auto seqs = random_seqs(m.config.vocab_size, {10, 16}, 31);
  std::vector<linalg::Matrix<double>> x0, grad;
  g.zero_grad();
  g.forward_backward(seqs, o.loss(), 1.0);
  double sq = 0, sq_e = 0;
  for (auto& p : g.params()) {
    x0.push_back(p.value);
    grad.push_back(p.grad);
    sq += p.grad.squaredNorm();
    if (!p.stiefel) sq_e += p.grad.squaredNorm();
  }
  // As the original trainer.py: only the Euclidean (w_down) gradients are clipped, by their own norm.
  const double norm = std::sqrt(sq), coef = std::min(1.0, o.max_grad_norm / (std::sqrt(sq_e) + 1e-6));
  REQUIRE(coef < 0.99);  // the clipping is exercised
  const long total = 10;
  const auto st = tr.step({seqs}, 0, total);
  CHECK(st.grad_norm == doctest::Approx(norm).epsilon(1e-12));
  CHECK(st.lr_euclidean == doctest::Approx(o.euclidean_lr));  // constant schedule (the original creates no scheduler)
  CHECK(st.lr_riemannian == doctest::Approx(o.riemannian_lr));
  for (std::size_t i = 0; i < x0.size(); ++i) {
    const auto& p = g.params()[i];
    CAPTURE(p.name);
    const linalg::Matrix<double> gc = p.stiefel ? grad[i] : linalg::Matrix<double>(grad[i] * coef);
    // The step leaves the gradient it used in p.grad: clipped for w_down, untouched for w_up.
    CHECK((p.grad - gc).cwiseAbs().maxCoeff() <= 1e-14 * std::max(1.0, gc.cwiseAbs().maxCoeff()));
    linalg::Matrix<double> expect;
    if (!p.stiefel) {
      // AdamW step 1: m^ = g, v^ = g^2 -> x (1 - lr wd) - lr g / (|g| + eps)
      expect = x0[i] * (1 - o.euclidean_lr * o.euclidean_weight_decay) -
               o.euclidean_lr * gc.cwiseQuotient((gc.cwiseAbs().array() + 1e-8).matrix());
    } else {
      // RiemannianAdam step 1 (one scalar second moment per matrix): rg = g - x sym(x^T g),
      // d = rg / (||rg|| + eps), x' = qf(x - lr d) with diag(R) > 0.
      // geoopt first re-projects x onto the manifold (polar: U V^T); the converted float basis
      // is orthonormal only to ~1e-7.
      Eigen::JacobiSVD<linalg::Matrix<double>> svd(x0[i], Eigen::ComputeThinU | Eigen::ComputeThinV);
      const linalg::Matrix<double> x = svd.matrixU() * svd.matrixV().transpose();
      const linalg::Matrix<double> xtg = x.transpose() * gc;
      const linalg::Matrix<double> rg = gc - x * (0.5 * (xtg + xtg.transpose()));
      const linalg::Matrix<double> y = x - o.riemannian_lr * rg / (rg.norm() + 1e-8);
      Eigen::HouseholderQR<linalg::Matrix<double>> qr(y);
      linalg::Matrix<double> Q = qr.householderQ() * linalg::Matrix<double>::Identity(y.rows(), y.cols());
      const linalg::Matrix<double> R = qr.matrixQR().topRows(y.cols()).triangularView<Eigen::Upper>();
      for (Eigen::Index j = 0; j < R.cols(); ++j)
        if (R(j, j) < 0) Q.col(j) *= -1;
      expect = Q;
    }
    CHECK((p.value - expect).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, expect.cwiseAbs().maxCoeff()));
  }
  // The loss at the new parameters, recomputed by the float runtime forward on the written-back model.
  tr.write_back();
  const double lm_graph = g.forward_backward(seqs, {}, 0.0).lm;
  model::Transformer<Gqa> tf(m);
  const MatrixRf logits = tf.forward(std::span<const std::vector<int>>(seqs));
  double nll = 0;
  int cnt = 0, row = 0;
  for (const auto& s : seqs) {
    for (std::size_t t = 0; t + 1 < s.size(); ++t, ++cnt) {
      const auto r = logits.row(row + static_cast<int>(t)).cast<double>();
      nll += std::log((r.array() - r.maxCoeff()).exp().sum()) + r.maxCoeff() - r(s[t + 1]);
    }
    row += static_cast<int>(s.size());
  }
  CHECK(nll / cnt == doctest::Approx(lm_graph).epsilon(1e-5));
  // Constant by default: mid-run steps keep the base lrs (a linear schedule would be at 1/2 here).
  const auto st5 = tr.step({seqs}, 5, total);
  CHECK(st5.lr_euclidean == o.euclidean_lr);
  CHECK(st5.lr_riemannian == o.riemannian_lr);
}

TEST_CASE("trainer steps match optim::RiemannianAdam / AdamW driven directly with the same gradients") {
  auto m = converted({"tiny-mqa", "separate"});
  train::TrainOptions o;
  o.recon_alpha = 0.5;
  o.schedule = "linear";
  o.warmup_steps = 2;
  o.euclidean_lr = 1e-3;
  o.riemannian_lr = 1e-2;
  train::MLATrainer<double> tr(m, o);
  auto& g = tr.graph();
  std::vector<linalg::Matrix<double>> x(g.params().size());
  std::vector<optim::AdamState<double>> st(g.params().size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = g.params()[i].value;
  optim::RiemannianAdamOptions ro;
  optim::AdamWOptions ao;
  ao.weight_decay = o.euclidean_weight_decay;
  const long total = 5;
  for (long t = 0; t < 4; ++t) {
    const auto seqs = random_seqs(m.config.vocab_size, {9, 12}, 100 + static_cast<std::uint64_t>(t));
    const auto s = tr.step({seqs}, t, total);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const auto& p = g.params()[i];  // grad now holds the clipped gradient the step used
      if (p.stiefel) optim::riemannian_adam_step(manifold::EuclideanStiefel<double>{}, x[i], p.grad, st[i], ro, s.lr_riemannian);
      else optim::adamw_step(x[i], p.grad, st[i], ao, s.lr_euclidean);
      CHECK((x[i] - p.value).cwiseAbs().maxCoeff() <= 1e-13);
    }
  }
}

TEST_CASE("training (float) reduces the loss, keeps the bases orthonormal, is deterministic, and writes stats JSON") {
  auto base = converted({"tiny-llama3", "xkv"});
  auto tok = tokenizer::Tokenizer::from_file(test::fixtures() / "data" / "tokenizer.json");
  const auto texts = train::load_texts(test::fixtures() / "data" / "wikitext2_valid.txt", 24);
  const auto seqs = train::encode_texts(tok, texts, 48);
  REQUIRE(seqs.size() == 24);
  // Like the original TextDataset, encode_texts keeps only sequences of more than 10 tokens.
  CHECK(train::encode_texts(tok, {"a b c d"}, 48).empty());
  CHECK(train::encode_texts(tok, {"a b c d"}, 48, 2).size() == 1);
  train::TrainOptions o;
  o.recon_alpha = 0.3;
  o.riemannian_lr = 3e-3;
  o.euclidean_lr = 3e-4;
  o.schedule = "linear";
  o.warmup_steps = 2;
  o.epochs = 3;
  o.max_length = 48;
  o.ortho_every = 5;
  auto m1 = base;
  train::MLATrainer<float> t1(m1, o);
  const auto s1 = t1.train(seqs);
  CHECK(s1.steps.size() == 18);
  CHECK(s1.final_ortho_error < 1e-5);
  for (const auto& st : s1.steps)
    if (st.ortho_error >= 0) CHECK(st.ortho_error < 1e-5);
  // Mean loss of the last epoch below the first epoch's.
  double first = 0, last = 0;
  for (int i = 0; i < 6; ++i) first += s1.steps[static_cast<std::size_t>(i)].loss, last += s1.steps[static_cast<std::size_t>(12 + i)].loss;
  CHECK(last < first);
  CHECK(s1.tokens > 0);
  CHECK(s1.tokens_per_second > 0);
  // The model now holds the trained weights (shared xkv basis updated once for the group).
  CHECK((*m1.weights.layers[0].mla->w_up_k - *base.weights.layers[0].mla->w_up_k).norm() > 0);
  CHECK(m1.weights.layers[0].mla->w_up_k.get() == m1.weights.layers[1].mla->w_up_k.get());
  // Determinism.
  auto m2 = base;
  train::MLATrainer<float> t2(m2, o);
  const auto s2 = t2.train(seqs);
  CHECK(s2.steps.back().loss == s1.steps.back().loss);
  CHECK((m2.weights.layers[2].mla->w_down_v - m1.weights.layers[2].mla->w_down_v).norm() == 0.0f);
  // JSON.
  const auto path = std::filesystem::temp_directory_path() / ("cacheshrink_train_stats_" + std::to_string(::getpid()) + ".json");
  s1.save_json(path);
  const auto j = nlohmann::json::parse(io::read_text_file(path));
  CHECK(j["steps"].size() == 18);
  CHECK(j["steps"][0]["lr_euclidean"].get<double>() == 0.0);  // warmup starts at 0
  std::filesystem::remove(path);
}

TEST_CASE("bad input: clear errors") {
  auto m = converted({"tiny-llama2", "separate"});
  train::TrainOptions o;
  o.recon_alpha = 0.3;
  o.distill = true;
  CHECK_THROWS_AS(train::MLATrainer<float>(m, o), InvalidArgument);
  o.distill = false;
  o.batch_size = 0;
  CHECK_THROWS_AS(train::MLATrainer<float>(m, o), InvalidArgument);
  o.batch_size = 4;
  auto no_kv = m;
  no_kv.weights.layers[1].wk.resize(0, 0);
  try {
    train::MLATrainer<float> t(no_kv, o);
    FAIL("expected an error");
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("store-original-weights") != std::string::npos);
  }
  auto plain = model::load_model(test::model_dir("tiny-llama2"));
  CHECK_THROWS_AS(train::TrainGraph<float>{plain}, InvalidArgument);
  train::TrainGraph<float> g(m);
  CHECK_THROWS_AS(g.forward_backward(std::vector<std::vector<int>>{{1, 99999}}, {}, 0.0), InvalidArgument);
  CHECK_THROWS_AS(g.forward_backward(std::vector<std::vector<int>>{{}}, {}, 0.0), InvalidArgument);
  train::MLATrainer<float> t(m, o);
  CHECK_THROWS_AS(t.train({{5}}), InvalidArgument);
}

TEST_CASE("checkpoints: resuming from step-N continues the same trajectory; old checkpoints pruned") {
  auto base = converted({"tiny-qwen2", "xkv"});
  const auto seqs = random_seqs(base.config.vocab_size, {9, 12, 7, 10, 11, 8, 6}, 77);
  const auto dir = std::filesystem::temp_directory_path() / ("cacheshrink_ckpt_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  train::TrainOptions o;
  o.recon_alpha = 0.3;
  o.batch_size = 2;
  o.epochs = 2;  // 4 steps per epoch, 8 in all; checkpoints at 3 and 6 (keep 1)
  o.schedule = "linear";
  o.warmup_steps = 2;
  o.euclidean_lr = 1e-3;
  o.riemannian_lr = 1e-2;
  o.checkpoint_dir = dir.string();
  o.checkpoint_every = 3;
  o.keep_last_checkpoints = 1;
  auto m1 = base;
  train::MLATrainer<float> t1(m1, o);
  const auto s1 = t1.train(seqs);
  REQUIRE(s1.steps.size() == 8);
  CHECK(!std::filesystem::exists(dir / "step-3"));
  REQUIRE(std::filesystem::exists(dir / "step-6"));
  auto m2 = base;
  o.checkpoint_dir.clear();
  train::MLATrainer<float> t2(m2, o);
  t2.load_checkpoint(dir / "step-6");
  const auto s2 = t2.train(seqs);
  REQUIRE(s2.steps.size() == 2);
  CHECK(s2.steps.back().step == 8);
  CHECK(s2.steps.back().loss == s1.steps.back().loss);
  for (std::size_t l = 0; l < m1.weights.layers.size(); ++l) {
    CHECK((m1.weights.layers[l].mla->w_down_k - m2.weights.layers[l].mla->w_down_k).norm() == 0.0f);
    CHECK((*m1.weights.layers[l].mla->w_up_v - *m2.weights.layers[l].mla->w_up_v).norm() == 0.0f);
  }
  // A checkpoint of another model is refused.
  auto other = converted({"tiny-qwen2", "separate"});
  train::MLATrainer<float> t3(other, o);
  CHECK_THROWS_AS(t3.load_checkpoint(dir / "step-6"), FormatError);
  std::filesystem::remove_all(dir);
}

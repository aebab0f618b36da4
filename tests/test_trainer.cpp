// Fine-tuning runs in float: orthonormality after training, determinism, stats JSON, bad input and
// checkpoint resume. Gradients and the double-precision step checks are in test_train.cpp (split
// by scalar type so each unit instantiates the training stack once and the two build in parallel).
#include "train_test_support.hpp"

using namespace cacheshrink;
using namespace cacheshrink::test::train_support;

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

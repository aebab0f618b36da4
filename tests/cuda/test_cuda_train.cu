// cuda::TrainGraph against the CPU training graph recomputed in float64 (train::TrainGraph<double>):
// losses, logits and every parameter's gradient, for the LM + reconstruction loss, pure LM and
// distillation, on all seven fixtures (separate, xkv with shared bases and early layers kept,
// joint; a sliding window shorter than the sequences; GQA, MQA, q/k norms, biases, GPT-2), and
// whole cuda::MLATrainer steps (graph + cuda::DeviceOptimizer) against the float64 CPU MLATrainer,
// and its training loop: write-back, checkpoints that resume on the GPU and load on the CPU.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cacheshrink/backend/cuda/optim.cuh>
#include <cacheshrink/backend/cuda/train.cuh>
#include <cacheshrink/backend/cuda/trainer.cuh>
#include <filesystem>

#include "cuda/cuda_test_support.cuh"
#include "cuda/train_reference.hpp"

using namespace cacheshrink;
using test::TrainCase;
using test::train_support::kCases;  // the CPU training tests' cases and batches (tests/train_cases.hpp)
using test::train_support::random_seqs;

namespace {

model::Model converted(const TrainCase& cs) { return test::converted_fixture((test::cuda_fixtures() / "models").string(), cs); }

/// max |got - want| / max(max |want|, floor) over a matrix.
template <class A, class B>
double rel_err(const A& got, const B& want, double floor = 1e-30) {
  const double scale = std::max(want.template cast<double>().cwiseAbs().maxCoeff(), floor);
  return (got.template cast<double>() - want.template cast<double>()).cwiseAbs().maxCoeff() / scale;
}

void compare(const TrainCase& cs, const train::LossOptions& lo, const char* what, double grad_tol = 2e-4) {
  const auto m = converted(cs);
  const auto seqs = random_seqs(m.config.vocab_size, {13, 20, 7, 20}, 1234);
  const auto ref = test::reference_graph(m, seqs, lo);
  cuda::TrainGraph dev(m);
  REQUIRE(ref.names.size() == dev.params().size());
  dev.zero_grad();
  const auto ld = dev.forward_backward(seqs, lo, 1.0);
  const auto& lr = ref.loss;
  const std::string tag = std::string(cs.model) + " " + cs.method + " " + what;  // const char* would print as a pointer
  INFO(tag << ": total " << ld.total << " vs " << lr.total << ", lm " << ld.lm << " vs " << lr.lm << ", recon " << ld.recon << " vs "
           << lr.recon << ", kl " << ld.kl << " vs " << lr.kl);
  CHECK(ld.tokens == lr.tokens);
  CHECK(ld.predicted == lr.predicted);
  CHECK(std::abs(ld.total - lr.total) <= 1e-5 * std::abs(lr.total));
  CHECK(std::abs(ld.lm - lr.lm) <= 1e-5 * std::abs(lr.lm));
  CHECK(std::abs(ld.recon - lr.recon) <= 1e-4 * std::abs(lr.recon) + 1e-12);
  // The KL between two nearly equal distributions is small (~5e-4 here) and first-order in the
  // logits' float32 error e (~1e-5 absolute): |dKL| <= e ||p - q||_1 <= e sqrt(2 KL) (Pinsker).
  CHECK(std::abs(ld.kl - lr.kl) <= 1e-4 * std::abs(lr.kl) + 1e-5 * std::sqrt(2 * std::abs(lr.kl)) + 1e-9);
  const double ez = rel_err(dev.logits(), ref.logits);
  INFO("logits rel err " << ez);
  CHECK(ez <= 1e-5);
  // Each gradient is compared relative to its own largest entry, floored at 1e-3 of the largest
  // entry of any parameter's gradient: a gradient that vanishes in exact arithmetic (with the
  // reconstruction loss alone, d/dW_down at the SVD initialisation is zero: the residual is
  // orthogonal to W_up's columns) is rounding noise on both sides.
  double gmax = 0;
  for (const auto& gr : ref.grads) gmax = std::max(gmax, gr.cwiseAbs().maxCoeff());
  for (std::size_t i = 0; i < ref.names.size(); ++i) {
    REQUIRE(ref.names[i] == dev.params()[i].name);
    const double ev = rel_err(dev.value(i), ref.values[i]);
    const double eg = rel_err(dev.grad(i), ref.grads[i], 1e-3 * gmax);
    INFO(ref.names[i] << ": value rel err " << ev << ", grad rel err " << eg << " (|grad| max " << ref.grads[i].cwiseAbs().maxCoeff()
                      << ")");
    CHECK(ev <= 1e-6);
    CHECK(eg <= grad_tol);
  }
}

}  // namespace

TEST_CASE("cuda TrainGraph: LM + reconstruction loss and gradients equal the float64 CPU graph on every fixture") {
  CACHESHRINK_REQUIRE_GPU();
  train::LossOptions lo;
  lo.recon_alpha = 0.3;
  for (const auto& cs : kCases) compare(cs, lo, "recon 0.3");
}

TEST_CASE("cuda TrainGraph: pure LM, padded reconstruction normalisation and distillation") {
  CACHESHRINK_REQUIRE_GPU();
  train::LossOptions lm;
  train::LossOptions padded;
  padded.recon_alpha = 1.0;
  padded.recon_norm = train::ReconNorm::Padded;
  train::LossOptions kd;
  kd.distill = true;
  for (const auto& cs : {kCases[0], kCases[2], kCases[6]}) {
    compare(cs, lm, "lm");
    // Reconstruction alone: the W_down gradients are second order here (each layer's own term
    // vanishes at the initialisation, what remains flows through the layers above) and come out
    // of a cancellation, so float32 keeps fewer digits of them (tiny-gpt2's layer-3 W_down_k, a
    // gradient of at most 1e-9: 1.6e-3 since the register-resident norm kernels and the one-pass
    // cross-entropy changed the float32 summation order; every other gradient stays within 1e-3).
    compare(cs, padded, "recon 1.0 padded", 3e-3);
    compare(cs, kd, "distill");
  }
}

TEST_CASE("cuda TrainGraph TF32: the fused attention's loss and gradients are as close to float64 as the materialised path's") {
  CACHESHRINK_REQUIRE_GPU();
  train::LossOptions lo;
  lo.recon_alpha = 0.3;
  for (const auto& cs : kCases) {
    const auto m = converted(cs);
    const auto seqs = random_seqs(m.config.vocab_size, {13, 20, 7, 20}, 1234);
    const auto ref = test::reference_graph(m, seqs, lo);
    cuda::TrainGraph dev(m);
    dev.set_tf32(true);
    REQUIRE(dev.fused_attention());  // every fixture's head_dim (32, 64) has a fused kernel
    double gmax = 0;
    for (const auto& gr : ref.grads) gmax = std::max(gmax, gr.cwiseAbs().maxCoeff());
    // Per path: the loss's relative error and the worst gradient's (as in compare()).
    auto run = [&](bool fused) {
      dev.set_fused_attention(fused);
      dev.zero_grad();
      const auto l = dev.forward_backward(seqs, lo, 1.0);
      double eg = 0;
      for (std::size_t i = 0; i < ref.names.size(); ++i) eg = std::max(eg, rel_err(dev.grad(i), ref.grads[i], 1e-3 * gmax));
      return std::pair{std::abs(l.total - ref.loss.total) / std::abs(ref.loss.total), eg};
    };
    const auto [lf, gf] = run(true);
    const auto [lm, gm] = run(false);
    const std::string tag = std::string(cs.model) + " " + cs.method;  // const char* would print as a pointer
    INFO(tag << ": loss rel err fused " << lf << " materialised " << lm << "; worst grad rel err fused " << gf
                  << " materialised " << gm);
    CHECK(lf <= 2e-3);
    CHECK(gf <= 5e-2);
    CHECK(gf <= 2 * gm + 5e-3);  // no worse than TF32 itself makes the materialised path
  }
}

TEST_CASE("cuda TrainGraph: the side stream's results equal the one-stream graph's, call after call") {
  // The side stream (reconstruction residuals, trainable weights' gradients) runs concurrently
  // with the main one; a missing wait would let one read a buffer the other is still writing and
  // show up as a loss or gradient that moves between calls or between the two modes. Both modes
  // take cuBLAS's first heuristic choice per shape, so they differ at most by rounding.
  CACHESHRINK_REQUIRE_GPU();
  train::LossOptions lo;
  lo.recon_alpha = 0.3;
  for (const auto& cs : kCases) {
    const auto m = converted(cs);
    const std::string tag = std::string(cs.model) + " " + cs.method;
    for (const bool tf32 : {false, true}) {
      cuda::TrainGraph dev(m);
      dev.set_tf32(tf32);
      auto run = [&](bool side, unsigned seed) {
        dev.set_side_stream(side);
        REQUIRE(dev.side_stream() == side);
        dev.zero_grad();
        const auto l = dev.forward_backward(random_seqs(m.config.vocab_size, {13, 20, 7, 20}, seed), lo, 1.0);
        std::vector<linalg::Matrix<float>> g;
        for (std::size_t i = 0; i < dev.params().size(); ++i) g.push_back(dev.grad(i));
        return std::pair{l, g};
      };
      for (const unsigned seed : {1u, 2u, 3u}) {
        const auto [l1, g1] = run(false, seed);
        for (int rep = 0; rep < 3; ++rep) {
          const auto [l2, g2] = run(true, seed);
          INFO(tag << (tf32 ? " tf32" : " fp32") << " seed " << seed << " rep " << rep << ": total " << l2.total << " vs " << l1.total
                   << ", recon " << l2.recon << " vs " << l1.recon);
          CHECK(std::abs(l2.total - l1.total) <= 1e-6 * std::abs(l1.total));
          CHECK(std::abs(l2.recon - l1.recon) <= 1e-5 * std::abs(l1.recon) + 1e-12);
          double gmax = 0;
          for (const auto& g : g1) gmax = std::max(gmax, static_cast<double>(g.cwiseAbs().maxCoeff()));
          for (std::size_t i = 0; i < g1.size(); ++i) {
            INFO(dev.params()[i].name);
            CHECK(rel_err(g2[i], g1[i], 1e-3 * gmax) <= 1e-5);
          }
        }
      }
    }
  }
}

TEST_CASE("cuda TrainGraph: gradients accumulate over calls and bad input throws") {
  CACHESHRINK_REQUIRE_GPU();
  const auto m = converted(kCases[2]);
  cuda::TrainGraph dev(m);
  train::LossOptions lo;
  lo.recon_alpha = 0.5;
  const auto seqs = random_seqs(m.config.vocab_size, {9, 4}, 7);
  dev.zero_grad();
  dev.forward_backward(seqs, lo, 1.0);
  std::vector<linalg::Matrix<float>> g1;
  for (std::size_t i = 0; i < dev.params().size(); ++i) g1.push_back(dev.grad(i));
  dev.forward_backward(seqs, lo, 0.5);
  for (std::size_t i = 0; i < dev.params().size(); ++i) CHECK(rel_err(dev.grad(i), (1.5f * g1[i]).eval()) <= 1e-5);
  // Loss only (no backward) leaves the gradients alone.
  const auto l32 = dev.forward_backward(seqs, lo, 0.0);
  CHECK(rel_err(dev.grad(0), (1.5f * g1[0]).eval()) <= 1e-5);
  // TF32 GEMMs: the same loss to TF32's precision (10 mantissa bits), not bit for bit.
  dev.set_tf32(true);
  const auto ltf = dev.forward_backward(seqs, lo, 0.0);
  dev.set_tf32(false);
  CHECK(std::abs(ltf.total - l32.total) <= 1e-2 * std::abs(l32.total));
  std::vector<std::vector<int>> empty;
  CHECK_THROWS_AS(dev.forward_backward(empty, lo, 1.0), InvalidArgument);
  CHECK_THROWS_WITH_AS(dev.forward_backward(std::vector<std::vector<int>>{{1, 2, m.config.vocab_size}}, lo, 1.0),
                       doctest::Contains("outside the vocabulary"), InvalidArgument);
  train::LossOptions both;
  both.recon_alpha = 0.3;
  both.distill = true;
  CHECK_THROWS_AS(dev.forward_backward(seqs, both, 1.0), InvalidArgument);
  auto original = model::load_model(test::cuda_fixtures() / "models" / "tiny-llama3");
  CHECK_THROWS_WITH_AS(cuda::TrainGraph{original}, doctest::Contains("no MLA layers"), InvalidArgument);
}

TEST_CASE("cuda MLATrainer: three steps follow the float64 CPU MLATrainer") {
  CACHESHRINK_REQUIRE_GPU();
  for (const auto& cs : {kCases[2], kCases[6], kCases[0]}) {
    const auto m = converted(cs);
    const auto seqs = random_seqs(m.config.vocab_size, {11, 17, 11, 9}, 99);
    train::TrainOptions o;
    o.recon_alpha = 0.3;
    o.euclidean_lr = 1e-3;
    o.riemannian_lr = 1e-2;
    o.max_grad_norm = 0.05;  // small enough to clip
    const auto ref = test::reference_steps(m, seqs, o, 3);
    model::Model copy = m;
    cuda::MLATrainer tr(copy, o);
    cuda::TrainGraph& g = tr.graph();
    for (std::size_t t = 0; t < ref.stats.size(); ++t) {
      const auto& st = ref.stats[t];
      const auto got = tr.step({seqs}, static_cast<long>(t), static_cast<long>(ref.stats.size()));
      INFO(cs.model << " " << cs.method << " step " << t + 1 << ": loss " << got.loss << " vs " << st.loss << ", grad norm "
                    << got.grad_norm << " vs " << st.grad_norm);
      CHECK(std::abs(got.loss - st.loss) <= 1e-5 * std::abs(st.loss));
      CHECK(std::abs(got.grad_norm - st.grad_norm) <= 1e-4 * st.grad_norm);
      CHECK(got.lr_euclidean == st.lr_euclidean);
      CHECK(got.lr_riemannian == st.lr_riemannian);
      CHECK(got.tokens == st.tokens);
    }
    // Compare the parameters' moves. RiemannianAdam's second moment is one scalar per matrix, so
    // its update is smooth in the gradient: tight. AdamW's early steps are ~lr sign(g) per entry,
    // so entries whose gradient is at rounding level may flip: compared in the Frobenius norm.
    for (std::size_t i = 0; i < ref.names.size(); ++i) {
      const linalg::Matrix<double> dc = ref.end[i] - ref.start[i];
      const linalg::Matrix<double> dg = g.value(i).cast<double>() - ref.start[i];
      const double e = (dg - dc).norm() / dc.norm();
      INFO(ref.names[i] << ": relative error of the move " << e << " (|move| " << dc.norm() << ")");
      CHECK(e <= (ref.stiefel[i] ? 1e-3 : 2e-2));
      if (ref.stiefel[i]) {
        const linalg::Matrix<double> u = g.value(i).cast<double>();
        CHECK((u.transpose() * u - linalg::Matrix<double>::Identity(u.cols(), u.cols())).norm() < 1e-5);
      }
    }
  }
}

TEST_CASE("cuda MLATrainer: train() writes back; a checkpoint resumes the run on the GPU and loads on the CPU") {
  CACHESHRINK_REQUIRE_GPU();
  const auto m = converted(kCases[2]);
  const auto seqs = random_seqs(m.config.vocab_size, {11, 17, 11, 9, 13, 15, 12, 10}, 7);
  const auto dir = std::filesystem::temp_directory_path() / ("cacheshrink_cuda_trainer_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  train::TrainOptions o;
  o.recon_alpha = 0.3;
  o.euclidean_lr = 1e-3;
  o.riemannian_lr = 1e-2;
  o.batch_size = 2;
  o.epochs = 1;  // 4 steps
  o.schedule = "linear";
  o.warmup_steps = 1;
  o.checkpoint_dir = dir.string();
  o.checkpoint_every = 2;
  o.progress = o.verbose = false;
  // A: the whole run; checkpoints at steps 2 and 4.
  model::Model ma = m;
  cuda::MLATrainer a(ma, o);
  const auto sa = a.train(seqs);
  REQUIRE(sa.steps.size() == 4);
  CHECK(std::filesystem::exists(dir / "step-2" / "checkpoint.json"));
  CHECK(std::filesystem::exists(dir / "step-4" / "state.bin"));
  CHECK(sa.final_ortho_error < 1e-5);
  // write_back: the model holds the trained weights (moved from the conversion's).
  const auto& la = *ma.weights.layers.back().mla;
  const auto& l0 = *m.weights.layers.back().mla;
  CHECK((la.w_down_k - l0.w_down_k).norm() > 1e-6 * l0.w_down_k.norm());
  CHECK((*la.w_up_k - *l0.w_up_k).norm() > 1e-6 * l0.w_up_k->norm());
  // B: resume from step 2 on the GPU: the last two steps and the final weights match A's.
  train::TrainOptions ob = o;
  ob.checkpoint_dir.clear();
  model::Model mb = m;
  cuda::MLATrainer b(mb, ob);
  b.load_checkpoint(dir / "step-2");
  std::vector<linalg::Matrix<float>> loaded;
  for (std::size_t i = 0; i < b.graph().params().size(); ++i) loaded.push_back(b.graph().value(i));
  const auto sb = b.train(seqs);
  REQUIRE(sb.steps.size() == 2);
  for (int t = 0; t < 2; ++t) {
    INFO("resumed step " << sb.steps[static_cast<std::size_t>(t)].step << ": loss " << sb.steps[static_cast<std::size_t>(t)].loss << " vs "
                         << sa.steps[static_cast<std::size_t>(t) + 2].loss);
    CHECK(sb.steps[static_cast<std::size_t>(t)].step == t + 3);
    CHECK(std::abs(sb.steps[static_cast<std::size_t>(t)].loss - sa.steps[static_cast<std::size_t>(t) + 2].loss) <=
          1e-6 * std::abs(sa.steps[static_cast<std::size_t>(t) + 2].loss));
  }
  for (std::size_t l = 0; l < ma.weights.layers.size(); ++l) {
    if (!ma.weights.layers[l].mla) continue;
    const auto& x = *ma.weights.layers[l].mla;
    const auto& y = *mb.weights.layers[l].mla;
    INFO("layer " << l);
    CHECK((x.w_down_k - y.w_down_k).norm() <= 1e-6 * x.w_down_k.norm());
    CHECK((*x.w_up_k - *y.w_up_k).norm() <= 1e-6 * x.w_up_k->norm());
  }
  // The same checkpoint loads into the CPU trainer: identical parameters (same format and layout).
  const auto cpu = test::cpu_checkpoint_values(m, ob, dir / "step-2");
  REQUIRE(cpu.size() == loaded.size());
  for (std::size_t i = 0; i < loaded.size(); ++i) {
    INFO(b.graph().params()[i].name);
    CHECK(cpu[i] == loaded[i]);
  }
  // A checkpoint of another model's shape is refused by name.
  model::Model other = converted(kCases[0]);
  cuda::MLATrainer d(other, ob);
  CHECK_THROWS_AS(d.load_checkpoint(dir / "step-2"), FormatError);
  std::filesystem::remove_all(dir);
}

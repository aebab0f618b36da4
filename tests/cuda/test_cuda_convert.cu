// Conversion on the GPU (backend/cuda/convert.cuh) against the CPU conversion:
//   - DeviceGrams vs the CPU GramAccumulator on random float32 / bf16 batches (float64 sums);
//   - DeviceInit's five operations vs HostInit on random matrices (float64, incl. odd sizes);
//   - the calibration Grams of all seven fixtures (float32 forward on both sides);
//   - cuda::convert vs compression::convert on every fixture and method: same report
//     bookkeeping, captured energies, subspaces (principal angles), and the converted models
//     give the same logits on the CPU runtime.
#include <doctest/doctest.h>

#include <cacheshrink/backend/cuda/convert.cuh>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/io/file.hpp>
#include <cacheshrink/linalg/gram.hpp>

#include "cuda/cuda_test_support.cuh"

using namespace cacheshrink;
using MatD = linalg::Matrix<double>;

namespace {

constexpr const char* kModels[] = {"tiny-gpt2", "tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mqa", "tiny-qwen3"};

std::filesystem::path model_dir(const std::string& name) { return test::cuda_fixtures() / "models" / name; }

std::vector<std::vector<int>> calibration(int vocab, int n = 12, int len = 96) {
  const auto valid = io::read_ids_u16(test::cuda_fixtures() / "data" / "wikitext2_valid.ids.u16");
  std::vector<std::vector<int>> c;
  for (int i = 0; i < n; ++i) {
    // ragged lengths so that padding-free packing is exercised
    const int l = len - 7 * (i % 3);
    std::vector<int> s;
    for (int t = 0; t < l; ++t) s.push_back(static_cast<int>(valid[static_cast<std::size_t>(i * len + t)]) % vocab);
    c.push_back(std::move(s));
  }
  return c;
}

MatD random_matrix(Eigen::Index r, Eigen::Index c, std::mt19937& g) {
  std::normal_distribution<double> d;
  MatD m(r, c);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = d(g);
  return m;
}

double rel(const MatD& got, const MatD& want) { return (got - want).norm() / std::max(want.norm(), 1e-300); }

/// sum of squared cosines of the principal angles between span(a) and span(b), over k:
/// 1 when the subspaces are equal.
double subspace_overlap(const MatD& a, const MatD& b) { return (a.transpose() * b).squaredNorm() / static_cast<double>(a.cols()); }

}  // namespace

TEST_CASE("DeviceGrams accumulate X^T X in float64 like the CPU GramAccumulator (float32 and bf16 input)") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(11);
  for (int dim : {1, 7, 64, 133}) {
    for (auto p : {cuda::Precision::Float32, cuda::Precision::BFloat16}) {
      cuda::DeviceGrams dg(2, dim);
      linalg::GramAccumulator acc(dim);
      for (int rows : {1, 5, 300, 37}) {
        auto x = test::random_floats(static_cast<std::size_t>(rows) * dim, g, 3.0f);
        if (p == cuda::Precision::BFloat16) x = test::round_bf16(x);
        Eigen::Map<const MatrixRf> xm(x.data(), rows, dim);
        acc.add(xm);
        if (p == cuda::Precision::Float32) {
          auto d = test::to_device<float>(x);
          dg.add(1, d.data(), rows, p, nullptr);
        } else {
          auto d = test::to_device<__nv_bfloat16>(x);
          dg.add(1, d.data(), rows, p, nullptr);
        }
        CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
      }
      const MatD want = acc.statistic();
      const double e = rel(dg.download(1), want);
      CHECK(e <= 1e-13);
      CHECK(dg.download(0).norm() == 0.0);  // other layers untouched
      CHECK(dg.rows(1) == 1 + 5 + 300 + 37);
    }
  }
  CHECK_THROWS_AS(cuda::DeviceGrams(0, 4), InvalidArgument);
}

TEST_CASE("DeviceInit's statistic, eigenbasis, spectra and down-projection match HostInit in float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(5);
  for (auto [d, H, k] : {std::tuple{5, 9, 2}, {24, 40, 6}, {67, 31, 13}, {128, 96, 32}}) {
    // A Gram with a spread spectrum (random X), lower triangle on the device.
    const MatD x = random_matrix(3 * H, H, g);
    std::vector<MatD> host_grams{MatD::Identity(H, H), x.transpose() * x};
    cuda::DeviceGrams dg(2, H);
    const MatrixRf xf = x.cast<float>();
    auto xd = test::to_device<float>(std::vector<float>(xf.data(), xf.data() + xf.size()));
    dg.add(1, xd.data(), static_cast<int>(x.rows()), cuda::Precision::Float32, nullptr);
    host_grams[1] = xf.cast<double>().transpose() * xf.cast<double>();  // what the device saw
    const compression::detail::HostInit hi{&host_grams};
    const cuda::DeviceInit di(&dg);
    const MatrixRf a = random_matrix(d, H, g).cast<float>();  // a stored weight
    const MatD ad = a.cast<double>();
    const MatD s_h = hi.statistic(1, a), s_d = di.statistic(1, a);
    CHECK(rel(s_h, ad * host_grams[1] * ad.transpose()) <= 1e-13);
    CHECK(rel(s_d, s_h) <= 1e-12);
    CHECK(rel(s_d, s_d.transpose()) == 0.0);  // mirrored
    // Uncalibrated: A A^T.
    const cuda::DeviceInit di0(nullptr);
    CHECK(rel(di0.statistic(0, a), ad * ad.transpose()) <= 1e-13);

    const auto bh = hi.top_basis(s_h, k), bd = di.top_basis(s_h, k);
    REQUIRE(bd.u.rows() == d);
    REQUIRE(bd.u.cols() == k);
    REQUIRE(bd.spectrum.size() == static_cast<std::size_t>(d));
    for (int i = 0; i < d; ++i) CHECK(bd.spectrum[i] == doctest::Approx(bh.spectrum[i]).epsilon(1e-10).scale(bh.spectrum[0]));
    for (int i = 1; i < d; ++i) CHECK(bd.spectrum[i] <= bd.spectrum[i - 1]);
    CHECK(bd.energy == doctest::Approx(bh.energy).epsilon(1e-12));
    // Orthonormal, eigenvectors of s (residual), same signs as the CPU where the spectrum is simple.
    CHECK((bd.u_all.transpose() * bd.u_all - MatD::Identity(d, d)).cwiseAbs().maxCoeff() <= 1e-12);
    for (int j = 0; j < d; ++j) CHECK((s_h * bd.u_all.col(j) - bd.spectrum[j] * bd.u_all.col(j)).norm() <= 1e-10 * bh.spectrum[0]);
    const MatD gap_ok = bd.u.transpose() * bh.u;  // ~identity with the same sign convention
    CHECK((gap_ok - MatD::Identity(k, k)).cwiseAbs().maxCoeff() <= 1e-6);

    const auto sp_h = hi.spectrum_along(s_h, bh.u_all), sp_d = di.spectrum_along(s_h, bh.u_all);
    for (int i = 0; i < d; ++i) CHECK(sp_d[i] == doctest::Approx(sp_h[i]).epsilon(1e-10).scale(bh.spectrum[0]));
    CHECK(di.energy_of(s_h, bh.u) == doctest::Approx(hi.energy_of(s_h, bh.u)).epsilon(1e-12));
    const MatrixRf w = random_matrix(d, H, g).cast<float>();
    const MatD want_down = bh.u.transpose() * w.cast<double>();
    CHECK(rel(hi.down(bh.u, w).cast<double>(), want_down) <= 1e-7);  // float storage
    CHECK(rel(di.down(bh.u, w).cast<double>(), hi.down(bh.u, w).cast<double>()) <= 1e-7);
    CHECK_THROWS_AS(di.down(bh.u, MatrixRf(d + 1, H)), InvalidArgument);
  }
}

TEST_CASE("DeviceInit::top_bases decomposes many statistics concurrently, each as top_basis does") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(9);
  const cuda::DeviceInit di(nullptr);
  const compression::detail::HostInit hi;
  std::vector<MatD> mats;
  for (int i = 0; i < 19; ++i) {  // more than the worker count, mixed sizes
    const MatD x = random_matrix(40 + 3 * i, 20 + i % 5, g);
    mats.push_back(x.transpose() * x);
  }
  const auto got = di.top_bases(mats, 4);
  REQUIRE(got.size() == mats.size());
  for (std::size_t i = 0; i < mats.size(); ++i) {
    const auto want = hi.top_basis(mats[i], 4);
    CHECK(rel(got[i].u, want.u) <= 1e-9);
    CHECK(got[i].energy == doctest::Approx(want.energy).epsilon(1e-12));
  }
  CHECK(di.top_bases({}, 3).empty());
}

TEST_CASE("the chunked, pinned weight upload gives bitwise the same model for any chunk size") {
  CACHESHRINK_REQUIRE_GPU();
  for (const char* name : {"tiny-qwen2", "tiny-gpt2"}) {
    const auto m = model::load_model(model_dir(name));
    const auto calib = calibration(m.config.vocab_size, 3, 40);
    dispatch_attention_kind(m.config, [&](auto kind) {
      for (auto p : {cuda::Precision::Float32, cuda::Precision::BFloat16}) {
        model::Transformer<decltype(kind), Cuda> whole(m, cuda::Options{p});
        const MatrixRf a = whole.forward(std::span<const std::vector<int>>(calib));
        CHECK(a.size() > 0);
        for (std::size_t chunk : {1000, 4099, 65536}) {  // many chunks, both pinned buffers reused
          model::Transformer<decltype(kind), Cuda> split(m, cuda::Options{p, 0, chunk});
          CHECK((split.forward(std::span<const std::vector<int>>(calib)) - a).cwiseAbs().maxCoeff() == 0.0f);
        }
      }
      return 0;
    });
  }
}

TEST_CASE("calibration Grams on the GPU (float32 forward) equal the CPU's on all seven fixtures") {
  CACHESHRINK_REQUIRE_GPU();
  for (const char* name : kModels) {
    const auto m = model::load_model(model_dir(name));
    const auto calib = calibration(m.config.vocab_size);
    long long tc = 0, tg = 0;
    const auto cpu = compression::attention_input_grams(m, calib, 5, false, &tc);
    const auto gpu = cuda::attention_input_grams(m, calib, 5, false, &tg);
    CHECK(tc == tg);
    double worst = 0;
    for (int l = 0; l < m.config.n_layers; ++l) {
      worst = std::max(worst, rel(gpu.download(l), cpu[static_cast<std::size_t>(l)]));
      CHECK(gpu.rows(l) == tc);
    }
    MESSAGE(std::string(name), ": Gram rel. difference ", worst);
    CHECK(worst <= 1e-5);
    // bf16 weights and activations: same statistic to bf16 accuracy.
    const auto gb = cuda::attention_input_grams(m, calib, 5, false, nullptr, cuda::Precision::BFloat16);
    double wb = 0;
    for (int l = 0; l < m.config.n_layers; ++l) wb = std::max(wb, rel(gb.download(l), cpu[static_cast<std::size_t>(l)]));
    MESSAGE(std::string(name), ": bf16 Gram rel. difference ", wb);
    CHECK(wb <= 3e-2);
  }
}

TEST_CASE("cuda::convert initialises the same model as compression::convert (every fixture and method)") {
  CACHESHRINK_REQUIRE_GPU();
  struct Case {
    const char* model;
    const char* method;
    double ratio;
  };
  std::vector<Case> cases;
  for (const char* name : kModels) cases.push_back({name, "auto", 2.0});
  for (const char* method : {"separate", "xkv", "joint", "decoupled_rope"}) cases.push_back({"tiny-llama3", method, 2.0});
  cases.push_back({"tiny-gpt2", "separate", 4.0});
  for (const auto& cs : cases) {
    const auto m = model::load_model(model_dir(cs.model));
    const auto calib = calibration(m.config.vocab_size);
    compression::ConvertOptions o;
    o.method = cs.method;
    o.compression_ratio = cs.ratio;
    if (std::string(cs.method) == "decoupled_rope") o.d_rope = 16;
    for (bool calibrated : {true, false}) {
      o.use_calibration = calibrated;
      compression::ConversionReport rc, rg;
      const auto mc = compression::convert(m, o, calib, &rc);
      const auto mg = cuda::convert(m, o, calib, &rg);
      const std::string label = std::string(cs.model) + " " + cs.method + (calibrated ? " calibrated" : " weight-SVD");
      CAPTURE(label);
      REQUIRE(rg.method == rc.method);
      REQUIRE(rg.d_latent == rc.d_latent);
      CHECK(rg.calibrated == rc.calibrated);
      CHECK(rg.calibration_tokens == rc.calibration_tokens);
      CHECK(rg.cache_floats_per_token_mla == rc.cache_floats_per_token_mla);
      REQUIRE(rg.layers.size() == rc.layers.size());
      double worst_e = 0, worst_overlap = 1;
      for (std::size_t l = 0; l < rc.layers.size(); ++l) {
        CHECK(rg.layers[l].kind == rc.layers[l].kind);
        CHECK(rg.layers[l].group == rc.layers[l].group);
        worst_e = std::max({worst_e, std::abs(rg.layers[l].energy_k - rc.layers[l].energy_k), std::abs(rg.layers[l].energy_v - rc.layers[l].energy_v)});
        const auto& a = *mc.weights.layers[l].mla;
        const auto& b = *mg.weights.layers[l].mla;
        CHECK(b.method == a.method);
        // Orthonormal bases (joint: the stacked [Wuk; Wuv]) spanning the CPU's subspaces.
        std::vector<std::pair<MatD, MatD>> bases;
        if (a.method == CompressionMethod::Joint) {
          MatD ua(2 * a.w_up_k->rows(), a.w_up_k->cols()), ub(ua.rows(), ua.cols());
          ua << a.w_up_k->cast<double>(), a.w_up_v->cast<double>();
          ub << b.w_up_k->cast<double>(), b.w_up_v->cast<double>();
          bases.emplace_back(ua, ub);
        } else {
          bases.emplace_back(a.w_up_k->cast<double>(), b.w_up_k->cast<double>());
          bases.emplace_back(a.w_up_v->cast<double>(), b.w_up_v->cast<double>());
        }
        for (const auto& [ua, ub] : bases) {
          worst_overlap = std::min(worst_overlap, subspace_overlap(ua, ub));
          CHECK((ub.transpose() * ub - MatD::Identity(ub.cols(), ub.cols())).cwiseAbs().maxCoeff() <= 1e-5);
        }
      }
      MESSAGE(label, ": max |energy diff| ", worst_e, ", min subspace overlap ", worst_overlap);
      CHECK(worst_e <= 1e-5);
      CHECK(worst_overlap >= 1.0 - 1e-3);
      // The two conversions give the same logits on the CPU runtime.
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tc(mc), tg(mg);
        const MatrixRf lc = tc.forward(calib[0]), lg = tg.forward(calib[0]);
        const double e = (lg - lc).cast<double>().norm() / lc.cast<double>().norm();
        MESSAGE(label, ": logits rel. difference ", e);
        CHECK(e <= 1e-3);
        return 0;
      });
    }
  }
}

TEST_CASE("cuda::convert rejects bad options with the CPU's messages") {
  CACHESHRINK_REQUIRE_GPU();
  const auto m = model::load_model(model_dir("tiny-llama3"));
  compression::ConvertOptions o;
  CHECK_THROWS_WITH_AS(cuda::convert(m, o, {}), doctest::Contains("no calibration sequences"), InvalidArgument);
  o.method = "bogus";
  CHECK_THROWS_WITH_AS(cuda::convert(m, o, calibration(m.config.vocab_size)), doctest::Contains("'bogus' is unknown"), InvalidArgument);
  o.method = "auto";
  o.calibration_batch = 0;
  CHECK_THROWS_AS(cuda::convert(m, o, calibration(m.config.vocab_size)), InvalidArgument);
}

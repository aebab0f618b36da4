// MLA conversion: methods x fixtures, latent cache sizes, orthonormality, exactness at
// d_latent = d_kv, calibration statistics against an independent float64 recomputation.
#include <doctest/doctest.h>

#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/io/file.hpp>
#include <cacheshrink/model/generate.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
#include <cacheshrink/pipeline/save_load.hpp>

#include "test_support.hpp"

using namespace cacheshrink;

namespace {

const std::vector<std::vector<int>>& calibration() {
  static const auto seqs = [] {
    auto tok = tokenizer::Tokenizer::from_file(test::fixtures() / "data" / "tokenizer.json");
    auto paras = compression::paragraphs(io::read_text_file(test::fixtures() / "data" / "wikitext2_valid.txt"), 16);
    return compression::encode_calibration(tok, paras, 128);
  }();
  return seqs;
}

const std::vector<int>& test_ids() {
  static const auto ids = io::read_ids_u16(test::fixtures() / "data" / "wikitext2_test.ids.u16");
  return ids;
}

template <class Fn>
auto with_tf(const model::Model& m, Fn&& fn) {
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    return fn(tf);
  });
}

MatrixRf logits_of(const model::Model& m, const std::vector<int>& seq) {
  return with_tf(m, [&](auto& tf) { return tf.forward(seq); });
}

}  // namespace

TEST_CASE("paragraph selection follows the calibration protocol") {
  auto p = compression::paragraphs("short\n = Heading with more than a hundred characters ......................................................... =\n  " +
                                       std::string(120, 'a') + "  \n" + std::string(101, 'b') + "\n" + std::string(100, 'c') + "\n",
                                   10);
  REQUIRE(p.size() == 2);
  CHECK(p[0] == std::string(120, 'a'));
  CHECK(p[1] == std::string(101, 'b'));
  auto all = compression::paragraphs(io::read_text_file(test::fixtures() / "data" / "wikitext2_valid.txt"), 0);
  CHECK(all.size() == 1638);  // the count stated in the fixtures README
}

TEST_CASE("every method converts every fixture; the latent cache has the formula's size") {
  const char* methods[] = {"separate", "xkv", "joint", "decoupled_rope"};
  for (const char* name : test::kModels) {
    for (const char* method : methods) {
      SUBCASE((std::string(name) + " " + method).c_str()) {
        auto m = model::load_model(test::model_dir(name));
        compression::ConvertOptions o;
        o.method = method;
        o.compression_ratio = 4.0;
        const bool decoupled = std::string(method) == "decoupled_rope";
        const int dkv = m.config.d_kv();
        if (decoupled) {
          o.compression_ratio = 2.0;  // d_latent = d_kv / 2 - d_rope = d_kv / 4
          o.d_rope = dkv / 4;
        }
        compression::ConversionReport rep;
        auto mm = compression::convert(m, o, calibration(), &rep);
        const int want_dl = std::string(method) == "joint" ? std::max(1, std::min(dkv, 2 * dkv / 4)) : std::max(1, dkv / 4);
        CHECK(rep.d_latent == want_dl);
        const std::size_t width = std::string(method) == "joint" ? want_dl : 2 * want_dl + (decoupled ? dkv / 4 : 0);
        // Up-projections have orthonormal columns (joint: the stacked [Wuk; Wuv]).
        for (const auto& lw : mm.weights.layers) {
          REQUIRE(lw.mla);
          MatrixRf u = lw.mla->w_up_k->transpose() * *lw.mla->w_up_k;
          if (lw.mla->method == CompressionMethod::Joint) u += lw.mla->w_up_v->transpose() * *lw.mla->w_up_v;
          else CHECK((lw.mla->w_up_v->transpose() * *lw.mla->w_up_v - MatrixRf::Identity(want_dl, want_dl)).cwiseAbs().maxCoeff() < 1e-5);
          CHECK((u - MatrixRf::Identity(want_dl, want_dl)).cwiseAbs().maxCoeff() < 1e-5);
        }
        with_tf(mm, [&](auto& tf) {
          auto cache = tf.make_cache(2);
          CHECK(cache.floats_per_token() == width * m.config.n_layers);
          CHECK(rep.cache_floats_per_token_mla == width * m.config.n_layers);
          std::vector<std::vector<int>> seqs{std::vector<int>(test_ids().begin(), test_ids().begin() + 40),
                                             std::vector<int>(test_ids().begin() + 100, test_ids().begin() + 103)};
          tf.forward(std::span<const std::vector<int>>(seqs), &cache);
          CHECK(cache.bytes_used() == 43 * width * m.config.n_layers * sizeof(float));
          // The memory report's formula agrees with the live cache (float32 storage here).
          auto rows = pipeline::cache_memory(mm, {40, 3}, sizeof(float));
          CHECK(rows[0].mla_bytes + rows[1].mla_bytes == cache.bytes_used());
          CHECK(rows[0].standard_bytes == 40u * 2 * dkv * m.config.n_layers * sizeof(float));
          for (int l = 0; l < m.config.n_layers; ++l) CHECK(cache.k[l][0].cols() + cache.v[l][0].cols() == static_cast<long>(width));
          if (decoupled) CHECK(mm.weights.layers[0].mla->w_rope_k.isApprox(m.weights.layers[0].wk.topRows(dkv / 4)));
          // Generation: the latent cache path equals full recomputation.
          model::SamplingOptions so;
          so.max_new_tokens = 8;
          std::vector<int> prompt(test_ids().begin() + 7, test_ids().begin() + 23);
          auto a = model::generate(tf, prompt, so);
          so.use_cache = false;
          CHECK(model::generate(tf, prompt, so) == a);
          // Perplexity stays finite and within reach of the original.
          pipeline::PerplexityOptions po;
          po.max_windows = 2;
          const double p = pipeline::perplexity(tf, test_ids(), po).perplexity;
          const double p0 = with_tf(m, [&](auto& t0) { return pipeline::perplexity(t0, test_ids(), po).perplexity; });
          CHECK(std::isfinite(p));
          CHECK(p < 3.0 * p0);
          return 0;
        });
      }
    }
  }
}

TEST_CASE("d_latent = d_kv reproduces the original logits") {
  auto seq = std::vector<int>(test_ids().begin() + 300, test_ids().begin() + 450);
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      const MatrixRf ref = logits_of(m, seq);
      for (const char* method : {"separate", "xkv"}) {
        for (bool calib : {true, false}) {
          compression::ConvertOptions o;
          o.method = method;
          o.d_latent = m.config.d_kv();
          o.use_calibration = calib;
          auto mm = compression::convert(m, o, calibration());
          const MatrixRf got = logits_of(mm, seq);
          INFO(method, " calibrated=", calib);
          CHECK((got - ref).norm() / ref.norm() <= 1e-4);
        }
      }
      // decoupled_rope with d_latent = d_kv - d_rope reproduces every key exactly (V keeps
      // only d_latent < d_kv directions by construction, so logits are not exact).
      {
        compression::ConvertOptions o;
        o.method = "decoupled_rope";
        const int dkv = m.config.d_kv(), dr = dkv / 4;
        o.d_rope = dr;
        o.d_latent = dkv - dr;
        auto mm = compression::convert(m, o, calibration());
        for (int l = 0; l < m.config.n_layers; ++l) {
          const auto& a = *mm.weights.layers[l].mla;
          MatrixRf rec(dkv, m.config.hidden_size);
          rec.topRows(dr) = a.w_rope_k;
          rec.bottomRows(dkv - dr) = *a.w_up_k * a.w_down_k;
          CHECK((rec - m.weights.layers[l].wk).norm() / m.weights.layers[l].wk.norm() <= 1e-5);
        }
      }
      // Joint is exact when [Wk; Wv] has rank <= d_kv, e.g. when hidden == d_kv.
      if (m.config.hidden_size == m.config.d_kv()) {
        compression::ConvertOptions o;
        o.method = "joint";
        o.d_latent = m.config.d_kv();
        auto mm = compression::convert(m, o, calibration());
        CHECK((logits_of(mm, seq) - ref).norm() / ref.norm() <= 1e-4);
      }
    }
  }
}

TEST_CASE("streamed Gram statistics and reported energies match a float64 recomputation") {
  auto m = model::load_model(test::model_dir("tiny-qwen2"));  // q/k/v biases: compression must leave them out
  std::vector<std::vector<int>> seqs(calibration().begin(), calibration().begin() + 5);
  // Independent: collect every attention input, stack in double.
  std::vector<linalg::Matrix<double>> stacked(m.config.n_layers);
  model::ForwardHooks hooks;
  hooks.on_attn_input = [&](int l, const MatrixRf& h) {
    linalg::Matrix<double> hd = h.cast<double>();
    linalg::Matrix<double> s(stacked[l].rows() + hd.rows(), hd.cols());
    if (stacked[l].rows()) s.topRows(stacked[l].rows()) = stacked[l];
    s.bottomRows(hd.rows()) = hd;
    stacked[l] = std::move(s);
  };
  model::ForwardOptions fo;
  fo.hooks = &hooks;
  fo.logits = model::LogitsFor::None;
  model::Transformer<Gqa> tf(m);
  for (const auto& s : seqs) tf.forward(s, nullptr, fo);
  auto grams = compression::attention_input_grams(m, seqs, 2, false);
  for (int l = 0; l < m.config.n_layers; ++l) {
    linalg::Matrix<double> g = stacked[l].transpose() * stacked[l];
    CHECK((grams[l] - g).norm() / g.norm() < 1e-6);
  }
  compression::ConvertOptions o;
  o.method = "separate";
  o.compression_ratio = 4;
  compression::ConversionReport rep;
  auto mm = compression::convert(m, o, seqs, &rep);
  for (int l = 0; l < m.config.n_layers; ++l) {
    // K without bias on the calibration data, and its reconstruction through the latent.
    const auto& lw = m.weights.layers[l];
    linalg::Matrix<double> K = stacked[l] * lw.wk.cast<double>().transpose();
    linalg::Matrix<double> Kr = stacked[l] * mm.weights.layers[l].mla->w_down_k.cast<double>().transpose() *
                                mm.weights.layers[l].mla->w_up_k->cast<double>().transpose();
    const double rel = (K - Kr).norm() / K.norm();
    CHECK(rel == doctest::Approx(rep.layers[l].rel_err_k).epsilon(1e-3));
    CHECK(rep.layers[l].energy_k > 0.5);
    CHECK(rep.layers[l].energy_k <= 1.0);
  }
}

TEST_CASE("xkv groups share up-projections; skipped layers follow the options") {
  auto m = model::load_model(test::model_dir("tiny-llama3"));
  compression::ConvertOptions o;
  o.method = "xkv";
  o.compression_ratio = 2;
  o.cross_layer_group_size = 2;
  auto mm = compression::convert(m, o, calibration());
  const auto& L = mm.weights.layers;
  CHECK(L[0].mla->w_up_k == L[1].mla->w_up_k);
  CHECK(L[2].mla->w_up_v == L[3].mla->w_up_v);
  CHECK(L[1].mla->w_up_k != L[2].mla->w_up_k);
  CHECK(L[0].mla->w_down_k.isApprox(L[1].mla->w_down_k) == false);
  // The shared bases span the top eigenvectors of the group's summed statistic
  // sum_l W_l G_l W_l^T (the SVD of K or V stacked over the group's layers, as xKV), recomputed
  // here in double from independently collected Grams.
  {
    const auto grams = compression::attention_input_grams(m, calibration(), 3, false);
    const int dkv = m.config.d_kv(), dl = static_cast<int>(L[0].mla->w_up_k->cols());
    for (int g = 0; g < 2; ++g)
      for (bool keys : {true, false}) {
        linalg::Matrix<double> S = linalg::Matrix<double>::Zero(dkv, dkv);
        for (int l = 2 * g; l < 2 * g + 2; ++l) {
          const linalg::Matrix<double> W = (keys ? m.weights.layers[l].wk : m.weights.layers[l].wv).cast<double>();
          S += W * grams[l] * W.transpose();
        }
        const Eigen::SelfAdjointEigenSolver<linalg::Matrix<double>> es(S);
        const linalg::Matrix<double> V = es.eigenvectors().rightCols(dl);
        const linalg::Matrix<double> U = (keys ? *L[2 * g].mla->w_up_k : *L[2 * g].mla->w_up_v).cast<double>();
        INFO("group ", g, std::string(keys ? " keys" : " values"), ": eigengap ", es.eigenvalues()(dkv - dl) / es.eigenvalues()(dkv - dl - 1));
        CHECK((V * V.transpose() - U * U.transpose()).norm() < 1e-4);
      }
  }
  o.cross_layer_group_size = 4;
  o.xkv_skip_early_layers = 1;
  auto a = compression::convert(m, o, calibration());
  CHECK(a.weights.layers[0].mla->group == -1);  // per-layer MLA
  CHECK(a.weights.layers[1].mla->w_up_k == a.weights.layers[3].mla->w_up_k);
  o.keep_early_layers_original = true;
  compression::ConversionReport rep;
  auto b = compression::convert(m, o, calibration(), &rep);
  CHECK(!b.weights.layers[0].mla);
  CHECK(rep.layers[0].kind == "original");
  CHECK(rep.cache_floats_per_token_mla == static_cast<std::size_t>(2 * 128 + 3 * 2 * 64));
  with_tf(b, [&](auto& tf) {
    auto cache = tf.make_cache(1);
    CHECK(cache.floats_per_token() == rep.cache_floats_per_token_mla);
    return 0;
  });
}

TEST_CASE("conversion options are validated with clear messages") {
  auto m = model::load_model(test::model_dir("tiny-llama2"));  // MHA, d_kv 192, 4 layers
  auto bad = [&](auto set, const char* phrase) {
    compression::ConvertOptions o;
    set(o);
    CHECK_THROWS_WITH_AS(compression::convert(m, o, calibration()), doctest::Contains(phrase), InvalidArgument);
  };
  bad([](auto& o) { o.compression_ratio = 0.5; }, "compression_ratio");
  bad([](auto& o) { o.d_latent = 193; }, "exceeds d_kv");
  bad([](auto& o) { o.method = "magic"; }, "unknown");
  bad([](auto& o) { o.method = "separate"; o.cross_layer_group_size = 2; }, "xkv method only");
  bad([](auto& o) { o.method = "auto"; o.xkv_skip_early_layers = 1; }, "xkv method only");  // auto -> separate on MHA
  bad([](auto& o) { o.method = "xkv"; o.cross_layer_group_size = 0; }, "cross_layer_group_size");
  bad([](auto& o) { o.method = "xkv"; o.xkv_skip_early_layers = 4; }, "xkv_skip_early_layers");
  bad([](auto& o) { o.method = "decoupled_rope"; o.d_rope = 192; }, "d_rope");
  bad([](auto& o) { o.method = "decoupled_rope"; o.d_rope = 64; o.d_latent = 129; }, "d_kv - d_rope");
  compression::ConvertOptions o;
  CHECK_THROWS_WITH_AS(compression::convert(m, o, {}), doctest::Contains("no calibration"), InvalidArgument);
  // Typed entry point fixes the method.
  compression::ConversionReport rep;
  compression::convert<Joint>(m, o, calibration(), &rep);
  CHECK(rep.method == CompressionMethod::Joint);
}

TEST_CASE("saved MLA models reload with bit-identical logits and without the original K/V") {
  namespace fs = std::filesystem;
  const fs::path tmp = fs::temp_directory_path() / ("cacheshrink_save_" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  auto seq = std::vector<int>(test_ids().begin() + 50, test_ids().begin() + 170);
  struct Case {
    const char* model;
    const char* method;
  };
  for (Case cs : {Case{"tiny-gpt2", "separate"}, Case{"tiny-llama3", "xkv"}, Case{"tiny-qwen2", "joint"}, Case{"tiny-mqa", "auto"},
                  Case{"tiny-qwen3", "decoupled_rope"}}) {
    SUBCASE((std::string(cs.model) + " " + cs.method).c_str()) {
      auto m = model::load_model(test::model_dir(cs.model));
      compression::ConvertOptions o;
      o.method = cs.method;
      if (std::string(cs.method) == "decoupled_rope") o.compression_ratio = 1.5, o.d_rope = 32;
      auto mm = compression::convert(m, o, calibration());
      const fs::path out = tmp / (std::string(cs.model) + "-" + cs.method);
      pipeline::save_mla_model(mm, out);
      CHECK(fs::exists(out / "mla_config.json"));
      CHECK(fs::exists(out / "tokenizer.json"));
      io::SafetensorsFile f(out / "model.safetensors");
      if (m.config.family == Family::Llama) CHECK(!f.contains("model.layers.0.self_attn.k_proj.weight"));
      auto back = pipeline::load_any(out);
      const MatrixRf a = logits_of(mm, seq), b = logits_of(back, seq);
      CHECK((a - b).cwiseAbs().maxCoeff() == 0.0f);
      if (std::string(cs.method) == "xkv") CHECK(back.weights.layers[0].mla->w_up_k == back.weights.layers[3].mla->w_up_k);
      CHECK_THROWS_WITH_AS(pipeline::save_mla_model(mm, out), doctest::Contains("exists"), IoError);
      // Plain models load through the same front door.
      CHECK(!pipeline::load_any(test::model_dir(cs.model)).weights.layers[0].mla);
    }
  }
  fs::remove_all(tmp);
}

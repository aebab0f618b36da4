// The CPU runtime against HF transformers' reference outputs on all seven fixtures.
#include <doctest/doctest.h>

#include <cacheshrink/io/safetensors.hpp>
#include <cacheshrink/model/transformer.hpp>
#include <cmath>
#include <nlohmann/json.hpp>

#include "test_support.hpp"

using namespace cacheshrink;

namespace {

struct Reference {
  std::vector<std::vector<int>> ids;  // 2 x 192
  std::vector<float> logits_tail;     // [2,16,V]
  std::vector<float> token_logprobs;  // [2,191]
  std::vector<float> hidden;          // [L+1,32,H]
  nlohmann::json json;
};

Reference load_reference(const std::string& name) {
  Reference r;
  io::SafetensorsFile f(test::model_dir(name) / "reference.safetensors");
  auto ids = f.to_int64("input_ids");
  const auto& sh = f.info("input_ids").shape;
  for (int b = 0; b < sh[0]; ++b) r.ids.emplace_back(ids.begin() + b * sh[1], ids.begin() + (b + 1) * sh[1]);
  r.logits_tail = f.to_float("logits_tail");
  r.token_logprobs = f.to_float("token_logprobs");
  r.hidden = f.to_float("hidden_states_seq0_first32");
  r.json = nlohmann::json::parse(io::read_text_file(test::model_dir(name) / "reference.json"));
  return r;
}

template <class Kind>
void check_model(const model::Model& m, const Reference& ref) {
  model::Transformer<Kind> tf(m);
  const int V = m.config.vocab_size, H = m.config.hidden_size, L = m.config.n_layers;
  std::vector<MatrixRf> hidden;
  model::ForwardHooks hooks;
  hooks.on_hidden = [&](int idx, const MatrixRf& x) {
    if (static_cast<int>(hidden.size()) <= idx) hidden.resize(idx + 1);
    hidden[idx] = x.topRows(32);  // seq 0 is the first packed block
  };
  model::ForwardOptions opt;
  opt.hooks = &hooks;
  MatrixRf logits = tf.forward(std::span<const std::vector<int>>(ref.ids), nullptr, opt);
  const int T = static_cast<int>(ref.ids[0].size());
  REQUIRE(logits.rows() == 2 * T);

  // logits_tail: positions 176..191 of both sequences.
  double num = 0, den = 0, maxd = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 16; ++t)
      for (int v = 0; v < V; ++v) {
        const double got = logits(b * T + T - 16 + t, v);
        const double want = ref.logits_tail[(static_cast<std::size_t>(b) * 16 + t) * V + v];
        num += (got - want) * (got - want);
        den += want * want;
        maxd = std::max(maxd, std::abs(got - want));
      }
  INFO("logits_tail max ", maxd, " rel ", std::sqrt(num / den));
  CHECK(maxd <= 1e-3);
  CHECK(std::sqrt(num / den) <= 1e-4);

  // token_logprobs: log p(ids[t+1] | ids[..t]).
  double maxlp = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t + 1 < T; ++t) {
      auto row = logits.row(b * T + t).cast<double>();
      const double mx = row.maxCoeff();
      const double lse = mx + std::log((row.array() - mx).exp().sum());
      const double lp = row(ref.ids[b][t + 1]) - lse;
      maxlp = std::max(maxlp, std::abs(lp - ref.token_logprobs[static_cast<std::size_t>(b) * (T - 1) + t]));
    }
  INFO("token_logprobs max ", maxlp);
  CHECK(maxlp <= 1e-3);

  // hidden states: HF lists embeddings, layer outputs, and replaces the last with the final norm.
  REQUIRE(static_cast<int>(hidden.size()) == L + 2);
  for (int i = 0; i <= L; ++i) {
    const MatrixRf& got = (i == L) ? hidden[L + 1] : hidden[i];
    Eigen::Map<const MatrixRf> want(ref.hidden.data() + static_cast<std::size_t>(i) * 32 * H, 32, H);
    const double rel = (got - want).norm() / want.norm();
    INFO("hidden state ", i, " rel ", rel);
    CHECK(rel <= 1e-4);
  }
}

}  // namespace

TEST_CASE("runtime matches HF reference outputs on every fixture") {
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      auto ref = load_reference(name);
      dispatch_attention_kind(m.config, [&](auto kind) { check_model<decltype(kind)>(m, ref); });
    }
  }
}

// KV cache, incremental decoding, padded batches, generation, sampling and perplexity.
#include <doctest/doctest.h>

#include <cacheshrink/io/file.hpp>
#include <cacheshrink/model/generate.hpp>
#include <cacheshrink/model/transformer.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
#include <nlohmann/json.hpp>

#include "test_support.hpp"

using namespace cacheshrink;

namespace {

nlohmann::json reference_json(const std::string& name) {
  return nlohmann::json::parse(io::read_text_file(test::model_dir(name) / "reference.json"));
}

std::vector<int> test_ids() { return io::read_ids_u16(test::fixtures() / "data" / "wikitext2_test.ids.u16"); }

double rel_err(const MatrixRf& a, const MatrixRf& b) { return (a - b).norm() / b.norm(); }

}  // namespace

TEST_CASE("greedy continuation equals HF generate, with and without the KV cache") {
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      auto ref = reference_json(name)["greedy"];
      auto prompt = ref["prompt_ids"].get<std::vector<int>>();
      auto want = ref["generated_ids"].get<std::vector<int>>();
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        model::SamplingOptions so;
        so.max_new_tokens = static_cast<int>(want.size());
        so.use_cache = true;
        CHECK(model::generate(tf, prompt, so) == want);
        so.use_cache = false;
        CHECK(model::generate(tf, prompt, so) == want);
      });
    }
  }
}

TEST_CASE("incremental decoding in chunks reproduces the full forward") {
  auto ids = test_ids();
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        // 300 tokens crosses Mistral's 128-token window several times.
        const int T = std::min(300, m.config.max_position);
        std::vector<int> seq(ids.begin() + 5000, ids.begin() + 5000 + T);
        MatrixRf full = tf.forward(seq);
        auto cache = tf.make_cache(1);
        MatrixRf inc(T, m.config.vocab_size);
        int pos = 0;
        const int chunks[] = {1, 7, 64, 1, 1, 100, 3};
        for (int ci = 0; pos < T; ci = (ci + 1) % 7) {
          const int n = std::min(chunks[ci], T - pos);
          std::vector<int> part(seq.begin() + pos, seq.begin() + pos + n);
          inc.middleRows(pos, n) = tf.forward(part, &cache);
          pos += n;
        }
        CHECK(cache.length[0] == T);
        CHECK(rel_err(inc, full) <= 1e-5);
      });
    }
  }
}

TEST_CASE("packed and padded batches equal per-sequence forwards") {
  auto ids = test_ids();
  for (const char* name : {"tiny-gpt2", "tiny-llama3", "tiny-mistral", "tiny-qwen3"}) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        const int lens[] = {37, 150, 5};
        std::vector<std::vector<int>> seqs;
        for (int i = 0; i < 3; ++i) seqs.emplace_back(ids.begin() + 1000 * i, ids.begin() + 1000 * i + lens[i]);
        MatrixRf packed = tf.forward(std::span<const std::vector<int>>(seqs));
        int off = 0;
        std::vector<MatrixRf> single;
        for (int i = 0; i < 3; ++i) {
          single.push_back(tf.forward(seqs[i]));
          CHECK(rel_err(packed.middleRows(off, lens[i]), single.back()) <= 1e-5);
          off += lens[i];
        }
        // Padded (B=3, T=150): sequence 0 left-padded, 1 full, 2 right-padded.
        const int T = 150;
        std::vector<int> pid(3 * T, 0), mask(3 * T, 0);
        for (int t = 0; t < lens[0]; ++t) pid[T - lens[0] + t] = seqs[0][t], mask[T - lens[0] + t] = 1;
        for (int t = 0; t < T; ++t) pid[T + t] = seqs[1][t], mask[T + t] = 1;
        for (int t = 0; t < lens[2]; ++t) pid[2 * T + t] = seqs[2][t], mask[2 * T + t] = 1;
        MatrixRf out = tf.forward_padded(pid, mask, 3, T);
        CHECK(rel_err(out.middleRows(T - lens[0], lens[0]), single[0]) <= 1e-5);
        CHECK(rel_err(out.middleRows(T, T), single[1]) <= 1e-5);
        CHECK(rel_err(out.middleRows(2 * T, lens[2]), single[2]) <= 1e-5);
        CHECK(out.row(0).norm() == 0.0f);  // padded positions are zero rows
      });
    }
  }
}

TEST_CASE("perplexity over the first 8 windows is within 0.05% of HF") {
  auto ids = test_ids();
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      const double want = reference_json(name)["perplexity"]["wikitext2_test_first8_windows"].get<double>();
      dispatch_attention_kind(m.config, [&](auto kind) {
        model::Transformer<decltype(kind)> tf(m);
        pipeline::PerplexityOptions po;
        po.max_windows = 8;
        po.batch = 3;  // uneven batches on purpose
        auto r = pipeline::perplexity(tf, ids, po);
        CHECK(r.windows == 8);
        CHECK(r.predicted_tokens == 8 * 255);
        INFO("ppl ", r.perplexity, " want ", want);
        CHECK(std::abs(r.perplexity / want - 1.0) <= 5e-4);
      });
    }
  }
}

TEST_CASE("sliding-window perplexity scores each token once with the right context") {
  auto m = model::load_model(test::model_dir("tiny-llama2"));
  model::Transformer<Mha> tf(m);
  auto all = test_ids();
  std::vector<int> ids(all.begin(), all.begin() + 700);
  pipeline::PerplexityOptions po;
  po.window = 256;
  po.stride = 128;
  auto r = pipeline::perplexity(tf, ids, po);
  CHECK(r.predicted_tokens == 699);  // every token but the first, exactly once
  // Independent recomputation: for every scored token t, a window ending at the first
  // window end >= t+1, built by hand.
  double nll = 0;
  long n = 0;
  std::size_t prev_end = 0;
  for (std::size_t b = 0; b < ids.size(); b += 128) {
    const std::size_t e = std::min(b + 256, ids.size());
    std::vector<int> w(ids.begin() + b, ids.begin() + e);
    MatrixRf lg = tf.forward(w);
    for (std::size_t t = std::max(prev_end, b + 1); t < e; ++t) {
      auto row = lg.row(t - b - 1).cast<double>();
      const double mx = row.maxCoeff();
      nll += mx + std::log((row.array() - mx).exp().sum()) - row(ids[t]);
      ++n;
    }
    prev_end = e;
    if (e == ids.size()) break;
  }
  CHECK(n == 699);
  CHECK(r.perplexity == doctest::Approx(std::exp(nll / n)).epsilon(1e-6));
}

TEST_CASE("sampling: seeded, top-k 1 and tiny top-p are greedy, frequencies follow softmax") {
  Eigen::VectorXf logits(5);
  logits << 1.0f, 2.5f, 0.3f, 2.0f, -1.0f;
  model::SamplingOptions g;
  model::Sampler greedy(g);
  CHECK(greedy.next(logits) == 1);
  for (std::uint64_t seed = 0; seed < 50; ++seed) {
    model::SamplingOptions k1;
    k1.greedy = false;
    k1.top_k = 1;
    k1.seed = seed;
    CHECK(model::Sampler(k1).next(logits) == 1);
    model::SamplingOptions p0;
    p0.greedy = false;
    p0.top_p = 1e-3f;
    p0.seed = seed;
    CHECK(model::Sampler(p0).next(logits) == 1);
  }
  // Temperature 0.7, top-k 3: frequencies of 200k draws vs the renormalised softmax.
  model::SamplingOptions s;
  s.greedy = false;
  s.temperature = 0.7f;
  s.top_k = 3;
  s.seed = 42;
  model::Sampler sm(s);
  std::vector<int> count(5, 0);
  const int N = 200000;
  for (int i = 0; i < N; ++i) ++count[sm.next(logits)];
  CHECK(count[2] == 0);
  CHECK(count[4] == 0);
  double z = 0;
  for (int i : {0, 1, 3}) z += std::exp(logits[i] / 0.7);
  for (int i : {0, 1, 3}) {
    const double p = std::exp(logits[i] / 0.7) / z;
    const double sd = std::sqrt(p * (1 - p) / N);
    CHECK(std::abs(count[i] / double(N) - p) < 5 * sd);
  }
  // Same seed, same stream; different seed, different stream.
  auto draw = [&](std::uint64_t seed) {
    model::SamplingOptions o = s;
    o.seed = seed;
    model::Sampler x(o);
    std::vector<int> r;
    for (int i = 0; i < 64; ++i) r.push_back(x.next(logits));
    return r;
  };
  CHECK(draw(7) == draw(7));
  CHECK(draw(7) != draw(8));
}

TEST_CASE("bad input to the runtime gets clear errors") {
  auto m = model::load_model(test::model_dir("tiny-gpt2"));
  model::Transformer<Mha> tf(m);
  CHECK_THROWS_WITH_AS(tf.forward(std::vector<int>{1, 4096}), doctest::Contains("outside the vocabulary"), InvalidArgument);
  CHECK_THROWS_WITH_AS(tf.forward(std::vector<int>{-1}), doctest::Contains("outside the vocabulary"), InvalidArgument);
  CHECK_THROWS_WITH_AS(tf.forward(std::vector<int>{}), doctest::Contains("no tokens"), InvalidArgument);
  CHECK_THROWS_WITH_AS(tf.forward(std::vector<int>(513, 1)), doctest::Contains("max_position_embeddings"), InvalidArgument);
  std::vector<std::vector<int>> none;
  CHECK_THROWS_AS(tf.forward(std::span<const std::vector<int>>(none)), InvalidArgument);
  CHECK_THROWS_WITH_AS(model::Transformer<Gqa>{m}, doctest::Contains("instantiated for GQA"), ConfigError);
  model::SamplingOptions bad;
  bad.greedy = false;
  bad.temperature = 0;
  CHECK_THROWS_AS(model::Sampler{bad}, InvalidArgument);
  pipeline::PerplexityOptions po;
  CHECK_THROWS_WITH_AS(pipeline::perplexity(tf, std::vector<int>(10, 1), po), doctest::Contains("fewer than one window"), InvalidArgument);
}

// Attention on the latent cache (absorbed values, absorbed queries where no rotation sits
// between W_uk and q) against the reference path that rebuilds K and V: same logits.
#include <doctest/doctest.h>

#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/io/file.hpp>

#include "test_support.hpp"

using namespace cacheshrink;

TEST_CASE("absorbed latent attention equals the decompressing path on every fixture and method") {
  auto tok = tokenizer::Tokenizer::from_file(test::fixtures() / "data" / "tokenizer.json");
  const auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(test::fixtures() / "data" / "wikitext2_valid.txt"), 8), 128);
  const auto ids = io::read_ids_u16(test::fixtures() / "data" / "wikitext2_test.ids.u16");
  for (const char* name : test::kModels) {
    for (const char* method : {"separate", "xkv", "joint", "decoupled_rope"}) {
      SUBCASE((std::string(name) + " " + method).c_str()) {
        auto m = model::load_model(test::model_dir(name));
        compression::ConvertOptions o;
        o.method = method;
        o.compression_ratio = 2.0;
        if (std::string(method) == "decoupled_rope") o.d_rope = m.config.d_kv() / 4;
        auto mm = compression::convert(m, o, calib);
        dispatch_attention_kind(mm.config, [&](auto kind) {
          model::Transformer<decltype(kind)> ref(mm), abs(mm);
          abs.set_absorbed(true);
          // Prefill 150 tokens (crosses Mistral's window), then decode 20 one at a time.
          std::vector<int> seq(ids.begin() + 2000, ids.begin() + 170 + 2000);
          std::vector<int> prefix(seq.begin(), seq.begin() + 150);
          auto c1 = ref.make_cache(1), c2 = abs.make_cache(1);
          MatrixRf a = ref.forward(prefix, &c1), b = abs.forward(prefix, &c2);
          CHECK((b - a).norm() / a.norm() <= 1e-4);
          double worst = 0;
          for (int t = 150; t < 170; ++t) {
            MatrixRf x = ref.forward(std::vector<int>{seq[t]}, &c1), y = abs.forward(std::vector<int>{seq[t]}, &c2);
            worst = std::max(worst, static_cast<double>((y - x).norm() / x.norm()));
          }
          INFO("worst decode-step relative error ", worst);
          CHECK(worst <= 1e-4);
          return 0;
        });
      }
    }
  }
}

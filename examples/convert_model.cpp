// Example: convert a HF checkpoint to Multi-Head Latent Attention, save it, reload it.
//
//   convert_model [MODEL_DIR] [OUT_DIR] [RATIO]
//
// Defaults: the embedded tiny LLaMA-3 (GQA, so "auto" picks xkv), OUT_DIR in the temporary
// directory, ratio 2. Exits non-zero if the reloaded model's logits differ from the converted
// model's in any bit.
#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/pipeline/save_load.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#ifndef CACHESHRINK_EXAMPLE_FIXTURES
#define CACHESHRINK_EXAMPLE_FIXTURES "tests/fixtures"
#endif

using namespace cacheshrink;

int main(int argc, char** argv) try {
  const std::string fixtures = CACHESHRINK_EXAMPLE_FIXTURES;
  const std::string model_dir = argc > 1 ? argv[1] : fixtures + "/models/tiny-llama3";
  const std::filesystem::path out = argc > 2 ? std::filesystem::path(argv[2]) : std::filesystem::temp_directory_path() / "convert_model_example";
  const double ratio = argc > 3 ? std::stod(argv[3]) : 2.0;

  // 1. Load the original model (config.json + model.safetensors) and its tokenizer.
  model::Model original = model::load_model(model_dir);
  auto tok = tokenizer::Tokenizer::from_directory(model_dir);

  // 2. Calibration data: real text, so the latent bases fit the activations the model sees.
  //    The first 32 WikiText-2 validation paragraphs, at most 128 tokens each, are plenty here;
  //    the paper protocol (and the CLI default) is 128 paragraphs of up to 512 tokens.
  auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(fixtures + "/data/wikitext2_valid.txt"), 32), 128);

  // 3. Convert. "auto" resolves to separate for MHA models and xkv for GQA/MQA models.
  compression::ConvertOptions opt;
  opt.compression_ratio = ratio;
  compression::ConversionReport rep;
  model::Model mla = compression::convert(original, opt, calib, &rep);

  std::printf("%s: %s, d_kv %d -> d_latent %d (%lld calibration tokens)\n", model_dir.c_str(), compression_method_name(rep.method),
              rep.d_kv, rep.d_latent, rep.calibration_tokens);
  std::printf("layer  energy_K  energy_V\n");
  for (const auto& l : rep.layers) std::printf("%5d  %7.2f%%  %7.2f%%\n", l.layer, 100 * l.energy_k, 100 * l.energy_v);
  std::printf("KV cache per token: %zu -> %zu numbers\n", rep.cache_floats_per_token_original, rep.cache_floats_per_token_mla);

  // 4. Save: config.json (unchanged) + mla_config.json + model.safetensors, written under a
  //    temporary name and renamed into place. The original K/V projections are dropped.
  pipeline::SaveOptions so;
  so.overwrite = true;
  so.compression_ratio = ratio;
  pipeline::save_mla_model(mla, out, so);
  std::printf("saved to %s\n", out.c_str());

  // 5. Reload. load_any() reads plain HF directories and saved MLA directories alike.
  model::Model back = pipeline::load_any(out);

  // 6. Check: same logits, bit for bit, on a short prompt. The attention kind (Mha/Gqa/Mqa) is
  //    a compile-time policy; dispatch_attention_kind picks it from the config at run time.
  const std::vector<int> prompt = tok.encode("The history of the city begins");
  auto logits_of = [&](const model::Model& m) {
    return dispatch_attention_kind(m.config, [&](auto kind) {
      model::Transformer<decltype(kind)> tf(m);
      return MatrixRf(tf.forward(prompt));
    });
  };
  const MatrixRf a = logits_of(mla), b = logits_of(back);
  const bool same = a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
  std::printf("reloaded model logits %s the converted model's\n", same ? "are bit-identical to" : "DIFFER from");
  return same ? 0 : 1;
} catch (const cacheshrink::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
}

#pragma once
// converted(): a training test case's fixture converted to MLA (host-compiled code only; see
// train_cases.hpp).
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/model/weights.hpp>
#include <filesystem>

#include "train_cases.hpp"

namespace cacheshrink::test::train_support {

/// models_dir / cs.model converted at ratio 2 without calibration (the training tests' protocol).
inline model::Model converted(const std::filesystem::path& models_dir, const Case& cs) {
  auto m = model::load_model(models_dir / cs.model);
  compression::ConvertOptions o;
  o.compression_ratio = 2.0;
  o.method = cs.method;
  o.use_calibration = false;
  if (cs.group) o.cross_layer_group_size = cs.group;
  if (cs.skip) {
    o.xkv_skip_early_layers = cs.skip;
    o.keep_early_layers_original = true;
  }
  auto mm = compression::convert(m, o, {});
  if (cs.window) mm.config.sliding_window = cs.window;
  return mm;
}

}  // namespace cacheshrink::test::train_support

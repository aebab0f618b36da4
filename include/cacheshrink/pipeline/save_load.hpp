#pragma once
// Saving and loading converted (MLA) models.
//
// Layout of a saved directory:
//   config.json          the original HF config, unchanged
//   mla_config.json      method, d_latent, per-layer kind/group, format version
//   model.safetensors    the original tensors in their stored dtype (K/V projections left
//                        out unless store_original_weights; GPT-2's fused c_attn is kept
//                        whole because Q lives in it) plus float32 MLA tensors:
//                          mla.layers.{l}.w_down_k / w_down_v   (d_latent, hidden)
//                          mla.layers.{l}.w_up_k / w_up_v       separate/joint, (d_kv, d_latent)
//                          mla.groups.{g}.w_up_k / w_up_v       xkv: stored once per group
//   tokenizer files      copied when present
// The directory is written under a temporary name and renamed into place.
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/file.hpp"
#include "cacheshrink/io/model_dir.hpp"
#include "cacheshrink/io/safetensors.hpp"
#include "cacheshrink/model/weights.hpp"

namespace cacheshrink::pipeline {

struct SaveOptions {
  bool store_original_weights = false;  // keep the original k_proj / v_proj tensors
  bool overwrite = false;               // replace an existing output directory
  double compression_ratio = 0;         // recorded in mla_config.json
};

namespace detail {
inline io::TensorData f32(const MatrixRf& m) {
  return io::TensorData::from_floats(std::span<const float>(m.data(), static_cast<std::size_t>(m.size())), {m.rows(), m.cols()});
}
inline bool is_original_kv(const std::string& name) {
  return name.size() > 20 && (name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.v_proj.weight"));
}
}  // namespace detail

/// Writes a converted model. `m.dir` must be the directory the original was loaded from.
inline void save_mla_model(const model::Model& m, const std::filesystem::path& out, const SaveOptions& o = {}) {
  namespace fs = std::filesystem;
  if (fs::exists(out) && !o.overwrite) throw IoError(out.string() + ": output directory exists (pass overwrite to replace it)");
  const auto parent = out.has_parent_path() ? out.parent_path() : fs::path(".");
  if (!fs::is_directory(parent)) throw IoError(out.string() + ": parent directory does not exist");
  fs::path tmp = out;
  tmp += ".tmp." + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directory(tmp);
  try {
    auto store = io::TensorStore::open_dir(m.dir);
    std::map<std::string, io::TensorData> tensors;
    for (const auto& name : store.names()) {
      if (detail::is_original_kv(name) && !o.store_original_weights) {
        // Only layers that were converted lose their K/V projections.
        const auto pos = name.find("layers.");
        const int l = pos == std::string::npos ? -1 : std::stoi(name.substr(pos + 7));
        if (l >= 0 && l < static_cast<int>(m.weights.layers.size()) && m.weights.layers[l].mla) continue;
      }
      tensors[name] = io::copy_tensor(store.file_of(name), name);
    }
    nlohmann::json layers = nlohmann::json::array();
    int method_layer = -1;
    for (std::size_t l = 0; l < m.weights.layers.size(); ++l) {
      const auto& lw = m.weights.layers[l];
      if (!lw.mla) {
        layers.push_back({{"mla", false}});
        continue;
      }
      method_layer = static_cast<int>(l);
      const auto& a = *lw.mla;
      const std::string p = "mla.layers." + std::to_string(l) + ".";
      tensors[p + "w_down_k"] = detail::f32(a.w_down_k);
      if (a.w_down_v.size()) tensors[p + "w_down_v"] = detail::f32(a.w_down_v);
      if (a.d_rope > 0) tensors[p + "w_rope_k"] = detail::f32(a.w_rope_k);
      const std::string up = a.group >= 0 ? "mla.groups." + std::to_string(a.group) + "." : p;
      tensors[up + "w_up_k"] = detail::f32(*a.w_up_k);
      tensors[up + "w_up_v"] = detail::f32(*a.w_up_v);
      layers.push_back({{"mla", true}, {"method", compression_method_name(a.method)}, {"d_latent", a.d_latent}, {"group", a.group},
                        {"d_rope", a.d_rope}});
    }
    if (method_layer < 0) throw InvalidArgument("save_mla_model: the model has no MLA layers (convert it first)");
    const auto& first = *m.weights.layers[method_layer].mla;
    nlohmann::json mc{{"format", "cacheshrink-mla"},
                      {"version", 1},
                      {"method", compression_method_name(first.method)},
                      {"d_latent", first.d_latent},
                      {"d_kv", m.config.d_kv()},
                      {"compression_ratio", o.compression_ratio},
                      {"store_original_weights", o.store_original_weights},
                      {"layers", layers}};
    io::write_safetensors(tmp / "model.safetensors", tensors, {{"format", "pt"}, {"cacheshrink", "mla"}});
    const std::string mcs = mc.dump(2) + "\n";
    io::atomic_write(tmp / "mla_config.json", [&](std::ofstream& f) { f << mcs; });
    fs::copy_file(m.dir / "config.json", tmp / "config.json");
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt"})
      if (fs::exists(m.dir / f)) fs::copy_file(m.dir / f, tmp / f);
    if (fs::exists(out)) fs::remove_all(out);
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

/// Loads a model directory: a plain HF model, or a saved MLA model (mla_config.json).
inline model::Model load_any(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const auto mc_path = dir / "mla_config.json";
  if (!fs::exists(mc_path)) return model::load_model(dir);
  auto m = model::load_model(dir, /*kv_optional=*/true);
  auto mc = nlohmann::json::parse(io::read_text_file(mc_path), nullptr, false);
  const std::string src = mc_path.string();
  if (mc.is_discarded() || !mc.is_object() || mc.value("format", "") != "cacheshrink-mla" || !mc.contains("layers") ||
      !mc["layers"].is_array())
    throw FormatError(src + ": not a cacheshrink MLA config (needs format 'cacheshrink-mla' and a 'layers' array)");
  if (mc["layers"].size() != m.weights.layers.size())
    throw FormatError(src + ": lists " + std::to_string(mc["layers"].size()) + " layers, the model has " +
                      std::to_string(m.weights.layers.size()));
  auto store = io::TensorStore::open_dir(dir);
  auto mat = [&](const std::string& name, std::int64_t r, std::int64_t c) {
    if (!store.contains(name)) throw TensorError(store.label() + ": missing tensor '" + name + "'");
    store.file_of(name).expect_shape(name, {r, c});
    auto v = store.to_float(name);
    return MatrixRf(Eigen::Map<MatrixRf>(v.data(), r, c));
  };
  std::map<int, std::pair<std::shared_ptr<MatrixRf>, std::shared_ptr<MatrixRf>>> groups;
  const int H = m.config.hidden_size, dkv = m.config.d_kv();
  for (std::size_t l = 0; l < m.weights.layers.size(); ++l) {
    const auto& e = mc["layers"][l];
    auto& lw = m.weights.layers[l];
    if (!e.value("mla", false)) {
      if (lw.wk.size() == 0 || lw.wv.size() == 0)
        throw TensorError(store.label() + ": layer " + std::to_string(l) + " is not MLA but its k_proj/v_proj are missing");
      continue;
    }
    model::MlaLayer a;
    const std::string method = e.value("method", "");
    if (method == "separate") a.method = CompressionMethod::Separate;
    else if (method == "xkv") a.method = CompressionMethod::Xkv;
    else if (method == "joint") a.method = CompressionMethod::Joint;
    else if (method == "decoupled_rope") a.method = CompressionMethod::DecoupledRope;
    else throw FormatError(src + ": layer " + std::to_string(l) + " has unknown method '" + method + "'");
    a.d_latent = e.value("d_latent", 0);
    a.group = e.value("group", -1);
    a.d_rope = e.value("d_rope", 0);
    if (a.d_rope < 0 || a.d_rope >= dkv || (a.d_rope > 0) != (a.method == CompressionMethod::DecoupledRope))
      throw FormatError(src + ": layer " + std::to_string(l) + " has an invalid d_rope");
    if (a.d_latent < 1 || a.d_latent > dkv - a.d_rope) throw FormatError(src + ": layer " + std::to_string(l) + " has d_latent out of [1, d_kv - d_rope]");
    const std::string p = "mla.layers." + std::to_string(l) + ".";
    a.w_down_k = mat(p + "w_down_k", a.d_latent, H);
    if (a.method != CompressionMethod::Joint) a.w_down_v = mat(p + "w_down_v", a.d_latent, H);
    if (a.d_rope > 0) a.w_rope_k = mat(p + "w_rope_k", a.d_rope, H);
    if (a.group >= 0) {
      auto it = groups.find(a.group);
      if (it == groups.end()) {
        const std::string g = "mla.groups." + std::to_string(a.group) + ".";
        it = groups.emplace(a.group, std::make_pair(std::make_shared<MatrixRf>(mat(g + "w_up_k", dkv, a.d_latent)),
                                                    std::make_shared<MatrixRf>(mat(g + "w_up_v", dkv, a.d_latent)))).first;
      }
      a.w_up_k = it->second.first;
      a.w_up_v = it->second.second;
    } else {
      a.w_up_k = std::make_shared<MatrixRf>(mat(p + "w_up_k", dkv - a.d_rope, a.d_latent));
      a.w_up_v = std::make_shared<MatrixRf>(mat(p + "w_up_v", dkv, a.d_latent));
    }
    lw.mla = std::move(a);
  }
  return m;
}

}  // namespace cacheshrink::pipeline

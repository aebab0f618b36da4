#pragma once
// A HF model directory: config.json plus model.safetensors or a sharded
// model.safetensors.index.json. Tensors are looked up by name across shards.
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <vector>

#include "cacheshrink/core/config.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/hf_config.hpp"
#include "cacheshrink/io/safetensors.hpp"

namespace cacheshrink::io {

class TensorStore {
 public:
  TensorStore() = default;
  /// Opens every safetensors file of a model directory.
  static TensorStore open_dir(const std::filesystem::path& dir) {
    TensorStore s;
    const auto single = dir / "model.safetensors";
    const auto index = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(single)) {
      s.add(single);
    } else if (std::filesystem::exists(index)) {
      auto j = nlohmann::json::parse(read_text_file(index), nullptr, false);
      if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object())
        throw FormatError(index.string() + ": not a safetensors index (needs an object 'weight_map')");
      std::vector<std::string> files;
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        if (!it.value().is_string()) throw FormatError(index.string() + ": weight_map['" + it.key() + "'] is not a file name");
        auto f = it.value().get<std::string>();
        if (f.find('/') != std::string::npos) throw FormatError(index.string() + ": shard name '" + f + "' must be a plain file name");
        if (std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
      }
      for (const auto& f : files) s.add(dir / f);
    } else {
      throw IoError(dir.string() + ": no model.safetensors or model.safetensors.index.json in the model directory");
    }
    return s;
  }

  void add(const std::filesystem::path& file) {
    files_.push_back(std::make_unique<SafetensorsFile>(file));
    const auto& f = *files_.back();
    for (const auto& n : f.names()) {
      if (where_.count(n)) throw FormatError(file.string() + ": tensor '" + n + "' also appears in another shard");
      where_[n] = &f;
    }
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) throw TensorError(label() + ": missing tensor '" + name + "'");
    return *it->second;
  }
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  std::vector<float> to_float(const std::string& name) const { return file_of(name).to_float(name); }
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    for (const auto& f : files_)
      for (const auto& n : f->names()) r.push_back(n);
    return r;
  }
  std::string label() const { return files_.empty() ? std::string("<no file>") : files_.front()->label(); }
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, const SafetensorsFile*> where_;
};

}  // namespace cacheshrink::io

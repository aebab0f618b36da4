#pragma once
// safetensors: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then data.
// The reader memory-maps the file (or owns a buffer) and validates everything before any
// tensor is touched: header bounds, JSON shape, dtype, byte counts, offsets in range and
// non-overlapping. The writer emits 8-byte aligned data and renames a temp file into place.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "cacheshrink/core/dtype.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/file.hpp"

namespace cacheshrink::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0;  // byte offsets into the data section
  std::size_t end = 0;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// An owned tensor for writing (bytes are in `dtype`, little-endian, row-major).
struct TensorData {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  static TensorData from_floats(std::span<const float> v, std::vector<std::int64_t> shape, DType as = DType::F32);
};

class SafetensorsFile {
 public:
  /// Maps and validates `path`; throws IoError/FormatError naming the file.
  explicit SafetensorsFile(const std::filesystem::path& path) : map_(path), label_(path.string()) {
    bytes_ = map_.bytes();
    parse();
  }
  /// Validates an in-memory image (used by tests); `label` names it in errors.
  SafetensorsFile(std::vector<std::byte> image, std::string label) : owned_(std::move(image)), label_(std::move(label)) {
    bytes_ = owned_;
    parse();
  }

  const std::string& label() const { return label_; }
  const std::vector<std::string>& names() const { return order_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) throw TensorError(label_ + ": missing tensor '" + name + "'");
    return infos_[it->second];
  }

  std::span<const std::byte> raw(const std::string& name) const {
    const auto& ti = info(name);
    return data_.subspan(ti.begin, ti.end - ti.begin);
  }

  /// Converts a floating tensor (F64/F32/F16/BF16) to float32, row-major.
  std::vector<float> to_float(const std::string& name) const {
    const auto& ti = info(name);
    auto b = raw(name);
    std::vector<float> out(static_cast<std::size_t>(ti.numel()));
    const auto n = out.size();
    switch (ti.dtype) {
      case DType::F32:
        if (n != 0) std::memcpy(out.data(), b.data(), n * 4);  // memcpy from/to null is UB even for 0 bytes
        break;
      case DType::F64:
        for (std::size_t i = 0; i < n; ++i) {
          double d;
          std::memcpy(&d, b.data() + 8 * i, 8);
          out[i] = static_cast<float>(d);
        }
        break;
      case DType::BF16:
        for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(load_u16(b.data() + 2 * i));
        break;
      case DType::F16:
        for (std::size_t i = 0; i < n; ++i) out[i] = fp16_to_float(load_u16(b.data() + 2 * i));
        break;
      default:
        throw TensorError(label_ + ": tensor '" + name + "' has dtype " + std::string(dtype_name(ti.dtype)) +
                          ", expected a floating dtype (F64, F32, F16, BF16)");
    }
    return out;
  }

  /// Converts an integer tensor (I64/I32/I16/I8/U8) to int64.
  std::vector<std::int64_t> to_int64(const std::string& name) const {
    const auto& ti = info(name);
    auto b = raw(name);
    std::vector<std::int64_t> out(static_cast<std::size_t>(ti.numel()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      switch (ti.dtype) {
        case DType::I64: std::memcpy(&out[i], b.data() + 8 * i, 8); break;
        case DType::I32: {
          std::int32_t v;
          std::memcpy(&v, b.data() + 4 * i, 4);
          out[i] = v;
          break;
        }
        case DType::I16: {
          std::int16_t v;
          std::memcpy(&v, b.data() + 2 * i, 2);
          out[i] = v;
          break;
        }
        case DType::I8: out[i] = static_cast<std::int8_t>(b[i]); break;
        case DType::U8: out[i] = std::to_integer<std::uint8_t>(b[i]); break;
        default:
          throw TensorError(label_ + ": tensor '" + name + "' has dtype " + std::string(dtype_name(ti.dtype)) +
                            ", expected an integer dtype");
      }
    }
    return out;
  }

  /// Checks that `name` exists with exactly `shape`; throws TensorError otherwise.
  void expect_shape(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const auto& ti = info(name);
    if (ti.shape != shape) throw TensorError(label_ + ": tensor '" + name + "' has shape " + shape_str(ti.shape) + ", expected " + shape_str(shape));
  }

  static std::string shape_str(const std::vector<std::int64_t>& s) {
    std::string r = "[";
    for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
  }

 private:
  static std::uint16_t load_u16(const std::byte* p) {
    return static_cast<std::uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
  }

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(label_ + ": invalid safetensors file: " + what); }

  void parse() {
    if (bytes_.size() < 8) fail("file is " + std::to_string(bytes_.size()) + " bytes, shorter than the 8-byte header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes_[static_cast<std::size_t>(i)]);
    if (n > bytes_.size() - 8) fail("header length " + std::to_string(n) + " exceeds the file size " + std::to_string(bytes_.size()));
    if (n < 2) fail("header length " + std::to_string(n) + " is too small for a JSON object");
    const char* hp = reinterpret_cast<const char*>(bytes_.data() + 8);
    nlohmann::json hdr = nlohmann::json::parse(hp, hp + n, nullptr, /*allow_exceptions=*/false);
    if (hdr.is_discarded()) fail("header is not valid JSON");
    if (!hdr.is_object()) fail("header is not a JSON object");
    data_ = bytes_.subspan(8 + static_cast<std::size_t>(n));

    for (auto it = hdr.begin(); it != hdr.end(); ++it) {
      const std::string& key = it.key();
      const auto& v = it.value();
      if (key == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__['" + m.key() + "'] is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      const std::string where = "tensor '" + key + "'";
      if (!v.is_object()) fail(where + " entry is not an object");
      auto dt = v.find("dtype");
      auto sh = v.find("shape");
      auto off = v.find("data_offsets");
      if (dt == v.end() || !dt->is_string()) fail(where + " has no string 'dtype'");
      if (sh == v.end() || !sh->is_array()) fail(where + " has no array 'shape'");
      if (off == v.end() || !off->is_array() || off->size() != 2) fail(where + " has no 'data_offsets' pair");
      TensorInfo ti;
      ti.name = key;
      if (!parse_dtype(dt->get<std::string>(), ti.dtype)) fail(where + " has unknown dtype '" + dt->get<std::string>() + "'");
      std::uint64_t numel = 1;
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned()) fail(where + " has a shape entry that is not a non-negative integer");
        const auto dim = d.get<std::uint64_t>();
        if (dim > (std::uint64_t{1} << 40) || (dim != 0 && numel > (std::uint64_t{1} << 48) / dim)) fail(where + " has an absurdly large shape");
        numel *= dim;
        ti.shape.push_back(static_cast<std::int64_t>(dim));
      }
      for (const auto& o : *off)
        if (!o.is_number_unsigned()) fail(where + " has data_offsets that are not non-negative integers");
      const auto b = (*off)[0].get<std::uint64_t>();
      const auto e = (*off)[1].get<std::uint64_t>();
      if (b > e) fail(where + " has data_offsets begin " + std::to_string(b) + " > end " + std::to_string(e));
      if (e > data_.size())
        fail(where + " has data_offsets end " + std::to_string(e) + " beyond the data section (" + std::to_string(data_.size()) + " bytes)");
      const std::uint64_t need = numel * dtype_size(ti.dtype);
      if (e - b != need)
        fail(where + " spans " + std::to_string(e - b) + " bytes but dtype " + std::string(dtype_name(ti.dtype)) + " x shape " +
             shape_str(ti.shape) + " needs " + std::to_string(need));
      ti.begin = static_cast<std::size_t>(b);
      ti.end = static_cast<std::size_t>(e);
      index_[key] = infos_.size();
      infos_.push_back(std::move(ti));
      order_.push_back(key);
    }
    // Overlap check on non-empty ranges.
    std::vector<const TensorInfo*> sorted;
    for (const auto& t : infos_)
      if (t.end > t.begin) sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < sorted.size(); ++i)
      if (sorted[i]->begin < sorted[i - 1]->end) fail("tensors '" + sorted[i - 1]->name + "' and '" + sorted[i]->name + "' overlap");
  }

  MappedFile map_;
  std::vector<std::byte> owned_;
  std::string label_;
  std::span<const std::byte> bytes_;
  std::span<const std::byte> data_;
  std::vector<TensorInfo> infos_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

inline TensorData TensorData::from_floats(std::span<const float> v, std::vector<std::int64_t> shape, DType as) {
  TensorData t;
  t.dtype = as;
  t.shape = std::move(shape);
  std::int64_t n = 1;
  for (auto d : t.shape) n *= d;
  if (n != static_cast<std::int64_t>(v.size())) throw InvalidArgument("TensorData::from_floats: shape does not match element count");
  t.bytes.resize(v.size() * dtype_size(as));
  for (std::size_t i = 0; i < v.size(); ++i) {
    switch (as) {
      case DType::F32: std::memcpy(t.bytes.data() + 4 * i, &v[i], 4); break;
      case DType::F64: {
        double d = v[i];
        std::memcpy(t.bytes.data() + 8 * i, &d, 8);
        break;
      }
      case DType::BF16: {
        auto h = float_to_bf16(v[i]);
        std::memcpy(t.bytes.data() + 2 * i, &h, 2);
        break;
      }
      case DType::F16: {
        auto h = float_to_fp16(v[i]);
        std::memcpy(t.bytes.data() + 2 * i, &h, 2);
        break;
      }
      default: throw InvalidArgument("TensorData::from_floats: target dtype must be floating");
    }
  }
  return t;
}

/// Serializes tensors into a safetensors image (keys sorted, data 8-byte aligned).
inline std::vector<std::byte> safetensors_image(const std::map<std::string, TensorData>& tensors,
                                                const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json hdr = nlohmann::ordered_json::object();
  if (!metadata.empty()) hdr["__metadata__"] = metadata;
  std::size_t off = 0;
  for (const auto& [name, t] : tensors) {
    std::int64_t n = 1;
    for (auto d : t.shape) n *= d;
    if (static_cast<std::size_t>(n) * dtype_size(t.dtype) != t.bytes.size())
      throw InvalidArgument("safetensors writer: tensor '" + name + "' byte count does not match dtype x shape");
    hdr[name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string h = hdr.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');
  std::vector<std::byte> img(8 + h.size() + off);
  std::uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) img[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  std::memcpy(img.data() + 8, h.data(), h.size());
  std::size_t p = 8 + h.size();
  for (const auto& [name, t] : tensors) {
    if (!t.bytes.empty()) std::memcpy(img.data() + p, t.bytes.data(), t.bytes.size());
    p += t.bytes.size();
  }
  return img;
}

/// Writes a safetensors file atomically (temp file + rename).
inline void write_safetensors(const std::filesystem::path& path, const std::map<std::string, TensorData>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  auto img = safetensors_image(tensors, metadata);
  atomic_write(path, [&](std::ofstream& out) { out.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(img.size())); });
}

/// Copies a tensor of a loaded file (raw bytes, same dtype) for re-writing.
inline TensorData copy_tensor(const SafetensorsFile& f, const std::string& name) {
  const auto& ti = f.info(name);
  auto b = f.raw(name);
  return TensorData{ti.dtype, ti.shape, std::vector<std::byte>(b.begin(), b.end())};
}

}  // namespace cacheshrink::io

// io/ and model loading: fixtures load with HF's parameter counts, safetensors round-trips
// bit-exactly, bf16/fp16 conversions match an independent reference on every bit pattern,
// every kind of bad input raises a cacheshrink::Error naming the file, and seeded fuzzing
// of safetensors images and config.json values lets nothing else escape.
#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <cacheshrink/core/dtype.hpp>
#include <cacheshrink/core/error.hpp>
#include <cacheshrink/io/file.hpp>
#include <cacheshrink/io/hf_config.hpp>
#include <cacheshrink/io/model_dir.hpp>
#include <cacheshrink/io/safetensors.hpp>
#include <cacheshrink/model/weights.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "test_support.hpp"

using namespace cacheshrink;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// helpers

/// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir() {
    static std::atomic<unsigned> counter{0};
    std::random_device rd;
    path_ = fs::temp_directory_path() /
            ("cacheshrink_test_io_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

void write_bytes(const fs::path& p, const std::vector<std::byte>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(out.good());
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
  REQUIRE(out.good());
}

std::vector<std::byte> read_bytes(const fs::path& p) {
  io::MappedFile f(p);
  auto b = f.bytes();
  return {b.begin(), b.end()};
}

/// An image with the given header text, an explicit (possibly lying) length prefix and
/// `data_bytes` of patterned data.
std::vector<std::byte> raw_image(const std::string& header, std::size_t data_bytes, std::uint64_t length_prefix) {
  std::vector<std::byte> img(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) img[static_cast<std::size_t>(i)] = static_cast<std::byte>((length_prefix >> (8 * i)) & 0xffu);
  std::memcpy(img.data() + 8, header.data(), header.size());
  for (std::size_t i = 0; i < data_bytes; ++i) img[8 + header.size() + i] = static_cast<std::byte>((i * 37 + 11) & 0xffu);
  return img;
}
std::vector<std::byte> raw_image(const std::string& header, std::size_t data_bytes) { return raw_image(header, data_bytes, header.size()); }

/// Runs `f`, requires it to throw exactly an `E` (a cacheshrink::Error subclass) and checks
/// that what() contains every phrase.
template <class E, class F>
void expect_error(F&& f, std::initializer_list<std::string_view> phrases) {
  static_assert(std::is_base_of_v<Error, E>);
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    const std::string what = e.what();
    for (auto p : phrases) CHECK_MESSAGE(what.find(p) != std::string::npos, "message '", what, "' lacks '", std::string(p), "'");
  }
  CHECK_MESSAGE(thrown, "expected an exception");
}

template <class E>
void expect_image_error(const std::vector<std::byte>& img, std::initializer_list<std::string_view> phrases) {
  expect_error<E>([&] { io::SafetensorsFile f(img, "bad_image.safetensors"); }, phrases);
}

io::TensorData make_tensor(DType dt, std::vector<std::int64_t> shape, unsigned seed) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  std::vector<float> v(static_cast<std::size_t>(n));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (auto& x : v) x = nd(rng);
  if (dt == DType::I32 || dt == DType::I64) {
    io::TensorData t{dt, shape, std::vector<std::byte>(static_cast<std::size_t>(n) * dtype_size(dt))};
    for (std::size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = static_cast<std::byte>(rng() & 0xffu);
    return t;
  }
  return io::TensorData::from_floats(v, std::move(shape), dt);
}

/// A small, valid image with every dtype the fuzzer should exercise, a scalar and an empty tensor.
std::vector<std::byte> small_image() {
  std::map<std::string, io::TensorData> t;
  t["a.f32"] = make_tensor(DType::F32, {2, 3}, 1);
  t["b.bf16"] = make_tensor(DType::BF16, {4}, 2);
  t["c.f16"] = make_tensor(DType::F16, {3, 1}, 3);
  t["d.i32"] = make_tensor(DType::I32, {2}, 4);
  t["e.f64"] = make_tensor(DType::F64, {1}, 5);
  t["f.scalar"] = make_tensor(DType::F32, {}, 6);
  t["g.empty"] = make_tensor(DType::F32, {0, 5}, 7);
  t["h.i64"] = make_tensor(DType::I64, {1, 2}, 8);
  return io::safetensors_image(t, {{"format", "pt"}});
}

std::map<std::string, io::TensorData> copy_all(const io::SafetensorsFile& f) {
  std::map<std::string, io::TensorData> r;
  for (const auto& n : f.names()) r[n] = io::copy_tensor(f, n);
  return r;
}

/// Copies config.json of a fixture into `dir` and writes its tensors after `edit`.
void write_model_dir(const fs::path& dir, const std::string& fixture,
                     const std::function<void(std::map<std::string, io::TensorData>&)>& edit = {}) {
  fs::create_directories(dir);
  fs::copy_file(test::model_dir(fixture) / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
  io::SafetensorsFile f(test::model_dir(fixture) / "model.safetensors");
  auto tensors = copy_all(f);
  if (edit) edit(tensors);
  io::write_safetensors(dir / "model.safetensors", tensors, f.metadata());
}

template <class M>
bool same(const M& a, const M& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  return a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

bool same_weights(const model::ModelWeights& a, const model::ModelWeights& b) {
  if (!same(a.embed, b.embed) || !same(a.pos_embed, b.pos_embed) || !same(a.lm_head, b.lm_head) || !same(a.final_norm_w, b.final_norm_w) ||
      !same(a.final_norm_b, b.final_norm_b) || a.layers.size() != b.layers.size())
    return false;
  for (std::size_t i = 0; i < a.layers.size(); ++i) {
    const auto &x = a.layers[i], &y = b.layers[i];
    for (auto m : {&model::LayerWeights::wq, &model::LayerWeights::wk, &model::LayerWeights::wv, &model::LayerWeights::wo,
                   &model::LayerWeights::w_gate, &model::LayerWeights::w_up, &model::LayerWeights::w_down})
      if (!same(x.*m, y.*m)) return false;
    for (auto v : {&model::LayerWeights::norm1_w, &model::LayerWeights::norm1_b, &model::LayerWeights::norm2_w,
                   &model::LayerWeights::norm2_b, &model::LayerWeights::bq, &model::LayerWeights::bk, &model::LayerWeights::bv,
                   &model::LayerWeights::bo, &model::LayerWeights::q_norm, &model::LayerWeights::k_norm, &model::LayerWeights::b_gate,
                   &model::LayerWeights::b_up, &model::LayerWeights::b_down})
      if (!same(x.*v, y.*v)) return false;
  }
  return true;
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- independent references for the half-precision formats (double arithmetic, no bit tricks)

double ref_fp16_value(std::uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) v = std::ldexp(m, -24);
  else if (e == 31) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}

double ref_bf16_value(std::uint16_t h) {
  const int e = (h >> 7) & 0xff, m = h & 0x7f;
  double v;
  if (e == 0) v = std::ldexp(m, -133);
  else if (e == 255) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(128 + m, e - 134);
  return (h & 0x8000) ? -v : v;
}

/// Round-to-nearest-even of a finite or infinite non-NaN float into a binary format with
/// `mant_bits` stored mantissa bits and exponent bias `bias` (fp16: 10/15, bf16: 7/127).
std::uint16_t ref_round(float f, int mant_bits, int exp_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int emin = 1 - bias;
  const std::uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const std::uint16_t inf = static_cast<std::uint16_t>(((1 << exp_bits) - 1) << mant_bits);
  const double a = std::fabs(static_cast<double>(f));
  // Smallest magnitude that rounds to infinity: max finite + half an ulp.
  const double overflow = std::ldexp(2.0 - std::ldexp(1.0, -(mant_bits + 1)), bias);
  if (a >= overflow) return sign | inf;
  int e = 0;
  std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
  const int exp2 = a == 0 ? emin : std::max(e - 1, emin);
  const double q = std::ldexp(1.0, exp2 - mant_bits);  // spacing of representable values here
  const double n = std::nearbyint(a / q);              // FE_TONEAREST: ties to even
  const double v = n * q;
  if (v == 0) return sign;
  std::frexp(v, &e);
  if (e - 1 < emin) return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(v / std::ldexp(1.0, emin - mant_bits)));
  const int biased = e - 1 + bias;
  const auto mant = static_cast<std::uint16_t>(std::ldexp(v, mant_bits - (e - 1)) - std::ldexp(1.0, mant_bits));
  return static_cast<std::uint16_t>(sign | (biased << mant_bits) | mant);
}

bool same_bits(float a, double b) {
  if (std::isnan(b)) return std::isnan(a);
  return bits_of(a) == bits_of(static_cast<float>(b));
}

}  // namespace

// =============================================================================================
// fixtures

TEST_CASE("all seven fixtures load and parameter counts equal the HF reference") {
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      const auto dir = test::model_dir(name);
      const auto ref = json::parse(io::read_text_file(dir / "reference.json"));
      const auto m = model::load_model(dir);
      CHECK(m.config.n_layers > 0);
      CHECK(static_cast<int>(m.weights.layers.size()) == m.config.n_layers);
      CHECK(m.config.source == (dir / "config.json").string());
      CHECK(model::parameter_count(m.weights) == ref["parameters"].get<std::int64_t>());
      // Every tensor of the checkpoint is float and convertible.
      io::SafetensorsFile f(dir / "model.safetensors");
      for (const auto& n : f.names()) CHECK(f.to_float(n).size() == static_cast<std::size_t>(f.info(n).numel()));
    }
  }
}

TEST_CASE("every fixture tensor round-trips bit-exactly through copy_tensor + write_safetensors") {
  TempDir tmp;
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      const auto src = test::model_dir(name) / "model.safetensors";
      io::SafetensorsFile f(src);
      REQUIRE(!f.names().empty());
      const auto out_dir = tmp / name;
      fs::create_directories(out_dir);
      const auto out = out_dir / "model.safetensors";
      io::write_safetensors(out, copy_all(f), f.metadata());
      // No temporary file is left next to the output.
      int entries = 0;
      for ([[maybe_unused]] const auto& e : fs::directory_iterator(out_dir)) ++entries;
      CHECK(entries == 1);

      io::SafetensorsFile g(out);
      CHECK(g.metadata() == f.metadata());
      auto fn = f.names(), gn = g.names();
      std::sort(fn.begin(), fn.end());
      std::sort(gn.begin(), gn.end());
      REQUIRE(fn == gn);
      for (const auto& n : f.names()) {
        const auto &a = f.info(n), &b = g.info(n);
        CHECK(a.dtype == b.dtype);
        CHECK(a.shape == b.shape);
        const auto ra = f.raw(n), rb = g.raw(n);
        REQUIRE(ra.size() == rb.size());
        CHECK_MESSAGE(std::memcmp(ra.data(), rb.data(), ra.size()) == 0, n);
        // Float conversion back to the stored dtype reproduces the stored bytes.
        auto v = f.to_float(n);
        auto t = io::TensorData::from_floats(v, a.shape, a.dtype);
        REQUIRE(t.bytes.size() == ra.size());
        CHECK_MESSAGE(std::memcmp(t.bytes.data(), ra.data(), ra.size()) == 0, n, " via float");
      }
      // The rewritten directory loads to identical weights.
      fs::copy_file(test::model_dir(name) / "config.json", out_dir / "config.json");
      CHECK(same_weights(model::load_model(test::model_dir(name)).weights, model::load_model(out_dir).weights));
    }
  }
}

TEST_CASE("safetensors images: scalar, empty, every dtype and metadata survive writing") {
  const auto img = small_image();
  io::SafetensorsFile f(img, "small");
  CHECK(f.names().size() == 8);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.info("f.scalar").shape.empty());
  CHECK(f.to_float("f.scalar").size() == 1);
  CHECK(f.to_float("g.empty").empty());
  CHECK(f.to_int64("d.i32").size() == 2);
  CHECK(io::safetensors_image(copy_all(f), f.metadata()) == img);
  // Header is padded so the data section starts 8-byte aligned.
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(img[static_cast<std::size_t>(i)]);
  CHECK((8 + n) % 8 == 0);
}

// =============================================================================================
// bf16 / fp16

TEST_CASE("fp16 and bf16 decode every bit pattern like the IEEE formula") {
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    const float f16 = fp16_to_float(h);
    const float b16 = bf16_to_float(h);
    if (!same_bits(f16, ref_fp16_value(h))) FAIL_CHECK("fp16_to_float(0x" << std::hex << i << ") = " << f16);
    if (!same_bits(b16, ref_bf16_value(h))) FAIL_CHECK("bf16_to_float(0x" << std::hex << i << ") = " << b16);
    if (std::isnan(f16)) {  // payload and sign kept
      if (((bits_of(f16) >> 13) & 0x3ffu) != (h & 0x3ffu) || std::signbit(f16) != bool(h & 0x8000)) FAIL_CHECK("fp16 NaN payload " << i);
    }
  }
}

TEST_CASE("fp16 and bf16 encode(decode(h)) == h for every non-NaN pattern; NaN stays NaN") {
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    const bool f16_nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0;
    const bool b16_nan = ((h >> 7) & 0xff) == 0xff && (h & 0x7f) != 0;
    const auto f = float_to_fp16(fp16_to_float(h));
    const auto b = float_to_bf16(bf16_to_float(h));
    if (f16_nan) {
      if (!(((f >> 10) & 0x1f) == 0x1f && (f & 0x3ff) != 0 && (f & 0x8000) == (h & 0x8000))) FAIL_CHECK("fp16 NaN lost: " << i);
    } else if (f != h) {
      FAIL_CHECK("fp16 round trip 0x" << std::hex << i << " -> 0x" << f);
    }
    if (b16_nan) {
      if (!(((b >> 7) & 0xff) == 0xff && (b & 0x7f) != 0 && (b & 0x8000) == (h & 0x8000))) FAIL_CHECK("bf16 NaN lost: " << i);
    } else if (b != h) {
      FAIL_CHECK("bf16 round trip 0x" << std::hex << i << " -> 0x" << b);
    }
  }
}

TEST_CASE("float -> fp16/bf16 rounds to nearest, ties to even (constructed midpoints)") {
  // Exact midpoints between consecutive finite halves, the values either side of them, and
  // the overflow boundary (max half + half an ulp rounds to the even neighbour: infinity).
  for (std::uint32_t i = 0; i <= 0x7bff; ++i) {
    for (std::uint16_t sign : {std::uint16_t{0}, std::uint16_t{0x8000}}) {
      const auto h = static_cast<std::uint16_t>(i | sign);
      const double lo = std::fabs(ref_fp16_value(h));
      const double hi = i == 0x7bff ? 65536.0 : std::fabs(ref_fp16_value(static_cast<std::uint16_t>(i + 1)));
      const float mid = static_cast<float>((lo + hi) / 2);
      REQUIRE(static_cast<double>(mid) == (lo + hi) / 2);
      const float s = sign ? -1.0f : 1.0f;
      const auto even = static_cast<std::uint16_t>(((i & 1u) ? i + 1 : i) | sign);
      if (float_to_fp16(s * mid) != even) FAIL_CHECK("fp16 tie at 0x" << std::hex << i);
      if (float_to_fp16(s * std::nextafter(mid, 1e30f)) != static_cast<std::uint16_t>((i + 1) | sign))
        FAIL_CHECK("fp16 above tie 0x" << std::hex << i);
      if (float_to_fp16(s * std::nextafter(mid, 0.0f)) != h) FAIL_CHECK("fp16 below tie 0x" << std::hex << i);
    }
  }
  for (std::uint32_t i = 0; i <= 0x7f7f; ++i) {
    for (std::uint32_t sign : {0u, 0x8000u}) {
      const float mid = float_of(((i | sign) << 16) | 0x8000u);
      const auto even = static_cast<std::uint16_t>(((i & 1u) ? i + 1 : i) | sign);
      if (float_to_bf16(mid) != even) FAIL_CHECK("bf16 tie at 0x" << std::hex << i);
      if (float_to_bf16(float_of(bits_of(mid) + 1)) != static_cast<std::uint16_t>((i + 1) | sign))
        FAIL_CHECK("bf16 above tie 0x" << std::hex << i);
      if (float_to_bf16(float_of(bits_of(mid) - 1)) != static_cast<std::uint16_t>(i | sign))
        FAIL_CHECK("bf16 below tie 0x" << std::hex << i);
    }
  }
  // A few by hand.
  CHECK(float_to_fp16(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // tie, even is 1.0
  CHECK(float_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie, rounds up to even
  CHECK(float_to_fp16(65520.0f) == 0x7c00);
  CHECK(float_to_fp16(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
  CHECK(float_to_fp16(std::ldexp(1.0f, -25)) == 0x0000);  // tie to 0
  CHECK(float_to_fp16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_fp16(3 * std::ldexp(1.0f, -25)) == 0x0002);  // tie 1.5 ulp -> 2
  CHECK(float_to_fp16(-0.0f) == 0x8000);
  CHECK(float_to_fp16(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(float_to_fp16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);
}

TEST_CASE("float -> fp16/bf16 agrees with a double-precision rounding reference") {
  std::mt19937_64 rng(20240611);
  std::uint64_t checked = 0;
  auto check_one = [&](std::uint32_t bits) {
    const float f = float_of(bits);
    if (std::isnan(f)) return;
    ++checked;
    const auto want16 = ref_round(f, 10, 5);
    const auto wantb = ref_round(f, 7, 8);
    if (float_to_fp16(f) != want16)
      FAIL_CHECK("fp16(" << f << " bits 0x" << std::hex << bits << ") = 0x" << float_to_fp16(f) << ", want 0x" << want16);
    if (float_to_bf16(f) != wantb)
      FAIL_CHECK("bf16(" << f << " bits 0x" << std::hex << bits << ") = 0x" << float_to_bf16(f) << ", want 0x" << wantb);
  };
  // Every sign/exponent/top-mantissa combination with the rounding bits set to their edge cases.
  for (std::uint32_t hi = 0; hi < (1u << 19); ++hi)
    for (std::uint32_t lo : {0x0u, 0x1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu}) check_one((hi << 13) | lo);
  for (std::uint32_t hi = 0; hi < (1u << 16); ++hi)
    for (std::uint32_t lo : {0x0u, 0x1u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) check_one((hi << 16) | lo);
  for (int i = 0; i < 1 << 20; ++i) check_one(static_cast<std::uint32_t>(rng()));
  CHECK(checked > 3'000'000);
}

// =============================================================================================
// bad safetensors input

TEST_CASE("bad safetensors files raise FormatError naming the file") {
  TempDir tmp;
  const std::string good_hdr = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";

  SUBCASE("truncated below the 8-byte length prefix (file)") {
    const auto p = tmp / "short.safetensors";
    write_bytes(p, {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}, std::byte{5}});
    expect_error<FormatError>([&] { io::SafetensorsFile f(p); }, {"short.safetensors", "shorter than the 8-byte header length"});
    write_bytes(p, {});
    expect_error<FormatError>([&] { io::SafetensorsFile f(p); }, {"short.safetensors", "file is 0 bytes"});
  }
  SUBCASE("cut in the middle of the data (file)") {
    const auto p = tmp / "cut.safetensors";
    auto img = raw_image(good_hdr, 16);
    img.resize(img.size() - 5);
    write_bytes(p, img);
    expect_error<FormatError>([&] { io::SafetensorsFile f(p); }, {"cut.safetensors", "tensor 'w'", "beyond the data section"});
  }
  SUBCASE("cut in the middle of the header (file)") {
    const auto p = tmp / "cuthdr.safetensors";
    auto img = raw_image(good_hdr, 16);
    img.resize(8 + good_hdr.size() / 2);
    write_bytes(p, img);
    expect_error<FormatError>([&] { io::SafetensorsFile f(p); }, {"cuthdr.safetensors", "header length", "exceeds the file size"});
  }
  SUBCASE("header length beyond the file") {
    expect_image_error<FormatError>(raw_image(good_hdr, 16, good_hdr.size() + 17), {"bad_image.safetensors", "exceeds the file size"});
    expect_image_error<FormatError>(raw_image(good_hdr, 16, ~std::uint64_t{0}), {"bad_image.safetensors", "exceeds the file size"});
    expect_image_error<FormatError>(raw_image(good_hdr, 16, std::uint64_t{1} << 63), {"bad_image.safetensors", "exceeds the file size"});
  }
  SUBCASE("header length too small") {
    expect_image_error<FormatError>(raw_image("{}", 0, 0), {"bad_image.safetensors", "too small"});
    expect_image_error<FormatError>(raw_image("{}", 0, 1), {"bad_image.safetensors", "too small"});
  }
  SUBCASE("malformed header JSON") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32",)", 16), {"bad_image.safetensors", "not valid JSON"});
    expect_image_error<FormatError>(raw_image("\xff\xfe{}", 0), {"bad_image.safetensors", "not valid JSON"});
    expect_image_error<FormatError>(raw_image(R"({"a":"\udc00"})", 0), {"bad_image.safetensors", "not valid JSON"});
  }
  SUBCASE("header not an object") {
    expect_image_error<FormatError>(raw_image("[1, 2, 3]", 0), {"bad_image.safetensors", "not a JSON object"});
    expect_image_error<FormatError>(raw_image("\"text\"", 0), {"bad_image.safetensors", "not a JSON object"});
    expect_image_error<FormatError>(raw_image(R"({"w": [1]})", 0), {"bad_image.safetensors", "tensor 'w' entry is not an object"});
  }
  SUBCASE("missing or mistyped entry fields") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4), {"tensor 'w'", "dtype"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":3,"shape":[1],"data_offsets":[0,4]}})", 4), {"tensor 'w'", "dtype"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", 4), {"tensor 'w'", "shape"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4),
                                    {"tensor 'w'", "data_offsets"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", 8),
                                    {"tensor 'w'", "data_offsets"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", 4),
                                    {"tensor 'w'", "data_offsets"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                                    {"tensor 'w'", "non-negative"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4),
                                    {"tensor 'w'", "non-negative"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 4),
                                    {"tensor 'w'", "absurdly large"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4),
                                    {"tensor 'w'", "non-negative"});
  }
  SUBCASE("metadata") {
    expect_image_error<FormatError>(raw_image(R"({"__metadata__":[1]})", 0), {"bad_image.safetensors", "__metadata__"});
    expect_image_error<FormatError>(raw_image(R"({"__metadata__":{"k":1}})", 0), {"bad_image.safetensors", "__metadata__['k']"});
  }
  SUBCASE("tensor offsets out of range") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}})", 16),
                                    {"bad_image.safetensors", "tensor 'w'", "end 24 beyond the data section (16 bytes)"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[17,17]}})", 16),
                                    {"bad_image.safetensors", "tensor 'w'", "beyond the data section"});
    expect_image_error<FormatError>(
        raw_image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})", 16), {"tensor 'w'"});
  }
  SUBCASE("overlapping tensors") {
    expect_image_error<FormatError>(
        raw_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 16),
        {"bad_image.safetensors", "'a'", "'b'", "overlap"});
    expect_image_error<FormatError>(
        raw_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"I8","shape":[1],"data_offsets":[15,16]}})", 16),
        {"overlap"});
    // Touching and empty ranges are fine.
    io::SafetensorsFile ok(
        raw_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
                  R"("c":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                  16),
        "ok");
    CHECK(ok.names().size() == 3);
  }
  SUBCASE("begin > end") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 16),
                                    {"bad_image.safetensors", "tensor 'w'", "begin 8 > end 4"});
  }
  SUBCASE("byte count does not match dtype x shape") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}})", 16),
                                    {"bad_image.safetensors", "tensor 'w'", "spans 8 bytes", "needs 16"});
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16),
                                    {"tensor 'w'", "BF16", "needs 8"});
  }
  SUBCASE("unknown dtype") {
    expect_image_error<FormatError>(raw_image(R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,1]}})", 16),
                                    {"bad_image.safetensors", "tensor 'w'", "unknown dtype 'Q4_K'"});
  }
}

TEST_CASE("tensor access errors raise TensorError naming file and tensor") {
  io::SafetensorsFile f(small_image(), "small.safetensors");
  expect_error<TensorError>([&] { (void)f.info("nope"); }, {"small.safetensors", "missing tensor 'nope'"});
  expect_error<TensorError>([&] { (void)f.to_float("nope"); }, {"small.safetensors", "missing tensor 'nope'"});
  expect_error<TensorError>([&] { (void)f.to_float("d.i32"); }, {"small.safetensors", "'d.i32'", "I32", "expected a floating dtype"});
  expect_error<TensorError>([&] { (void)f.to_int64("a.f32"); }, {"small.safetensors", "'a.f32'", "F32", "expected an integer dtype"});
  expect_error<TensorError>([&] { f.expect_shape("a.f32", {3, 2}); }, {"small.safetensors", "'a.f32'", "shape [2, 3]", "expected [3, 2]"});
  CHECK_NOTHROW(f.expect_shape("a.f32", {2, 3}));
}

TEST_CASE("writer rejects inconsistent tensors and never leaves a partial file") {
  TempDir tmp;
  const auto p = tmp / "out.safetensors";
  std::map<std::string, io::TensorData> t;
  t["ok"] = make_tensor(DType::F32, {2}, 1);
  t["bad"] = io::TensorData{DType::F32, {3}, std::vector<std::byte>(8)};
  expect_error<InvalidArgument>([&] { io::write_safetensors(p, t); }, {"'bad'", "byte count"});
  CHECK(!fs::exists(p));
  CHECK(fs::is_empty(tmp.path()));
  expect_error<InvalidArgument>([&] { (void)io::TensorData::from_floats(std::vector<float>(3), {2, 2}); }, {"shape"});
  expect_error<InvalidArgument>([&] { (void)io::TensorData::from_floats(std::vector<float>(2), {2}, DType::I32); }, {"floating"});
  expect_error<IoError>([&] { io::write_safetensors(tmp / "no_such_dir" / "x.safetensors", {}); },
                        {"no_such_dir", "directory does not exist"});
  // An existing file is replaced atomically with a complete image.
  t.erase("bad");
  io::write_safetensors(p, t);
  io::write_safetensors(p, t, {{"k", "v"}});
  CHECK(io::SafetensorsFile(p).metadata().at("k") == "v");
}

TEST_CASE("other readers: missing files, ids files") {
  TempDir tmp;
  expect_error<IoError>([&] { io::SafetensorsFile f(tmp / "absent.safetensors"); }, {"absent.safetensors", "cannot open"});
  expect_error<IoError>([&] { io::SafetensorsFile f(tmp.path()); }, {tmp.path().string(), "not a regular file"});
  expect_error<IoError>([&] { (void)io::read_text_file(tmp / "absent.json"); }, {"absent.json"});
  write_bytes(tmp / "odd.ids.u16", {std::byte{1}, std::byte{0}, std::byte{2}});
  expect_error<FormatError>([&] { (void)io::read_ids_u16(tmp / "odd.ids.u16"); }, {"odd.ids.u16", "odd"});
  write_bytes(tmp / "ok.ids.u16", {std::byte{1}, std::byte{0}, std::byte{0xff}, std::byte{0xff}});
  CHECK(io::read_ids_u16(tmp / "ok.ids.u16") == std::vector<int>{1, 65535});
}

// =============================================================================================
// bad model directories and configs

namespace {

json llama_config() { return json::parse(io::read_text_file(test::model_dir("tiny-llama3") / "config.json")); }
json gpt2_config() { return json::parse(io::read_text_file(test::model_dir("tiny-gpt2") / "config.json")); }

}  // namespace

TEST_CASE("model directories: missing files and tensors, wrong shapes") {
  TempDir tmp;
  SUBCASE("missing model directory") {
    expect_error<IoError>([&] { (void)model::load_model(tmp / "nowhere"); }, {"nowhere", "model directory does not exist"});
  }
  SUBCASE("missing config.json") {
    const auto d = tmp / "noconfig";
    write_model_dir(d, "tiny-llama3");
    fs::remove(d / "config.json");
    expect_error<IoError>([&] { (void)model::load_model(d); }, {"config.json", "file not found"});
  }
  SUBCASE("config.json is not JSON") {
    const auto d = tmp / "badjson";
    write_model_dir(d, "tiny-llama3");
    write_text(d / "config.json", "{\"model_type\": \"llama\",");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"config.json", "not valid JSON"});
  }
  SUBCASE("missing model.safetensors") {
    const auto d = tmp / "noweights";
    write_model_dir(d, "tiny-llama3");
    fs::remove(d / "model.safetensors");
    expect_error<IoError>([&] { (void)model::load_model(d); }, {"noweights", "no model.safetensors"});
  }
  SUBCASE("missing tensor") {
    const auto d = tmp / "missing";
    write_model_dir(d, "tiny-llama3", [](auto& t) { REQUIRE(t.erase("model.layers.2.mlp.up_proj.weight") == 1); });
    expect_error<TensorError>([&] { (void)model::load_model(d); },
                              {"model.safetensors", "missing tensor 'model.layers.2.mlp.up_proj.weight'"});
  }
  SUBCASE("missing tensor (gpt2)") {
    const auto d = tmp / "missing_gpt2";
    write_model_dir(d, "tiny-gpt2", [](auto& t) { REQUIRE(t.erase("transformer.h.1.attn.c_attn.bias") == 1); });
    expect_error<TensorError>([&] { (void)model::load_model(d); },
                              {"model.safetensors", "missing tensor 'transformer.h.1.attn.c_attn.bias'"});
  }
  SUBCASE("wrong tensor shape") {
    const auto d = tmp / "shape";
    write_model_dir(d, "tiny-llama3", [](auto& t) {
      auto& w = t.at("model.layers.0.self_attn.k_proj.weight");
      std::swap(w.shape[0], w.shape[1]);
    });
    expect_error<TensorError>([&] { (void)model::load_model(d); }, {"model.safetensors", "'model.layers.0.self_attn.k_proj.weight'",
                                                                    "has shape [256, 128]", "expected [128, 256]"});
  }
  SUBCASE("non-float weight dtype") {
    const auto d = tmp / "dtype";
    write_model_dir(d, "tiny-llama3", [](auto& t) {
      auto& w = t.at("model.norm.weight");
      w = io::TensorData{DType::I16, w.shape, w.bytes};
    });
    expect_error<TensorError>([&] { (void)model::load_model(d); },
                              {"model.safetensors", "'model.norm.weight'", "expected a floating dtype"});
  }
  SUBCASE("corrupt model.safetensors") {
    const auto d = tmp / "corrupt";
    write_model_dir(d, "tiny-llama3");
    auto b = read_bytes(d / "model.safetensors");
    b.resize(b.size() / 2);
    write_bytes(d / "model.safetensors", b);
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"model.safetensors", "beyond the data section"});
  }
  SUBCASE("unknown architecture") {
    const auto d = tmp / "bert";
    write_model_dir(d, "tiny-llama3");
    write_text(d / "config.json", R"({"model_type": "bert", "vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4})");
    expect_error<ConfigError>([&] { (void)model::load_model(d); }, {"config.json", "unknown architecture", "bert"});
    expect_error<ConfigError>([&] { (void)io::parse_model_config(json::object(), "empty.json"); }, {"empty.json", "unknown architecture"});
    expect_error<ConfigError>([&] { (void)io::parse_model_config(json::array(), "arr.json"); }, {"arr.json", "not a JSON object"});
  }
  SUBCASE("llama-like fallback keyed on fields is accepted") {
    auto j = llama_config();
    j["model_type"] = "my_llama_clone";
    auto c = io::parse_model_config(j, "clone.json");
    CHECK(c.family == Family::Llama);
    CHECK(c.n_kv_heads == 2);
    CHECK(c.attention_kind() == AttentionKindId::Gqa);
  }
}

TEST_CASE("config.json consistency checks raise ConfigError naming the file") {
  auto bad = [](json j, std::initializer_list<std::string_view> phrases) {
    expect_error<ConfigError>([&] { (void)io::parse_model_config(j, "cfg/config.json"); }, phrases);
  };
  SUBCASE("DeepSeek latent attention is rejected") {
    auto j = llama_config();
    j["model_type"] = "deepseek_v2";
    j["kv_lora_rank"] = 512;
    bad(j, {"cfg/config.json", "latent attention", "deepseek_v2"});
    j["model_type"] = "llama";
    bad(j, {"cfg/config.json", "latent attention", "kv_lora_rank"});
    j.erase("kv_lora_rank");
    j["model_type"] = "deepseek_v3";
    bad(j, {"latent attention"});
  }
  SUBCASE("hidden not divisible by heads") {
    auto j = llama_config();
    j.erase("head_dim");
    j["hidden_size"] = 250;
    bad(j, {"cfg/config.json", "250", "not divisible by num_attention_heads 4"});
    auto g = gpt2_config();
    g["n_embd"] = 130;
    g["n_head"] = 4;
    bad(g, {"cfg/config.json", "not divisible by n_head 4"});
  }
  SUBCASE("kv heads not dividing heads") {
    auto j = llama_config();
    j["num_key_value_heads"] = 3;
    bad(j, {"cfg/config.json", "num_key_value_heads 3 does not divide num_attention_heads 4"});
    j["num_key_value_heads"] = 8;
    bad(j, {"num_key_value_heads 8 does not divide"});
  }
  SUBCASE("zero and negative sizes") {
    for (const char* key : {"hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                            "num_key_value_heads", "max_position_embeddings", "head_dim"}) {
      CAPTURE(key);
      auto j = llama_config();
      j[key] = 0;
      bad(j, {"cfg/config.json", "must be positive"});
      j[key] = -4;
      bad(j, {"cfg/config.json", key, "out of range"});
    }
    auto g = gpt2_config();
    g["n_layer"] = 0;
    bad(g, {"cfg/config.json", "number of layers must be positive"});
    auto e = llama_config();
    e["rms_norm_eps"] = -1e-6;
    bad(e, {"cfg/config.json", "epsilon"});
    e = llama_config();
    e["rope_parameters"]["rope_theta"] = 0;
    bad(e, {"cfg/config.json", "rope_theta"});
  }
  SUBCASE("non-integer and mistyped fields") {
    auto j = llama_config();
    j["hidden_size"] = 256.5;
    bad(j, {"cfg/config.json", "'hidden_size'", "must be an integer"});
    j["hidden_size"] = "256";
    bad(j, {"cfg/config.json", "'hidden_size'", "must be an integer"});
    j = llama_config();
    j["num_hidden_layers"] = json::array({4});
    bad(j, {"'num_hidden_layers'", "must be an integer"});
    j = llama_config();
    j["rms_norm_eps"] = "small";
    bad(j, {"'rms_norm_eps'", "must be a number"});
    j = llama_config();
    j["hidden_size"] = 1ULL << 40;
    bad(j, {"'hidden_size'", "out of range"});
    j = llama_config();
    j["model_type"] = 7;
    bad(j, {"cfg/config.json", "'model_type'", "must be a string"});
    j = llama_config();
    j["hidden_act"] = json::array({"silu"});
    bad(j, {"cfg/config.json", "'hidden_act'", "must be a string"});
    auto g = gpt2_config();
    g["activation_function"] = 1;
    bad(g, {"cfg/config.json", "'activation_function'", "must be a string"});
  }
  SUBCASE("huge sizes do not overflow") {
    auto g = gpt2_config();
    g.erase("n_inner");
    g["n_embd"] = 2147483647;
    g["n_head"] = 1;
    try {
      (void)io::parse_model_config(g, "cfg/config.json");  // any outcome but UB (UBSan) or a foreign exception
    } catch (const ConfigError&) {}
    auto j = llama_config();
    j["num_attention_heads"] = 1 << 20;
    j["num_key_value_heads"] = 1 << 20;
    j["head_dim"] = 1 << 20;
    bad(j, {"cfg/config.json", "head_dim", "out of range"});
  }
  SUBCASE("missing required fields") {
    auto j = llama_config();
    j.erase("vocab_size");
    bad(j, {"cfg/config.json", "'vocab_size' is missing"});
    auto g = gpt2_config();
    g.erase("n_head");
    bad(g, {"'n_head' is missing"});
  }
  SUBCASE("unsupported variants") {
    auto j = llama_config();
    j["hidden_act"] = "gelu";
    bad(j, {"hidden_act 'gelu'"});
    j = llama_config();
    j["rope_parameters"]["rope_type"] = "yarn";
    bad(j, {"'yarn'", "not supported"});
    auto g = gpt2_config();
    g["activation_function"] = "relu";
    bad(g, {"'relu'"});
  }
}

TEST_CASE("sharded model (model.safetensors.index.json) loads identically to the single file") {
  TempDir tmp;
  for (const char* name : {"tiny-llama3", "tiny-gpt2", "tiny-qwen3"}) {
    CAPTURE(name);
    const auto d = tmp / (std::string("sharded-") + name);
    fs::create_directories(d);
    fs::copy_file(test::model_dir(name) / "config.json", d / "config.json");
    io::SafetensorsFile f(test::model_dir(name) / "model.safetensors");
    std::map<std::string, io::TensorData> shards[3];
    json weight_map = json::object();
    std::size_t i = 0;
    for (const auto& n : f.names()) {
      const auto s = i++ % 3;
      shards[s][n] = io::copy_tensor(f, n);
      weight_map[n] = "model-0000" + std::to_string(s + 1) + "-of-00003.safetensors";
    }
    for (std::size_t s = 0; s < 3; ++s)
      io::write_safetensors(d / ("model-0000" + std::to_string(s + 1) + "-of-00003.safetensors"), shards[s]);
    write_text(d / "model.safetensors.index.json", json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump(1));

    const auto single = model::load_model(test::model_dir(name));
    const auto sharded = model::load_model(d);
    CHECK(same_weights(single.weights, sharded.weights));
    CHECK(model::parameter_count(sharded.weights) == model::parameter_count(single.weights));
    CHECK(sharded.stored_dtype == single.stored_dtype);
  }

  SUBCASE("bad shard sets") {
    const auto d = tmp / "badshards";
    write_model_dir(d, "tiny-llama3");
    io::SafetensorsFile f(d / "model.safetensors");
    auto all = copy_all(f);
    fs::remove(d / "model.safetensors");
    // A shard named in the index is absent.
    write_text(d / "model.safetensors.index.json", json{{"weight_map", {{"model.norm.weight", "gone.safetensors"}}}}.dump());
    expect_error<IoError>([&] { (void)model::load_model(d); }, {"gone.safetensors", "cannot open"});
    // The index is not JSON / lacks weight_map / has a path in it.
    write_text(d / "model.safetensors.index.json", "{");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"model.safetensors.index.json", "weight_map"});
    write_text(d / "model.safetensors.index.json", R"({"weight_map": [1]})");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"model.safetensors.index.json", "weight_map"});
    write_text(d / "model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"model.safetensors.index.json", "weight_map['a']"});
    write_text(d / "model.safetensors.index.json", R"({"weight_map": {"a": "../x.safetensors"}})");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"model.safetensors.index.json", "plain file name"});
    // The same tensor in two shards.
    io::write_safetensors(d / "s1.safetensors", all);
    std::map<std::string, io::TensorData> dup;
    dup["model.norm.weight"] = all.at("model.norm.weight");
    io::write_safetensors(d / "s2.safetensors", dup);
    write_text(d / "model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "model.norm.weight": "s2.safetensors"}})");
    expect_error<FormatError>([&] { (void)model::load_model(d); }, {"s2.safetensors", "'model.norm.weight'", "another shard"});
    // A tensor missing from every shard.
    all.erase("model.embed_tokens.weight");
    io::write_safetensors(d / "s1.safetensors", all);
    write_text(d / "model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors"}})");
    expect_error<TensorError>([&] { (void)model::load_model(d); }, {"s1.safetensors", "missing tensor 'model.embed_tokens.weight'"});
  }
}

// =============================================================================================
// fuzzing

namespace {

json random_json_value(std::mt19937_64& rng) {
  switch (rng() % 28) {
    case 26: return 2147483647;
    case 27: return 1 << 30;
    case 0: return -1;
    case 1: return 0;
    case 2: return 1;
    case 3: return 2;
    case 4: return std::int64_t{1} << 31;
    case 5: return std::int64_t{1} << 53;
    case 6: return std::uint64_t{1} << 63;
    case 7: return ~std::uint64_t{0};
    case 8: return 1e300;
    case 9: return -0.5;
    case 10: return 3.5;
    case 11: return "x";
    case 12: return "F32";
    case 13: return "BF16";
    case 14: return "I64";
    case 15: return "BOOL";
    case 16: return nullptr;
    case 17: return true;
    case 18: return json::array();
    case 19: return json::array({1});
    case 20: return json::array({1, 2, 3});
    case 21: return json::array({-1, 2});
    case 22: return json::object();
    case 23: return json::array({json::array({1})});
    case 24: return json::array({std::uint64_t{1} << 40, std::uint64_t{1} << 40});
    default: return static_cast<std::int64_t>(rng() % 4096) - 64;
  }
}

void set_length_prefix(std::vector<std::byte>& img, std::uint64_t n) {
  for (int i = 0; i < 8 && static_cast<std::size_t>(i) < img.size(); ++i)
    img[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
}

std::uint64_t length_prefix(const std::vector<std::byte>& img) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(img[static_cast<std::size_t>(i)]);
  return n;
}

/// One seeded mutation of a valid image.
void mutate(std::vector<std::byte>& img, std::mt19937_64& rng) {
  const std::uint64_t hlen = std::min<std::uint64_t>(length_prefix(img), img.size() - 8);
  auto pick = [&](std::size_t lo, std::size_t hi) { return hi <= lo ? lo : lo + static_cast<std::size_t>(rng() % (hi - lo)); };
  static constexpr std::string_view kTokens = "{}[]\",:0123456789-+.eE \\u0ntf";
  switch (rng() % 11) {
    case 9:
    case 10:  // flip data bytes only: the header stays valid, to_float sees arbitrary bit patterns
      if (img.size() > 8 + hlen)
        for (int k = 0, n = 1 + static_cast<int>(rng() % 16); k < n; ++k)
          img[pick(8 + hlen, img.size())] = static_cast<std::byte>(rng() & 0xffu);
      break;
    case 0:  // flip bits in the header
      for (int k = 0, n = 1 + static_cast<int>(rng() % 8); k < n; ++k) img[pick(8, 8 + hlen)] ^= static_cast<std::byte>(1u << (rng() % 8));
      break;
    case 1:  // replace header bytes with JSON-ish tokens
      for (int k = 0, n = 1 + static_cast<int>(rng() % 4); k < n; ++k)
        img[pick(8, 8 + hlen)] = static_cast<std::byte>(kTokens[rng() % kTokens.size()]);
      break;
    case 2: {  // lie in the length prefix
      const std::uint64_t choices[] = {
          0,     1,           2, 7, hlen - 1, hlen + 1, hlen + 8, img.size() - 8, img.size() - 7, std::uint64_t{1} << 63, ~std::uint64_t{0},
          rng(), rng() % 1024};
      set_length_prefix(img, choices[rng() % std::size(choices)]);
      break;
    }
    case 3:  // truncate
      img.resize(pick(0, img.size()));
      break;
    case 4:  // random bytes anywhere
      for (int k = 0, n = 1 + static_cast<int>(rng() % 16); k < n; ++k) img[pick(0, img.size())] = static_cast<std::byte>(rng() & 0xffu);
      break;
    case 5:    // structured: replace one field of one entry with an arbitrary JSON value
    case 6: {  // structured: plausible-but-wrong offsets
      const auto* hp = reinterpret_cast<const char*>(img.data() + 8);
      auto hdr = json::parse(hp, hp + hlen, nullptr, false);
      if (hdr.is_discarded() || !hdr.is_object() || hdr.empty()) break;
      auto it = hdr.begin();
      std::advance(it, static_cast<long>(rng() % hdr.size()));
      const std::size_t data = img.size() - 8 - hlen;
      if (it.value().is_object() && !it.value().empty() && it.key() != "__metadata__") {
        if (rng() % 2) {
          it.value()["data_offsets"] = json::array({rng() % (data + 16), rng() % (data + 16)});
        } else {
          static const char* fields[] = {"dtype", "shape", "data_offsets"};
          auto& field = it.value()[fields[rng() % 3]];
          if (field.is_array() && !field.empty() && rng() % 2) field[rng() % field.size()] = random_json_value(rng);
          else field = random_json_value(rng);
        }
      } else {
        it.value() = random_json_value(rng);
      }
      if (rng() % 4 == 0) hdr[std::string(1, static_cast<char>('a' + rng() % 26))] = random_json_value(rng);
      const std::string h = hdr.dump();
      std::vector<std::byte> out(8 + h.size() + data);
      set_length_prefix(out, h.size());
      std::memcpy(out.data() + 8, h.data(), h.size());
      if (data) std::memcpy(out.data() + 8 + h.size(), img.data() + 8 + hlen, data);
      img = std::move(out);
      break;
    }
    case 7: {  // delete a range of header bytes (length prefix now lies)
      const auto a = pick(8, 8 + hlen);
      const auto b = std::min<std::size_t>(a + 1 + rng() % 8, img.size());
      img.erase(img.begin() + static_cast<long>(a), img.begin() + static_cast<long>(b));
      break;
    }
    default: {  // duplicate a header range
      const auto a = pick(8, 8 + hlen);
      const auto b = std::min<std::size_t>(a + 1 + rng() % 16, img.size());
      std::vector<std::byte> piece(img.begin() + static_cast<long>(a), img.begin() + static_cast<long>(b));
      img.insert(img.begin() + static_cast<long>(pick(8, 8 + hlen)), piece.begin(), piece.end());
      if (rng() % 2) set_length_prefix(img, hlen + piece.size());
      break;
    }
  }
}

/// Exercises everything a reader would touch. Returns true when the image was accepted.
bool exercise(const io::SafetensorsFile& f) {
  for (const auto& n : f.names()) {
    const auto& ti = f.info(n);
    const auto raw = f.raw(n);
    if (raw.size() != static_cast<std::size_t>(ti.numel()) * dtype_size(ti.dtype)) FAIL_CHECK("raw size mismatch for " << n);
    try {
      auto v = f.to_float(n);
      if (v.size() != static_cast<std::size_t>(ti.numel())) FAIL_CHECK("to_float size mismatch for " << n);
    } catch (const TensorError&) {}
    try {
      (void)f.to_int64(n);
    } catch (const TensorError&) {}
  }
  return true;
}

}  // namespace

TEST_CASE("fuzz: mutated safetensors images raise only cacheshrink::Error") {
  const auto base = small_image();
  constexpr int kCases = 20000;
  int accepted = 0, rejected = 0;
  for (int i = 0; i < kCases; ++i) {
    std::mt19937_64 rng(0x5eed0000ULL + static_cast<std::uint64_t>(i));
    auto img = base;
    for (int k = 0, n = 1 + static_cast<int>(rng() % 3); k < n && img.size() >= 8; ++k) mutate(img, rng);
    // Exact-capacity copy so ASan sees any read past the end.
    std::vector<std::byte> exact(img.begin(), img.end());
    try {
      io::SafetensorsFile f(std::move(exact), "fuzz.safetensors");
      exercise(f);
      ++accepted;
    } catch (const Error& e) {
      ++rejected;
      const std::string what = e.what();
      if (what.find("fuzz.safetensors") == std::string::npos) FAIL_CHECK("case " << i << ": message lacks the label: " << what);
    } catch (const std::exception& e) {
      FAIL_CHECK("case " << i << ": non-cacheshrink exception escaped: " << std::string(e.what()));
    } catch (...) {
      FAIL_CHECK("case " << i << ": unknown exception escaped");
    }
  }
  MESSAGE("safetensors fuzz: " << accepted << " accepted, " << rejected << " rejected of " << kCases);
  CHECK(accepted > kCases / 20);  // the mutations are not all trivially fatal
  CHECK(rejected > kCases / 2);
}

TEST_CASE("fuzz: mutated images read from files (mmap path)") {
  TempDir tmp;
  const auto base = small_image();
  const auto p = tmp / "fuzz_file.safetensors";
  for (int i = 0; i < 300; ++i) {
    std::mt19937_64 rng(0xf11e0000ULL + static_cast<std::uint64_t>(i));
    auto img = base;
    mutate(img, rng);
    write_bytes(p, img);
    try {
      io::SafetensorsFile f(p);
      exercise(f);
    } catch (const Error& e) {
      if (std::string(e.what()).find("fuzz_file.safetensors") == std::string::npos)
        FAIL_CHECK("case " << i << ": " << std::string(e.what()));
    } catch (const std::exception& e) {
      FAIL_CHECK("case " << i << ": non-cacheshrink exception escaped: " << std::string(e.what()));
    }
  }
}

TEST_CASE("fuzz: mutated config.json values raise only cacheshrink::Error") {
  std::vector<json> bases;
  for (const char* name : test::kModels) bases.push_back(json::parse(io::read_text_file(test::model_dir(name) / "config.json")));
  static const char* keys[] = {"model_type",
                               "n_embd",
                               "n_head",
                               "n_layer",
                               "n_inner",
                               "n_positions",
                               "vocab_size",
                               "hidden_size",
                               "num_attention_heads",
                               "num_key_value_heads",
                               "num_hidden_layers",
                               "intermediate_size",
                               "head_dim",
                               "max_position_embeddings",
                               "rms_norm_eps",
                               "layer_norm_epsilon",
                               "rope_theta",
                               "rope_scaling",
                               "rope_parameters",
                               "sliding_window",
                               "use_sliding_window",
                               "attention_bias",
                               "mlp_bias",
                               "tie_word_embeddings",
                               "hidden_act",
                               "activation_function",
                               "bos_token_id",
                               "eos_token_id",
                               "kv_lora_rank",
                               "scale_attn_by_inverse_layer_idx",
                               "reorder_and_upcast_attn"};
  static const char* rope_keys[] = {
      "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_theta"};
  static const char* model_types[] = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "bert", "deepseek_v3", ""};
  static const char* strings[] = {"silu", "swish", "gelu_new", "gelu", "llama3", "linear", "yarn", "default"};
  constexpr int kCases = 20000;
  int accepted = 0;
  for (int i = 0; i < kCases; ++i) {
    std::mt19937_64 rng(0xc0f1600ULL + static_cast<std::uint64_t>(i));
    json j = bases[rng() % bases.size()];
    for (int k = 0, n = 1 + static_cast<int>(rng() % 3); k < n; ++k) {
      const std::string key = keys[rng() % std::size(keys)];
      switch (rng() % 8) {
        case 0: j.erase(key); break;
        case 1: j[key] = model_types[rng() % std::size(model_types)]; break;
        case 2: j[key] = strings[rng() % std::size(strings)]; break;
        case 3: {  // nested rope object
          json r = json::object();
          for (int m = 0, c = static_cast<int>(rng() % 4); m < c; ++m) {
            const std::string rk = rope_keys[rng() % std::size(rope_keys)];
            r[rk] = rng() % 2 ? random_json_value(rng) : json(strings[rng() % std::size(strings)]);
          }
          j[rng() % 2 ? "rope_scaling" : "rope_parameters"] = r;
          break;
        }
        case 4: j["model_type"] = model_types[rng() % std::size(model_types)]; break;
        default: j[key] = random_json_value(rng); break;
      }
    }
    if (rng() % 200 == 0) j = random_json_value(rng);
    try {
      const auto c = io::parse_model_config(j, "fuzz/config.json");
      ++accepted;
      if (!(c.hidden_size > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 && c.n_layers > 0 && c.vocab_size > 0 &&
            c.intermediate_size > 0 && c.n_heads % c.n_kv_heads == 0 &&
            static_cast<long long>(c.n_heads) * c.head_dim <= std::numeric_limits<int>::max()))
        FAIL_CHECK("case " << i << ": accepted an inconsistent config: " << j.dump());
    } catch (const Error& e) {
      if (std::string(e.what()).find("fuzz/config.json") == std::string::npos) FAIL_CHECK("case " << i << ": " << std::string(e.what()));
    } catch (const std::exception& e) {
      FAIL_CHECK("case " << i << ": non-cacheshrink exception escaped: " << std::string(e.what()) << "\n  config: " << j.dump());
    }
  }
  MESSAGE("config fuzz: " << accepted << " of " << kCases << " accepted");
  CHECK(accepted > kCases / 20);
}

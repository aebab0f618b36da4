// Quantized latent cache (issue 9): FP8 E4M3 conversion against a float64 reference, the
// int8/fp8 per-token row quantizers' error bounds, the cache byte layout and byte counts, and
// the runtime with a quantized cache on every fixture (close to the float cache, absorbed ==
// decompressing path, prefill/decode split invariance, generate with cache == recompute).
#include <doctest/doctest.h>

#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/core/fp8.hpp>
#include <cacheshrink/io/file.hpp>
#include <cacheshrink/model/generate.hpp>
#include <cacheshrink/model/kv_quant.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "test_support.hpp"

using namespace cacheshrink;
using model::CacheDtype;

namespace {

// E4M3 decoded straight from the bit fields in float64 (independent of the library's table).
double e4m3_ref(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}

// Brute-force float -> E4M3: nearest finite magnitude among the 127 codes 0x00..0x7E, ties to
// the even code, |x| >= 448 saturates; the sign bit is copied.
int e4m3_encode_ref(float x) {
  const int sign = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return sign | 0x7F;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7E;
  int best = 0;
  double bd = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= 0x7E; ++c) {
    const double d = std::fabs(e4m3_ref(c) - a);
    if (d < bd || (d == bd && (c & 1) == 0)) {
      bd = d;
      best = c;
    }
  }
  return sign | best;
}

struct Fixture {
  std::vector<std::vector<int>> calib;
  std::vector<int> ids;
};
const Fixture& fixture() {
  static const Fixture f = [] {
    auto tok = tokenizer::Tokenizer::from_file(test::fixtures() / "data" / "tokenizer.json");
    Fixture r;
    r.calib = compression::encode_calibration(
        tok, compression::paragraphs(io::read_text_file(test::fixtures() / "data" / "wikitext2_valid.txt"), 8), 128);
    r.ids = io::read_ids_u16(test::fixtures() / "data" / "wikitext2_test.ids.u16");
    return r;
  }();
  return f;
}

// The anchor's ratio per fixture (tests/fixtures/anchor/cacheshrink-0.1.5-tiny.json, method auto).
double anchor_ratio(const std::string& name) { return (name == "tiny-gpt2" || name == "tiny-llama2") ? 4.0 : 2.0; }

double rel(const MatrixRf& a, const MatrixRf& b) { return static_cast<double>((a - b).norm() / b.norm()); }

}  // namespace

TEST_CASE("fp8 e4m3: all 256 codes decode to the float64 reference") {
  for (int c = 0; c < 256; ++c) {
    const double ref = e4m3_ref(c);
    const float got = fp8_e4m3_to_float(static_cast<std::uint8_t>(c));
    INFO("code ", c);
    if (std::isnan(ref)) {
      CHECK(std::isnan(got));
      continue;
    }
    CHECK(static_cast<double>(got) == ref);
    CHECK(std::signbit(got) == ((c & 0x80) != 0));
    CHECK(float_to_fp8_e4m3(got) == c);  // every finite code round-trips, -0 included
  }
  CHECK(fp8_e4m3_to_float(0x7E) == 448.0f);
  CHECK(fp8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(fp8_e4m3_to_float(0x08) == std::ldexp(1.0f, -6));
}

TEST_CASE("fp8 e4m3: rounding to nearest even with saturation matches a brute-force reference") {
  std::vector<float> xs;
  // Every midpoint between adjacent magnitudes (exact ties) and its float neighbours.
  for (int c = 0; c < 0x7E; ++c) {
    const float mid = static_cast<float>((e4m3_ref(c) + e4m3_ref(c + 1)) / 2);
    REQUIRE(static_cast<double>(mid) == (e4m3_ref(c) + e4m3_ref(c + 1)) / 2);
    for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) {
      xs.push_back(x);
      xs.push_back(-x);
    }
  }
  for (float x : {448.0f, 449.0f, 464.0f, 480.0f, 1e30f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), 0.0f, -0.0f, std::ldexp(1.0f, -10), std::ldexp(1.0f, -11)}) {
    xs.push_back(x);
    xs.push_back(-x);
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> ex(-14, 10);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  for (int i = 0; i < 200000; ++i) xs.push_back((rng() & 1 ? -1.0f : 1.0f) * std::ldexp(mant(rng), ex(rng)));
  std::normal_distribution<float> nd(0.0f, 100.0f);
  for (int i = 0; i < 50000; ++i) xs.push_back(nd(rng));
  int bad = 0;
  for (float x : xs) {
    const int want = e4m3_encode_ref(x), got = float_to_fp8_e4m3(x);
    if (want != got && ++bad <= 5) FAIL_CHECK("x = " << x << ": got code " << got << ", reference " << want);
  }
  CHECK(bad == 0);
  CHECK((float_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7F) == 0x7F);

  // Relative error <= 2^-4 (half a unit in the last of 3 mantissa bits) in the normal range.
  double worst = 0;
  for (float x : xs) {
    const float a = std::fabs(x);
    if (a < std::ldexp(1.0f, -6) || a > 448.0f) continue;
    worst = std::max(worst, std::fabs(static_cast<double>(fp8_e4m3_to_float(float_to_fp8_e4m3(x))) - x) / a);
  }
  INFO("worst relative error in the normal range ", worst);
  CHECK(worst <= std::ldexp(1.0, -4));
}

TEST_CASE("row quantizers: int8 |x - q(x)| <= scale/2, fp8 relative error <= 2^-4 in the normal range") {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> mag(-30.0f, 30.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    const int w = 1 + static_cast<int>(rng() % 130);
    const float spread = std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
    std::vector<float> x(static_cast<std::size_t>(w));
    for (auto& v : x) v = nd(rng) * spread;
    if (trial % 3 == 0) x[rng() % x.size()] = mag(rng) * spread * 10;  // an outlier
    const float amax = *std::max_element(x.begin(), x.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); });
    std::vector<std::uint8_t> codes(x.size());
    std::vector<float> back(x.size());

    // int8
    float s = model::quantize_row(x.data(), w, CacheDtype::Int8, codes.data());
    CHECK(s == std::fabs(amax) / 127.0f);
    model::dequantize_row(codes.data(), s, w, CacheDtype::Int8, back.data());
    bool ok = true, hit_max = false;
    for (int i = 0; i < w; ++i) {
      const int c = static_cast<std::int8_t>(codes[i]);
      ok = ok && c >= -127 && c <= 127;
      hit_max = hit_max || std::abs(c) == 127;
      // Bound scale/2, plus the float32 rounding of x/scale and of code*scale (<= 2^-23 |x| each).
      ok = ok && std::fabs(static_cast<double>(back[i]) - x[i]) <= s / 2.0 + std::ldexp(std::fabs(static_cast<double>(x[i])), -22);
    }
    CHECK(ok);
    CHECK(hit_max);

    // fp8 (scaled so that amax maps to 448)
    s = model::quantize_row(x.data(), w, CacheDtype::Fp8E4M3, codes.data());
    CHECK(s == std::fabs(amax) / 448.0f);
    model::dequantize_row(codes.data(), s, w, CacheDtype::Fp8E4M3, back.data());
    ok = true;
    for (int i = 0; i < w; ++i) {
      const double a = std::fabs(static_cast<double>(x[i])), err = std::fabs(static_cast<double>(back[i]) - x[i]);
      const double y = a / s;  // position on the E4M3 grid
      // normal range: half an ulp = 2^-4 relative; subnormals: half of 2^-9 absolute, times scale.
      const double bound = y >= std::ldexp(1.0, -6) ? std::ldexp(a, -4) : std::ldexp(static_cast<double>(s), -10);
      ok = ok && err <= bound * (1 + 1e-6) + std::ldexp(a, -22);
    }
    CHECK(ok);
  }
  // A zero row stores scale 0 and zero codes; a non-finite row propagates NaN.
  std::vector<float> z(8, 0.0f);
  std::vector<std::uint8_t> codes(8, 0xAB);
  CHECK(model::quantize_row(z.data(), 8, CacheDtype::Int8, codes.data()) == 0.0f);
  CHECK(std::all_of(codes.begin(), codes.end(), [](std::uint8_t c) { return c == 0; }));
  z[3] = std::numeric_limits<float>::infinity();
  CHECK(std::isnan(model::quantize_row(z.data(), 8, CacheDtype::Fp8E4M3, codes.data())));
}

TEST_CASE("KvCache: documented layout (codes row-major per token, one scale per token per K/V) and bytes == formula") {
  const std::vector<int> kw{5, 7}, vw{5, 0};
  for (CacheDtype dt : {CacheDtype::Int8, CacheDtype::Fp8E4M3}) {
    model::KvCache c(kw, vw, 2, dt);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.0f, 2.0f);
    MatrixRf rows(40, 7);
    for (Eigen::Index i = 0; i < rows.size(); ++i) rows.data()[i] = nd(rng);
    // layer 1, sequence 1: 25 tokens in two writes (the second grows the storage).
    c.write_k(1, 1, 0, rows.topRows(10));
    c.write_k(1, 1, 10, rows.middleRows(10, 15));
    const auto& q = c.qk[1][1];
    const float cmax = dt == CacheDtype::Int8 ? 127.0f : 448.0f;
    for (int t = 0; t < 25; ++t) {
      const float amax = rows.row(t).cwiseAbs().maxCoeff();
      REQUIRE(q.scale[static_cast<std::size_t>(t)] == amax / cmax);
      for (int i = 0; i < 7; ++i) {
        const float y = rows(t, i) / q.scale[static_cast<std::size_t>(t)];
        const std::uint8_t want =
            dt == CacheDtype::Int8 ? static_cast<std::uint8_t>(static_cast<std::int8_t>(std::nearbyint(y))) : static_cast<std::uint8_t>(e4m3_encode_ref(y));
        INFO("token ", t, " element ", i);
        CHECK(q.codes[static_cast<std::size_t>(t * 7 + i)] == want);
      }
    }
    const MatrixRf& back = c.read_k(1, 1, 25);
    REQUIRE(back.rows() == 25);
    for (int t = 0; t < 25; ++t)
      for (int i = 0; i < 7; ++i) {
        const std::uint8_t code = q.codes[static_cast<std::size_t>(t * 7 + i)];
        const double dec = dt == CacheDtype::Int8 ? static_cast<std::int8_t>(code) : e4m3_ref(code);
        CHECK(static_cast<double>(back(t, i)) == static_cast<double>(static_cast<float>(dec) * q.scale[static_cast<std::size_t>(t)]));
      }
    // Bytes: per token, layer 0 (5 + 4) + (5 + 4), layer 1 (7 + 4) and no V row.
    CHECK(c.bytes_per_token() == static_cast<std::size_t>((5 + 4) + (5 + 4) + (7 + 4)));
    c.length = {3, 25};
    CHECK(c.bytes_used() == static_cast<std::size_t>(28 * 29));
  }
  model::KvCache f(kw, vw, 1);
  CHECK(f.bytes_per_token() == static_cast<std::size_t>(4 * (5 + 5 + 7)));
  CHECK(model::parse_cache_dtype("int8") == CacheDtype::Int8);
  CHECK(model::parse_cache_dtype("fp8") == CacheDtype::Fp8E4M3);
  CHECK(model::parse_cache_dtype("f32") == CacheDtype::F32);
  CHECK_THROWS_AS(model::parse_cache_dtype("int4"), InvalidArgument);
}

TEST_CASE("quantized latent cache on every fixture (auto method at the anchor ratio)") {
  const auto& fx = fixture();
  for (const char* name : test::kModels) {
    SUBCASE(name) {
      auto m = model::load_model(test::model_dir(name));
      compression::ConvertOptions o;
      o.compression_ratio = anchor_ratio(name);
      auto mm = compression::convert(m, o, fx.calib);
      int d_latent = 0;
      for (const auto& lw : mm.weights.layers) {
        REQUIRE(lw.mla);  // auto at these ratios compresses every layer
        d_latent = lw.mla->d_latent;
      }
      REQUIRE(d_latent > 0);
      const int L = mm.config.n_layers, dkv = mm.config.d_kv();
      dispatch_attention_kind(mm.config, [&](auto kind) {
        using Tf = model::Transformer<decltype(kind)>;
        for (CacheDtype dt : {CacheDtype::Int8, CacheDtype::Fp8E4M3}) {
          INFO("dtype ", model::cache_dtype_name(dt));
          // Bytes: d_latent codes + a 4-byte scale, for K and for V, per layer per token.
          Tf probe(mm);
          probe.set_cache_dtype(dt);
          auto pc = probe.make_cache(1);
          const std::size_t want = static_cast<std::size_t>(L) * 2 * (static_cast<std::size_t>(d_latent) + 4);
          CHECK(pc.bytes_per_token() == want);
          const auto rows = pipeline::cache_memory(mm, {1, 100}, dt);
          CHECK(rows[1].mla_bytes == 100 * want);
          CHECK(rows[1].standard_bytes == 100 * static_cast<std::size_t>(L) * 2 * (static_cast<std::size_t>(dkv) + 4));
          CHECK(pipeline::cache_memory(mm, {7}, CacheDtype::F32)[0].mla_bytes == 7 * static_cast<std::size_t>(L) * 2 * d_latent * 4);

          // Tolerance against the float cache, from the quantization bound: a cached row of
          // width w changes by ||x - x~|| <= eps ||x|| with eps = sqrt(w)/254 for int8
          // (each element by <= amax/254, amax <= ||x||) and eps = 2^-4 + sqrt(w) 2^-10/448 for
          // fp8 (normal elements 2^-4 relative, subnormal ones amax 2^-10/448 absolute). Attention
          // averages value rows (a convex combination) and the residual stream adds the
          // attention output to an unperturbed path, so a correct cache should not move the
          // logits by more than eps relative; a wrong scale, row or sign moves them by O(1).
          const double w = d_latent;
          const double eps = dt == CacheDtype::Int8 ? std::sqrt(w) / 254.0 : 1.0 / 16 + std::sqrt(w) / 1024.0 / 448.0;
          INFO("eps ", eps);
          std::vector<int> seq(fx.ids.begin() + 3000, fx.ids.begin() + 3000 + 170);
          std::vector<int> prefix(seq.begin(), seq.begin() + 150);
          Tf f32(mm), dec(mm), abs(mm);
          dec.set_cache_dtype(dt);
          abs.set_cache_dtype(dt);
          abs.set_absorbed(true);
          auto c0 = f32.make_cache(1), c1 = dec.make_cache(1), c2 = abs.make_cache(1);
          const MatrixRf a0 = f32.forward(prefix, &c0), a1 = dec.forward(prefix, &c1), a2 = abs.forward(prefix, &c2);
          REQUIRE(c1.quantized());
          CHECK(c1.bytes_used() == 150 * want);
          // Layer 0 sees the same input with and without quantization: its cached latents are
          // the float ones within the per-element bound.
          {
            const MatrixRf& qk0 = c1.read_k(0, 0, 150);
            const MatrixRf fk0 = c0.read_k(0, 0, 150).topRows(150);
            bool ok = true;
            for (int t = 0; t < 150; ++t) {
              const double s = c1.qk[0][0].scale[static_cast<std::size_t>(t)];
              for (int i = 0; i < d_latent; ++i) {
                const double x = fk0(t, i), e = std::fabs(static_cast<double>(qk0(t, i)) - x);
                ok = ok && (dt == CacheDtype::Int8 ? e <= s / 2 + std::ldexp(std::fabs(x), -22)
                                                   : e <= std::max(std::ldexp(std::fabs(x), -4), std::ldexp(s, -10)) * (1 + 1e-6));
              }
            }
            CHECK(ok);
          }
          // Prefill through each path on its own cache: the paths round differently (~1e-7),
          // which can move a latent across a rounding boundary of the quantizer (one code step
          // in one element), so prefills are compared at the quantization tolerance only.
          CHECK(rel(a2, a1) <= eps);
          double worst_f32 = rel(a1, a0), worst_abs = 0;
          const double moved = worst_f32;
          // Decode 20 tokens one at a time. Absorbed vs decompressing: each step starts from
          // the same quantized cache (a copy of the decompressing path's), as the issue asks.
          MatrixRf steps1(20, mm.config.vocab_size);
          for (int t = 150; t < 170; ++t) {
            const std::vector<int> one{seq[t]};
            c2 = c1;
            const MatrixRf x0 = f32.forward(one, &c0), x1 = dec.forward(one, &c1), x2 = abs.forward(one, &c2);
            worst_f32 = std::max(worst_f32, rel(x1, x0));
            worst_abs = std::max(worst_abs, rel(x2, x1));
            steps1.row(t - 150) = x1.row(0);
          }
          MESSAGE(std::string(name), " ", model::cache_dtype_name(dt), ": worst relative logit error vs float cache ", worst_f32, " (eps ", eps,
                  "); absorbed vs decompressing ", worst_abs);
          CHECK(worst_f32 <= eps);
          CHECK(moved > 1e-6);  // the cache really is read quantized
          CHECK(worst_abs <= 1e-4);

          // Split invariance: every token's rows are quantized on their own and attention reads
          // them back from the cache, the chunk's own rows included, so one forward over a
          // sequence equals prefill + one-token decode steps. On 12 tokens (few elements, so
          // no rounding-boundary flip between the GEMM and GEMV roundings) at 1e-4; had the
          // chunk's own rows been used unquantized, the difference would be the size of the
          // quantization effect itself. Over all 170 tokens a few flips may occur; each moves
          // one element by at most one code step, far below the whole quantization error, so
          // there eps / 8.
          {
            std::vector<int> s12(seq.begin(), seq.begin() + 12);
            auto cs = dec.make_cache(1);
            MatrixRf split(12, mm.config.vocab_size);
            split.topRows(4) = dec.forward(std::vector<int>(s12.begin(), s12.begin() + 4), &cs);
            for (int t = 4; t < 12; ++t) split.row(t) = dec.forward(std::vector<int>{s12[t]}, &cs).row(0);
            CHECK(rel(dec.forward(s12), split) <= 1e-4);
          }
          const MatrixRf whole = dec.forward(seq);
          CHECK(rel(whole.topRows(150), a1) <= eps / 8);
          CHECK(rel(whole.bottomRows(20), steps1) <= eps / 8);

          // generate with the quantized cache == recomputation with a quantized local cache.
          model::SamplingOptions so;
          so.max_new_tokens = 12;
          so.use_cache = true;
          const auto g1 = model::generate(abs, prefix, so);
          so.use_cache = false;
          const auto g2 = model::generate(dec, prefix, so);
          CHECK(g1 == g2);
        }
        return 0;
      });
    }
  }
}

// SVG line charts (pipeline/svg_plot.hpp) and the conversion energy plot (pipeline/energy_plot.hpp):
// tick placement, escaping, log axes, bad input, atomic writes, and that the per-layer spectra in
// the conversion report agree with the reported energies.
// Designated initializers leave members at their defaults on purpose.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <doctest/doctest.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/pipeline/energy_plot.hpp>
#include <cacheshrink/pipeline/svg_plot.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "test_support.hpp"

using namespace cacheshrink;
namespace svg = cacheshrink::pipeline::svg;

namespace {
std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (auto p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}
}  // namespace

TEST_CASE("linear ticks are 1-2-5 multiples covering the range") {
  auto t = svg::detail::linear_ticks(0.0, 100.0);
  REQUIRE(t.size() >= 4);
  CHECK(t.front() == doctest::Approx(0.0));
  CHECK(t.back() == doctest::Approx(100.0));
  for (std::size_t i = 1; i < t.size(); ++i) CHECK(t[i] - t[i - 1] == doctest::Approx(t[1] - t[0]));
  auto u = svg::detail::linear_ticks(0.013, 0.047);
  for (double v : u) CHECK((v >= 0.013 - 1e-12 && v <= 0.047 + 1e-12));
  CHECK(u.size() >= 3);
}

TEST_CASE("log ticks are decades, with 2 and 5 on short ranges") {
  auto t = svg::detail::log_ticks(1e-3, 1e3);
  CHECK(t.size() == 7);
  auto s = svg::detail::log_ticks(0.9, 60);
  CHECK(s == std::vector<double>{1, 2, 5, 10, 20, 50});
}

TEST_CASE("a chart renders one path per series, a legend entry per series, and escapes text") {
  svg::LineChart c({.title = "a < b & \"c\"", .x_label = "step", .y_label = "loss"});
  c.add({.name = "train", .x = {1, 2, 3}, .y = {3, 2, 1}});
  c.add({.name = "eval", .x = {1, 3}, .y = {3.5, 1.5}, .dashed = true});
  const auto doc = c.render();
  CHECK(doc.starts_with("<?xml"));
  CHECK(doc.ends_with("</svg>\n"));
  CHECK(count(doc, "<path ") == 2);
  CHECK(doc.find("a &lt; b &amp; &quot;c&quot;") != std::string::npos);
  CHECK(doc.find(">train</text>") != std::string::npos);
  CHECK(doc.find(">eval</text>") != std::string::npos);
  CHECK(count(doc, "stroke-dasharray=\"6,3\"") == 2);  // the dashed line and its legend entry
}

TEST_CASE("log axis skips non-positive and non-finite points, breaking the line") {
  svg::LineChart c({.log_y = true});
  c.add({.name = "s", .x = {1, 2, 3, 4, 5}, .y = {10, 0, 1, std::nan(""), 0.1}});
  const auto doc = c.render();
  // Three drawable points in three separate segments: three moves, no line-to.
  const auto p = doc.find("<path d=\"");
  REQUIRE(p != std::string::npos);
  const auto d = doc.substr(p, doc.find('"', p + 9) - p);
  CHECK(count(d, "M") == 3);
  CHECK(count(d, "L") == 0);
}

TEST_CASE("bad input throws") {
  svg::LineChart c;
  CHECK_THROWS_AS(c.add({.name = "bad", .x = {1, 2}, .y = {1}}), InvalidArgument);
  CHECK_THROWS_AS(c.render(), InvalidArgument);  // no drawable point
  svg::LineChart l({.log_y = true});
  l.add({.name = "neg", .x = {1, 2}, .y = {-1, -2}});
  CHECK_THROWS_AS(l.render(), InvalidArgument);
  CHECK_THROWS_AS(svg::render_panels({}), InvalidArgument);
}

TEST_CASE("write_svg is atomic: a missing directory throws and leaves nothing") {
  const auto dir = std::filesystem::temp_directory_path() / ("cacheshrink_svg_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  CHECK_THROWS_AS(svg::write_svg(dir / "x.svg", "<svg/>"), IoError);
  CHECK(!std::filesystem::exists(dir));
  std::filesystem::create_directory(dir);
  svg::LineChart c;
  c.add({.name = "s", .x = {0, 1}, .y = {0, 1}});
  svg::write_svg(dir / "x.svg", svg::render_panels({c, c}, 2));
  std::ifstream in(dir / "x.svg");
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(count(ss.str(), "<path ") == 2);
  CHECK(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator{}) == 1);  // no temp file left
  std::filesystem::remove_all(dir);
}

TEST_CASE("conversion spectra: cumulative energy at d_latent equals the reported energy") {
  auto m = model::load_model(test::model_dir("tiny-llama3"));
  auto tok = tokenizer::Tokenizer::from_directory(test::model_dir("tiny-llama3"));
  auto calib = compression::encode_calibration(
      tok, compression::paragraphs(io::read_text_file(test::fixtures() / "data" / "wikitext2_valid.txt"), 8), 64);
  for (const char* method : {"separate", "xkv", "joint"}) {
    CAPTURE(method);
    compression::ConvertOptions o;
    o.method = method;
    o.compression_ratio = 2.0;
    compression::ConversionReport rep;
    compression::convert(m, o, calib, &rep);
    for (const auto& l : rep.layers) {
      const int d = std::string(method) == "joint" ? 2 * rep.d_kv : rep.d_kv;
      REQUIRE(static_cast<int>(l.spectrum_k.size()) == d);
      REQUIRE(static_cast<int>(l.spectrum_v.size()) == d);
      const auto ck = pipeline::cumulative_energy_percent(l.spectrum_k), cv = pipeline::cumulative_energy_percent(l.spectrum_v);
      CHECK(ck[rep.d_latent - 1] == doctest::Approx(100 * l.energy_k).epsilon(1e-9));
      CHECK(cv[rep.d_latent - 1] == doctest::Approx(100 * l.energy_v).epsilon(1e-9));
      CHECK(ck.back() == doctest::Approx(100.0));
      for (std::size_t i = 1; i < ck.size(); ++i) CHECK(ck[i] >= ck[i - 1] - 1e-9);  // energies are >= 0
    }
    const auto charts = pipeline::energy_charts(rep, "tiny-llama3");
    CHECK(charts.size() == (std::string(method) == "joint" ? 1u : 2u));
    for (const auto& c : charts) CHECK(c.series().size() == rep.layers.size());
  }
}

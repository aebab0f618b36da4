// SVG line charts (pipeline/svg_plot.hpp), the conversion energy plot (pipeline/energy_plot.hpp) and
// the training loss curves (pipeline/loss_plot.hpp):
// tick placement, escaping, log axes, bad input, atomic writes, and that the per-layer spectra in
// the conversion report agree with the reported energies.
// Designated initializers leave members at their defaults on purpose.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <doctest/doctest.h>

#include <cacheshrink/cacheshrink.hpp>
#include <cacheshrink/compression/calibration.hpp>
#include <cacheshrink/pipeline/energy_plot.hpp>
#include <cacheshrink/pipeline/loss_plot.hpp>
#include <cacheshrink/pipeline/svg_plot.hpp>
#include <cacheshrink/train/trainer.hpp>
#include <filesystem>
#include <fstream>
#include <cstdio>
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

// ---- training loss curves (pipeline/loss_plot.hpp) ----
namespace {
nlohmann::json stats_json(const std::vector<double>& loss, const std::vector<double>& recon, const std::vector<double>& kl,
                          const std::vector<double>& grad) {
  nlohmann::json steps = nlohmann::json::array();
  for (std::size_t i = 0; i < loss.size(); ++i)
    steps.push_back({{"step", i + 1},
                     {"epoch", 0},
                     {"loss", loss[i]},
                     {"lm_loss", loss[i]},
                     {"recon_loss", recon[i]},
                     {"kl_loss", kl[i]},
                     {"lr_euclidean", i * 1e-5},
                     {"lr_riemannian", i * 1e-4},
                     {"grad_norm", grad[i]}});
  return {{"steps", steps}, {"tokens", 100}};
}

// The d attribute of the first <path> of a document.
std::string first_path(const std::string& doc) {
  const auto p = doc.find("<path d=\"");
  REQUIRE(p != std::string::npos);
  return doc.substr(p + 9, doc.find('"', p + 9) - p - 9);
}
}  // namespace

TEST_CASE("loss plot: the trainer's stats JSON reads back step by step") {
  train::TrainStats st;
  for (int i = 1; i <= 3; ++i) {
    train::StepStats s;
    s.step = i;
    s.loss = 5.0 / i, s.lm = 4.0 / i, s.recon = 0.1 / i, s.kl = 0;
    s.lr_euclidean = 1e-5 * i, s.lr_riemannian = 1e-4 * i, s.grad_norm = 0.5 * i;
    st.steps.push_back(s);
  }
  const auto h = pipeline::loss_history(st.to_json());
  REQUIRE(h.step.size() == 3);
  CHECK(h.step == std::vector<double>{1, 2, 3});
  CHECK(h.loss[1] == doctest::Approx(2.5));
  CHECK(h.lm[2] == doctest::Approx(4.0 / 3));
  CHECK(h.recon[0] == doctest::Approx(0.1));
  CHECK(h.lr_riemannian[2] == doctest::Approx(3e-4));
  CHECK(h.grad_norm[1] == doctest::Approx(1.0));
  CHECK(h.has_recon());
  CHECK(!h.has_kl());
}

TEST_CASE("loss plot: values map to the expected coordinates") {
  const auto h = pipeline::loss_history(stats_json({10, 1, 0.1}, {0.5, 0.2, 0.1}, {0, 0, 0}, {1, 2, 3}));
  const auto charts = pipeline::loss_charts(h);
  REQUIRE(charts.size() == 3);
  // Plot area of a 560x380 chart with title and x label: x 64..544, y 36..330 (top..bottom).
  // Gradient-norm panel, linear axis: [1, 3] padded by 0.08 -> [0.92, 3.08];
  // y(1) = 330 - 0.08/2.16 * 294 = 319.11, y(2) = 183, y(3) = 46.89.
  CHECK(first_path(charts[2].render()) == "M64.00,319.11 L304.00,183.00 L544.00,46.89");
  // Loss panel, log axis raised for the legend: x exact, equal steps per decade (10 -> 1 -> 0.1),
  // the lowest point 4% of the data's log range above the bottom, and the legend box (top right)
  // entirely above the highest point.
  const auto loss_doc = charts[0].render();
  double y10 = 0, y1 = 0, y01 = 0;
  REQUIRE(std::sscanf(first_path(loss_doc).c_str(), "M64.00,%lf L304.00,%lf L544.00,%lf", &y10, &y1, &y01) == 3);
  CHECK(y1 - y10 == doctest::Approx(y01 - y1).epsilon(1e-3));
  CHECK(y10 < y1);
  CHECK((330 - y01) / (330 - y10) == doctest::Approx(0.08 / 2.08).epsilon(1e-3));
  const auto legend = loss_doc.find("fill-opacity=\"0.9\"");
  REQUIRE(legend != std::string::npos);
  const auto rect = loss_doc.rfind("<rect ", legend);
  double lx = 0, ly = 0, lw = 0, lh = 0;
  REQUIRE(std::sscanf(loss_doc.c_str() + rect, "<rect x=\"%lf\" y=\"%lf\" width=\"%lf\" height=\"%lf\"", &lx, &ly, &lw, &lh) == 4);
  CHECK(lh == doctest::Approx(3 * 15 + 8));  // three series
  CHECK(ly + lh < y10);                      // the legend does not cover the curves
  CHECK(lx + lw == doctest::Approx(544 - 6));
  // Learning rates: step 1 has lr 0 (warmup), which a log axis cannot draw: the path starts at step 2.
  CHECK(first_path(charts[1].render()).starts_with("M304.00,"));
  // total, LM, reconstruction (KL all zero: no series); with smoothing one more.
  CHECK(charts[0].series().size() == 3);
  CHECK(pipeline::loss_charts(h, {.title = "t", .smooth = 2})[0].series().size() == 4);
  CHECK(pipeline::trailing_mean({1, 3, 5, 7}, 2) == std::vector<double>{1, 2, 4, 6});
  // The document: three panels side by side, one path per series.
  const auto doc = svg::render_panels(charts, 3);
  CHECK(doc.find("width=\"1680\" height=\"380\"") != std::string::npos);
  CHECK(count(doc, "<path ") == 3 + 2 + 1);
  CHECK(doc.ends_with("</svg>\n"));
}

TEST_CASE("loss plot: a distillation run plots the KL instead of the reconstruction") {
  const auto h = pipeline::loss_history(stats_json({3, 2}, {0, 0}, {0.4, 0.3}, {1, 1}));
  const auto c = pipeline::loss_charts(h)[0];
  REQUIRE(c.series().size() == 3);
  CHECK(c.series()[2].name == "distillation KL");
}

TEST_CASE("loss plot: empty, NaN and malformed stats are errors") {
  CHECK_THROWS_AS(pipeline::loss_history(nlohmann::json{{"steps", nlohmann::json::array()}}), InvalidArgument);
  CHECK_THROWS_AS(pipeline::loss_history(nlohmann::json::array()), InvalidArgument);
  CHECK_THROWS_AS(pipeline::loss_charts(pipeline::LossHistory{}), InvalidArgument);
  auto j = stats_json({3, 2, 1}, {0, 0, 0}, {0, 0, 0}, {1, 1, 1});
  auto nan = j;
  nan["steps"][1]["loss"] = std::nan("");  // nlohmann stores NaN; dump() writes it as null
  CHECK_THROWS_WITH_AS(pipeline::loss_history(nan), doctest::Contains("loss at step 2 is not a finite number"), InvalidArgument);
  auto null = nlohmann::json::parse(nan.dump());
  CHECK(null["steps"][1]["loss"].is_null());
  CHECK_THROWS_AS(pipeline::loss_history(null), InvalidArgument);
  auto missing = j;
  missing["steps"][2].erase("grad_norm");
  CHECK_THROWS_WITH_AS(pipeline::loss_history(missing, "s.json"), doctest::Contains("s.json: steps[2] has no \"grad_norm\""), InvalidArgument);
  auto order = j;
  order["steps"][2]["step"] = 1;
  CHECK_THROWS_WITH_AS(pipeline::loss_history(order), doctest::Contains("does not increase"), InvalidArgument);
  auto text = j;
  text["steps"][0]["lm_loss"] = "x";
  CHECK_THROWS_AS(pipeline::loss_history(text), InvalidArgument);
  // A series that is NaN everywhere cannot be drawn: the chart refuses it.
  pipeline::LossHistory h = pipeline::loss_history(j);
  for (auto& v : h.grad_norm) v = std::nan("");
  CHECK_THROWS_AS(pipeline::loss_charts(h)[2].render(), InvalidArgument);
  // Files: missing -> IoError, not JSON -> InvalidArgument; a good file round-trips.
  const auto dir = std::filesystem::temp_directory_path() / ("cacheshrink_loss_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  CHECK_THROWS_AS(pipeline::load_loss_history(dir / "none.json"), IoError);
  std::ofstream(dir / "bad.json") << "{not json";
  CHECK_THROWS_AS(pipeline::load_loss_history(dir / "bad.json"), InvalidArgument);
  std::ofstream(dir / "good.json") << j.dump(1);
  const auto back = pipeline::load_loss_history(dir / "good.json");
  CHECK(back.loss == std::vector<double>{3, 2, 1});
  pipeline::write_loss_plot(back, dir / "loss.svg");
  std::ifstream in(dir / "loss.svg");
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(count(ss.str(), "<path ") == 2 + 2 + 1);
  std::filesystem::remove_all(dir);
}

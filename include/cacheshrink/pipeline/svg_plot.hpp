#pragma once
// A tiny SVG line-chart writer: no dependency beyond the standard library (and io/file.hpp for
// the atomic write). Enough for the pictures the library produces: per-layer energy curves at
// conversion (pipeline/energy_plot.hpp) and training loss curves.
//
// API (namespace cacheshrink::pipeline::svg)
//   svg::Series     {name, x, y, color = "" (palette), dashed = false, width = 1.6}
//                   x and y have equal length; points whose x or y is not finite (or y <= 0
//                   on a log axis) are skipped and break the line into segments.
//   svg::Marker     {x, label}: a vertical dotted reference line (e.g. d_latent).
//   svg::ChartOptions {title, x_label, y_label, log_y = false, width = 640, height = 420,
//                   x_min/x_max/y_min/y_max (std::optional; default: the data range, y padded
//                   by 4%), legend = true, legend_corner = BottomRight | TopRight | TopLeft |
//                   BottomLeft, legend_max_rows = 12 (more series wrap into columns), markers}
//   svg::LineChart  chart(opts); chart.add(series)...; chart.render() -> std::string (a complete
//                   <svg> document); chart.render_body(x0, y0) -> the elements only, placed at
//                   (x0, y0) (used to compose panels).
//   svg::render_panels(charts, columns)  one document with the charts in a grid.
//   svg::write_svg(path, document)       writes atomically (temporary file, then rename), so a
//                   failure never leaves a partial file; throws cacheshrink::IoError.
//
// Example (a training loss curve on a log axis):
//   svg::LineChart c({.title = "fine-tuning", .x_label = "step", .y_label = "loss", .log_y = true});
//   c.add({.name = "train", .x = steps, .y = losses});
//   c.add({.name = "eval", .x = eval_steps, .y = eval_losses, .dashed = true});
//   svg::write_svg("loss.svg", c.render());
//
// Axis ticks: linear axes use 1-2-5 steps (about 6 ticks); log axes use decades, with 2 and 5
// added when the range spans fewer than three decades. Throws InvalidArgument for a series whose
// x and y lengths differ or for a chart with no drawable point.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/file.hpp"

namespace cacheshrink::pipeline::svg {

struct Series {
  std::string name;
  std::vector<double> x, y;
  std::string color;  // CSS color; empty: the palette color of the series index
  bool dashed = false;
  double width = 1.6;
};

struct Marker {
  double x = 0;
  std::string label;
};

enum class Corner { BottomRight, TopRight, TopLeft, BottomLeft };

struct ChartOptions {
  std::string title, x_label, y_label;
  bool log_y = false;
  int width = 640, height = 420;
  std::optional<double> x_min, x_max, y_min, y_max;
  bool legend = true;
  Corner legend_corner = Corner::BottomRight;
  int legend_max_rows = 12;
  std::vector<Marker> markers;
};

/// The colors series get by index (Tableau 10).
inline const char* palette(std::size_t i) {
  static const char* const colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                       "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return colors[i % 10];
}

namespace detail {

inline std::string escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    switch (ch) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += ch;
    }
  }
  return o;
}

inline std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}

/// Tick label: shortest of %g with up to 6 significant digits.
inline std::string tick_label(double v) {
  if (std::abs(v) < 1e-12) return "0";
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

/// About `target` ticks on [lo, hi] at multiples of 1, 2 or 5 times a power of ten.
inline std::vector<double> linear_ticks(double lo, double hi, int target = 6) {
  std::vector<double> t;
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / target;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  double step = p;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * p >= raw) {
      step = m * p;
      break;
    }
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) t.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

inline std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> t;
  const int d0 = static_cast<int>(std::floor(std::log10(lo))), d1 = static_cast<int>(std::ceil(std::log10(hi)));
  const bool fine = std::log10(hi / lo) < 3;
  for (int d = d0; d <= d1; ++d)
    for (double m : {1.0, 2.0, 5.0}) {
      if (m != 1.0 && !fine) continue;
      const double v = m * std::pow(10.0, d);
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) t.push_back(v);
    }
  return t;
}

}  // namespace detail

class LineChart {
 public:
  explicit LineChart(ChartOptions o = {}) : o_(std::move(o)) {}

  LineChart& add(Series s) {
    if (s.x.size() != s.y.size())
      throw InvalidArgument("svg::LineChart: series '" + s.name + "' has " + std::to_string(s.x.size()) + " x values but " +
                            std::to_string(s.y.size()) + " y values");
    series_.push_back(std::move(s));
    return *this;
  }

  const ChartOptions& options() const { return o_; }
  const std::vector<Series>& series() const { return series_; }

  /// A complete SVG document.
  std::string render() const {
    std::string s = header(o_.width, o_.height);
    s += render_body(0, 0);
    s += "</svg>\n";
    return s;
  }

  /// The chart's elements, translated to (x0, y0): for composing panels.
  std::string render_body(int x0, int y0) const {
    using detail::num;
    const bool logy = o_.log_y;
    auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!logy || y > 0); };
    // Data range.
    double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo, ylo = xlo, yhi = -xlo;
    for (const auto& s : series_)
      for (std::size_t i = 0; i < s.x.size(); ++i)
        if (usable(s.x[i], s.y[i])) {
          xlo = std::min(xlo, s.x[i]), xhi = std::max(xhi, s.x[i]);
          ylo = std::min(ylo, s.y[i]), yhi = std::max(yhi, s.y[i]);
        }
    if (!std::isfinite(xlo)) throw InvalidArgument("svg::LineChart '" + o_.title + "': no drawable point (all series empty or non-finite)");
    if (logy) {
      ylo = std::log10(ylo), yhi = std::log10(yhi);
    }
    const double ypad = yhi > ylo ? 0.04 * (yhi - ylo) : 0.5;
    ylo -= ypad, yhi += ypad;
    if (logy) ylo = std::pow(10.0, ylo), yhi = std::pow(10.0, yhi);
    if (xhi == xlo) xlo -= 0.5, xhi += 0.5;
    if (o_.x_min) xlo = *o_.x_min;
    if (o_.x_max) xhi = *o_.x_max;
    if (o_.y_min) ylo = *o_.y_min;
    if (o_.y_max) yhi = *o_.y_max;
    if (logy && !(ylo > 0 && yhi > ylo)) throw InvalidArgument("svg::LineChart '" + o_.title + "': log y axis needs 0 < y_min < y_max");
    if (!(xhi > xlo) || !(yhi > ylo)) throw InvalidArgument("svg::LineChart '" + o_.title + "': empty axis range");

    // Plot area.
    const double left = x0 + 64, right = x0 + o_.width - 16, top = y0 + (o_.title.empty() ? 16 : 36),
                 bottom = y0 + o_.height - (o_.x_label.empty() ? 32 : 50);
    auto fy = [&](double y) { return logy ? std::log10(y) : y; };
    auto px = [&](double x) { return left + (x - xlo) / (xhi - xlo) * (right - left); };
    auto py = [&](double y) { return bottom - (fy(y) - fy(ylo)) / (fy(yhi) - fy(ylo)) * (bottom - top); };

    std::string s;
    s += "<g font-family=\"sans-serif\" font-size=\"11\">\n";
    s += "<rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(right - left) + "\" height=\"" + num(bottom - top) +
         "\" fill=\"white\" stroke=\"#444\"/>\n";
    // Grid and ticks.
    for (double t : detail::linear_ticks(xlo, xhi)) {
      const double X = px(t);
      s += "<line x1=\"" + num(X) + "\" y1=\"" + num(top) + "\" x2=\"" + num(X) + "\" y2=\"" + num(bottom) + "\" stroke=\"#e4e4e4\"/>\n";
      s += "<text x=\"" + num(X) + "\" y=\"" + num(bottom + 14) + "\" text-anchor=\"middle\">" + detail::tick_label(t) + "</text>\n";
    }
    for (double t : logy ? detail::log_ticks(ylo, yhi) : detail::linear_ticks(ylo, yhi)) {
      const double Y = py(t);
      s += "<line x1=\"" + num(left) + "\" y1=\"" + num(Y) + "\" x2=\"" + num(right) + "\" y2=\"" + num(Y) + "\" stroke=\"#e4e4e4\"/>\n";
      s += "<text x=\"" + num(left - 4) + "\" y=\"" + num(Y + 4) + "\" text-anchor=\"end\">" + detail::tick_label(t) + "</text>\n";
    }
    if (!o_.title.empty())
      s += "<text x=\"" + num((left + right) / 2) + "\" y=\"" + num(y0 + 22) + "\" text-anchor=\"middle\" font-size=\"14\">" +
           detail::escape(o_.title) + "</text>\n";
    if (!o_.x_label.empty())
      s += "<text x=\"" + num((left + right) / 2) + "\" y=\"" + num(bottom + 34) + "\" text-anchor=\"middle\" font-size=\"12\">" +
           detail::escape(o_.x_label) + "</text>\n";
    if (!o_.y_label.empty())
      s += "<text transform=\"translate(" + num(x0 + 16) + "," + num((top + bottom) / 2) +
           ") rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">" + detail::escape(o_.y_label) + "</text>\n";
    // Clip the data to the plot area so explicit axis limits cut lines cleanly.
    const std::string clip = "clip" + std::to_string(x0) + "_" + std::to_string(y0) + "_" + std::to_string(id_counter()++);
    s += "<clipPath id=\"" + clip + "\"><rect x=\"" + num(left) + "\" y=\"" + num(top) + "\" width=\"" + num(right - left) +
         "\" height=\"" + num(bottom - top) + "\"/></clipPath>\n<g clip-path=\"url(#" + clip + ")\">\n";
    for (const auto& m : o_.markers) {
      const double X = px(m.x);
      s += "<line x1=\"" + num(X) + "\" y1=\"" + num(top) + "\" x2=\"" + num(X) + "\" y2=\"" + num(bottom) +
           "\" stroke=\"#555\" stroke-dasharray=\"2,3\"/>\n";
      s += "<text x=\"" + num(X + 3) + "\" y=\"" + num(bottom - 6) + "\" fill=\"#555\">" + detail::escape(m.label) + "</text>\n";
    }
    for (std::size_t k = 0; k < series_.size(); ++k) {
      const auto& sr = series_[k];
      const std::string color = sr.color.empty() ? palette(k) : sr.color;
      std::string d;
      bool pen = false;
      for (std::size_t i = 0; i < sr.x.size(); ++i) {
        if (!usable(sr.x[i], sr.y[i])) {
          pen = false;
          continue;
        }
        d += (pen ? " L" : " M") + num(px(sr.x[i])) + "," + num(py(sr.y[i]));
        pen = true;
      }
      if (d.empty()) continue;
      s += "<path d=\"" + d.substr(1) + "\" fill=\"none\" stroke=\"" + detail::escape(color) + "\" stroke-width=\"" + num(sr.width) + "\"" +
           (sr.dashed ? " stroke-dasharray=\"6,3\"" : "") + " stroke-linejoin=\"round\"/>\n";
    }
    s += "</g>\n";
    // Legend.
    if (o_.legend && !series_.empty()) {
      const int n = static_cast<int>(series_.size());
      const int rows = std::min(n, std::max(1, o_.legend_max_rows));
      const int cols = (n + rows - 1) / rows;
      std::size_t longest = 1;
      for (const auto& sr : series_) longest = std::max(longest, sr.name.size());
      const double colw = 34 + 6.2 * static_cast<double>(longest), rowh = 15;
      const double w = cols * colw + 8, h = rows * rowh + 8;
      const bool at_right = o_.legend_corner == Corner::BottomRight || o_.legend_corner == Corner::TopRight;
      const bool at_bottom = o_.legend_corner == Corner::BottomRight || o_.legend_corner == Corner::BottomLeft;
      const double lx = at_right ? right - w - 6 : left + 6, ly = at_bottom ? bottom - h - 6 : top + 6;
      s += "<rect x=\"" + num(lx) + "\" y=\"" + num(ly) + "\" width=\"" + num(w) + "\" height=\"" + num(h) +
           "\" fill=\"white\" fill-opacity=\"0.9\" stroke=\"#bbb\"/>\n";
      for (int k = 0; k < n; ++k) {
        const auto& sr = series_[static_cast<std::size_t>(k)];
        const double ex = lx + 6 + (k / rows) * colw, ey = ly + 4 + (k % rows) * rowh + rowh / 2;
        const std::string color = sr.color.empty() ? palette(static_cast<std::size_t>(k)) : sr.color;
        s += "<line x1=\"" + num(ex) + "\" y1=\"" + num(ey) + "\" x2=\"" + num(ex + 22) + "\" y2=\"" + num(ey) + "\" stroke=\"" +
             detail::escape(color) + "\" stroke-width=\"" + num(sr.width) + "\"" + (sr.dashed ? " stroke-dasharray=\"6,3\"" : "") + "/>\n";
        s += "<text x=\"" + num(ex + 27) + "\" y=\"" + num(ey + 4) + "\">" + detail::escape(sr.name) + "</text>\n";
      }
    }
    s += "</g>\n";
    return s;
  }

  static std::string header(int w, int h) {
    return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(w) +
           "\" height=\"" + std::to_string(h) + "\" viewBox=\"0 0 " + std::to_string(w) + " " + std::to_string(h) +
           "\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  }

 private:
  static int& id_counter() {
    static thread_local int n = 0;
    return n;
  }
  ChartOptions o_;
  std::vector<Series> series_;
};

/// One document with the charts laid out left to right, `columns` per row (each cell is as
/// large as the largest chart).
inline std::string render_panels(const std::vector<LineChart>& charts, int columns = 2) {
  if (charts.empty()) throw InvalidArgument("svg::render_panels: no charts");
  columns = std::max(1, std::min(columns, static_cast<int>(charts.size())));
  int cw = 0, ch = 0;
  for (const auto& c : charts) cw = std::max(cw, c.options().width), ch = std::max(ch, c.options().height);
  const int rows = (static_cast<int>(charts.size()) + columns - 1) / columns;
  std::string s = LineChart::header(cw * columns, ch * rows);
  for (std::size_t i = 0; i < charts.size(); ++i)
    s += charts[i].render_body(static_cast<int>(i % columns) * cw, static_cast<int>(i / columns) * ch);
  s += "</svg>\n";
  return s;
}

/// Writes `document` to `path` atomically (temporary file in the same directory, then rename).
inline void write_svg(const std::filesystem::path& path, const std::string& document) {
  io::atomic_write(path, [&](std::ofstream& out) { out.write(document.data(), static_cast<std::streamsize>(document.size())); });
}

}  // namespace cacheshrink::pipeline::svg

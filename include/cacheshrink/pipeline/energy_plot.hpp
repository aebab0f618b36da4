#pragma once
// Per-layer energy curves of a conversion as an SVG picture: for every converted layer, the
// cumulative fraction of the calibration activation energy captured by the first r basis
// vectors, r = 1..d (K and V panels; one panel for joint), with a marker at d_latent. Reads
// LayerReport::spectrum_k / spectrum_v (see compression/convert.hpp). Used by
// `cacheshrink convert --plot-energy FILE.svg`.
#include <filesystem>
#include <string>
#include <vector>

#include "cacheshrink/compression/convert.hpp"
#include "cacheshrink/pipeline/svg_plot.hpp"

namespace cacheshrink::pipeline {

/// Cumulative energy (percent) of a descending spectrum: out[r-1] = 100 * sum_{i<r} s_i / sum s.
inline std::vector<double> cumulative_energy_percent(const std::vector<double>& spectrum) {
  double total = 0;
  for (double v : spectrum) total += v;
  std::vector<double> out;
  double acc = 0;
  for (double v : spectrum) {
    acc += v;
    out.push_back(total > 0 ? 100.0 * acc / total : 100.0);
  }
  return out;
}

/// The charts (K, V; or one for joint) of a conversion report. `title` prefixes each panel title.
inline std::vector<svg::LineChart> energy_charts(const compression::ConversionReport& r, const std::string& title = "") {
  const bool joint = r.method == CompressionMethod::Joint;
  const std::string what = r.calibrated ? "calibration activation energy" : "weight energy (no calibration)";
  std::vector<svg::LineChart> charts;
  for (int kv = 0; kv < (joint ? 1 : 2); ++kv) {
    svg::ChartOptions o;
    o.title = (title.empty() ? "" : title + ": ") + (joint ? std::string("joint [K; V]") : kv == 0 ? std::string("K") : std::string("V")) +
              " (" + compression_method_name(r.method) + ", d_kv " + std::to_string(r.d_kv) + ")";
    o.x_label = "rank r (basis vectors kept)";
    o.y_label = "captured " + what + " (%)";
    o.y_max = 100.5;
    o.width = 560;
    o.height = 380;
    o.markers.push_back({static_cast<double>(r.d_latent), "d_latent = " + std::to_string(r.d_latent)});
    svg::LineChart c(o);
    for (const auto& l : r.layers) {
      const auto& sp = kv == 0 ? l.spectrum_k : l.spectrum_v;
      if (l.kind != "mla" || sp.empty()) continue;
      svg::Series s;
      s.name = "layer " + std::to_string(l.layer) + (l.group >= 0 ? " (group " + std::to_string(l.group) + ")" : "");
      s.y = cumulative_energy_percent(sp);
      for (std::size_t i = 0; i < s.y.size(); ++i) s.x.push_back(static_cast<double>(i + 1));
      c.add(std::move(s));
    }
    if (!c.series().empty()) charts.push_back(std::move(c));
  }
  if (charts.empty()) throw InvalidArgument("energy plot: the conversion report has no per-layer spectra (no layer was converted)");
  return charts;
}

/// Writes the energy curves of `r` as one SVG document (panels side by side), atomically.
inline void write_energy_plot(const compression::ConversionReport& r, const std::filesystem::path& path, const std::string& title = "") {
  auto charts = energy_charts(r, title);
  svg::write_svg(path, svg::render_panels(charts, static_cast<int>(charts.size())));
}

}  // namespace cacheshrink::pipeline

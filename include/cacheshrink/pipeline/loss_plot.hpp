#pragma once
// Training loss curves as an SVG picture, from the stats a training run writes
// (train::TrainStats::to_json() / save_json(): {"steps": [{"step", "loss", "lm_loss",
// "recon_loss", "kl_loss", "lr_euclidean", "lr_riemannian", "grad_norm", ...}, ...], ...}).
// Works from the JSON so that a stats file written earlier can be plotted without the trainer
// (`cacheshrink plot-loss STATS.json --out FILE.svg`), and a fresh run through
// `loss_history(stats.to_json())` (`cacheshrink train ... --plot-loss FILE.svg`).
//
// Three panels: losses per optimizer step on a log axis (total, LM, and the reconstruction MSE
// or the distillation KL when the run used them; plus a trailing mean of the total when
// `smooth` > 1), the two learning rates (log axis; warmup's lr 0 at step 1 is not drawn), and
// the gradient norm before clipping (linear axis). The log panels leave headroom above the
// curves for their legend (top right), so it never covers data.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/io/file.hpp"
#include "cacheshrink/pipeline/svg_plot.hpp"

namespace cacheshrink::pipeline {

/// Per-step series of a training run (all of equal length, one entry per optimizer step).
struct LossHistory {
  std::vector<double> step, loss, lm, recon, kl, lr_euclidean, lr_riemannian, grad_norm;
  bool has_recon() const {
    for (double v : recon)
      if (v != 0) return true;
    return false;
  }
  bool has_kl() const {
    for (double v : kl)
      if (v != 0) return true;
    return false;
  }
};

/// Reads the per-step series from training-stats JSON. `what` names the source in errors.
/// Throws InvalidArgument when "steps" is missing or empty, a step lacks a field, the steps do
/// not increase, or a step's loss is not a finite number (JSON writes NaN as null).
inline LossHistory loss_history(const nlohmann::json& stats, const std::string& what = "training stats") {
  if (!stats.is_object() || !stats.contains("steps") || !stats["steps"].is_array())
    throw InvalidArgument(what + ": expected a JSON object with a \"steps\" array (the stats `cacheshrink train` writes)");
  const auto& steps = stats["steps"];
  if (steps.empty()) throw InvalidArgument(what + ": \"steps\" is empty, nothing to plot");
  LossHistory h;
  struct Field {
    const char* key;
    std::vector<double>* out;
  };
  const Field fields[] = {{"step", &h.step},
                          {"loss", &h.loss},
                          {"lm_loss", &h.lm},
                          {"recon_loss", &h.recon},
                          {"kl_loss", &h.kl},
                          {"lr_euclidean", &h.lr_euclidean},
                          {"lr_riemannian", &h.lr_riemannian},
                          {"grad_norm", &h.grad_norm}};
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const auto& s = steps[i];
    for (const auto& f : fields) {
      if (!s.is_object() || !s.contains(f.key))
        throw InvalidArgument(what + ": steps[" + std::to_string(i) + "] has no \"" + f.key + "\"");
      const auto& v = s[f.key];
      if (v.is_number()) f.out->push_back(v.get<double>());
      else if (v.is_null()) f.out->push_back(std::nan(""));
      else throw InvalidArgument(what + ": steps[" + std::to_string(i) + "]." + f.key + " is not a number");
    }
    if (!std::isfinite(h.step.back()) || (i > 0 && !(h.step[i] > h.step[i - 1])))
      throw InvalidArgument(what + ": steps[" + std::to_string(i) + "].step does not increase");
    if (!std::isfinite(h.loss.back()))
      throw InvalidArgument(what + ": the loss at step " + std::to_string(static_cast<long>(h.step.back())) + " is not a finite number");
  }
  return h;
}

/// Reads a stats JSON file (IoError when unreadable, InvalidArgument when malformed).
inline LossHistory load_loss_history(const std::filesystem::path& path) {
  const auto j = nlohmann::json::parse(io::read_text_file(path), nullptr, false);
  if (j.is_discarded()) throw InvalidArgument(path.string() + ": not valid JSON");
  return loss_history(j, path.string());
}

/// Mean of the last `window` values up to each index (fewer at the start).
inline std::vector<double> trailing_mean(const std::vector<double>& v, int window) {
  window = std::max(window, 1);
  std::vector<double> out(v.size());
  double acc = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    acc += v[i];
    if (i >= static_cast<std::size_t>(window)) acc -= v[i - static_cast<std::size_t>(window)];
    out[i] = acc / static_cast<double>(std::min<std::size_t>(i + 1, static_cast<std::size_t>(window)));
  }
  return out;
}

namespace detail {
inline svg::Series loss_series(std::string name, const std::vector<double>& x, const std::vector<double>& y, double width = 1.6,
                               std::string color = "") {
  svg::Series s;
  s.name = std::move(name);
  s.x = x;
  s.y = y;
  s.width = width;
  s.color = std::move(color);
  return s;
}

/// The same chart with its log y axis raised so the top-right legend sits above every curve:
/// the data (padded 4% both ways) keep the lower part of the axis, the legend box (15 px a row
/// plus margins) the part above.
inline svg::LineChart with_legend_headroom(const svg::LineChart& c) {
  double lo = std::numeric_limits<double>::infinity(), hi = 0;
  for (const auto& sr : c.series())
    for (std::size_t i = 0; i < sr.y.size(); ++i)
      if (std::isfinite(sr.y[i]) && sr.y[i] > 0 && std::isfinite(sr.x[i])) lo = std::min(lo, sr.y[i]), hi = std::max(hi, sr.y[i]);
  if (!(hi > 0)) return c;  // nothing drawable: render() reports it
  svg::ChartOptions o = c.options();
  const double r = std::max(std::log10(hi / lo), 0.1);
  const double plot_h = o.height - (o.x_label.empty() ? 32.0 : 50.0) - (o.title.empty() ? 16.0 : 36.0);
  const double f = std::min(0.6, (15.0 * static_cast<double>(c.series().size()) + 24.0) / plot_h);
  o.y_min = std::pow(10.0, std::log10(lo) - 0.04 * r);
  o.y_max = std::pow(10.0, std::log10(hi) + 0.04 * r + 1.08 * r * f / (1 - f));
  o.legend_corner = svg::Corner::TopRight;
  svg::LineChart framed(o);
  for (const auto& sr : c.series()) framed.add(sr);
  return framed;
}
}  // namespace detail

struct LossPlotOptions {
  std::string title;  // prefixes each panel's title
  int smooth = 0;     // > 1: add the trailing mean of the total loss over this many steps
};

/// The three charts (losses, learning rates, gradient norm) of a run.
inline std::vector<svg::LineChart> loss_charts(const LossHistory& h, const LossPlotOptions& po = {}) {
  if (h.step.empty()) throw InvalidArgument("loss plot: no steps");
  const std::string pre = po.title.empty() ? "" : po.title + ": ";
  std::vector<svg::LineChart> charts;
  // Every panel spans all steps, so the panels line up even where a series starts later.
  const double x_lo = h.step.front(), x_hi = h.step.size() > 1 ? h.step.back() : h.step.front() + 1;
  {
    svg::ChartOptions o;
    o.title = pre + "loss per optimizer step";
    o.x_label = "step";
    o.y_label = "loss (log scale)";
    o.log_y = true;
    o.width = 560;
    o.height = 380;
    o.x_min = x_lo;
    o.x_max = x_hi;
    svg::LineChart c(o);
    c.add(detail::loss_series("total", h.step, h.loss, 1.2));
    c.add(detail::loss_series("LM (cross-entropy)", h.step, h.lm, 1.2));
    if (h.has_recon()) c.add(detail::loss_series("reconstruction MSE", h.step, h.recon, 1.2));
    if (h.has_kl()) c.add(detail::loss_series("distillation KL", h.step, h.kl, 1.2));
    if (po.smooth > 1)
      c.add(detail::loss_series("total, mean of last " + std::to_string(po.smooth), h.step, trailing_mean(h.loss, po.smooth), 2.0, "#000000"));
    c = detail::with_legend_headroom(c);
    charts.push_back(std::move(c));
  }
  {
    svg::ChartOptions o;
    o.title = pre + "learning rates";
    o.x_label = "step";
    o.y_label = "lr (log scale)";
    o.log_y = true;
    o.width = 560;
    o.height = 380;
    o.x_min = x_lo;
    o.x_max = x_hi;
    svg::LineChart c(o);
    c.add(detail::loss_series("W_down (AdamW)", h.step, h.lr_euclidean));
    c.add(detail::loss_series("W_up (RiemannianAdam)", h.step, h.lr_riemannian));
    c = detail::with_legend_headroom(c);
    charts.push_back(std::move(c));
  }
  {
    svg::ChartOptions o;
    o.title = pre + "gradient norm (before clipping)";
    o.x_label = "step";
    o.y_label = "||g||";
    o.width = 560;
    o.height = 380;
    o.x_min = x_lo;
    o.x_max = x_hi;
    o.legend = false;
    svg::LineChart c(o);
    c.add(detail::loss_series("grad norm", h.step, h.grad_norm, 1.2));
    charts.push_back(std::move(c));
  }
  return charts;
}

/// Writes the loss curves of `h` as one SVG document (three panels in a row), atomically.
inline void write_loss_plot(const LossHistory& h, const std::filesystem::path& path, const LossPlotOptions& po = {}) {
  svg::write_svg(path, svg::render_panels(loss_charts(h, po), 3));
}

}  // namespace cacheshrink::pipeline

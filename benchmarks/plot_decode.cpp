// Draws docs/img/decode_h200.svg from the JSON files of bench_cuda_decode and
// benchmarks/python/bench_hf_decode.py: decode tokens/s against context, one panel per shape
// and batch, for HF transformers, our standard cache, our MLA cache rebuilt every step and our
// absorbed latent attention. No GPU needed.
//
//   plot_decode docs/data/bench_cuda_decode_h200.json docs/data/bench_hf_decode_h200.json docs/img/decode_h200.svg
#include <cacheshrink/io/file.hpp>
#include <cacheshrink/pipeline/svg_plot.hpp>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>

using namespace cacheshrink;
namespace svg = pipeline::svg;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: plot_decode OURS.json HF.json OUT.svg\n");
    return 2;
  }
  try {
    // (shape, path, batch) -> (context, tokens/s)
    std::map<std::tuple<std::string, std::string, int>, std::vector<std::pair<double, double>>> pts;
    for (int f = 1; f <= 2; ++f) {
      const auto j = nlohmann::json::parse(io::read_text_file(argv[f]));
      for (const auto& r : j.at("rows")) {
        if (r.at("path") == "kernel" || !r.value("fits", false)) continue;
        pts[{r.at("shape"), r.at("path"), r.at("batch")}].push_back({r.at("context").get<double>(), r.at("tokens_per_s").get<double>()});
      }
    }
    const std::vector<std::pair<std::string, std::string>> paths = {
        {"hf", "HF transformers (bf16, sdpa)"}, {"standard", "(a) ours, standard cache"}, {"rebuild", "(b) ours, MLA rebuilt each step"},
        {"standard_learned_pos", "(a') ours, standard, learned pos."}, {"absorbed", "(c) ours, absorbed latents"}};
    std::vector<svg::LineChart> charts;
    for (const std::string shape : {"llama2", "qwen25"})
      for (int B : {1, 16, 64}) {
        svg::ChartOptions o;
        o.title = (shape == "llama2" ? std::string("LLaMA-2-7B shapes, 4x") : std::string("Qwen2.5-7B shapes, 2x")) + ", batch " + std::to_string(B);
        o.x_label = "context (tokens, log2)";
        o.y_label = "decode tokens/s";
        o.log_y = true;
        o.width = 460;
        o.height = 340;
        o.legend_corner = svg::Corner::BottomLeft;
        o.legend = charts.empty();  // one legend (first panel), so no curve is hidden
        svg::LineChart c(o);
        bool any = false;
        for (std::size_t i = 0; i < paths.size(); ++i) {
          auto it = pts.find({shape, paths[i].first, B});
          if (it == pts.end()) continue;
          svg::Series s;
          s.name = paths[i].second;
          for (auto [x, y] : it->second) {
            s.x.push_back(std::log2(x));
            s.y.push_back(y);
          }
          s.color = svg::palette(i);
          s.dashed = paths[i].first == "standard_learned_pos";
          c.add(s);
          any = true;
        }
        if (any) charts.push_back(std::move(c));
      }
    svg::write_svg(argv[3], svg::render_panels(charts, 3));
    std::printf("wrote %s (%zu panels)\n", argv[3], charts.size());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "plot_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}

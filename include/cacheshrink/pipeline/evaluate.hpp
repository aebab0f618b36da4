#pragma once
// Perplexity. Two protocols:
//  - windows (the fixtures' protocol; stride == window): consecutive non-overlapping windows
//    of `window` tokens, full windows only, each evaluated from position 0; every window
//    predicts its window-1 next tokens.
//  - sliding (stride < window, like HF's / the original's compute_perplexity): windows of
//    `window` tokens starting every `stride` tokens; each scores only the tokens not scored
//    by the previous window, with the preceding tokens as context.
// NLL is accumulated in double; windows are run in batches through the packed forward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/progress.hpp"
#include "cacheshrink/model/transformer.hpp"

namespace cacheshrink::pipeline {

struct PerplexityOptions {
  int window = 256;     // tokens per window
  int stride = 0;       // 0 or == window: non-overlapping full windows; < window: sliding
  long max_windows = 0; // 0: all
  int batch = 8;        // windows per forward call
  bool progress = false;
};

struct PerplexityResult {
  double perplexity = 0;
  double mean_nll = 0;
  long long predicted_tokens = 0;
  long long processed_tokens = 0;  // tokens run through the model (context included)
  long windows = 0;
  double seconds = 0;
  double tokens_per_second = 0;  // processed tokens / s
};

namespace detail {
struct Window {
  std::size_t begin;  // first token of the window in ids
  int length;         // tokens in the window
  int first_target;   // first position within the window whose token is scored (>= 1)
};
}  // namespace detail

template <class Tf>
PerplexityResult perplexity(Tf& tf, const std::vector<int>& ids, const PerplexityOptions& o = {}) {
  if (o.window < 2) throw InvalidArgument("perplexity: window must be >= 2 (got " + std::to_string(o.window) + ")");
  if (o.stride < 0 || o.stride > o.window) throw InvalidArgument("perplexity: stride must be in [0, window]");
  if (o.batch < 1) throw InvalidArgument("perplexity: batch must be >= 1");
  if (static_cast<long>(ids.size()) < o.window)
    throw InvalidArgument("perplexity: " + std::to_string(ids.size()) + " tokens are fewer than one window of " + std::to_string(o.window));
  std::vector<detail::Window> wins;
  const int stride = (o.stride == 0) ? o.window : o.stride;
  if (stride == o.window) {
    for (std::size_t b = 0; b + o.window <= ids.size(); b += o.window) wins.push_back({b, o.window, 1});
  } else {
    std::size_t prev_end = 0;
    for (std::size_t b = 0; b < ids.size(); b += stride) {
      const std::size_t e = std::min(b + o.window, ids.size());
      const int trg = static_cast<int>(e - prev_end);
      const int len = static_cast<int>(e - b);
      if (len >= 2) wins.push_back({b, len, std::max(1, len - trg)});
      prev_end = e;
      if (e == ids.size()) break;
    }
  }
  if (o.max_windows > 0 && static_cast<long>(wins.size()) > o.max_windows) wins.resize(static_cast<std::size_t>(o.max_windows));

  PerplexityResult r;
  Progress bar("perplexity", static_cast<long long>(wins.size()), "windows", o.progress);
  double nll = 0;
  model::ForwardOptions fo;
  fo.logits = model::LogitsFor::All;
  for (std::size_t w0 = 0; w0 < wins.size(); w0 += o.batch) {
    const std::size_t w1 = std::min(wins.size(), w0 + o.batch);
    std::vector<std::vector<int>> seqs;
    for (std::size_t w = w0; w < w1; ++w) seqs.emplace_back(ids.begin() + wins[w].begin, ids.begin() + wins[w].begin + wins[w].length);
    MatrixRf logits = tf.forward(std::span<const std::vector<int>>(seqs), nullptr, fo);
    Eigen::Index row = 0;
    for (std::size_t w = w0; w < w1; ++w) {
      const auto& win = wins[w];
      for (int t = 1; t < win.length; ++t) {
        if (t >= win.first_target) {
          auto lr = logits.row(row + t - 1);
          const float mx = lr.maxCoeff();
          const double lse = mx + std::log(static_cast<double>((lr.array() - mx).exp().sum()));
          nll += lse - static_cast<double>(lr(seqs[w - w0][t]));
          ++r.predicted_tokens;
        }
      }
      row += win.length;
      r.processed_tokens += win.length;
    }
    bar.update(static_cast<long long>(w1), static_cast<double>(r.processed_tokens), "tok");
  }
  r.windows = static_cast<long>(wins.size());
  r.seconds = bar.elapsed();
  r.mean_nll = r.predicted_tokens ? nll / static_cast<double>(r.predicted_tokens) : 0.0;
  r.perplexity = std::exp(r.mean_nll);
  r.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.processed_tokens) / r.seconds : 0.0;
  return r;
}

}  // namespace cacheshrink::pipeline

namespace cacheshrink::pipeline {

/// Like the original's measure_cache_memory: cache bytes of the standard model vs the model
/// as it is (MLA layers store latents) for given sequence lengths, batch 1.
struct CacheMemoryRow {
  int seq_len = 0;
  std::size_t standard_bytes = 0;
  std::size_t mla_bytes = 0;
  double ratio = 1.0;  // standard / mla
};

inline std::vector<CacheMemoryRow> cache_memory(const model::Model& m, const std::vector<int>& seq_lens, std::size_t bytes_per_number = 2) {
  std::size_t std_per_token = 0, mla_per_token = 0;
  for (const auto& lw : m.weights.layers) {
    std_per_token += static_cast<std::size_t>(2) * m.config.d_kv();
    mla_per_token += lw.mla ? static_cast<std::size_t>(lw.mla->cache_width()) : static_cast<std::size_t>(2) * m.config.d_kv();
  }
  std::vector<CacheMemoryRow> rows;
  for (int T : seq_lens) {
    CacheMemoryRow r;
    r.seq_len = T;
    r.standard_bytes = std_per_token * bytes_per_number * static_cast<std::size_t>(T);
    r.mla_bytes = mla_per_token * bytes_per_number * static_cast<std::size_t>(T);
    r.ratio = r.mla_bytes ? static_cast<double>(r.standard_bytes) / static_cast<double>(r.mla_bytes) : 1.0;
    rows.push_back(r);
  }
  return rows;
}

/// The same in a cache dtype (model/kv_quant.hpp): F32 4 bytes per number; Int8/Fp8E4M3
/// 1 byte per number plus a 4-byte scale per token for each non-empty K and V row of a
/// layer. Equals KvCache::bytes_per_token of the runtime's caches (tests/test_quant_cache.cpp).
inline std::vector<CacheMemoryRow> cache_memory(const model::Model& m, const std::vector<int>& seq_lens, model::CacheDtype dtype) {
  std::size_t std_per_token = 0, mla_per_token = 0;
  for (const auto& lw : m.weights.layers) {
    const std::size_t full = 2 * model::cache_row_bytes(m.config.d_kv(), dtype);
    std_per_token += full;
    mla_per_token += lw.mla ? model::cache_row_bytes(lw.mla->k_cache_width(), dtype) + model::cache_row_bytes(lw.mla->v_cache_width(), dtype)
                            : full;
  }
  std::vector<CacheMemoryRow> rows;
  for (int T : seq_lens) {
    CacheMemoryRow r;
    r.seq_len = T;
    r.standard_bytes = std_per_token * static_cast<std::size_t>(T);
    r.mla_bytes = mla_per_token * static_cast<std::size_t>(T);
    r.ratio = r.mla_bytes ? static_cast<double>(r.standard_bytes) / static_cast<double>(r.mla_bytes) : 1.0;
    rows.push_back(r);
  }
  return rows;
}

}  // namespace cacheshrink::pipeline

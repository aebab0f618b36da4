#pragma once
// Token generation: greedy or sampled (temperature -> top-k -> top-p, HF's order), with the
// KV cache (prefill once, then one token per step) or by full recomputation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/tensor.hpp"
#include "cacheshrink/model/kv_cache.hpp"
#include "cacheshrink/model/transformer.hpp"

namespace cacheshrink::model {

struct SamplingOptions {
  int max_new_tokens = 32;
  bool greedy = true;         // argmax; other fields ignored
  float temperature = 1.0f;   // > 0
  int top_k = 0;              // 0: off
  float top_p = 1.0f;         // 1: off
  std::uint64_t seed = 0;
  int eos_token_id = -1;      // stop after emitting it (-1: never)
  bool use_cache = true;      // false: recompute the whole sequence every step
};

/// Picks the next token from one row of logits.
class Sampler {
 public:
  explicit Sampler(const SamplingOptions& o) : o_(o), rng_(o.seed) {
    if (!o.greedy) {
      if (!(o.temperature > 0)) throw InvalidArgument("sampling: temperature must be > 0 (use greedy for argmax)");
      if (o.top_k < 0) throw InvalidArgument("sampling: top_k must be >= 0");
      if (!(o.top_p > 0 && o.top_p <= 1)) throw InvalidArgument("sampling: top_p must be in (0, 1]");
    }
  }

  template <class Row>
  int next(const Row& logits) {
    const int V = static_cast<int>(logits.size());
    if (o_.greedy) {
      int best = 0;
      for (int i = 1; i < V; ++i)
        if (logits[i] > logits[best]) best = i;  // first maximum, as torch.argmax
      return best;
    }
    std::vector<int> idx(V);
    std::iota(idx.begin(), idx.end(), 0);
    std::vector<double> z(V);
    for (int i = 0; i < V; ++i) z[i] = static_cast<double>(logits[i]) / o_.temperature;
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return z[a] > z[b]; });
    int keep = V;
    if (o_.top_k > 0) keep = std::min(keep, o_.top_k);
    const double mx = z[idx[0]];
    std::vector<double> p(keep);
    double sum = 0;
    for (int i = 0; i < keep; ++i) sum += (p[i] = std::exp(z[idx[i]] - mx));
    if (o_.top_p < 1.0f) {
      // Smallest prefix whose probability reaches top_p (at least one token).
      double acc = 0;
      int k = 0;
      while (k < keep) {
        acc += p[k] / sum;
        ++k;
        if (acc >= o_.top_p) break;
      }
      keep = k;
    }
    std::discrete_distribution<int> dist(p.begin(), p.begin() + keep);
    return idx[dist(rng_)];
  }

 private:
  SamplingOptions o_;
  std::mt19937_64 rng_;
};

namespace detail {
// `who`'s argument checks of every generate.
inline void check_generate(const char* who, const std::vector<int>& prompt, const SamplingOptions& o) {
  if (prompt.empty()) throw InvalidArgument(std::string(who) + ": empty prompt");
  if (o.max_new_tokens < 0) throw InvalidArgument(std::string(who) + ": max_new_tokens must be >= 0");
}
// The cached generation loop: picks a token from `logits` (row 0: the prompt's last-token
// logits), appends it, and asks step(token) for the next logits until max_new_tokens or EOS.
template <class Step>
std::vector<int> sample_loop(Sampler& sampler, MatrixRf logits, const SamplingOptions& o, Step&& step) {
  std::vector<int> out;
  for (int s = 0; s < o.max_new_tokens; ++s) {
    const int t = sampler.next(logits.row(0));
    out.push_back(t);
    if (t == o.eos_token_id || s + 1 == o.max_new_tokens) break;
    logits = step(t);
  }
  return out;
}
}  // namespace detail

/// Generates up to max_new_tokens after `prompt`; returns only the new tokens.
template <class Tf>
std::vector<int> generate(Tf& tf, const std::vector<int>& prompt, const SamplingOptions& o) {
  detail::check_generate("generate", prompt, o);
  Sampler sampler(o);
  ForwardOptions last;
  last.logits = LogitsFor::Last;
  if (o.use_cache) {
    KvCache cache = tf.make_cache(1);
    return detail::sample_loop(sampler, tf.forward(prompt, &cache, last), o,
                               [&](int t) { return tf.forward(std::vector<int>{t}, &cache, last); });
  }
  std::vector<int> out, seq = prompt;
  for (int step = 0; step < o.max_new_tokens; ++step) {
    MatrixRf logits = tf.forward(seq, nullptr, last);
    const int t = sampler.next(logits.row(0));
    out.push_back(t);
    seq.push_back(t);
    if (t == o.eos_token_id) break;
  }
  return out;
}

}  // namespace cacheshrink::model

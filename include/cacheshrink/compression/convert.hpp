#pragma once
// Conversion of a loaded model to MLA.
//
// Calibration streams the real attention input X_l of every layer (after its input norm)
// into a float64 Gram matrix G_l = sum X_l^T X_l (hidden x hidden); no hidden state is kept.
// For a projection W (d_kv x hidden) the Gram of its activations is W G W^T, so one statistic
// per layer initializes K, V and joint bases alike:
//   separate: Wu = top-d_latent eigenvectors of Wk G Wk^T, Wd = Wu^T Wk (per layer; same for V)
//   xkv:      Wu = top eigenvectors of sum_{l in group} Wk_l G_l Wk_l^T, Wd_l = Wu^T Wk_l (the
//             SVD of the group's stacked K, as xKV and the original package; no per-layer weights)
//   joint:    Wu = top eigenvectors of [Wk; Wv] G [Wk; Wv]^T, Wd = Wu^T [Wk; Wv]
//   decoupled_rope: K's first d_rope rows Wr are kept exactly (cached as h Wr^T); the other
//             rows Wc are compressed like separate, Wuk from Wc G Wc^T; V as separate
// For orthonormal Wu, Wd = Wu^T W is the least-squares optimal down-projection for any X, so
// the reconstruction of the calibration activations is governed by Wu alone; its captured
// energy (eigenvalue mass) is reported per layer. Without calibration G = I (weight SVD).
// Biases stay outside the compression: K~ = X Wd^T Wu^T + bk.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cacheshrink/compression/policies.hpp"
#include "cacheshrink/core/error.hpp"
#include "cacheshrink/core/progress.hpp"
#include "cacheshrink/dist/comm.hpp"
#include "cacheshrink/linalg/eigen.hpp"
#include "cacheshrink/linalg/gram.hpp"
#include "cacheshrink/model/transformer.hpp"
#include "cacheshrink/model/weights.hpp"

namespace cacheshrink::compression {

struct ConvertOptions {
  double compression_ratio = 4.0;
  std::string method = "auto";  // separate | xkv | joint | auto
  int d_latent = 0;             // 0: from the ratio
  int d_rope = 64;              // decoupled_rope only: key features cached exactly
  bool use_calibration = true;
  bool store_original_weights = false;
  std::optional<int> cross_layer_group_size;  // xkv only; default 4
  std::optional<int> xkv_skip_early_layers;   // xkv only; default 0
  bool keep_early_layers_original = false;    // xkv only
  int calibration_batch = 8;
  bool verbose = false;
};

struct LayerReport {
  int layer = 0;
  std::string kind;       // "mla", "original"
  int group = -1;
  double energy_k = 1.0;  // captured fraction of the activation energy (joint: of [K V])
  double energy_v = 1.0;
  double rel_err_k = 0.0;  // sqrt(1 - energy): relative reconstruction error on calibration data
  double rel_err_v = 0.0;
  // Energy per rank of the basis the layer uses (descending; empty for "original" layers):
  // separate/joint, the eigenvalues of its statistic; xkv, u_i^T S_l u_i along the group's
  // eigenvectors. cumsum(spectrum)[d_latent-1] / sum(spectrum) == energy (for plots).
  std::vector<double> spectrum_k, spectrum_v;
};

struct ConversionReport {
  CompressionMethod method = CompressionMethod::Separate;
  int d_latent = 0;
  int d_kv = 0;
  bool calibrated = false;
  long long calibration_tokens = 0;
  double calibration_seconds = 0;
  double seconds = 0;
  std::size_t cache_floats_per_token_original = 0;
  std::size_t cache_floats_per_token_mla = 0;
  std::vector<LayerReport> layers;
  std::vector<std::string> warnings;
};

/// Resolves "auto" and validates option combinations against the model.
inline CompressionMethod resolve_method(const ModelConfig& c, const ConvertOptions& o) {
  CompressionMethod m;
  if (o.method == "auto") m = c.attention_kind() == AttentionKindId::Mha ? CompressionMethod::Separate : CompressionMethod::Xkv;
  else if (o.method == "separate") m = CompressionMethod::Separate;
  else if (o.method == "xkv") m = CompressionMethod::Xkv;
  else if (o.method == "joint") m = CompressionMethod::Joint;
  else if (o.method == "decoupled_rope") m = CompressionMethod::DecoupledRope;
  else throw InvalidArgument("compression_method '" + o.method + "' is unknown (expected separate, xkv, joint, decoupled_rope or auto)");
  if (!(o.compression_ratio >= 1.0)) throw InvalidArgument("compression_ratio must be >= 1 (got " + std::to_string(o.compression_ratio) + ")");
  if (o.d_latent < 0) throw InvalidArgument("d_latent must be positive (got " + std::to_string(o.d_latent) + ")");
  if (o.d_latent > c.d_kv())
    throw InvalidArgument("d_latent " + std::to_string(o.d_latent) + " exceeds d_kv = " + std::to_string(c.d_kv()) + " (n_kv_heads * head_dim)");
  if (m != CompressionMethod::Xkv && (o.cross_layer_group_size || o.xkv_skip_early_layers || o.keep_early_layers_original))
    throw InvalidArgument(std::string("cross_layer_group_size, xkv_skip_early_layers and keep_early_layers_original apply to the xkv method only (method is '") +
                          compression_method_name(m) + "')");
  if (o.cross_layer_group_size && *o.cross_layer_group_size < 1)
    throw InvalidArgument("cross_layer_group_size must be >= 1 (got " + std::to_string(*o.cross_layer_group_size) + ")");
  if (o.xkv_skip_early_layers && (*o.xkv_skip_early_layers < 0 || *o.xkv_skip_early_layers >= c.n_layers))
    throw InvalidArgument("xkv_skip_early_layers must be in [0, " + std::to_string(c.n_layers) + ") (got " +
                          std::to_string(*o.xkv_skip_early_layers) + ")");
  if (o.calibration_batch < 1) throw InvalidArgument("calibration batch must be >= 1");
  if (m == CompressionMethod::DecoupledRope) {
    if (o.d_rope < 1 || o.d_rope >= c.d_kv())
      throw InvalidArgument("d_rope must be in [1, d_kv) = [1, " + std::to_string(c.d_kv()) + ") for decoupled_rope (got " +
                            std::to_string(o.d_rope) + ")");
    if (o.d_latent > c.d_kv() - o.d_rope)
      throw InvalidArgument("d_latent " + std::to_string(o.d_latent) + " exceeds d_kv - d_rope = " + std::to_string(c.d_kv() - o.d_rope));
  }
  return m;
}

/// Per-layer Gram matrices of the attention input over the calibration sequences. With a
/// communicator of P ranks, rank r streams only its contiguous share of `seqs`
/// (dist::shard_range) and the float64 sums are all-reduced, so every rank returns the Gram
/// of all sequences (equal to one process up to the order of float64 additions); `tokens`
/// counts all ranks' tokens and only rank 0 shows progress.
template <dist::Communicator Comm = dist::Single>
std::vector<linalg::Matrix<double>> attention_input_grams(const model::Model& m, const std::vector<std::vector<int>>& seqs, int batch,
                                                          bool progress, long long* tokens = nullptr, const Comm& comm = {}) {
  const auto range = dist::shard_range(seqs.size(), comm.rank(), comm.size());
  const std::size_t first = range.first, last = range.second;  // plain names: lambdas below capture them
  const int L = m.config.n_layers;
  std::vector<linalg::GramAccumulator> acc;
  for (int l = 0; l < L; ++l) acc.emplace_back(m.config.hidden_size, linalg::Centering::None);
  model::ForwardHooks hooks;
  hooks.on_attn_input = [&](int l, const MatrixRf& h) { acc[l].add(h); };
  model::ForwardOptions fo;
  fo.logits = model::LogitsFor::None;
  fo.hooks = &hooks;
  fo.stop_after_attn_input = L - 1;  // the last layer's attention input is the last thing needed
  Progress bar("calibration", static_cast<long long>(last - first), "sequences", progress && comm.rank() == 0);
  long long n = 0;
  dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind)> tf(m);
    for (std::size_t b = first; b < last; b += batch) {
      const std::size_t e = std::min(last, b + batch);
      std::vector<std::vector<int>> chunk(seqs.begin() + b, seqs.begin() + e);
      for (const auto& s : chunk) n += static_cast<long long>(s.size());
      tf.forward(std::span<const std::vector<int>>(chunk), nullptr, fo);
      bar.update(static_cast<long long>(e - first), static_cast<double>(n), "tok");
    }
  });
  std::vector<linalg::Matrix<double>> out;
  for (auto& a : acc) {
    out.push_back(a.statistic());
    comm.allreduce_sum(out.back().data(), static_cast<std::size_t>(out.back().size()));
  }
  if (tokens) {
    double nt = static_cast<double>(n);
    comm.allreduce_sum(&nt, 1);
    *tokens = static_cast<long long>(nt);
  }
  return out;
}

namespace detail {

using MatD = linalg::Matrix<double>;

struct Basis {
  MatD u;  // (d, k)
  double energy = 1.0;
  MatD u_all;                    // (d, d): every eigenvector, descending (for the report's spectra);
                                 // a backend may keep only the first k when not asked for all
  std::vector<double> spectrum;  // (d): eigenvalues, descending
};

/// Basis from all eigenpairs (descending, signs fixed as linalg::symmetric_eigen) of a statistic
/// with trace `tr`.
inline Basis basis_from(MatD vectors, const Eigen::VectorXd& values, double tr, int k) {
  Basis b;
  b.u = vectors.leftCols(k);
  b.energy = tr > 0 ? std::clamp(values.head(k).sum() / tr, 0.0, 1.0) : 1.0;
  b.u_all = std::move(vectors);
  b.spectrum.assign(values.data(), values.data() + values.size());
  return b;
}

/// The dense float64 linear algebra of the initialisation, on the host (Eigen). The CUDA
/// backend provides the same five operations with the Grams kept on the device
/// (backend/cuda/convert.cuh), so both backends run one initialisation routine (initialise).
struct HostInit {
  const std::vector<MatD>* grams = nullptr;  // per layer; nullptr: G = I (weight SVD)
  /// W G_l W^T for a weight W (d, hidden) as stored (float, row-major), in float64.
  MatD statistic(int l, const MatrixRf& w) const {
    const MatD a = w.cast<double>();
    return grams ? MatD(a * (*grams)[l] * a.transpose()) : MatD(a * a.transpose());
  }
  /// Every eigenpair of s, descending; the first k vectors are the basis.
  Basis top_basis(const MatD& s, int k) const {
    auto es = linalg::symmetric_eigen(s);  // the solver computes all d pairs anyway
    return basis_from(std::move(es.vectors), es.values, s.trace(), k);
  }
  /// top_basis of each statistic (a backend may run them concurrently; without `all_vectors` it
  /// may return only the first k eigenvectors in u_all).
  std::vector<Basis> top_bases(const std::vector<MatD>& s, int k, bool all_vectors = true) const {
    (void)all_vectors;
    std::vector<Basis> out;
    for (const auto& m : s) out.push_back(top_basis(m, k));
    return out;
  }
  /// How many layers' statistics initialise() hands to top_bases at once.
  int parallelism() const { return 1; }
  /// diag(U^T S U): the energy of S along each column of U.
  std::vector<double> spectrum_along(const MatD& s, const MatD& u) const {
    const Eigen::VectorXd d = (s * u).cwiseProduct(u).colwise().sum().transpose();
    return {d.data(), d.data() + d.size()};
  }
  double energy_of(const MatD& s, const MatD& u) const {
    const double tr = s.trace();
    return tr > 0 ? std::clamp((u.transpose() * s * u).trace() / tr, 0.0, 1.0) : 1.0;
  }
  /// U^T W in float64, stored as float: the least-squares down-projection for an orthonormal U.
  MatrixRf down(const MatD& u, const MatrixRf& w) const { return MatD(u.transpose() * w.cast<double>()).cast<float>(); }
};

inline MatrixRf to_f(const MatD& m) { return m.cast<float>(); }

/// Method and latent width of a conversion (fills rep.method, rep.d_kv, rep.d_latent).
inline CompressionMethod plan(const ModelConfig& c, const ConvertOptions& o, ConversionReport& rep) {
  const CompressionMethod method = resolve_method(c, o);
  rep.method = method;
  rep.d_kv = c.d_kv();
  const int d_rope = method == CompressionMethod::DecoupledRope ? o.d_rope : 0;
  rep.d_latent = o.d_latent > 0 ? o.d_latent
                                : dispatch_compression(method, [&](auto p) { return decltype(p)::d_latent(c.d_kv(), o.compression_ratio, d_rope); });
  return method;
}

/// The initialisation shared by every backend: bases from the statistics A G_l A^T, the
/// down-projections, the per-layer report, warnings and cache sizes. `init` supplies the
/// linear algebra (HostInit or cuda::DeviceInit). `out` is the model to convert, modified in
/// place (its K/V weights are read, never changed) and returned.
template <class Init>
model::Model initialise(model::Model out, const ConvertOptions& o, ConversionReport& rep, const Init& init, bool progress) {
  const model::Model& original = out;
  const ModelConfig& c = original.config;
  const CompressionMethod method = rep.method;
  const int d_rope = method == CompressionMethod::DecoupledRope ? o.d_rope : 0;
  const int dl = rep.d_latent;
  const int L = c.n_layers;

  rep.layers.resize(L);
  const int chunk = std::max(1, init.parallelism());
  auto wk = [&](int l) -> const MatrixRf& { return original.weights.layers[l].wk; };
  auto wv = [&](int l) -> const MatrixRf& { return original.weights.layers[l].wv; };

  auto set_separate = [&](int l, const MatrixRf& wkl, const MatrixRf& wvl, const Basis& bk, const Basis& bv, int group, CompressionMethod m) {
    model::MlaLayer mla;
    mla.method = m;
    mla.d_latent = dl;
    mla.group = group;
    mla.w_up_k = std::make_shared<MatrixRf>(to_f(bk.u));
    mla.w_up_v = std::make_shared<MatrixRf>(to_f(bv.u));
    mla.w_down_k = init.down(bk.u, wkl);
    mla.w_down_v = init.down(bv.u, wvl);
    out.weights.layers[l].mla = std::move(mla);
  };

  int skip = 0, gsize = 4;
  if (method == CompressionMethod::Xkv) {
    skip = o.xkv_skip_early_layers.value_or(0);
    gsize = o.cross_layer_group_size.value_or(4);
  }
  for (int l = 0; l < L; ++l) rep.layers[l].layer = l;
  Progress bar("initialisation", L, "layers", progress);
  int done = 0;
  auto tick = [&](int n) { bar.update(done += n); };

  if (method == CompressionMethod::Separate || (method == CompressionMethod::Xkv && skip > 0)) {
    const int last = method == CompressionMethod::Separate ? L : skip;
    for (int l0 = 0; l0 < last; l0 += chunk) {
      const int l1 = std::min(last, l0 + chunk);
      if (method == CompressionMethod::Xkv && o.keep_early_layers_original) {
        for (int l = l0; l < l1; ++l) rep.layers[l].kind = "original";
        tick(l1 - l0);
        continue;
      }
      std::vector<MatD> stats;  // K, V per layer
      for (int l = l0; l < l1; ++l) {
        stats.push_back(init.statistic(l, wk(l)));
        stats.push_back(init.statistic(l, wv(l)));
      }
      const auto bases = init.top_bases(stats, dl, /*all_vectors=*/false);
      for (int l = l0; l < l1; ++l) {
        const auto& bk = bases[2 * (l - l0)];
        const auto& bv = bases[2 * (l - l0) + 1];
        set_separate(l, wk(l), wv(l), bk, bv, -1, CompressionMethod::Separate);
        auto& lr = rep.layers[l];
        lr.kind = "mla";
        lr.energy_k = bk.energy;
        lr.energy_v = bv.energy;
        lr.spectrum_k = bk.spectrum;
        lr.spectrum_v = bv.spectrum;
      }
      tick(l1 - l0);
    }
  }
  if (method == CompressionMethod::Xkv) {
    int g = 0;
    for (int start = skip; start < L; start += gsize, ++g) {
      const int end = std::min(L, start + gsize);
      // The plain sum of the layers' statistics: the Gram of the group's K stacked over its
      // layers (xKV's cross-layer SVD). An earlier version weighted each layer by 1 / its trace
      // (so no layer dominates); after fine-tuning that basis was worse (tiny-mqa xkv 2x:
      // 130.21 vs 125.36 with the plain sum, docs/training.md), so the original's sum is used.
      MatD sk = MatD::Zero(c.d_kv(), c.d_kv()), sv = sk;
      std::vector<MatD> lk, lv;
      for (int l = start; l < end; ++l) {
        lk.push_back(init.statistic(l, wk(l)));
        lv.push_back(init.statistic(l, wv(l)));
        sk += lk.back();
        sv += lv.back();
      }
      auto kv = init.top_bases({sk, sv}, dl, /*all_vectors=*/true);  // spectra along every vector
      const Basis& bk = kv[0];
      const Basis& bv = kv[1];
      auto uk = std::make_shared<MatrixRf>(to_f(bk.u));
      auto uv = std::make_shared<MatrixRf>(to_f(bv.u));
      for (int l = start; l < end; ++l) {
        model::MlaLayer mla;
        mla.method = CompressionMethod::Xkv;
        mla.d_latent = dl;
        mla.group = g;
        mla.w_up_k = uk;
        mla.w_up_v = uv;
        mla.w_down_k = init.down(bk.u, wk(l));
        mla.w_down_v = init.down(bv.u, wv(l));
        out.weights.layers[l].mla = std::move(mla);
        auto& lr = rep.layers[l];
        lr.kind = "mla";
        lr.group = g;
        lr.energy_k = init.energy_of(lk[l - start], bk.u);
        lr.energy_v = init.energy_of(lv[l - start], bv.u);
        lr.spectrum_k = init.spectrum_along(lk[l - start], bk.u_all);
        lr.spectrum_v = init.spectrum_along(lv[l - start], bv.u_all);
      }
      tick(end - start);
    }
  }
  if (method == CompressionMethod::DecoupledRope) {
    const int dc = c.d_kv() - d_rope;
    for (int l0 = 0; l0 < L; l0 += chunk) {
      const int l1 = std::min(L, l0 + chunk);
      std::vector<MatD> stats;  // content part of K, V per layer
      for (int l = l0; l < l1; ++l) {
        stats.push_back(init.statistic(l, MatrixRf(wk(l).bottomRows(dc))));
        stats.push_back(init.statistic(l, wv(l)));
      }
      const auto bases = init.top_bases(stats, dl, /*all_vectors=*/false);
      for (int l = l0; l < l1; ++l) {
        const MatrixRf& wkl = wk(l);
        const MatrixRf wc = wkl.bottomRows(dc);
        const MatD& sk = stats[2 * (l - l0)];
        const auto& bk = bases[2 * (l - l0)];
        const auto& bv = bases[2 * (l - l0) + 1];
        model::MlaLayer mla;
        mla.method = CompressionMethod::DecoupledRope;
        mla.d_latent = dl;
        mla.d_rope = d_rope;
        mla.w_rope_k = wkl.topRows(d_rope);
        mla.w_up_k = std::make_shared<MatrixRf>(to_f(bk.u));
        mla.w_up_v = std::make_shared<MatrixRf>(to_f(bv.u));
        mla.w_down_k = init.down(bk.u, wc);
        mla.w_down_v = init.down(bv.u, wv(l));
        out.weights.layers[l].mla = std::move(mla);
        // Energy of the whole K: the exact slice keeps all of its energy.
        const MatD full = init.statistic(l, wkl);
        const double tr = full.trace();
        auto& lr = rep.layers[l];
        lr.kind = "mla";
        lr.energy_k = tr > 0 ? std::clamp((full.topLeftCorner(d_rope, d_rope).trace() + bk.energy * sk.trace()) / tr, 0.0, 1.0) : 1.0;
        lr.energy_v = bv.energy;
        lr.spectrum_k = bk.spectrum;  // of the compressed content part
        lr.spectrum_v = bv.spectrum;
      }
      tick(l1 - l0);
    }
  }
  if (method == CompressionMethod::Joint) {
    auto stacked = [&](int l) {
      MatrixRf wkv(2 * c.d_kv(), c.hidden_size);
      wkv << wk(l), wv(l);
      return wkv;
    };
    for (int l0 = 0; l0 < L; l0 += chunk) {
      const int l1 = std::min(L, l0 + chunk);
      std::vector<MatD> stats;
      for (int l = l0; l < l1; ++l) stats.push_back(init.statistic(l, stacked(l)));
      const auto bases = init.top_bases(stats, dl, /*all_vectors=*/false);
      for (int l = l0; l < l1; ++l) {
        const auto& b = bases[l - l0];
        model::MlaLayer mla;
        mla.method = CompressionMethod::Joint;
        mla.d_latent = dl;
        mla.w_up_k = std::make_shared<MatrixRf>(to_f(b.u.topRows(c.d_kv())));
        mla.w_up_v = std::make_shared<MatrixRf>(to_f(b.u.bottomRows(c.d_kv())));
        mla.w_down_k = init.down(b.u, stacked(l));
        out.weights.layers[l].mla = std::move(mla);
        auto& lr = rep.layers[l];
        lr.kind = "mla";
        lr.energy_k = lr.energy_v = b.energy;
        lr.spectrum_k = lr.spectrum_v = b.spectrum;
      }
      tick(l1 - l0);
    }
  }
  for (auto& lr : rep.layers) {
    lr.rel_err_k = std::sqrt(std::max(0.0, 1.0 - lr.energy_k));
    lr.rel_err_v = std::sqrt(std::max(0.0, 1.0 - lr.energy_v));
    if (lr.kind == "mla" && (lr.energy_k < 0.8 || lr.energy_v < 0.8)) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "layer %d keeps only %.1f%% (K) / %.1f%% (V) of the activation energy (< 80%%)", lr.layer,
                    100 * lr.energy_k, 100 * lr.energy_v);
      rep.warnings.push_back(buf);
    }
  }
  rep.cache_floats_per_token_original = static_cast<std::size_t>(2) * c.d_kv() * L;
  rep.cache_floats_per_token_mla = 0;
  for (const auto& lw : out.weights.layers)
    rep.cache_floats_per_token_mla += lw.mla ? static_cast<std::size_t>(lw.mla->cache_width()) : static_cast<std::size_t>(2 * c.d_kv());
  return out;
}

}  // namespace detail

/// Converts `original` to MLA. `calibration`: token sequences (ignored when
/// use_calibration is false). Returns the converted model; fills `report` when given.
/// With a communicator (dist::Mpi), every rank passes the same model, options and calibration
/// list; calibration is sharded and reduced (attention_input_grams), then every rank computes
/// the same initialisation from the same Grams (redundantly: the eigen-decompositions are
/// d_kv x d_kv, small next to calibration for the models we target) and returns the same model.
/// The CUDA backend's cuda::convert (backend/cuda/convert.cuh) runs the same steps on the GPU.
template <dist::Communicator Comm = dist::Single>
model::Model convert(const model::Model& original, const ConvertOptions& o, const std::vector<std::vector<int>>& calibration,
                     ConversionReport* report = nullptr, const Comm& comm = {}) {
  using detail::MatD;
  const auto t0 = std::chrono::steady_clock::now();
  ConversionReport rep;
  detail::plan(original.config, o, rep);

  std::vector<MatD> grams;
  if (o.use_calibration) {
    if (calibration.empty()) throw InvalidArgument("convert: use_calibration is on but no calibration sequences were given");
    const auto tc = std::chrono::steady_clock::now();
    grams = attention_input_grams(original, calibration, o.calibration_batch, o.verbose, &rep.calibration_tokens, comm);
    rep.calibration_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
    rep.calibrated = true;
  }
  model::Model out = detail::initialise(original, o, rep, detail::HostInit{o.use_calibration ? &grams : nullptr},
                                          o.verbose && comm.rank() == 0);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (o.verbose && comm.rank() == 0)
    for (const auto& w : rep.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (report) *report = std::move(rep);
  return out;
}

/// Typed entry point: the method is fixed by the policy (options.method is ignored).
template <CompressionPolicy P, dist::Communicator Comm = dist::Single>
model::Model convert(const model::Model& original, ConvertOptions o, const std::vector<std::vector<int>>& calibration,
                     ConversionReport* report = nullptr, const Comm& comm = {}) {
  o.method = compression_method_name(P::id);
  return convert(original, o, calibration, report, comm);
}

}  // namespace cacheshrink::compression

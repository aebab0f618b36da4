#pragma once
// Conversion to MLA on the GPU: the same steps as compression::convert (convert.hpp), with the
// two expensive ones on the device.
//   calibration: the packed forward of Transformer<Kind, Cuda> (float32 or bf16 weights) hands
//     every layer's attention input to DeviceGrams, which accumulates G_l = sum X_l^T X_l in
//     float64 with cublasDsyrk (lower triangle; X converted to float64 first, so only the
//     forward's precision differs from the CPU, never the accumulation).
//   initialisation: DeviceInit supplies compression::detail::initialise's five operations on the
//     device: W G_l W^T (cublasDsymm + cublasDgemm against the resident Gram; W uploaded as the
//     stored float and widened there), all eigenpairs with cusolverDnXsyevd (float64, eight at a
//     time on their own streams), diag(U^T S U) and U^T W with cublasDgemm. Eigenvector
//     signs are fixed as linalg::symmetric_eigen (largest-magnitude entry positive), so the
//     bases are directly comparable with the CPU's.
// The returned model, report and layer bookkeeping come from the shared routine; only the
// numbers' rounding differs (tests/cuda/test_cuda_convert.cu bounds the difference).
#include <chrono>
#include <exception>
#include <mutex>
#include <memory>
#include <thread>
#include <optional>
#include <vector>

#include "cacheshrink/backend/cuda/solver.cuh"
#include "cacheshrink/backend/cuda/transformer.cuh"
#include "cacheshrink/compression/convert.hpp"

namespace cacheshrink::cuda {

namespace detail {

template <class T>
__global__ void to_double_kernel(const T* __restrict__ x, double* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, float>) y[i] = static_cast<double>(x[i]);
    else y[i] = static_cast<double>(__bfloat162float(x[i]));
  }
}

/// Upper triangle := lower triangle of a column-major (n x n) matrix.
__global__ void mirror_lower_kernel(double* s, int n) {
  const long long total = static_cast<long long>(n) * n;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < total; t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(t % n), j = static_cast<int>(t / n);  // row i, column j
    if (i < j) s[t] = s[j + static_cast<long long>(i) * n];
  }
}

__global__ void to_float_kernel(const double* __restrict__ x, float* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long long>(gridDim.x) * blockDim.x)
    y[i] = static_cast<float>(x[i]);
}

inline int grid_for(long long n) { return static_cast<int>(std::min<long long>((n + 255) / 256, 65535)); }

/// Host -> device into a buffer that only grows (no reallocation when shapes repeat).
template <class T>
void put(DeviceBuffer<T>& d, const T* host, std::size_t n, cudaStream_t s) {
  d.reserve(n);
  if (n) CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(d.data(), host, n * sizeof(T), cudaMemcpyHostToDevice, s));
}

/// Device (rows x cols, column-major, ld = rows) -> a host float64 matrix; synchronises.
inline linalg::Matrix<double> get(const double* d, Eigen::Index rows, Eigen::Index cols, cudaStream_t s) {
  linalg::Matrix<double> m(rows, cols);
  if (m.size()) CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(m.data(), d, sizeof(double) * m.size(), cudaMemcpyDeviceToHost, s));
  CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s));
  return m;
}

}  // namespace detail

/// Per-layer float64 Gram matrices (dim x dim, lower triangle, column-major) on the device.
class DeviceGrams {
 public:
  DeviceGrams(int layers, int dim) : dim_(dim), blas_(std::make_unique<CublasHandle>(nullptr)) {
    if (layers < 1 || dim < 1) throw InvalidArgument("DeviceGrams: layers and dim must be >= 1");
    rows_.assign(static_cast<std::size_t>(layers), 0);
    for (int l = 0; l < layers; ++l) {
      g_.emplace_back(static_cast<std::size_t>(dim) * dim);
      CACHESHRINK_CUDA_CHECK(cudaMemset(g_.back().data(), 0, sizeof(double) * g_.back().size()));
    }
  }
  int layers() const { return static_cast<int>(g_.size()); }
  int dim() const { return dim_; }
  long long rows(int l) const { return rows_[static_cast<std::size_t>(l)]; }

  /// G_l += X^T X for X (rows x dim, row-major, on the device; float or __nv_bfloat16 per
  /// `p`), ordered on stream `s`.
  void add(int l, const void* x, int rows, Precision p, cudaStream_t s) {
    if (l < 0 || l >= layers()) throw InvalidArgument("DeviceGrams::add: layer " + std::to_string(l) + " out of range");
    if (rows <= 0) return;
    rows_[static_cast<std::size_t>(l)] += rows;
    const long long n = static_cast<long long>(rows) * dim_;
    xd_.reserve(static_cast<std::size_t>(n));
    const int threads = 256, blocks = static_cast<int>(std::min<long long>((n + threads - 1) / threads, 65535));
    if (p == Precision::Float32) detail::to_double_kernel<<<blocks, threads, 0, s>>>(static_cast<const float*>(x), xd_.data(), n);
    else detail::to_double_kernel<<<blocks, threads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), xd_.data(), n);
    CACHESHRINK_CUDA_LAUNCH_CHECK("to_double_kernel");
    CACHESHRINK_CUBLAS_CHECK(cublasSetStream(blas_->get(), s));
    const double one = 1.0;
    // Column-major view: xd is (dim x rows) with ld = dim, so xd xd^T = X^T X.
    CACHESHRINK_CUBLAS_CHECK(cublasDsyrk(blas_->get(), CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, dim_, rows, &one, xd_.data(), dim_, &one,
                                         g_[static_cast<std::size_t>(l)].data(), dim_));
  }

  /// The lower triangle of G_l on the device.
  const double* lower(int l) const { return g_[static_cast<std::size_t>(l)].data(); }

  /// G_l on the host, both triangles (synchronises).
  linalg::Matrix<double> download(int l) const {
    linalg::Matrix<double> m = detail::get(lower(l), dim_, dim_, nullptr);
    m.template triangularView<Eigen::StrictlyUpper>() = m.transpose();
    return m;
  }

 private:
  int dim_;
  std::vector<DeviceBuffer<double>> g_;
  std::vector<long long> rows_;
  DeviceBuffer<double> xd_;
  std::unique_ptr<CublasHandle> blas_;  // (movable)
};

/// Streams the calibration sequences through Transformer<Kind, Cuda> (weights in `precision`)
/// in batches of `batch` and returns every layer's Gram of the attention input on the device.
/// `tokens` (optional) receives the number of tokens seen.
inline DeviceGrams attention_input_grams(const model::Model& m, const std::vector<std::vector<int>>& seqs, int batch, bool progress,
                                         long long* tokens = nullptr, Precision precision = Precision::Float32) {
  if (batch < 1) throw InvalidArgument("calibration batch must be >= 1");
  const int L = m.config.n_layers;
  DeviceGrams grams(L, m.config.hidden_size);
  Progress bar("calibration (gpu)", static_cast<long long>(seqs.size()), "sequences", progress);
  long long n = 0;
  dispatch_attention_kind(m.config, [&](auto kind) {
    using Tf = model::Transformer<decltype(kind), Cuda>;
    Tf tf(m, Options{precision});
    const typename Tf::AttnInputFn fn = [&](int l, const void* h, int rows) { grams.add(l, h, rows, precision, tf.stream()); };
    for (std::size_t b = 0; b < seqs.size(); b += static_cast<std::size_t>(batch)) {
      const std::size_t e = std::min(seqs.size(), b + static_cast<std::size_t>(batch));
      const std::span<const std::vector<int>> chunk(seqs.data() + b, e - b);
      for (const auto& s : chunk) n += static_cast<long long>(s.size());
      tf.attention_inputs(chunk, fn, L - 1);
      bar.update(static_cast<long long>(e), static_cast<double>(n), "tok");
    }
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(tf.stream()));
  });
  if (tokens) *tokens = n;
  return grams;
}

/// compression::detail::initialise's linear algebra on the device (see the file comment).
/// grams == nullptr means G = I (uncalibrated weight SVD).
class DeviceInit {
 public:
  using MatD = linalg::Matrix<double>;

  explicit DeviceInit(const DeviceGrams* grams) : grams_(grams), blas_(stream_.get()) {}

  /// W G_l W^T for a stored weight W (d x H, float, row-major): W goes up as float (its bytes
  /// read as the column-major W^T), is widened to float64 on the device, and S is mirrored there.
  MatD statistic(int l, const MatrixRf& w) const {
    const Timed timed(this, &Timings::statistic);
    const int d = static_cast<int>(w.rows()), H = static_cast<int>(w.cols());
    if (grams_ && H != grams_->dim())
      throw InvalidArgument("DeviceInit::statistic: matrix has " + std::to_string(H) + " columns, the Grams are " + std::to_string(grams_->dim()));
    cudaStream_t s = stream_.get();
    const double* wt = weight_t(w);  // (H x d), ld H
    s_.reserve(static_cast<std::size_t>(d) * d);
    const double one = 1.0, zero = 0.0;
    if (grams_) {
      t_.reserve(static_cast<std::size_t>(d) * H);
      // T = G W^T (G symmetric, lower triangle stored), S = W T.
      CACHESHRINK_CUBLAS_CHECK(cublasDsymm(blas_.get(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, H, d, &one, grams_->lower(l), H, wt, H, &zero,
                                           t_.data(), H));
      CACHESHRINK_CUBLAS_CHECK(cublasDgemm(blas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, d, d, H, &one, wt, H, t_.data(), H, &zero, s_.data(), d));
    } else {
      CACHESHRINK_CUBLAS_CHECK(cublasDgemm(blas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, d, d, H, &one, wt, H, wt, H, &zero, s_.data(), d));
    }
    // The two triangles of W G W^T differ by rounding; keep the lower one (what the solver reads).
    detail::mirror_lower_kernel<<<detail::grid_for(static_cast<long long>(d) * d), 256, 0, s>>>(s_.data(), d);
    CACHESHRINK_CUDA_LAUNCH_CHECK("mirror_lower_kernel");
    return detail::get(s_.data(), d, d, s);
  }

  compression::detail::Basis top_basis(const MatD& sym, int k) const { return top_bases({sym}, k).front(); }

  /// Wall seconds spent per operation so far (the benchmark's breakdown); `solver` sums the
  /// syevd calls of all workers (they overlap), `bases` is the wall time of top_bases.
  struct Timings {
    double statistic = 0, bases = 0, solver = 0, down = 0;
  };
  Timings timings() const {
    std::lock_guard<std::mutex> g(mu_);
    return t_acc_;
  }

  /// Eigen-decompositions of several statistics at once: one host thread per worker, each with
  /// its own stream, cuSOLVER handle and buffers (a single syevd of a few thousand rows leaves
  /// most of the GPU idle; independent ones overlap).
  std::vector<compression::detail::Basis> top_bases(const std::vector<MatD>& mats, int k, bool all_vectors = true) const {
    const Clock c;
    std::vector<compression::detail::Basis> out(mats.size());
    const std::size_t nw = std::min(mats.size(), static_cast<std::size_t>(kWorkers));
    while (workers_.size() < nw) workers_.push_back(std::make_unique<Worker>());
    std::vector<std::exception_ptr> err(nw);
    auto run = [&](std::size_t w) {
      try {
        for (std::size_t i = w; i < mats.size(); i += nw) {
          double solver_s = 0;
          out[i] = workers_[w]->basis(mats[i], k, all_vectors, solver_s);
          std::lock_guard<std::mutex> g(mu_);
          t_acc_.solver += solver_s;
        }
      } catch (...) {
        err[w] = std::current_exception();
      }
    };
    if (nw == 1) {
      run(0);
    } else {
      std::vector<std::thread> th;
      for (std::size_t w = 0; w < nw; ++w) th.emplace_back(run, w);
      for (auto& t : th) t.join();
    }
    for (auto& e : err)
      if (e) std::rethrow_exception(e);
    add(&Timings::bases, c);
    return out;
  }
  /// Layers whose K and V statistics initialise() hands over at once (2 per layer).
  int parallelism() const { return kWorkers / 2; }

  std::vector<double> spectrum_along(const MatD& sym, const MatD& u) const {
    const MatD su = times(sym, u);
    const Eigen::VectorXd d = su.cwiseProduct(u).colwise().sum().transpose();
    return {d.data(), d.data() + d.size()};
  }

  double energy_of(const MatD& sym, const MatD& u) const {
    const double tr = sym.trace();
    return tr > 0 ? std::clamp(times(sym, u).cwiseProduct(u).sum() / tr, 0.0, 1.0) : 1.0;
  }

  /// U^T W as the stored float (k x H, row-major) = the column-major (H x k) W^T U.
  MatrixRf down(const MatD& u, const MatrixRf& w) const {
    const Timed timed(this, &Timings::down);
    const int d = static_cast<int>(u.rows()), k = static_cast<int>(u.cols()), H = static_cast<int>(w.cols());
    if (w.rows() != d) throw InvalidArgument("DeviceInit::down: basis has " + std::to_string(d) + " rows, the weight " + std::to_string(w.rows()));
    cudaStream_t s = stream_.get();
    const double* wt = weight_t(w);
    detail::put(a_, u.data(), static_cast<std::size_t>(u.size()), s);
    s_.reserve(static_cast<std::size_t>(k) * H);
    const double one = 1.0, zero = 0.0;
    CACHESHRINK_CUBLAS_CHECK(cublasDgemm(blas_.get(), CUBLAS_OP_N, CUBLAS_OP_N, H, k, d, &one, wt, H, a_.data(), d, &zero, s_.data(), H));
    const long long n = static_cast<long long>(k) * H;
    f_.reserve(static_cast<std::size_t>(n));
    detail::to_float_kernel<<<detail::grid_for(n), 256, 0, s>>>(s_.data(), f_.data(), n);
    CACHESHRINK_CUDA_LAUNCH_CHECK("to_float_kernel");
    MatrixRf out(k, H);
    CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(out.data(), f_.data(), sizeof(float) * static_cast<std::size_t>(n), cudaMemcpyDeviceToHost, s));
    CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(s));
    return out;
  }

 private:
  /// Uploads a stored weight (d x H, float, row-major) and widens it to float64 on the device:
  /// the result is W^T column-major (H x d, ld H), valid until the next call.
  const double* weight_t(const MatrixRf& w) const {
    cudaStream_t s = stream_.get();
    const long long n = static_cast<long long>(w.size());
    wf_.reserve(static_cast<std::size_t>(n));
    if (n) CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(wf_.data(), w.data(), sizeof(float) * static_cast<std::size_t>(n), cudaMemcpyHostToDevice, s));
    wd_.reserve(static_cast<std::size_t>(n));
    detail::to_double_kernel<<<detail::grid_for(n), 256, 0, s>>>(wf_.data(), wd_.data(), n);
    CACHESHRINK_CUDA_LAUNCH_CHECK("to_double_kernel");
    return wd_.data();
  }

  /// S U on the device (S square, U with as many rows).
  MatD times(const MatD& sym, const MatD& u) const {
    const int d = static_cast<int>(sym.rows()), m = static_cast<int>(u.cols());
    cudaStream_t s = stream_.get();
    detail::put(a_, sym.data(), static_cast<std::size_t>(sym.size()), s);
    detail::put(t_, u.data(), static_cast<std::size_t>(u.size()), s);
    s_.reserve(static_cast<std::size_t>(d) * m);
    const double one = 1.0, zero = 0.0;
    CACHESHRINK_CUBLAS_CHECK(cublasDgemm(blas_.get(), CUBLAS_OP_N, CUBLAS_OP_N, d, m, d, &one, a_.data(), d, t_.data(), d, &zero, s_.data(), d));
    return detail::get(s_.data(), d, m, s);
  }

  static constexpr int kWorkers = 8;

  struct Clock {
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
  };
  void add(double Timings::*field, const Clock& c) const {
    std::lock_guard<std::mutex> g(mu_);
    t_acc_.*field += c.seconds();
  }
  /// Adds the scope's wall time to one Timings field when it ends (also on an exception).
  struct Timed {
    const DeviceInit* self;
    double Timings::*field;
    Clock c;
    Timed(const DeviceInit* s, double Timings::*f) : self(s), field(f) {}
    ~Timed() { self->add(field, c); }
  };
  mutable std::mutex mu_;
  mutable Timings t_acc_;

  struct Worker {
    Stream stream;
    CusolverHandle solver{stream.get()};
    SymmetricEigen eig;
    DeviceBuffer<double> a, w;

    /// all_vectors = false: only the top k eigenvectors leave the device (u_all = u).
    compression::detail::Basis basis(const MatD& sym, int k, bool all_vectors, double& solver_s) {
      const int d = static_cast<int>(sym.rows());
      if (k < 1 || k > d) throw InvalidArgument("DeviceInit: k = " + std::to_string(k) + " outside [1, " + std::to_string(d) + "]");
      cudaStream_t s = stream.get();
      detail::put(a, sym.data(), static_cast<std::size_t>(sym.size()), s);
      w.reserve(static_cast<std::size_t>(d));
      const Clock c;
      eig(solver.get(), s, d, a.data(), w.data());
      solver_s += c.seconds();
      const int first = all_vectors ? 0 : d - k;  // ascending: the top k are the last k columns
      const MatD vec = detail::get(a.data() + static_cast<std::size_t>(first) * d, d, d - first, s);
      const MatD val = detail::get(w.data(), d, 1, s);
      // Descending order and the CPU's sign convention.
      MatD v = vec.rowwise().reverse();
      Eigen::VectorXd values = val.col(0).reverse();
      for (Eigen::Index j = 0; j < v.cols(); ++j) {
        Eigen::Index imax = 0;
        v.col(j).cwiseAbs().maxCoeff(&imax);
        if (v(imax, j) < 0) v.col(j) = -v.col(j);
      }
      return compression::detail::basis_from(std::move(v), values, sym.trace(), k);
    }
  };

  const DeviceGrams* grams_;
  mutable std::vector<std::unique_ptr<Worker>> workers_;
  Stream stream_;
  CublasHandle blas_;
  mutable DeviceBuffer<double> a_, t_, s_, wd_;
  mutable DeviceBuffer<float> wf_, f_;
};

/// compression::convert on the GPU: calibration forward and Grams on the device in `precision`
/// (Float32 reproduces the CPU's activations to float32 rounding; BFloat16 is the fast mode
/// for large models), then the initialisation's dense algebra on the device. Same options,
/// report and result as the CPU convert (the report's calibration_seconds covers the GPU
/// calibration). Single device; no communicator.
/// Takes the model by value: pass std::move(model) to convert a large model in place instead
/// of copying its weights on the host.
inline model::Model convert(model::Model original, const compression::ConvertOptions& o, const std::vector<std::vector<int>>& calibration,
                            compression::ConversionReport* report = nullptr, Precision precision = Precision::Float32,
                            DeviceInit::Timings* timings = nullptr) {
  const auto t0 = std::chrono::steady_clock::now();
  compression::ConversionReport rep;
  compression::detail::plan(original.config, o, rep);
  std::optional<DeviceGrams> grams;
  if (o.use_calibration) {
    if (calibration.empty()) throw InvalidArgument("cuda::convert: use_calibration is on but no calibration sequences were given");
    const auto tc = std::chrono::steady_clock::now();
    grams.emplace(attention_input_grams(original, calibration, o.calibration_batch, o.verbose, &rep.calibration_tokens, precision));
    rep.calibration_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
    rep.calibrated = true;
  }
  const DeviceInit init(grams ? &*grams : nullptr);
  model::Model out = compression::detail::initialise(std::move(original), o, rep, init, o.verbose);
  if (timings) *timings = init.timings();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (o.verbose)
    for (const auto& w : rep.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (report) *report = std::move(rep);
  return out;
}

}  // namespace cacheshrink::cuda

// cuda::DeviceOptimizer against the CPU optimizers run in float64 from the same float32 start:
// AdamW (optim::adamw_step) on Euclidean parameters, RiemannianAdam on EuclideanStiefel
// (optim::riemannian_adam_step, with its SVD polar and Householder QR), and the trainer's
// clipping against optim::clip_grad_norm. Odd shapes throughout; random gradients every step.
#include <doctest/doctest.h>

#include <cacheshrink/backend/cuda/optim.cuh>
#include <cacheshrink/manifold/stiefel.hpp>
#include <cacheshrink/optim/clip.hpp>
#include <cacheshrink/optim/updates.hpp>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "cuda/cuda_test_support.cuh"

using namespace cacheshrink;

namespace {

using MatD = linalg::Matrix<double>;
using MatF = linalg::Matrix<float>;
using RowF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Row-major device layout <-> column-major CPU matrices.
std::vector<float> to_row_major(const MatF& m) {
  const RowF r = m;
  return {r.data(), r.data() + r.size()};
}
MatF from_row_major(const std::vector<float>& v, int rows, int cols) {
  REQUIRE(v.size() == static_cast<std::size_t>(rows) * cols);
  return Eigen::Map<const RowF>(v.data(), rows, cols);
}

/// max |got - want| / max(max |want|, 1e-30)
double rel_err(const MatF& got, const MatD& want) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double scale = std::max(want.cwiseAbs().maxCoeff(), 1e-30);
  return (got.cast<double>() - want).cwiseAbs().maxCoeff() / scale;
}

MatF random_matrix(int rows, int cols, std::mt19937& g, float a = 1.0f) {
  return from_row_major(test::random_floats(static_cast<std::size_t>(rows) * cols, g, a), rows, cols);
}

struct Shape {
  int rows, cols;
  bool stiefel;
};

/// One parameter on both sides: device value/grad, and the float64 CPU reference.
struct Pair {
  std::string name;
  Shape shape;
  cuda::DeviceBuffer<float> value, grad;
  MatD start;                      // the common float32 start
  MatD ref;                        // CPU parameter, float64
  optim::AdamState<double> state;  // CPU state, float64
};

std::vector<Pair> make_pairs(const std::vector<Shape>& shapes, std::mt19937& g, manifold::Rng& rng) {
  std::vector<Pair> ps;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const Shape& s = shapes[i];
    Pair p;
    p.name = std::string(s.stiefel ? "stiefel_" : "euclid_") + std::to_string(s.rows) + "x" + std::to_string(s.cols);
    p.shape = s;
    // Both sides start from the same float32 values; the Stiefel start is Haar (float64 QR,
    // then rounded), so it is orthonormal only to float precision, as the trainer's W_up.
    const MatF x0 = s.stiefel ? MatF(manifold::EuclideanStiefel<double>{}.random(s.rows, s.cols, rng).cast<float>())
                              : random_matrix(s.rows, s.cols, g);
    p.value = test::to_device<float>(to_row_major(x0));
    p.grad = cuda::DeviceBuffer<float>(static_cast<std::size_t>(s.rows) * s.cols);
    p.start = x0.cast<double>();
    p.ref = p.start;
    ps.push_back(std::move(p));
  }
  return ps;
}

cuda::DeviceParam device_param(Pair& p) {
  return cuda::DeviceParam{p.name, p.value.data(), p.grad.data(), p.shape.rows, p.shape.cols, p.shape.stiefel};
}

/// ||U^T U - I||_F of a float matrix, in float64.
double orth_error(const MatF& u) {
  const MatD d = u.cast<double>();
  return (d.transpose() * d - MatD::Identity(d.cols(), d.cols())).norm();
}

/// scratch_floats > 0: DeviceOptimizer::set_batch_scratch_floats, to split the batched groups into chunks.
void run_trajectory(const optim::AdamWOptions& eo, const optim::RiemannianAdamOptions& ro, int steps, std::uint32_t seed,
                    std::size_t scratch_floats = 0) {
  std::mt19937 g(seed);
  manifold::Rng rng(seed);
  // Euclidean shapes like W_down (d_latent, d) and odd ones; Stiefel like W_up (d_kv, d_latent),
  // the joint (2 d_kv, d_latent), a column and a square one. Stiefel parameters with <= 320
  // columns are stepped batched, grouped by shape (the repeated 64 x 16 and 300 x 48, and the
  // Qwen2.5-7B-like 512 x 256 pair, form groups of 3, 2 and 2 members, interleaved with others);
  // 340 x 330 takes the per-parameter cuSOLVER path. The blocked chol_inverse_upper (panels of
  // 32 columns) sees p = 1, 5, 16, 24, 31, 32, 33, 48, 64, 100, 256 and 320 (its widest).
  const std::vector<Shape> shapes = {{37, 5, false},   {5, 37, false},  {64, 16, false},  {300, 48, false}, {1, 129, false},
                                     {37, 5, true},    {64, 16, true},  {300, 48, true},  {128, 24, true},  {48, 1, true},
                                     {33, 33, true},   {64, 16, true},  {512, 256, true}, {300, 48, true},  {64, 16, true},
                                     {512, 256, true}, {340, 330, true}, {40, 32, true},  {100, 31, true},  {70, 64, true},
                                     {300, 100, true}, {400, 320, true}};
  std::vector<Pair> ps = make_pairs(shapes, g, rng);
  cuda::Stream stream;
  cuda::CublasHandle blas(stream.get());
  cuda::DeviceOptimizer opt(stream.get(), blas.get(), eo, ro);
  if (scratch_floats > 0) opt.set_batch_scratch_floats(scratch_floats);
  for (Pair& p : ps) opt.add(device_param(p));
  const manifold::EuclideanStiefel<double> st;
  for (int t = 0; t < steps; ++t) {
    const double lr_e = eo.lr * (1.0 + 0.5 * std::sin(t)), lr_r = ro.lr * (1.0 + 0.5 * std::cos(t));
    std::vector<MatD> grads;
    for (Pair& p : ps) {
      const MatF gf = random_matrix(p.shape.rows, p.shape.cols, g);
      const std::vector<float> h = to_row_major(gf);
      CACHESHRINK_CUDA_CHECK(cudaMemcpyAsync(p.grad.data(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice, stream.get()));
      CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(stream.get()));  // h dies at the end of the iteration
      grads.push_back(gf.cast<double>());
    }
    opt.step(lr_e, lr_r);
    // The CPU optimizers: per parameter, then geoopt's group stabilisation.
    bool due = false;
    for (std::size_t i = 0; i < ps.size(); ++i) {
      Pair& p = ps[i];
      if (p.shape.stiefel) {
        optim::riemannian_adam_step(st, p.ref, grads[i], p.state, ro, lr_r);
        due = due || (ro.stabilize > 0 && p.state.step % ro.stabilize == 0);
      } else {
        optim::adamw_step(p.ref, grads[i], p.state, eo, lr_e);
      }
    }
    if (due)
      for (Pair& p : ps)
        if (p.shape.stiefel) optim::riemannian_adam_stabilize(st, p.ref, p.state);
  }
  CHECK(opt.steps() == steps);
  for (std::size_t i = 0; i < ps.size(); ++i) {
    Pair& p = ps[i];
    const MatF x = from_row_major(test::to_host(p.value), p.shape.rows, p.shape.cols);
    const optim::AdamState<float> s = opt.state(i);
    const double ex = rel_err(x, p.ref), em = rel_err(s.exp_avg, p.state.exp_avg), ev = rel_err(s.exp_avg_sq, p.state.exp_avg_sq);
    const bool ams = p.shape.stiefel ? ro.amsgrad : eo.amsgrad;
    const double evm = ams ? rel_err(s.max_exp_avg_sq, p.state.max_exp_avg_sq) : 0.0;
    // The trajectory must move far beyond the tolerance (>= 50x the 1e-4 below), or the
    // comparison proves nothing. A Stiefel step moves ~lr in Frobenius norm, spread over all
    // entries, so the largest entry of a 512 x 256 parameter moves ~1e-2 in these 20 steps.
    const double moved = (p.ref - p.start).cwiseAbs().maxCoeff() / p.start.cwiseAbs().maxCoeff();
    INFO(p.name, " after ", steps, " steps: rel err x ", ex, ", exp_avg ", em, ", exp_avg_sq ", ev, ", max_exp_avg_sq ", evm,
         "; the parameter moved ", moved, " (relative)");
    CHECK(moved > 5e-3);
    CHECK(s.step == p.state.step);
    CHECK(ex < 1e-4);
    CHECK(em < 1e-4);
    // exp_avg_sq carries the float32 constant 1 - 0.999f = 9.99987e-4 (as the CPU float code
    // does), 1.3e-5 relative from float64's 1e-3.
    CHECK(ev < 1e-4);
    CHECK(evm < 1e-4);
    if (p.shape.stiefel) {
      const double eo_ = orth_error(x);
      INFO(p.name, ": ||U^T U - I||_F = ", eo_);
      CHECK(eo_ < 1e-5);
    }
  }
}

}  // namespace

TEST_CASE("DeviceOptimizer: AdamW and RiemannianAdam (Stiefel) follow the float64 CPU optimizers for 20 steps") {
  CACHESHRINK_REQUIRE_GPU();
  optim::AdamWOptions eo;
  eo.lr = 1e-2;
  eo.weight_decay = 0.05;
  optim::RiemannianAdamOptions ro;
  ro.lr = 3e-2;
  ro.weight_decay = 0.02;
  SUBCASE("defaults otherwise") { run_trajectory(eo, ro, 20, 11); }
  SUBCASE("amsgrad, stabilize every 3 steps, beta1 below 0.5 (the other lerp branch)") {
    eo.amsgrad = true;
    eo.beta1 = 0.3;
    ro.amsgrad = true;
    ro.stabilize = 3;
    run_trajectory(eo, ro, 20, 12);
  }
  SUBCASE("no weight decay") {
    eo.weight_decay = 0.0;
    ro.weight_decay = 0.0;
    run_trajectory(eo, ro, 20, 13);
  }
  SUBCASE("batched groups split into chunks (scratch for 2 members of 64 x 16: chunks of 2 + 1, and 1 + 1 of the larger shapes)") {
    run_trajectory(eo, ro, 20, 14, 2048);
  }
}

TEST_CASE("DeviceOptimizer::grad_norm_and_clip: the trainer's norm over all parameters, clip_grad_norm on the clipped set") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(21);
  manifold::Rng rng(21);
  const std::vector<Shape> shapes = {{37, 5, false}, {300, 48, false}, {64, 16, true}, {128, 24, true}, {1, 1, false}};
  for (const bool clip_stiefel : {false, true})
    for (const double max_norm : {0.0, 1.0, 1e6}) {
      std::vector<Pair> ps = make_pairs(shapes, g, rng);
      cuda::Stream stream;
      cuda::CublasHandle blas(stream.get());
      cuda::DeviceOptimizer opt(stream.get(), blas.get(), {}, {});
      std::vector<MatF> host;  // the CPU's float gradients, clipped by optim::clip_grad_norm below
      for (Pair& p : ps) {
        opt.add(device_param(p));
        host.push_back(random_matrix(p.shape.rows, p.shape.cols, g, 3.0f));
        const std::vector<float> h = to_row_major(host.back());
        p.grad.upload(h, stream.get());
      }
      // MLATrainer::step: norm of everything, clip_grad_norm over the clipped set.
      double sq = 0.0;
      std::vector<MatF*> clipped;
      for (std::size_t i = 0; i < ps.size(); ++i) {
        sq += host[i].cast<double>().squaredNorm();
        if (!ps[i].shape.stiefel || clip_stiefel) clipped.push_back(&host[i]);
      }
      double clipped_norm = 0.0;
      if (max_norm > 0) clipped_norm = optim::clip_grad_norm<float>(std::span<MatF* const>(clipped), max_norm);
      const double want = std::sqrt(sq);
      const double got = opt.grad_norm_and_clip(max_norm, clip_stiefel);
      INFO("max_norm ", max_norm, " clip_stiefel ", clip_stiefel, ": norm ", got, " want ", want, " (clipped set ", clipped_norm, ")");
      CHECK(std::abs(got - want) <= 1e-12 * want);
      if (max_norm == 1.0) CHECK(clipped_norm > 10.0);  // the clip really scales
      for (std::size_t i = 0; i < ps.size(); ++i) {
        const MatF gd = from_row_major(test::to_host(ps[i].grad), ps[i].shape.rows, ps[i].shape.cols);
        const double e = rel_err(gd, host[i].cast<double>());
        INFO(ps[i].name, ": gradient rel err after clipping ", e);
        // The same float coefficient times the same float values: equal up to one rounding of
        // the coefficient (the norms differ only in double summation order).
        CHECK(e <= 2e-7);
        if (max_norm == 0.0 || (ps[i].shape.stiefel && !clip_stiefel)) CHECK(e == 0.0);
      }
    }
}

TEST_CASE("DeviceOptimizer: state() / load_state() resume a run exactly, and read CPU states") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(31);
  manifold::Rng rng(31);
  const std::vector<Shape> shapes = {{37, 5, false}, {64, 16, true}, {300, 48, true}};
  optim::AdamWOptions eo;
  eo.weight_decay = 0.1;
  eo.amsgrad = true;
  optim::RiemannianAdamOptions ro;
  ro.lr = 1e-2;
  ro.amsgrad = true;
  std::vector<Pair> a = make_pairs(shapes, g, rng);
  cuda::Stream stream;
  cuda::CublasHandle blas(stream.get());
  cuda::DeviceOptimizer oa(stream.get(), blas.get(), eo, ro);
  for (Pair& p : a) oa.add(device_param(p));
  std::vector<std::vector<std::vector<float>>> grads;  // [step][param]
  for (int t = 0; t < 6; ++t) {
    grads.emplace_back();
    for (Pair& p : a) grads.back().push_back(test::random_floats(p.grad.size(), g));
  }
  auto run = [&](cuda::DeviceOptimizer& o, std::vector<Pair>& ps, int t) {
    for (std::size_t i = 0; i < ps.size(); ++i) ps[i].grad.upload(grads[static_cast<std::size_t>(t)][i], stream.get());
    o.step(1e-2, 1e-2);
  };
  for (int t = 0; t < 3; ++t) run(oa, a, t);
  // A second optimizer over copies of the parameters, resumed from oa's states.
  std::vector<Pair> b = make_pairs(shapes, g, rng);
  cuda::DeviceOptimizer ob(stream.get(), blas.get(), eo, ro);
  for (std::size_t i = 0; i < b.size(); ++i) {
    b[i].value.upload(test::to_host(a[i].value), stream.get());
    ob.add(device_param(b[i]));
    ob.load_state(i, oa.state(i));
  }
  CHECK(ob.steps() == 3);
  for (int t = 3; t < 6; ++t) {
    run(oa, a, t);
    run(ob, b, t);
  }
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double ex = test::max_rel(test::to_host(b[i].value), [&] {
      const std::vector<float> v = test::to_host(a[i].value);
      return std::vector<double>(v.begin(), v.end());
    }());
    const optim::AdamState<float> sa = oa.state(i), sb = ob.state(i);
    const double em = rel_err(sb.exp_avg, sa.exp_avg.cast<double>()), ev = rel_err(sb.exp_avg_sq, sa.exp_avg_sq.cast<double>()),
                 evm = rel_err(sb.max_exp_avg_sq, sa.max_exp_avg_sq.cast<double>());
    INFO(a[i].name, ": resumed vs continued rel err x ", ex, ", exp_avg ", em, ", exp_avg_sq ", ev, ", max_exp_avg_sq ", evm);
    // Only the double atomics' summation order may differ (<rg, rg>, rounded to float).
    CHECK(ex < 1e-6);
    CHECK(em < 1e-6);
    CHECK(ev < 1e-6);
    CHECK(evm < 1e-6);
    CHECK(sb.step == 6);
  }
  // A CPU state in the CPU layout (column-major; (1, 1) second moment for Stiefel) loads as is.
  optim::AdamState<float> cpu;
  cpu.step = 4;
  cpu.exp_avg = random_matrix(64, 16, g);
  cpu.exp_avg_sq = MatF::Constant(1, 1, 0.25f);
  cpu.max_exp_avg_sq = MatF::Constant(1, 1, 0.5f);
  ob.load_state(1, cpu);
  const optim::AdamState<float> back = ob.state(1);
  CHECK(back.step == 4);
  CHECK(back.exp_avg == cpu.exp_avg);
  CHECK(back.exp_avg_sq == cpu.exp_avg_sq);
  CHECK(back.max_exp_avg_sq == cpu.max_exp_avg_sq);
  cpu.exp_avg_sq = MatF::Zero(64, 16);  // a Euclidean-shaped second moment for a Stiefel parameter
  CHECK_THROWS_WITH_AS(ob.load_state(1, cpu), doctest::Contains("exp_avg_sq has shape (64, 16), expected (1, 1)"), InvalidArgument);
}

TEST_CASE("DeviceOptimizer: a non-finite gradient fails the QR retraction with NumericalError naming the parameter") {
  // Y = x + u with u tangent has Y^T Y = I + u^T u, positive definite in exact arithmetic, so a
  // NaN is what reaches the Cholesky's pivot check (chol_inverse_upper's info; p <= 320).
  CACHESHRINK_REQUIRE_GPU();
  for (const Shape sh : {Shape{64, 16, true}, Shape{300, 48, true}, Shape{400, 320, true}}) {
    std::mt19937 g(5);
    manifold::Rng rng(5);
    std::vector<Pair> ps = make_pairs({Shape{64, 16, true}, sh}, g, rng);
    cuda::Stream stream;
    cuda::CublasHandle blas(stream.get());
    cuda::DeviceOptimizer opt(stream.get(), blas.get(), {}, {});
    for (Pair& p : ps) opt.add(device_param(p));
    for (std::size_t i = 0; i < ps.size(); ++i) {
      std::vector<float> h = to_row_major(random_matrix(ps[i].shape.rows, ps[i].shape.cols, g));
      if (i == 1) h[7] = NAN;
      CACHESHRINK_CUDA_CHECK(
          cudaMemcpyAsync(ps[i].grad.data(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice, stream.get()));
      CACHESHRINK_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    }
    INFO(ps[1].name);
    // The first parameter is fine; the message names the second (same shape as the first for 64 x 16).
    const std::string want = "DeviceOptimizer::step(" + ps[1].name + "): QR retraction";
    CHECK_THROWS_WITH_AS(opt.step(0.0, 1e-2), doctest::Contains(want.c_str()), NumericalError);
  }
}

TEST_CASE("DeviceOptimizer rejects bad parameters, options and handles with messages naming them") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(41);
  cuda::Stream stream;
  cuda::CublasHandle blas(stream.get());
  optim::AdamWOptions bad;
  bad.beta1 = 1.0;
  CHECK_THROWS_WITH_AS(cuda::DeviceOptimizer(stream.get(), blas.get(), bad, {}), doctest::Contains("beta1"), InvalidArgument);
  cuda::DeviceOptimizer opt(stream.get(), blas.get(), {}, {});
  cuda::DeviceBuffer<float> v = test::to_device<float>(test::random_floats(40 * 8, g)), gr(40 * 8);
  CHECK_THROWS_WITH_AS(opt.add({"wide", v.data(), gr.data(), 8, 40, true}), doctest::Contains("wide"), InvalidArgument);
  CHECK_THROWS_WITH_AS(opt.add({"not_orthonormal", v.data(), gr.data(), 40, 8, true}), doctest::Contains("not orthonormal"), InvalidArgument);
  CHECK_THROWS_WITH_AS(opt.add({"no_grad", v.data(), nullptr, 40, 8, false}), doctest::Contains("no_grad"), InvalidArgument);
  CHECK_THROWS_WITH_AS(opt.add({"empty", v.data(), gr.data(), 0, 8, false}), doctest::Contains("empty"), InvalidArgument);
  CHECK(opt.size() == 0);
  CHECK_THROWS_WITH_AS(opt.step(-1.0, 0.1), doctest::Contains("euclidean_lr"), InvalidArgument);
  CHECK_THROWS_WITH_AS(opt.step(0.1, NAN), doctest::Contains("riemannian_lr"), InvalidArgument);
  // A Stiefel parameter with a handle bound to another stream would race: refused at step().
  manifold::Rng rng(41);
  const MatF u = manifold::EuclideanStiefel<double>{}.random(40, 8, rng).cast<float>();
  v.upload(to_row_major(u), stream.get());
  cuda::CublasHandle other(nullptr);
  cuda::DeviceOptimizer o2(stream.get(), other.get(), {}, {});
  CHECK_THROWS_WITH_AS(o2.add({"w_up", v.data(), gr.data(), 40, 8, true}), doctest::Contains("another stream"), InvalidArgument);
  // The caller's cuBLAS math mode survives a step (it is forced to full float32 only inside).
  CACHESHRINK_CUBLAS_CHECK(cublasSetMathMode(blas.get(), CUBLAS_TF32_TENSOR_OP_MATH));
  opt.add({"w_up", v.data(), gr.data(), 40, 8, true});
  CACHESHRINK_CUDA_CHECK(cudaMemsetAsync(gr.data(), 0, gr.size() * sizeof(float), stream.get()));
  opt.step(0.1, 0.1);
  cublasMath_t mode{};
  CACHESHRINK_CUBLAS_CHECK(cublasGetMathMode(blas.get(), &mode));
  CHECK(mode == CUBLAS_TF32_TENSOR_OP_MATH);
  // A zero gradient leaves the point where it was (wd = 0: no L2 term; the step is 0 / eps).
  const MatF after = from_row_major(test::to_host(v), 40, 8);
  INFO("zero-gradient step moved the point by ", (after - u).cwiseAbs().maxCoeff());
  CHECK((after - u).cwiseAbs().maxCoeff() < 1e-6);
}

// Every CUDA kernel against a float64 CPU recomputation on random shapes, odd sizes included,
// in float32 and bf16 (inputs rounded to bf16 before the reference sees them).
#include <doctest/doctest.h>

#include <cmath>
#include <optional>

#include "cuda/cuda_test_support.cuh"

using namespace cacheshrink;
using test::max_rel;
using bf16 = __nv_bfloat16;

namespace {

template <class T>
constexpr double tol(double f32, double b16) {
  return std::is_same_v<T, float> ? f32 : b16;
}
template <class T>
std::vector<float> as_input(std::vector<float> v) {
  return std::is_same_v<T, float> ? v : test::round_bf16(std::move(v));
}

/// norm_rows, or with a residual bias (bias_norm_rows: x += xb in place, then the norm).
template <class T>
void check_norms(int rows, int H, bool layer, bool residual_bias, std::mt19937& g) {
  auto x = test::random_floats(static_cast<std::size_t>(rows) * H, g, 2.0f);
  auto w = test::random_floats(H, g), b = test::random_floats(H, g), xb = test::random_floats(H, g);
  const float eps = 1e-5f;
  cuda::DeviceBuffer<float> dx = test::to_device<float>(x), dw = test::to_device<float>(w), db = test::to_device<float>(b), dxb = test::to_device<float>(xb);
  cuda::DeviceBuffer<T> dy(x.size());
  if (residual_bias) {
    cuda::bias_norm_rows<T>(dx.data(), H, dxb.data(), dw.data(), layer ? db.data() : nullptr, layer, eps, dy.data(), H, rows, H, nullptr);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < H; ++c) x[r * H + c] += xb[c];  // the same float additions the kernel does
    CHECK(test::to_host(dx) == x);                        // the residual is updated in place
  } else {
    cuda::norm_rows<T>(dx.data(), H, dw.data(), layer ? db.data() : nullptr, layer, eps, dy.data(), H, rows, H, nullptr);
    CHECK(test::to_host(dx) == x);  // and left alone here
  }
  std::vector<double> want(x.size());
  for (int r = 0; r < rows; ++r) {
    double mean = 0, ss = 0;
    if (layer)
      for (int c = 0; c < H; ++c) mean += x[r * H + c] / static_cast<double>(H);
    for (int c = 0; c < H; ++c) ss += (x[r * H + c] - mean) * (x[r * H + c] - mean) / H;
    const double inv = 1.0 / std::sqrt(ss + eps);
    for (int c = 0; c < H; ++c) want[r * H + c] = (x[r * H + c] - mean) * inv * w[c] + (layer ? b[c] : 0.0);
  }
  const double e = max_rel(test::to_host(dy), want);
  INFO("rows ", rows, " H ", H, " layer ", layer, " residual bias ", residual_bias, " err ", e);
  CHECK(e < tol<T>(2e-6, 8e-3));
}

template <class T>
void check_gemm(int rows, int out, int in, float beta, std::mt19937& g) {
  auto x = as_input<T>(test::random_floats(static_cast<std::size_t>(rows) * in, g));
  auto w = as_input<T>(test::random_floats(static_cast<std::size_t>(out) * in, g));
  auto y0 = test::random_floats(static_cast<std::size_t>(rows) * out, g);
  auto dx = test::to_device<T>(x), dw = test::to_device<T>(w);
  auto dy = test::to_device<float>(y0);
  cuda::CublasHandle h(nullptr);
  cuda::gemm_xwt<T, float>(h.get(), rows, out, in, dx.data(), in, dw.data(), in, dy.data(), out, 1.0f, beta);
  std::vector<double> want(y0.size());
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = beta * static_cast<double>(y0[r * out + o]);
      for (int k = 0; k < in; ++k) s += static_cast<double>(x[r * in + k]) * w[o * in + k];
      want[r * out + o] = s;
    }
  const double e = max_rel(test::to_host(dy), want);
  INFO("gemm ", rows, "x", out, "x", in, " err ", e);
  CHECK(e < tol<T>(1e-5, 1e-4));  // inputs exactly bf16, float accumulation
  if constexpr (std::is_same_v<T, bf16>) {
    // bf16 output: one rounding on top
    cuda::DeviceBuffer<T> yb(y0.size());
    cuda::gemm_xwt<T, T>(h.get(), rows, out, in, dx.data(), in, dw.data(), in, yb.data(), out);
    std::vector<double> w0(want.size());
    for (std::size_t i = 0; i < want.size(); ++i) w0[i] = want[i] - beta * static_cast<double>(y0[i]);
    CHECK(max_rel(test::to_host(yb), w0) < 8e-3);
  }
}

struct AttnCase {
  std::vector<int> lens;
  int nh, nkv, hd, window;
};

/// Reference attention in double over bf16/float-rounded inputs. q: (N, ldq) etc.
std::vector<double> attention_ref(const std::vector<float>& qkv, int ld, const AttnCase& c) {
  const int Dq = c.nh * c.hd, Dkv = c.nkv * c.hd, group = c.nh / c.nkv;
  int N = 0;
  for (int l : c.lens) N += l;
  std::vector<double> out(static_cast<std::size_t>(N) * Dq, 0.0);
  int begin = 0;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
  for (int len : c.lens) {
    for (int i = 0; i < len; ++i)
      for (int h = 0; h < c.nh; ++h) {
        const int kvh = h / group;
        std::vector<double> s;
        const int lo = c.window > 0 ? std::max(0, i - c.window + 1) : 0;
        double m = -1e300;
        for (int j = lo; j <= i; ++j) {
          double d = 0;
          for (int t = 0; t < c.hd; ++t) d += static_cast<double>(qkv[(begin + i) * ld + h * c.hd + t]) * qkv[(begin + j) * ld + Dq + kvh * c.hd + t];
          s.push_back(d * scale);
          m = std::max(m, d * scale);
        }
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - m));
        for (int t = 0; t < c.hd; ++t) {
          double acc = 0;
          for (int j = lo; j <= i; ++j) acc += s[j - lo] * qkv[(begin + j) * ld + Dq + Dkv + kvh * c.hd + t];
          out[static_cast<std::size_t>(begin + i) * Dq + h * c.hd + t] = acc / sum;
        }
      }
    begin += len;
  }
  return out;
}

/// kernel: nullopt = attention_rows, else the flash kernel forced to that kind.
template <class T>
void check_attention(const AttnCase& c, std::optional<cuda::FlashKernel> kernel, std::mt19937& g) {
  const bool flash = kernel.has_value();
  const int Dq = c.nh * c.hd, Dkv = c.nkv * c.hd, ld = Dq + 2 * Dkv;
  std::vector<int> off{0};
  for (int l : c.lens) off.push_back(off.back() + l);
  const int N = off.back();
  auto qkv = as_input<T>(test::random_floats(static_cast<std::size_t>(N) * ld, g, 2.0f));
  auto d = test::to_device<T>(qkv);
  cuda::DeviceBuffer<T> out(static_cast<std::size_t>(N) * Dq);
  auto plan = cuda::AttentionPlan::from_offsets(off);
  cuda::DeviceBuffer<int> rb;
  rb.upload(plan.row_begin);
  cuda::DeviceBuffer<int4> tiles;
  tiles.upload(plan.tiles);
  cuda::AttentionArgs<T> a;
  a.q = d.data();
  a.k = d.data() + Dq;
  a.v = d.data() + Dq + Dkv;
  a.out = out.data();
  a.ldq = a.ldkv = ld;
  a.ldo = Dq;
  a.rows = N;
  a.n_heads = c.nh;
  a.n_kv_heads = c.nkv;
  a.head_dim = c.hd;
  a.window = c.window;
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
  if constexpr (std::is_same_v<T, bf16>) {
    if (flash) {
      REQUIRE(cuda::flash_supported(a));
      cuda::flash_attention(a, tiles.data(), static_cast<int>(plan.tiles.size()), nullptr, *kernel);
    } else {
      cuda::attention_rows<T>(a, rb.data(), nullptr);
    }
  } else {
    cuda::attention_rows<T>(a, rb.data(), nullptr);
  }
  const double e = max_rel(test::to_host(out), attention_ref(qkv, ld, c));
  INFO("attention nh ", c.nh, " nkv ", c.nkv, " hd ", c.hd, " window ", c.window, " flash ", flash ? static_cast<int>(*kernel) : -1, " seqs ",
       c.lens.size(), " err ", e);
  CHECK(e < tol<T>(2e-5, 2e-2));
}

}  // namespace

TEST_CASE("norm kernels match float64 (RMSNorm, LayerNorm; float and bf16 outputs)") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(1);
  // 20000 columns: wider than the 48 KB shared-memory row cache (the uncached kernel)
  for (auto [rows, H] : {std::pair{1, 1}, {3, 7}, {17, 257}, {5, 4096}, {2, 1000}, {64, 3584}, {3, 20000}})
    for (bool layer : {false, true})
      for (bool rb : {false, true}) {
        check_norms<float>(rows, H, layer, rb, g);
        check_norms<bf16>(rows, H, layer, rb, g);
      }
}

TEST_CASE("head RMSNorm and RoPE match float64 on strided column blocks") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(2);
  for (int hd : {2, 6, 64, 128})
    for (int rows : {1, 13}) {
      const int heads = 3, col0 = hd, ld = hd * (heads + 2) + 3;
      auto y = test::random_floats(static_cast<std::size_t>(rows) * ld, g, 2.0f);
      auto w = test::random_floats(hd, g);
      // head RMSNorm (float)
      {
        auto d = test::to_device<float>(y);
        auto dw = test::to_device<float>(w);
        cuda::head_rms_norm<float>(d.data(), ld, col0, rows, heads, hd, dw.data(), 1e-6f, nullptr);
        std::vector<double> want(y.begin(), y.end());
        for (int r = 0; r < rows; ++r)
          for (int h = 0; h < heads; ++h) {
            double ss = 0;
            for (int t = 0; t < hd; ++t) ss += std::pow(y[r * ld + col0 + h * hd + t], 2) / hd;
            for (int t = 0; t < hd; ++t) want[r * ld + col0 + h * hd + t] = y[r * ld + col0 + h * hd + t] / std::sqrt(ss + 1e-6) * w[t];
          }
        CHECK(max_rel(test::to_host(d), want) < 2e-6);
      }
      // RoPE: table from positions; reference in double from the same table.
      {
        const int half = hd / 2, P = 40;
        std::vector<float> cs(P * half), sn(P * half);
        for (int p = 0; p < P; ++p)
          for (int i = 0; i < half; ++i) {
            const double f = std::pow(10000.0, -2.0 * i / hd);
            cs[p * half + i] = static_cast<float>(std::cos(p * f));
            sn[p * half + i] = static_cast<float>(std::sin(p * f));
          }
        std::vector<int> pos(rows);
        for (int r = 0; r < rows; ++r) pos[r] = (r * 7 + 3) % P;
        for (int variant = 0; variant < 2; ++variant) {
          auto yin = variant ? test::round_bf16(y) : y;
          std::vector<double> want(yin.begin(), yin.end());
          for (int r = 0; r < rows; ++r)
            for (int h = 0; h < heads; ++h)
              for (int i = 0; i < half; ++i) {
                const int a = r * ld + col0 + h * hd + i;
                const double c = cs[pos[r] * half + i], s = sn[pos[r] * half + i];
                want[a] = yin[a] * c - yin[a + half] * s;
                want[a + half] = yin[a + half] * c + yin[a] * s;
              }
          cuda::DeviceBuffer<int> dp;
          dp.upload(pos);
          auto dc = test::to_device<float>(cs), ds = test::to_device<float>(sn);
          if (variant == 0) {
            auto d = test::to_device<float>(yin);
            cuda::rope<float>(d.data(), ld, col0, rows, heads, hd, dp.data(), dc.data(), ds.data(), nullptr);
            CHECK(max_rel(test::to_host(d), want) < 1e-6);
          } else {
            auto d = test::to_device<bf16>(yin);
            cuda::rope<bf16>(d.data(), ld, col0, rows, heads, hd, dp.data(), dc.data(), ds.data(), nullptr);
            CHECK(max_rel(test::to_host(d), want) < 8e-3);
          }
        }
      }
    }
}

TEST_CASE("elementwise kernels: bias, SwiGLU, GELU(tanh), embedding, NLL") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(3);
  for (auto [rows, I] : {std::pair{1, 1}, {7, 33}, {65, 1025}, {3, 5000}}) {
    auto gu = test::random_floats(static_cast<std::size_t>(rows) * 2 * I, g, 4.0f);
    auto bg = test::random_floats(I, g), bu = test::random_floats(I, g);
    auto dgu = test::to_device<float>(gu);
    auto dbg = test::to_device<float>(bg), dbu = test::to_device<float>(bu);
    cuda::DeviceBuffer<float> act(static_cast<std::size_t>(rows) * I);
    cuda::swiglu<float>(dgu.data(), rows, I, dbg.data(), dbu.data(), act.data(), nullptr);
    std::vector<double> want(act.size());
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < I; ++i) {
        const double gg = gu[r * 2 * I + i] + static_cast<double>(bg[i]), u = gu[r * 2 * I + I + i] + static_cast<double>(bu[i]);
        want[r * I + i] = gg / (1 + std::exp(-gg)) * u;
      }
    CHECK(max_rel(test::to_host(act), want) < 2e-6);
    // GELU on the first rows*I values, with bias
    std::vector<float> y(gu.begin(), gu.begin() + static_cast<long>(rows) * I);
    auto dy = test::to_device<float>(y);
    cuda::bias_gelu<float>(dy.data(), rows, I, dbg.data(), nullptr);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < I; ++i) {
        const double v = y[r * I + i] + static_cast<double>(bg[i]);
        want[r * I + i] = 0.5 * v * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
      }
    CHECK(max_rel(test::to_host(dy), want) < 2e-6);
    // bias add on a strided block
    auto db = test::to_device<float>(y);
    cuda::add_bias<float>(db.data(), I, rows, I - (I > 1), dbu.data(), nullptr);
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < I; ++i) want[r * I + i] = y[r * I + i] + (i < I - (I > 1) ? static_cast<double>(bu[i]) : 0.0);
    CHECK(max_rel(test::to_host(db), want) < 1e-6);
  }
  // embedding (+ positions)
  {
    const int V = 37, H = 1100, P = 11, rows = 23;  // H over one 1024-column chunk
    auto tab = test::random_floats(V * H, g), ptab = test::random_floats(P * H, g);
    std::vector<int> ids(rows), pos(rows);
    for (int r = 0; r < rows; ++r) ids[r] = (r * 13) % V, pos[r] = r % P;
    auto dt = test::to_device<float>(tab), dpt = test::to_device<float>(ptab);
    cuda::DeviceBuffer<int> di, dp;
    di.upload(ids);
    dp.upload(pos);
    cuda::DeviceBuffer<float> x(rows * H);
    cuda::embedding<float>(di.data(), dp.data(), dt.data(), dpt.data(), x.data(), rows, H, nullptr);
    std::vector<double> want(rows * H);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < H; ++c) want[r * H + c] = static_cast<double>(tab[ids[r] * H + c]) + ptab[pos[r] * H + c];
    CHECK(max_rel(test::to_host(x), want) < 1e-6);
  }
  // NLL rows
  for (int V : {1, 5, 4096, 32001}) {
    const int rows = 9;
    auto lg = test::random_floats(static_cast<std::size_t>(rows) * V, g, 8.0f);
    std::vector<int> tg(rows);
    for (int r = 0; r < rows; ++r) tg[r] = r == 4 ? -1 : (r * 7919) % V;
    auto dl = test::to_device<float>(lg);
    cuda::DeviceBuffer<int> dtg;
    dtg.upload(tg);
    cuda::DeviceBuffer<float> nll(rows);
    cuda::nll_rows(dl.data(), rows, V, dtg.data(), nll.data(), nullptr);
    std::vector<double> want(rows);
    for (int r = 0; r < rows; ++r) {
      double m = -1e300, s = 0;
      for (int v = 0; v < V; ++v) m = std::max(m, static_cast<double>(lg[r * V + v]));
      for (int v = 0; v < V; ++v) s += std::exp(lg[r * V + v] - m);
      want[r] = tg[r] < 0 ? 0.0 : m + std::log(s) - lg[r * V + tg[r]];
    }
    CHECK(max_rel(test::to_host(nll), want, 1.0) < 2e-5);
  }
}

TEST_CASE("GEMM X W^T: cublasSgemm (float32) and cublasGemmEx (bf16 in, fp32 accumulate) match float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(4);
  for (auto [r, o, i] : {std::tuple{1, 1, 1}, {3, 5, 7}, {17, 33, 65}, {129, 255, 513}, {64, 1000, 96}})
    for (float beta : {0.0f, 1.0f}) {
      check_gemm<float>(r, o, i, beta, g);
      check_gemm<bf16>(r, o, i, beta, g);
    }
}

TEST_CASE("TunedGemm (cublasLt, timed kernel choice) matches float64: every op pair, odd sizes, offset pointers, beta 0/1, in/out of place") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(9);
  cuda::Stream stream;
  cuda::CublasHandle h(stream.get());
  cuda::TunedGemm tg(stream.get(), h.get());
  // Column-major C (m, n) = alpha op(A) op(B) + beta C with ld = rows + pad and the operands
  // starting `shift` floats into their buffers (alignment 4 bytes: the planner must honour it).
  // search: 0 untuned, 1 tuned among 8 heuristic candidates, 2 among 64 plus split-K variants.
  for (int search : {1, 0, 2})
    for (auto [m, n, k] : {std::tuple{1, 1, 1}, {3, 5, 7}, {33, 17, 65}, {129, 257, 96}, {256, 512, 384}})
      for (auto [ta, tb] : {std::pair{CUBLAS_OP_N, CUBLAS_OP_N}, {CUBLAS_OP_T, CUBLAS_OP_N}, {CUBLAS_OP_N, CUBLAS_OP_T}, {CUBLAS_OP_T, CUBLAS_OP_T}})
        for (float beta : {0.0f, 1.0f})
          for (int shift : {0, 1})
            for (bool oop : {false, true}) {
            const bool tune = search > 0;
            tg.set_tuning(tune);
            tg.set_search(search == 2 ? 64 : cuda::TunedGemm::kCandidates, search == 2);
            const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
            const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
            const int lda = ar + 3, ldb = br + 1, ldc = m + 2;
            auto A = test::random_floats(static_cast<std::size_t>(lda) * ac + shift, g);
            auto B = test::random_floats(static_cast<std::size_t>(ldb) * bc + shift, g);
            auto C = test::random_floats(static_cast<std::size_t>(ldc) * n + shift, g);
            // Out of place: D starts as other random values; C must come back unchanged.
            auto D0 = test::random_floats(C.size(), g);
            auto dA = test::to_device<float>(A), dB = test::to_device<float>(B), dC = test::to_device<float>(C), dD = test::to_device<float>(D0);
            const float alpha = 0.75f;
            if (oop)
              tg.gemm(ta, tb, m, n, k, alpha, dA.data() + shift, lda, dB.data() + shift, ldb, beta, static_cast<const float*>(dC.data() + shift),
                      ldc, dD.data() + shift);
            else
              tg.gemm(ta, tb, m, n, k, alpha, dA.data() + shift, lda, dB.data() + shift, ldb, beta, dC.data() + shift, ldc);
            const auto got = test::to_host(oop ? dD : dC);
            if (oop) CHECK(test::to_host(dC) == C);
            double worst = 0, scale = 0;
            for (int j = 0; j < n; ++j)
              for (int i = 0; i < m; ++i) {
                double s = 0;
                for (int p = 0; p < k; ++p) {
                  const double a = ta == CUBLAS_OP_N ? A[shift + i + static_cast<std::size_t>(p) * lda] : A[shift + p + static_cast<std::size_t>(i) * lda];
                  const double b = tb == CUBLAS_OP_N ? B[shift + p + static_cast<std::size_t>(j) * ldb] : B[shift + j + static_cast<std::size_t>(p) * ldb];
                  s += a * b;
                }
                const std::size_t at = shift + i + static_cast<std::size_t>(j) * ldc;
                const double want = alpha * s + beta * C[at];
                worst = std::max(worst, std::abs(got[at] - want));
                scale = std::max(scale, std::abs(want));
              }
            // Padding rows of C (i >= m) and the shifted-off prefix stay untouched.
            bool pad_kept = true;
            for (int j = 0; j < n; ++j)
              for (int i = m; i < ldc; ++i)
                pad_kept &= got[shift + i + static_cast<std::size_t>(j) * ldc] == (oop ? D0 : C)[shift + i + static_cast<std::size_t>(j) * ldc];
            INFO("search ", search, " oop ", oop, " m ", m, " n ", n, " k ", k, " ta ", static_cast<int>(ta), " tb ", static_cast<int>(tb), " beta ", beta,
                 " shift ", shift, " err ", worst / scale);
            CHECK(worst <= 1e-5 * scale);  // strict float32: a timing run writing into C (beta 1) would be ~4x off
            CHECK(pad_kept);
          }
  CHECK(tg.planned() > 0);
}

TEST_CASE("attention (causal, sliding window, MHA/GQA/MQA, packed ragged sequences) matches float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(5);
  const std::vector<AttnCase> cases = {
      {{1}, 1, 1, 32, 0},          {{5, 1, 3}, 4, 2, 64, 0},       {{63, 64, 65}, 4, 2, 64, 0},   {{130}, 8, 1, 32, 0},
      {{200, 7}, 4, 4, 64, 0},     {{150, 70}, 4, 2, 64, 16},      {{129}, 2, 1, 128, 70},        {{300}, 3, 3, 128, 0},
      {{67, 33}, 6, 2, 128, 64},   {{40, 9}, 4, 2, 64, 1},
  };
  for (const auto& c : cases) {
    check_attention<float>(c, std::nullopt, g);
    check_attention<bf16>(c, std::nullopt, g);
    check_attention<bf16>(c, cuda::FlashKernel::MmaSync, g);
  }
  // odd head sizes through the generic kernel only
  for (const auto& c : std::vector<AttnCase>{{{17, 5}, 3, 1, 24, 0}, {{33}, 2, 2, 80, 7}, {{9}, 4, 2, 256, 0}, {{11}, 1, 1, 3, 0}}) {
    check_attention<float>(c, std::nullopt, g);
    check_attention<bf16>(c, std::nullopt, g);
  }
}

TEST_CASE("wgmma attention (sm_90a, head_dim 64 and 128) matches float64 on ragged, windowed, GQA/MQA sequences") {
  CACHESHRINK_REQUIRE_GPU();
  if (!cuda::wgmma_available()) {
    MESSAGE("skipped: this binary has no sm_90a code for the current device");
    return;
  }
  std::mt19937 g(15);
  // head_dim 128 (Q in registers) and 64 (Q read from shared memory): single and multi-tile
  // sequences (a fault that only later key tiles show, like stop 24's miscompiled register Q at
  // 64, needs these), tile-edge lengths, GQA / MQA, sliding windows shorter and longer than a tile.
  std::vector<AttnCase> cases;
  for (int hd : {128, 64})
    for (AttnCase c : std::vector<AttnCase>{{{1}, 1, 1, 0, 0},
                                            {{5, 1, 3}, 4, 2, 0, 0},
                                            {{63, 64, 65}, 4, 2, 0, 0},
                                            {{200, 7}, 4, 4, 0, 0},
                                            {{150, 70}, 4, 2, 0, 16},
                                            {{129}, 2, 1, 0, 70},
                                            {{300}, 3, 3, 0, 0},
                                            {{67, 33}, 6, 2, 0, 64},
                                            {{40, 9}, 4, 2, 0, 1},
                                            {{1, 2, 127, 128}, 2, 2, 0, 0},
                                            {{1000, 77}, 8, 2, 0, 0},
                                            {{700}, 7, 1, 0, 200},
                                            {{513, 190}, 4, 1, 0, 0}}) {
      c.hd = hd;
      cases.push_back(c);
    }
  for (const auto& c : cases) check_attention<bf16>(c, cuda::FlashKernel::Wgmma, g);
  // Auto takes it wherever it applies; head_dim 32 has no wgmma kernel and says so when forced.
  check_attention<bf16>({{130, 9}, 4, 2, 128, 0}, cuda::FlashKernel::Auto, g);
  cuda::AttentionArgs<bf16> a;
  cuda::DeviceBuffer<bf16> buf(64 * 3 * 32);
  a.q = buf.data();
  a.k = buf.data() + 32;
  a.v = buf.data() + 64;
  a.out = buf.data();
  a.ldq = a.ldkv = a.ldo = 96;
  a.rows = 64;
  a.n_heads = a.n_kv_heads = 1;
  a.head_dim = 32;
  CHECK_THROWS_WITH_AS(cuda::flash_attention(a, nullptr, 1, nullptr, cuda::FlashKernel::Wgmma), doctest::Contains("head_dim 32"),
                       InvalidArgument);
}

TEST_CASE("errors name the operation and are cacheshrink::Error subclasses") {
  CACHESHRINK_REQUIRE_GPU();
  CHECK_THROWS_AS(cuda::DeviceBuffer<float>(std::size_t(1) << 50), cuda::CudaError);
  try {
    cuda::DeviceBuffer<float> b(std::size_t(1) << 50);
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("cudaMalloc") != std::string::npos);
  }
  cuda::CublasHandle h(nullptr);
  cuda::DeviceBuffer<float> a(4);
  // ldx < in is invalid for cuBLAS
  CHECK_THROWS_AS((cuda::gemm_xwt<float, float>(h.get(), 2, 2, 2, a.data(), 1, a.data(), 2, a.data(), 2)), cuda::CublasError);
  cuda::AttentionArgs<float> bad;
  bad.n_heads = 3;
  bad.n_kv_heads = 2;
  bad.head_dim = 64;
  CHECK_THROWS_AS(cuda::attention_rows<float>(bad, nullptr, nullptr), InvalidArgument);
}

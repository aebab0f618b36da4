// The training graph's bandwidth-bound kernels (backend/cuda/train.cuh, train_kernels) and the
// fused TF32 attention (flash_train.cuh) against float64 CPU recomputations: each launcher picks a
// register / float4 kernel where sizes and alignment allow and a plain one otherwise, and the
// shapes here (odd sizes, unaligned pointers, rows past the register kernels' widths) take both.
#include <doctest/doctest.h>

#include <algorithm>
#include <cacheshrink/backend/cuda/train.cuh>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/cuda_test_support.cuh"

using namespace cacheshrink;
using test::max_rel;
namespace tk = cuda::train_kernels;

namespace {

cudaStream_t kStream = nullptr;

/// A device copy of v starting `shift` floats into its buffer (shift 1: not 16-byte aligned).
struct Shifted {
  cuda::DeviceBuffer<float> buf;
  int shift;
  Shifted(const std::vector<float>& v, int s) : buf(v.size() + 4), shift(s) {
    std::vector<float> h(v.size() + 4, 0.0f);
    std::copy(v.begin(), v.end(), h.begin() + s);
    buf.upload(h);
  }
  float* data() { return buf.data() + shift; }
  std::vector<float> host(std::size_t n) const {
    CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
    const auto h = buf.download();
    return {h.begin() + shift, h.begin() + shift + static_cast<long>(n)};
  }
};

void check_norm(int rows, int H, bool layer, int shift, std::mt19937& g) {
  const auto x = test::random_floats(static_cast<std::size_t>(rows) * H, g, 2.0f);
  const auto w = test::random_floats(H, g), b = test::random_floats(H, g), dy = test::random_floats(x.size(), g);
  const auto dx0 = test::random_floats(x.size(), g);
  const float eps = 1e-5f;
  // float64 reference: y, mean, rstd, and dx0 + the backward of dy.
  std::vector<double> y(x.size()), mean(rows), rstd(rows), dx(x.size());
  for (int r = 0; r < rows; ++r) {
    const float* xr = x.data() + static_cast<std::size_t>(r) * H;
    double mu = 0, ss = 0;
    if (layer)
      for (int c = 0; c < H; ++c) mu += xr[c] / static_cast<double>(H);
    for (int c = 0; c < H; ++c) ss += (xr[c] - mu) * (xr[c] - mu) / H;
    const double rs = 1.0 / std::sqrt(ss + eps);
    mean[r] = mu;
    rstd[r] = rs;
    double sg = 0, sgx = 0;
    for (int c = 0; c < H; ++c) {
      const std::size_t i = static_cast<std::size_t>(r) * H + c;
      const double xh = (xr[c] - mu) * rs, gg = static_cast<double>(w[c]) * dy[i];
      y[i] = xh * w[c] + (layer ? b[c] : 0.0);
      sg += gg / H;
      sgx += gg * xh / H;
    }
    for (int c = 0; c < H; ++c) {
      const std::size_t i = static_cast<std::size_t>(r) * H + c;
      const double xh = (xr[c] - mu) * rs, gg = static_cast<double>(w[c]) * dy[i];
      dx[i] = dx0[i] + (layer ? rs * (gg - sg - xh * sgx) : rs * (gg - xh * sgx));
    }
  }
  Shifted dX(x, shift), dY(std::vector<float>(x.size()), shift), dDy(dy, shift), dDx(dx0, shift);
  auto dw = test::to_device<float>(w), db = test::to_device<float>(b);
  cuda::DeviceBuffer<float> dmean(rows), drstd(rows);
  tk::norm_forward(dX.data(), dw.data(), layer ? db.data() : nullptr, layer, eps, dY.data(), layer ? dmean.data() : nullptr, drstd.data(),
                   rows, H, kStream);
  tk::norm_backward(dX.data(), dw.data(), dmean.data(), drstd.data(), layer, dDy.data(), dDx.data(), rows, H, kStream);
  INFO("rows ", rows, " H ", H, " layer ", layer, " shift ", shift);
  CHECK(max_rel(dY.host(x.size()), y) < 2e-6);
  CHECK(max_rel(test::to_host(drstd), rstd) < 2e-6);
  if (layer) CHECK(max_rel(test::to_host(dmean), mean) < 2e-6);
  CHECK(max_rel(dDx.host(x.size()), dx) < 4e-6);
}

// The host twin of train_kernels::causal_block_end.
int block_end(int i, int n) {
  int b = 1;
  while (tk::causal_bound(b, n) <= i) ++b;
  return tk::causal_bound(b, n);
}

void check_softmax(int heads, int n, int window, int shift, std::mt19937& g) {
  const long long rows = static_cast<long long>(heads) * n;
  const auto s = test::random_floats(static_cast<std::size_t>(rows) * n, g, 6.0f);
  const auto dp = test::random_floats(s.size(), g);
  Shifted dS(s, shift), dDp(dp, shift);
  tk::softmax_forward(dS.data(), rows, n, window, kStream);
  tk::softmax_backward(dS.data(), dDp.data(), rows, n, window, kStream);
  const auto P = dS.host(s.size()), dPS = dDp.host(s.size());
  // Compare each row up to its causal block's end (later entries are unspecified).
  std::vector<float> got_p, got_d;
  std::vector<double> want_p, want_d;
  long long nonzero_masked = 0;
  for (long long r = 0; r < rows; ++r) {
    const int i = static_cast<int>(r % n), a = window > 0 ? std::max(0, i - window + 1) : 0, end = block_end(i, n);
    const std::size_t o = static_cast<std::size_t>(r) * n;
    double m = -INFINITY, sum = 0, dot = 0;
    for (int j = a; j <= i; ++j) m = std::max(m, static_cast<double>(s[o + j]));
    for (int j = a; j <= i; ++j) sum += std::exp(s[o + j] - m);
    std::vector<double> p(static_cast<std::size_t>(end), 0.0);
    for (int j = a; j <= i; ++j) p[j] = std::exp(s[o + j] - m) / sum;
    for (int j = a; j <= i; ++j) dot += p[j] * dp[o + j];
    for (int j = 0; j < end; ++j) {
      got_p.push_back(P[o + j]);
      want_p.push_back(p[j]);
      got_d.push_back(dPS[o + j]);
      want_d.push_back(j >= a && j <= i ? p[j] * (dp[o + j] - dot) : 0.0);
      if ((j < a || j > i) && P[o + j] != 0.0f) ++nonzero_masked;  // masked entries must be exact zeros
    }
  }
  INFO("heads ", heads, " n ", n, " window ", window, " shift ", shift);
  CHECK(nonzero_masked == 0);
  CHECK(max_rel(got_p, want_p) < 2e-6);
  CHECK(max_rel(got_d, want_d) < 4e-6);
}

void check_swiglu(int rows, int I, int shift, std::mt19937& g) {
  const auto gu = test::random_floats(static_cast<std::size_t>(rows) * 2 * I, g, 4.0f);
  const auto da = test::random_floats(static_cast<std::size_t>(rows) * I, g);
  std::vector<double> act(da.size()), dgu(gu.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < I; ++c) {
      const std::size_t gi = static_cast<std::size_t>(r) * 2 * I + c, ai = static_cast<std::size_t>(r) * I + c;
      const double x = gu[gi], u = gu[gi + I], sg = 1.0 / (1.0 + std::exp(-x));
      act[ai] = x * sg * u;
      dgu[gi] = da[ai] * u * sg * (1.0 + x * (1.0 - sg));  // d(x sg(x))/dx = sg (1 + x (1 - sg))
      dgu[gi + I] = da[ai] * x * sg;
    }
  Shifted dGu(gu, shift), dDa(da, shift), dAct(std::vector<float>(da.size()), shift), dDgu(std::vector<float>(gu.size()), shift);
  tk::swiglu_forward(dGu.data(), dAct.data(), rows, I, kStream);
  tk::swiglu_backward(dGu.data(), dDa.data(), dDgu.data(), rows, I, kStream);
  INFO("rows ", rows, " I ", I, " shift ", shift);
  CHECK(max_rel(dAct.host(da.size()), act) < 2e-6);
  CHECK(max_rel(dDgu.host(gu.size()), dgu) < 2e-6);
}

void check_cross_entropy(int rows, int V, int shift, std::mt19937& g) {
  const auto z = test::random_floats(static_cast<std::size_t>(rows) * V, g, 8.0f);
  std::vector<int> target(rows);
  std::uniform_int_distribution<int> pick(0, V - 1);
  for (int r = 0; r < rows; ++r) target[r] = r % 3 == 2 ? -1 : pick(g);  // every third row unscored
  const float weight = 0.37f;
  double nll = 0;
  std::vector<double> dz(z.size(), 0.0);
  for (int r = 0; r < rows; ++r) {
    if (target[r] < 0) continue;
    const float* zr = z.data() + static_cast<std::size_t>(r) * V;
    double m = -INFINITY, s = 0;
    for (int c = 0; c < V; ++c) m = std::max(m, static_cast<double>(zr[c]));
    for (int c = 0; c < V; ++c) s += std::exp(zr[c] - m);
    nll += m + std::log(s) - zr[target[r]];
    for (int c = 0; c < V; ++c) dz[static_cast<std::size_t>(r) * V + c] = weight * (std::exp(zr[c] - m) / s - (c == target[r] ? 1.0 : 0.0));
  }
  Shifted dZ(z, shift), dDz(std::vector<float>(z.size(), 5.0f), shift);  // dz pre-filled: unscored rows must be zeroed
  cuda::DeviceBuffer<int> dt(target.size());
  dt.upload(target);
  cuda::DeviceBuffer<double> acc(1);
  CACHESHRINK_CUDA_CHECK(cudaMemset(acc.data(), 0, sizeof(double)));
  tk::cross_entropy_rows(dZ.data(), rows, V, dt.data(), weight, dDz.data(), acc.data(), kStream);
  CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
  const double got = acc.download()[0];
  INFO("rows ", rows, " V ", V, " shift ", shift, " nll ", got, " want ", nll);
  CHECK(std::abs(got - nll) <= 2e-6 * std::max(1.0, std::abs(nll)));
  CHECK(max_rel(dDz.host(z.size()), dz) < 2e-6);
}

void check_sum_groups(int rows, int nkv, int group, int hd, int shift, std::mt19937& g) {
  const auto src = test::random_floats(static_cast<std::size_t>(rows) * nkv * group * hd, g);
  std::vector<double> want(static_cast<std::size_t>(rows) * nkv * hd, 0.0);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < nkv; ++k)
      for (int q = 0; q < group; ++q)
        for (int d = 0; d < hd; ++d)
          want[(static_cast<std::size_t>(r) * nkv + k) * hd + d] += src[((static_cast<std::size_t>(r) * nkv + k) * group + q) * hd + d];
  Shifted dSrc(src, shift), dDst(std::vector<float>(want.size(), 9.0f), shift);  // overwritten, not accumulated
  tk::sum_groups(dSrc.data(), dDst.data(), rows, nkv, group, hd, kStream);
  INFO("rows ", rows, " nkv ", nkv, " group ", group, " hd ", hd, " shift ", shift);
  CHECK(max_rel(dDst.host(want.size()), want) < 1e-6);
  // Two pairs in one launch (the graph's dK and dV): the second sums the source negated.
  std::vector<float> neg(src.size());
  for (std::size_t i = 0; i < src.size(); ++i) neg[i] = -src[i];
  std::vector<double> want_neg(want.size());
  for (std::size_t i = 0; i < want.size(); ++i) want_neg[i] = -want[i];
  Shifted dSrc2(neg, shift), dDst1(std::vector<float>(want.size(), 9.0f), shift), dDst2(std::vector<float>(want.size(), 9.0f), shift);
  tk::sum_groups(dSrc.data(), dDst1.data(), rows, nkv, group, hd, kStream, dSrc2.data(), dDst2.data());
  CHECK(max_rel(dDst1.host(want.size()), want) < 1e-6);
  CHECK(max_rel(dDst2.host(want.size()), want_neg) < 1e-6);
}

void check_rope(int rows, int ld, int heads, int hd, bool with_bias, int shift, std::mt19937& g) {
  const int half = hd / 2, positions = 37;
  const auto y = test::random_floats(static_cast<std::size_t>(rows) * ld, g);
  const auto bias = test::random_floats(static_cast<std::size_t>(heads) * hd, g);
  const auto ang = test::random_floats(static_cast<std::size_t>(positions) * half, g, 3.0f);
  std::vector<float> cs(ang.size()), sn(ang.size());
  for (std::size_t i = 0; i < ang.size(); ++i) cs[i] = std::cos(ang[i]), sn[i] = std::sin(ang[i]);
  std::vector<int> pos(rows);
  std::uniform_int_distribution<int> pick(0, positions - 1);
  for (auto& p : pos) p = pick(g);
  std::vector<double> want(y.begin(), y.end());
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < heads; ++h)
      for (int k = 0; k < half; ++k) {
        const std::size_t i1 = static_cast<std::size_t>(r) * ld + h * hd + k, i2 = i1 + half;
        const double x1 = y[i1] + (with_bias ? bias[h * hd + k] : 0.0f), x2 = y[i2] + (with_bias ? bias[h * hd + k + half] : 0.0f);
        const double c = cs[static_cast<std::size_t>(pos[r]) * half + k], s = sn[static_cast<std::size_t>(pos[r]) * half + k];
        want[i1] = x1 * c - x2 * s;
        want[i2] = x2 * c + x1 * s;
      }
  Shifted dY(y, shift);
  auto db = test::to_device<float>(bias), dc = test::to_device<float>(cs), ds = test::to_device<float>(sn);
  cuda::DeviceBuffer<int> dp(pos.size());
  dp.upload(pos);
  tk::rope_forward(dY.data(), ld, rows, heads, hd, dp.data(), dc.data(), ds.data(), with_bias ? db.data() : nullptr, kStream);
  INFO("rows ", rows, " ld ", ld, " heads ", heads, " hd ", hd, " bias ", with_bias, " shift ", shift);
  CHECK(max_rel(dY.host(y.size()), want) < 1e-6);  // columns past the heads are left alone (want keeps them)
  // Stored rounded to TF32 (the fused attention's pre-rounded q and k): 13 low mantissa bits zero.
  Shifted dT(y, shift);
  tk::rope_forward(dT.data(), ld, rows, heads, hd, dp.data(), dc.data(), ds.data(), with_bias ? db.data() : nullptr, kStream, true);
  const auto t = dT.host(y.size());
  CHECK(max_rel(t, want) < 1e-3);
  int unrounded = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < heads * hd; ++c) {
      std::uint32_t b;
      std::memcpy(&b, &t[static_cast<std::size_t>(r) * ld + c], 4);
      unrounded += (b & 0x1FFFu) != 0;
    }
  CHECK(unrounded == 0);
}

// The fused TF32 attention forward (O, lse2) and backward (dS, per-query-head dK, dV) on packed
// sequences of lengths `lens` against float64. Row strides carry `pad` extra columns (odd pad:
// the scalar tile loads); shift 1 misaligns every operand. pre: q, k, v given already rounded to
// TF32 (FlashTrainArgs::rounded, the kernels skip their rounding).
float tf32_host(float x) {  // cvt.rna.tf32.f32: nearest, ties away from zero (finite x)
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  b = (b + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&x, &b, 4);
  return x;
}
void check_flash(const std::vector<int>& lens, int nh, int nkv, int hd, int window, int pad, int shift, std::mt19937& g, bool pre = false,
                 cuda::FlashKernel kind = cuda::FlashKernel::MmaSync) {
  const int B = static_cast<int>(lens.size()), ldq = nh * hd + pad, ldkv = nkv * hd + pad, ldo = nh * hd, group = nh / nkv;
  std::vector<int> off(1, 0);
  std::vector<std::size_t> poff(1, 0);
  for (int n : lens) {
    off.push_back(off.back() + n);
    poff.push_back(poff.back() + static_cast<std::size_t>(nh) * n * n);
  }
  const int N = off.back(), max_len = *std::max_element(lens.begin(), lens.end());
  auto q = test::random_floats(static_cast<std::size_t>(N) * ldq, g, 2.0f),
       k = test::random_floats(static_cast<std::size_t>(N) * ldkv, g, 2.0f);
  auto v = test::random_floats(static_cast<std::size_t>(N) * ldkv, g);
  const auto dout = test::random_floats(static_cast<std::size_t>(N) * ldq, g);
  if (pre)
    for (auto* x : {&q, &k, &v})
      for (auto& e : *x) e = tf32_host(e);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> o(static_cast<std::size_t>(N) * ldo), lse2(static_cast<std::size_t>(N) * nh), ds(poff.back(), 0.0);
  std::vector<double> dk(static_cast<std::size_t>(N) * ldo, 0.0), dv(dk.size(), 0.0);
  for (int s = 0; s < B; ++s) {
    const int b = off[s], n = lens[static_cast<std::size_t>(s)];
    for (int h = 0; h < nh; ++h) {
      const int kh = h / group;
      auto Q = [&](int i, int d) { return static_cast<double>(q[static_cast<std::size_t>(b + i) * ldq + h * hd + d]); };
      auto K = [&](int j, int d) { return static_cast<double>(k[static_cast<std::size_t>(b + j) * ldkv + kh * hd + d]); };
      auto V = [&](int j, int d) { return static_cast<double>(v[static_cast<std::size_t>(b + j) * ldkv + kh * hd + d]); };
      auto dO = [&](int i, int d) { return static_cast<double>(dout[static_cast<std::size_t>(b + i) * ldq + h * hd + d]); };
      for (int i = 0; i < n; ++i) {
        const int j0 = window > 0 ? std::max(0, i - window + 1) : 0;
        std::vector<double> z(static_cast<std::size_t>(i + 1), 0.0), dp(z.size(), 0.0);
        double mx = -1e300;
        for (int j = j0; j <= i; ++j) {
          for (int d = 0; d < hd; ++d) z[j] += Q(i, d) * K(j, d);
          z[j] *= scale;
          mx = std::max(mx, z[j]);
        }
        double sum = 0;
        for (int j = j0; j <= i; ++j) sum += std::exp(z[j] - mx);
        lse2[static_cast<std::size_t>(b + i) * nh + h] = (mx + std::log(sum)) / std::log(2.0);
        double D = 0;
        for (int j = j0; j <= i; ++j) {
          z[j] = std::exp(z[j] - mx) / sum;  // P
          for (int d = 0; d < hd; ++d) {
            o[static_cast<std::size_t>(b + i) * ldo + h * hd + d] += z[j] * V(j, d);
            dp[j] += dO(i, d) * V(j, d);
          }
          D += z[j] * dp[j];
        }
        for (int j = j0; j <= i; ++j) {
          const double dsij = z[j] * (dp[j] - D);
          ds[poff[s] + (static_cast<std::size_t>(h) * n + i) * n + j] = dsij;
          for (int d = 0; d < hd; ++d) {
            dk[static_cast<std::size_t>(b + j) * ldo + h * hd + d] += scale * dsij * Q(i, d);
            dv[static_cast<std::size_t>(b + j) * ldo + h * hd + d] += z[j] * dO(i, d);
          }
        }
      }
    }
  }
  Shifted dQ(q, shift), dK(k, shift), dV(v, shift), dDo(dout, shift);
  cuda::DeviceBuffer<float> dO_(o.size()), dL(lse2.size()), dDelta(lse2.size()), dS(ds.size()), ddk(dk.size()), ddv(dv.size());
  CACHESHRINK_CUDA_CHECK(cudaMemset(dS.data(), 0, dS.size() * sizeof(float)));  // the caller keeps unvisited entries zero
  cuda::DeviceBuffer<int> doff(off.size());
  doff.upload(off);
  cuda::DeviceBuffer<std::size_t> dpoff(poff.size());
  dpoff.upload(poff);
  cuda::FlashTrainArgs a;
  a.q = dQ.data();
  a.ldq = ldq;
  a.k = dK.data();
  a.v = dV.data();
  a.ldkv = ldkv;
  a.o = dO_.data();
  a.ldo = ldo;
  a.lse2 = dL.data();
  a.dout = dDo.data();
  a.lddo = ldq;
  a.delta = dDelta.data();
  a.ds = dS.data();
  a.ds_off = dpoff.data();
  a.dk = ddk.data();
  a.dv = ddv.data();
  a.lddkv = ldo;
  a.off = doff.data();
  a.batch = B;
  a.max_len = max_len;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = hd;
  a.window = window;
  a.scale = static_cast<float>(scale);
  a.rounded = pre;
  cuda::flash_train_forward(a, kStream, kind);
  cuda::flash_train_backward(a, N, kStream, kind);
  std::string ls;
  for (int n : lens) ls += std::to_string(n) + " ";
  INFO("lengths ", ls, "heads ", nh, "/", nkv, " hd ", hd, " window ", window, " pad ", pad, " shift ", shift, " pre-rounded ", pre,
       " kernel ", std::string(kind == cuda::FlashKernel::Wgmma ? "wgmma" : "mma.sync"));
  // TF32 operands (10 mantissa bits): ~1e-3 of the largest entry.
  CHECK(max_rel(test::to_host(dO_), o) < 4e-3);
  const auto gl = test::to_host(dL);
  double el = 0;
  for (std::size_t i = 0; i < gl.size(); ++i) el = std::max(el, std::abs(gl[i] - lse2[i]));
  CHECK(el < 1e-2);
  CHECK(max_rel(test::to_host(dS), ds) < 4e-3);  // masked entries must come out 0
  CHECK(max_rel(test::to_host(ddk), dk) < 4e-3);
  CHECK(max_rel(test::to_host(ddv), dv) < 4e-3);
}

}  // namespace

TEST_CASE("training RoPE with a fused bias matches float64 (float2 and scalar paths)") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(16);
  // (rows, ld, heads, hd): ld odd or hd % 4 != 0 take the scalar kernel
  for (auto [rows, ld, heads, hd] : {std::tuple{5, 64, 2, 32}, {7, 70, 2, 32}, {3, 133, 4, 32}, {4, 30, 3, 10}, {9, 3584 + 512, 28, 128}})
    for (bool b : {false, true})
      for (int shift : {0, 1}) check_rope(rows, ld, heads, hd, b, shift, g);
}

TEST_CASE("training norms (RMSNorm, LayerNorm) forward and backward match float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(11);
  // 4096 / 6000: the register kernel's 8- and 16-vector widths; 9000: past them; 7, 257: unaligned widths
  for (auto [rows, H] : {std::pair{1, 4}, {3, 7}, {17, 257}, {5, 256}, {6, 3584}, {3, 4096}, {2, 6000}, {2, 9000}})
    for (bool layer : {false, true})
      for (int shift : {0, 1}) check_norm(rows, H, layer, shift, g);
}

TEST_CASE("training attention softmax and its backward match float64 (causal blocks, sliding window, aligned or not)") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(12);
  for (int n : {1, 3, 4, 20, 64, 128, 132, 200, 512, 516, 1024, 1030})
    for (int window : {0, 5, 100})
      for (int shift : {0, 1}) check_softmax(n > 600 ? 1 : 3, n, window, shift, g);
}

TEST_CASE("training SwiGLU forward and backward match float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(13);
  for (auto [rows, I] : {std::pair{1, 1}, {3, 7}, {5, 8}, {17, 1000}, {3, 18944}})
    for (int shift : {0, 1}) check_swiglu(rows, I, shift, g);
}

TEST_CASE("training cross-entropy (one-pass max and sum) matches float64, unscored rows zeroed") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(14);
  for (auto [rows, V] : {std::pair{3, 1}, {4, 7}, {6, 8}, {5, 4096}, {4, 4097}, {3, 152064}})
    for (int shift : {0, 1}) check_cross_entropy(rows, V, shift, g);
}

TEST_CASE("training GQA head-group sums match float64") {
  CACHESHRINK_REQUIRE_GPU();
  std::mt19937 g(15);
  for (auto [rows, nkv, group, hd] : {std::tuple{3, 1, 1, 1}, {5, 2, 3, 7}, {7, 4, 7, 128}, {2, 1, 8, 64}})
    for (int shift : {0, 1}) check_sum_groups(rows, nkv, group, hd, shift, g);
}

void check_flash_cases(cuda::FlashKernel kind) {
  std::mt19937 g(17);
  // lengths: partial tiles (37, 100), one token, a full 64-tile, several key blocks (200, 130)
  check_flash({37, 1, 64, 200}, 4, 2, 64, 0, 0, 0, g, false, kind);
  check_flash({37, 1, 64, 200}, 4, 2, 64, 0, 3, 1, g, false, kind);
  check_flash({130, 9}, 2, 2, 128, 0, 4, 0, g, false, kind);
  check_flash({130, 9}, 8, 1, 32, 0, 0, 1, g, false, kind);
  check_flash({200, 100}, 4, 2, 64, 50, 0, 0, g, false, kind);  // sliding window across tile edges
  check_flash({200, 100}, 4, 4, 32, 7, 1, 0, g, false, kind);
  check_flash({300}, 7, 1, 128, 0, 0, 0, g, false, kind);
  // several 128-key blocks and 64-query warpgroup halves; windows shorter than a warpgroup's keys
  check_flash({517, 64, 129}, 4, 2, 128, 0, 0, 0, g, false, kind);
  check_flash({517, 191}, 2, 1, 64, 70, 0, 0, g, false, kind);
  check_flash({400}, 2, 2, 32, 3, 0, 0, g, false, kind);
  // q, k, v stored rounded by the caller (the training graph with RoPE): the kernels skip rounding them
  check_flash({37, 1, 64, 200}, 4, 2, 64, 0, 0, 0, g, true, kind);
  check_flash({130, 9}, 8, 1, 128, 0, 3, 1, g, true, kind);
  check_flash({200, 100}, 4, 2, 32, 50, 0, 0, g, true, kind);
}

TEST_CASE("fused TF32 training attention forward and backward match float64 (packed lengths, GQA/MQA, window, unaligned)") {
  CACHESHRINK_REQUIRE_GPU();
  check_flash_cases(cuda::FlashKernel::MmaSync);
}

TEST_CASE("fused TF32 training attention on wgmma (sm_90a) matches float64 on the same cases") {
  CACHESHRINK_REQUIRE_GPU();
  cudaDeviceProp prop{};
  CACHESHRINK_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
#if defined(CACHESHRINK_TEST_BUILT_SM90A)
  // This build has sm_90a code: an sm_90 device must run it (a broken probe must not skip it).
  if (prop.major == 9 && prop.minor == 0) REQUIRE(cuda::wgmma_available());
#endif
  if (!cuda::wgmma_available()) {
    MESSAGE("no sm_90a code for this device: the wgmma kernels are not run (Auto takes mma.sync)");
    cuda::FlashTrainArgs a;
    CHECK_THROWS_WITH_AS(cuda::flash_train_forward(a, kStream, cuda::FlashKernel::Wgmma), doctest::Contains("sm_90a"), InvalidArgument);
    return;
  }
  check_flash_cases(cuda::FlashKernel::Wgmma);
}

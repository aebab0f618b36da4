#pragma once
// Helpers for the GPU tests: skip without a device, fixture paths (CACHESHRINK_FIXTURES
// overrides the compiled-in path so binaries built elsewhere can run), host<->device copies.
#include <doctest/doctest.h>

#include <cacheshrink/cuda.hpp>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <vector>

namespace cacheshrink::test {

inline std::filesystem::path cuda_fixtures() {
  if (const char* e = std::getenv("CACHESHRINK_FIXTURES"); e && *e) return e;
  return CACHESHRINK_FIXTURES_DIR;
}

inline bool gpu_or_skip() {
  if (cuda::device_count() > 0) return true;
  MESSAGE("skipped: no CUDA device visible (cudaGetDeviceCount returned 0 or failed)");
  return false;
}

#define CACHESHRINK_REQUIRE_GPU() \
  if (!::cacheshrink::test::gpu_or_skip()) return

inline std::vector<float> random_floats(std::size_t n, std::mt19937& g, float a = 1.0f) {
  std::uniform_real_distribution<float> d(-a, a);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

/// Rounds to bf16 and back (the values a bf16 kernel actually sees).
inline std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = __bfloat162float(__float2bfloat16(x));
  return v;
}

template <class T>
cuda::DeviceBuffer<T> to_device(const std::vector<float>& v) {
  cuda::DeviceBuffer<T> d(v.size());
  if constexpr (std::is_same_v<T, float>) {
    d.upload(v);
  } else {
    std::vector<T> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) h[i] = __float2bfloat16(v[i]);
    d.upload(h);
  }
  return d;
}

template <class T>
std::vector<float> to_host(const cuda::DeviceBuffer<T>& d) {
  CACHESHRINK_CUDA_CHECK(cudaDeviceSynchronize());
  auto h = d.download();
  std::vector<float> v(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) {
    if constexpr (std::is_same_v<T, float>) v[i] = h[i];
    else v[i] = __bfloat162float(h[i]);
  }
  return v;
}

/// max |got - want| / max(max |want|, floor)
inline double max_rel(const std::vector<float>& got, const std::vector<double>& want, double floor = 1e-6) {
  REQUIRE(got.size() == want.size());
  double md = 0, mw = floor;
  for (std::size_t i = 0; i < got.size(); ++i) {
    md = std::max(md, std::abs(static_cast<double>(got[i]) - want[i]));
    mw = std::max(mw, std::abs(want[i]));
  }
  return md / mw;
}

}  // namespace cacheshrink::test

#pragma once
// The training tests' cases and batches, shared by the CPU tests (train_test_support.hpp) and the
// GPU ones (tests/cuda/test_cuda_train*): the seven fixture conversions and random token
// sequences. Light on purpose (no library headers): nvcc's host pass parses it in the .cu test,
// while the conversion itself (train_convert.hpp) is compiled by the host compiler only.
#include <cstdint>
#include <random>
#include <vector>

namespace cacheshrink::test::train_support {

/// A fixture converted to MLA at ratio 2 without calibration (train_convert.hpp's converted()).
struct Case {
  const char* model;
  const char* method;
  int group = 0;   // xkv group size (0: default)
  int skip = 0;    // xkv early layers kept original
  int window = 0;  // > 0: override the sliding window (shorter than the sequences) to exercise the mask
};

/// One case per fixture family: separate, joint and xkv (shared bases, early layers kept), a
/// sliding window shorter than the sequences; GQA, MQA, q/k norms, biases, GPT-2.
inline const std::vector<Case> kCases = {
    {"tiny-gpt2", "separate"},          {"tiny-llama2", "joint"},         {"tiny-llama3", "xkv", 2},
    {"tiny-qwen2", "xkv", 0, 1},        {"tiny-mistral", "xkv", 0, 0, 5}, {"tiny-mqa", "separate"},
    {"tiny-qwen3", "joint"},
};

/// Sequences of the given lengths, token ids uniform in [0, vocab).
inline std::vector<std::vector<int>> random_seqs(int vocab, std::vector<int> lens, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int>> s;
  for (int n : lens) {
    std::vector<int> t(static_cast<std::size_t>(n));
    for (auto& id : t) id = static_cast<int>(rng() % static_cast<std::uint64_t>(vocab));
    s.push_back(std::move(t));
  }
  return s;
}

}  // namespace cacheshrink::test::train_support

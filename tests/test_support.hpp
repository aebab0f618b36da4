#pragma once
// Shared helpers for the tests: fixture paths and reference loading.
#include <array>
#include <filesystem>
#include <string>

namespace cacheshrink::test {

inline std::filesystem::path fixtures() { return CACHESHRINK_FIXTURES_DIR; }
inline std::filesystem::path model_dir(const std::string& name) { return fixtures() / "models" / name; }

inline constexpr std::array<const char*, 7> kModels = {"tiny-gpt2", "tiny-llama2", "tiny-llama3", "tiny-qwen2",
                                                       "tiny-mistral", "tiny-mqa", "tiny-qwen3"};

}  // namespace cacheshrink::test

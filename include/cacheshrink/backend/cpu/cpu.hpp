#pragma once
// Backend tags. `Cpu` runs on Eigen with float32 compute; `Cuda` is declared here so the
// typed templates can name it, and is defined by cacheshrink/cuda.hpp in .cu units.

namespace cacheshrink {

struct Cpu {
  static constexpr const char* name = "cpu";
};

struct Cuda;

}  // namespace cacheshrink

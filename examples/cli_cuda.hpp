#pragma once
// The CLI's GPU entry points. With the CUDA backend (CACHESHRINK_CLI_CUDA) they are defined in
// examples/cli_cuda.cu, a CUDA unit compiled for the same host ISA as the rest of the program
// (model::Model's Eigen matrices cross the boundary; examples/CMakeLists.txt); without it they
// throw a clear error.
#include <cacheshrink/core/error.hpp>
#include <cacheshrink/model/weights.hpp>
#include <cacheshrink/train/trainer.hpp>
#include <string>
#include <vector>

namespace cacheshrink::cli {

/// Trains m on the GPU (cuda::MLATrainer: the CPU trainer's loop, losses and checkpoint format),
/// resuming from `resume` when not empty; tf32: the graph's GEMMs on TF32 tensor cores.
#if defined(CACHESHRINK_CLI_CUDA)
train::TrainStats train_on_gpu(model::Model& m, const train::TrainOptions& o, const std::vector<std::vector<int>>& seqs,
                               const std::string& resume, bool tf32);
/// Throws InvalidArgument unless a CUDA device is visible.
void require_gpu();
#else
inline void require_gpu() {
  throw InvalidArgument("--device cuda: this cacheshrink was built without the CUDA backend (configure where nvcc is found, "
                        "CACHESHRINK_CUDA=AUTO or ON)");
}
inline train::TrainStats train_on_gpu(model::Model&, const train::TrainOptions&, const std::vector<std::vector<int>>&, const std::string&,
                                      bool) {
  throw InvalidArgument("--device cuda: this cacheshrink was built without the CUDA backend (configure where nvcc is found, "
                        "CACHESHRINK_CUDA=AUTO or ON)");
}
#endif

}  // namespace cacheshrink::cli

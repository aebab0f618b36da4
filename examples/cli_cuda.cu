// `cacheshrink train --device cuda` (examples/cli_cuda.hpp).
#include <cacheshrink/backend/cuda/trainer.cuh>

#include "cli_cuda.hpp"

namespace cacheshrink::cli {

void require_gpu() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    (void)cudaGetLastError();
    throw InvalidArgument("--device cuda: no CUDA device is visible");
  }
}

train::TrainStats train_on_gpu(model::Model& m, const train::TrainOptions& o, const std::vector<std::vector<int>>& seqs,
                               const std::string& resume, bool tf32) {
  require_gpu();
  cuda::MLATrainer t(m, o);
  t.graph().set_tf32(tf32);
  if (!resume.empty()) t.load_checkpoint(resume);
  return t.train(seqs);
}

}  // namespace cacheshrink::cli

#pragma once
// The CLI's GPU entry points. With the CUDA backend (CACHESHRINK_CLI_CUDA) they are defined in
// examples/cli_cuda.cu, a CUDA unit compiled for the same host ISA as the rest of the program
// (model::Model's Eigen matrices cross the boundary; examples/CMakeLists.txt); without it they
// throw a clear error.
#include <cacheshrink/compression/convert.hpp>
#include <cacheshrink/core/error.hpp>
#include <cacheshrink/model/generate.hpp>
#include <cacheshrink/model/weights.hpp>
#include <cacheshrink/pipeline/evaluate.hpp>
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
/// `eval --device cuda`: cuda::perplexity with Transformer<Kind, Cuda> in float32 or bf16 (the same
/// windows and result fields as the CPU's pipeline::perplexity); *kv_bytes: the device cache's
/// bytes per token in that precision.
pipeline::PerplexityResult eval_on_gpu(const model::Model& m, const std::vector<int>& ids, const pipeline::PerplexityOptions& po, bool bf16,
                                       std::size_t* kv_bytes);
/// `convert --device cuda`: cuda::convert (calibration Grams and initialisation on the device,
/// calibration forward in float32 or bf16), the CPU convert's options and report.
model::Model convert_on_gpu(model::Model m, const compression::ConvertOptions& o, const std::vector<std::vector<int>>& calib,
                            compression::ConversionReport* rep, bool bf16);
/// `generate --device cuda`: cuda::generate (device KV cache filled by prefill, then one decode step per token,
/// rebuilt latent keys) in float32 or bf16.
std::vector<int> generate_on_gpu(const model::Model& m, const std::vector<int>& prompt, const model::SamplingOptions& so, bool bf16);
#else
inline void require_gpu() {
  throw InvalidArgument("--device cuda: this cacheshrink was built without the CUDA backend (configure where nvcc is found, "
                        "CACHESHRINK_CUDA=AUTO or ON)");
}
inline train::TrainStats train_on_gpu(model::Model&, const train::TrainOptions&, const std::vector<std::vector<int>>&, const std::string&,
                                      bool) {
  require_gpu();
  return {};
}
inline pipeline::PerplexityResult eval_on_gpu(const model::Model&, const std::vector<int>&, const pipeline::PerplexityOptions&, bool,
                                              std::size_t*) {
  require_gpu();
  return {};
}
inline model::Model convert_on_gpu(model::Model, const compression::ConvertOptions&, const std::vector<std::vector<int>>&,
                                   compression::ConversionReport*, bool) {
  require_gpu();
  return {};
}
inline std::vector<int> generate_on_gpu(const model::Model&, const std::vector<int>&, const model::SamplingOptions&, bool) {
  require_gpu();
  return {};
}
#endif

}  // namespace cacheshrink::cli

// `cacheshrink train / eval / convert --device cuda` (examples/cli_cuda.hpp).
#include <cacheshrink/backend/cuda/convert.cuh>
#include <cacheshrink/backend/cuda/trainer.cuh>
#include <cacheshrink/backend/cuda/transformer.cuh>

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

pipeline::PerplexityResult eval_on_gpu(const model::Model& m, const std::vector<int>& ids, const pipeline::PerplexityOptions& po, bool bf16,
                                       std::size_t* kv_bytes) {
  require_gpu();
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind), Cuda> tf(m, cuda::Options{bf16 ? cuda::Precision::BFloat16 : cuda::Precision::Float32});
    if (kv_bytes) *kv_bytes = tf.make_cache(1, 1, cuda::LatentDecode::Rebuild).bytes_per_token();
    return cuda::perplexity(tf, ids, po);
  });
}

std::vector<int> generate_on_gpu(const model::Model& m, const std::vector<int>& prompt, const model::SamplingOptions& so, bool bf16) {
  require_gpu();
  return dispatch_attention_kind(m.config, [&](auto kind) {
    model::Transformer<decltype(kind), Cuda> tf(m, cuda::Options{bf16 ? cuda::Precision::BFloat16 : cuda::Precision::Float32});
    return cuda::generate(tf, prompt, so);
  });
}

model::Model convert_on_gpu(model::Model m, const compression::ConvertOptions& o, const std::vector<std::vector<int>>& calib,
                            compression::ConversionReport* rep, bool bf16) {
  require_gpu();
  return cuda::convert(std::move(m), o, calib, rep, bf16 ? cuda::Precision::BFloat16 : cuda::Precision::Float32);
}

}  // namespace cacheshrink::cli

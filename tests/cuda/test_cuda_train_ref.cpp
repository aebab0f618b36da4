// Host-compiled half of test_cuda_train (see train_reference.hpp).
#include "cuda/train_reference.hpp"
#include "train_convert.hpp"

namespace cacheshrink::test {

model::Model converted_fixture(const std::string& models_dir, const TrainCase& cs) { return train_support::converted(models_dir, cs); }

GraphReference reference_graph(const model::Model& m, const std::vector<std::vector<int>>& seqs, const train::LossOptions& lo) {
  train::TrainGraph<double> g(m);
  train::TrainGraph<double>::MatR teacher;
  if (lo.distill) teacher = g.teacher_logits(seqs);
  g.zero_grad();
  GraphReference r;
  r.loss = g.forward_backward(seqs, lo, 1.0, lo.distill ? &teacher : nullptr);
  r.logits = g.logits();
  for (const auto& p : g.params()) {
    r.names.push_back(p.name);
    r.values.push_back(p.value);
    r.grads.push_back(p.grad);
  }
  return r;
}

StepsReference reference_steps(const model::Model& m, const std::vector<std::vector<int>>& seqs, const train::TrainOptions& o, int steps) {
  model::Model copy = m;
  train::MLATrainer<double> t(copy, o);
  StepsReference r;
  for (const auto& p : t.graph().params()) {
    r.names.push_back(p.name);
    r.stiefel.push_back(p.stiefel);
    r.start.push_back(p.value);
  }
  for (int i = 0; i < steps; ++i) r.stats.push_back(t.step({seqs}, i, steps));
  for (const auto& p : t.graph().params()) r.end.push_back(p.value);
  return r;
}

std::vector<linalg::Matrix<float>> cpu_checkpoint_values(const model::Model& m, const train::TrainOptions& o, const std::filesystem::path& dir) {
  model::Model copy = m;
  train::MLATrainer<float> t(copy, o);
  t.load_checkpoint(dir);
  std::vector<linalg::Matrix<float>> v;
  for (const auto& p : t.graph().params()) v.push_back(p.value);
  return v;
}

}  // namespace cacheshrink::test

#pragma once
// The float64 CPU references of test_cuda_train.cu, compiled by the host compiler in
// test_cuda_train_ref.cpp: instantiating the CPU training graph, trainer and conversion inside
// the .cu made nvcc's host pass take over ten minutes (EDG's transformed source), the same code
// as plain C++ takes a few.
#include <cacheshrink/linalg/types.hpp>
#include <cacheshrink/model/weights.hpp>
#include <cacheshrink/train/graph.hpp>
#include <cacheshrink/train/trainer.hpp>
#include <filesystem>
#include <string>
#include <vector>

#include "train_cases.hpp"

namespace cacheshrink::test {

/// A fixture converted to MLA at ratio 2 without calibration (the CPU training tests' cases).
using TrainCase = train_support::Case;
model::Model converted_fixture(const std::string& models_dir, const TrainCase& cs);

struct GraphReference {
  train::LossParts loss;
  MatrixR<double> logits;
  std::vector<std::string> names;
  std::vector<linalg::Matrix<double>> values, grads;
};
/// train::TrainGraph<double>: loss, logits and gradients (backward_scale 1; the teacher is the
/// same model with the original K/V when lo.distill).
GraphReference reference_graph(const model::Model& m, const std::vector<std::vector<int>>& seqs, const train::LossOptions& lo);

struct StepsReference {
  std::vector<std::string> names;
  std::vector<bool> stiefel;
  std::vector<linalg::Matrix<double>> start, end;  // parameter values before / after the steps
  std::vector<train::StepStats> stats;
};
/// `steps` MLATrainer<double>::step calls on the same batch (t = 0.., total = steps).
StepsReference reference_steps(const model::Model& m, const std::vector<std::vector<int>>& seqs, const train::TrainOptions& o, int steps);

/// The parameters train::MLATrainer<float> holds after load_checkpoint(dir) on model m.
std::vector<linalg::Matrix<float>> cpu_checkpoint_values(const model::Model& m, const train::TrainOptions& o, const std::filesystem::path& dir);

}  // namespace cacheshrink::test

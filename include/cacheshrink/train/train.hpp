#pragma once
// Umbrella for fine-tuning: training kernels (ops), the training forward/backward (graph) and
// MLATrainer (trainer). See docs/training.md.
#include "cacheshrink/train/graph.hpp"
#include "cacheshrink/train/ops.hpp"
#include "cacheshrink/train/trainer.hpp"

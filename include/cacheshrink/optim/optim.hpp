#pragma once
// Umbrella for optimizers, schedules and gradient clipping.
#include "cacheshrink/optim/clip.hpp"
#include "cacheshrink/optim/optimizer.hpp"
#include "cacheshrink/optim/options.hpp"
#include "cacheshrink/optim/schedule.hpp"
#include "cacheshrink/optim/updates.hpp"

#pragma once
// Umbrella for manifold models.
#include "cacheshrink/manifold/any_manifold.hpp"
#include "cacheshrink/manifold/concept.hpp"
#include "cacheshrink/manifold/euclidean.hpp"
#include "cacheshrink/manifold/stiefel.hpp"

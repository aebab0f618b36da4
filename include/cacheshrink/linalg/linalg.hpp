#pragma once
// Umbrella for the dense linear-algebra helpers of the numerical core.
#include "cacheshrink/linalg/eigen.hpp"
#include "cacheshrink/linalg/gram.hpp"
#include "cacheshrink/linalg/polar.hpp"
#include "cacheshrink/linalg/principal_angles.hpp"
#include "cacheshrink/linalg/qr.hpp"
#include "cacheshrink/linalg/svd.hpp"
#include "cacheshrink/linalg/types.hpp"

#pragma once
// Umbrella for CUDA users: include from a .cu translation unit (compiled by nvcc). Pulls in
// the CPU library too; cacheshrink.hpp never includes this.
#ifndef __CUDACC__
#error "cacheshrink/cuda.hpp needs a CUDA compiler: include it from a .cu translation unit compiled by nvcc"
#endif

#include "cacheshrink/backend/cuda/attention.cuh"
#include "cacheshrink/backend/cuda/check.cuh"
#include "cacheshrink/backend/cuda/gemm.cuh"
#include "cacheshrink/backend/cuda/kernels.cuh"
#include "cacheshrink/backend/cuda/memory.cuh"
#include "cacheshrink/backend/cuda/transformer.cuh"
#include "cacheshrink/backend/cuda/tuned_gemm.cuh"

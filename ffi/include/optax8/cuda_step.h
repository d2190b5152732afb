// What the CUDA step's two translation units share (cuda_step.cu: the
// handler and the general kernel; cuda_step_whole.cu: the whole-blocks
// kernel): the per-element rule for device code, the maps, the kernels'
// arguments. CUDA (or CUDA-emulation) code only.
#pragma once

#include <cfloat>
#include <cstdint>

#include "optax8/cuda_platform.h"
#include "optax8/quantize.h"
#include "optax8/step.h"
#include "optax8/step_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace optax8 {

namespace cuda_rule {

__device__ __forceinline__ float vsqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ float vsign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
__device__ __forceinline__ float vselect(bool m, float a, float b) { return m ? a : b; }
__device__ __forceinline__ bool vfinite(float x) { return fabsf(x) <= FLT_MAX; }
__device__ __forceinline__ bool vpositive(float x) { return x > 0.0f; }
__device__ __forceinline__ bool vand(bool a, bool b) { return a && b; }

#define OPTAX8_RULE __device__ __forceinline__
#include "optax8/step_rule.inc"
#undef OPTAX8_RULE

}  // namespace cuda_rule

namespace cuda_step {

namespace {  // each translation unit has its own copy in constant memory
__constant__ float kStepMapValues[4][256] = {{OPTAX8_SIGNED_MAP}, {OPTAX8_UNSIGNED_MAP}, {OPTAX8_SIGNED4_MAP},
                                             {OPTAX8_UNSIGNED4_MAP}};
__constant__ float kStepMapMids[4][256] = {{OPTAX8_SIGNED_MIDS}, {OPTAX8_UNSIGNED_MIDS}, {OPTAX8_SIGNED4_MIDS},
                                           {OPTAX8_UNSIGNED4_MIDS}};
}  // namespace

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 16;  // elements of a block per thread: block <= 16 * 256
constexpr int64_t kMaxBlock = int64_t{kMaxPerThread} * kThreads;
static_assert(kMaxBlock == kCudaMaxStepBlock, "CUDA_MAX_STEP_BLOCK (optax8/kernels/algorithms.py) is the CUDA step's largest block");

// What the kernel reads of StepBuffers (a plain struct, passed by value).
struct StepArgs {
  BlockLayout l;
  const float* hyper;
  int64_t rows_per_hyper;
  int64_t hyper_stride;
  const void* g;
  const void* p;
  void* u;
  const uint8_t* codes_in[kMaxStates];
  const float* absmax_in[kMaxStates];
  uint8_t* codes_out[kMaxStates];
  float* absmax_out[kMaxStates];
  const uint32_t* row_index;   // stochastic rounding (step_ffi.h): element (r, c)'s index is row_index[r] +
  const uint32_t* col_index;   // col_index[c] (null without stochastic rounding)
  bool stochastic_states;      // the new codes are rounded stochastically
  bool round_params;           // the new parameters are rounded stochastically to bfloat16 values (round_param)
  int group;
  bool with_params;
  bool apply;
  int bits;            // of the codes: 8, or 4 (two a byte along the last axis)
  int64_t code_cols;   // bytes of codes per row
};

// The whole-blocks kernel (cuda_step_whole.cu): whether a leaf can take it,
// and its launch for algorithm A and dtype G.
bool whole_blocks(const StepBuffers& s);
template <int A, typename G>
xla::ffi::Error launch_whole_blocks(cudaStream_t stream, const StepArgs& a);

}  // namespace cuda_step
}  // namespace optax8

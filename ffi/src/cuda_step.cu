// CUDA FFI handler of the fused optimizer step (see optax8/step.h).
//
// Two kernels: step_whole_blocks (cuda_step_whole.cu) for rows of whole blocks of 128 to
// 4096 elements, the usual case, and a general one for every layout. In the
// general kernel, like the quantize kernel (cuda_quantize.cu), a group of
// min(block, 256) threads owns one quantization block and a 256-thread CTA
// holds 256 / group blocks. Thread `lane` of a group owns the elements lane, lane + group, ...
// (E = block / group <= 16 of them, counted row by row in a tile) of its block: it loads all their inputs
// at once (coalesced across the group), applies the rule, writes the update
// and keeps the new float32 states in registers while the group reduces each
// state's absmax (warp shuffles, then shared memory for groups of more than
// one warp); then it requantizes its own elements by binary search over the
// decision points held in shared memory, and with stochastic rounding
// (optax8/rounding.py) moves each code to stochastic_code's (quantize.h),
// with the draw of the element's index in its leaf. 4-bit codes (two a
// byte) are read a half byte each; the new ones go through shared memory,
// where each thread packs whole bytes of its block (an odd last column
// leaves the high half 0).
//
// Aliasing: XLA aliases the old codes and absmax to the new ones and the
// gradient to the update. Every element is read and written by the same
// thread, its reads first; a block's old absmax is read by all its threads
// before the reduction whose result lane 0 writes. No pointer is __restrict__
// and nothing aliased is read through the non-coherent cache.
//
// Exactness: the rule (step_rule.inc) runs with IEEE division and square root
// and both step files are compiled with -fmad=false (CMakeLists.txt), so no
// multiply-add is contracted and results match the CPU handler to the bit.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <string>
#include <vector>

#include "optax8/cuda_step.h"
#include "optax8/ffi_common.h"

namespace ffi = xla::ffi;

namespace optax8 {
namespace cuda_step {
namespace {

// The absmax of each state i (fold_absmax with its map, v[i] in each thread)
// over the `group` consecutive threads (a power of two) that share a block.
// Every thread of the CTA must call it.
template <int A, int N>
__device__ __forceinline__ void group_absmax(float (&v)[N], int group, float (*scratch)[kThreads / 32]) {
  for (int offset = min(group, 32) / 2; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      v[i] = fold_absmax(v[i], __shfl_xor_sync(0xffffffffu, v[i], offset), signs_absmax(state_map(A, i)));
  }
  if (group <= 32) return;
  const int warp = threadIdx.x / 32, warps = group / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i][warp] = v[i];
  }
  __syncthreads();
  const int first = (warp / warps) * warps;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float m = scratch[i][first];
    for (int w = 1; w < warps; ++w) m = fold_absmax(m, scratch[i][first + w], signs_absmax(state_map(A, i)));
    v[i] = m;
  }
}

// E: elements per thread (block / group), a power of two <= kMaxPerThread.
template <int A, typename G, int E>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepArgs a) {
  using T = typename G::T;
  constexpr int n = algo_states(A);
  __shared__ float values[2][256];   // the maps of the signed and unsigned states at a.bits
  __shared__ float mids[2][256];
  __shared__ float scratch[kMaxStates][kThreads / 32];
  __shared__ uint8_t staged[kThreads * E];   // 4-bit codes: the new codes of the CTA's blocks
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    values[k][threadIdx.x] = kStepMapValues[map_with_bits(k, a.bits)][threadIdx.x];
    mids[k][threadIdx.x] = kStepMapMids[map_with_bits(k, a.bits)][threadIdx.x];
  }
  __syncthreads();
  const bool four = a.bits == 4;

  const BlockLayout& l = a.l;
  const int group = a.group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t b = int64_t(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const bool active = b < l.blocks();
  const Block blk = active ? l.at(b) : Block{0, 0, 1, 0};
  const int len = int(blk.width * blk.height), width = int(blk.width);
  const int64_t off = blk.off, row = blk.row;
  const int64_t col0 = off - row * l.cols;   // the block's first column (even at 4 bits)
  const T* g = static_cast<const T*>(a.g) + off;
  const T* p = static_cast<const T*>(a.p) + off;
  T* u = static_cast<T*>(a.u) + off;
  // Element k of the block (k < len) lies at e[j] from off: rows of `width` elements, l.cols apart.
  int64_t e[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int k = lane + j * group;
    e[j] = width == len ? k : int64_t(k / width) * l.cols + k % width;
  }

  // Loads first, all of them: nothing aliased is written before.
  float old_absmax[n];
#pragma unroll
  for (int i = 0; i < n; ++i) old_absmax[i] = active ? a.absmax_in[i][b] : 0.0f;
  float gv[E], pv[E];
  uint8_t code[n][E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int k = lane + j * group;
    const bool in = k < len;
    gv[j] = in ? G::load(g[e[j]]) : 0.0f;
    pv[j] = in && a.with_params ? G::load(p[e[j]]) : 0.0f;
    // 4-bit: element (r, c) of the block is half (c & 1) of byte (row + r) * code_cols + (col0 + c) / 2
    const int r = in ? k / width : 0, c = k - r * width;
    const int64_t byte = (row + r) * a.code_cols + (col0 + c) / 2;
#pragma unroll
    for (int i = 0; i < n; ++i)
      code[i][j] = !in ? uint8_t(0)
                       : four ? uint8_t((a.codes_in[i][byte] >> (4 * (c & 1))) & 0x0fu) : a.codes_in[i][off + e[j]];
  }

  HyperF<float> h;
  const float* hr = a.hyper + (row / a.rows_per_hyper) * a.hyper_stride;
#pragma unroll
  for (int j = 0; j < kNumHyper; ++j) h.v[j] = __ldg(hr + j);
  h.one = 1.0f;
  const uint32_t param_key =
      a.round_params ? rounding_key(h.v[kParamRoundingStep], h.v[kRoundingSeed], kParamsState) : 0u;

  // The rule; the new states stay in registers.
  float st[n][E], m[n];
#pragma unroll
  for (int i = 0; i < n; ++i) m[i] = 0.0f;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    float s[n];
#pragma unroll
    for (int i = 0; i < n; ++i) s[i] = scale_value(values[state_map(A, i)][code[i][j]], old_absmax[i]);
    const float uj = cuda_rule::step_rule<A>(h, gv[j], pv[j], s);
    const int k = lane + j * group;
    if (k < len) {
      float out = a.apply ? pv[j] + uj : uj;
      if (a.round_params) {   // element (k / width, k % width) of the block
        const int r = k / width;
        out = round_param(out, a.row_index[row + r] + a.col_index[col0 + k - r * width], param_key);
      }
      u[e[j]] = G::store(out);
    }
#pragma unroll
    for (int i = 0; i < n; ++i) {
      st[i][j] = s[i];
      const bool sign = signs_absmax(state_map(A, i));
      m[i] = fold_absmax(m[i], k < len ? absmax_term(s[i], sign) : 0.0f, sign);
    }
  }

  group_absmax<A>(m, group, scratch);

  uint8_t* slot = staged + (threadIdx.x / group) * group * E;   // this block's new 4-bit codes
#pragma unroll
  for (int i = 0; i < n; ++i) {
    const Normalizer normalize(m[i]);
    const float* mi = mids[state_map(A, i)];
    const float* vi = values[state_map(A, i)];
    const int floor = positive_floor(state_map(A, i));
    const uint32_t key = a.stochastic_states ? rounding_key(h.v[kRoundingStep], h.v[kRoundingSeed], i) : 0u;
    uint8_t* codes = a.codes_out[i] + off;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const int k = lane + j * group;
      if (k < len) {
        const float v = normalize(st[i][j]);
        int c = search_code(v, mi);
        if (a.stochastic_states) {   // element (k / width, k % width) of the block
          const int r = k / width;
          c = stochastic_code(v, c, rounding_draw(a.row_index[row + r] + a.col_index[col0 + k - r * width], key), vi);
        }
        if (four)
          slot[k] = uint8_t(floor_code(c, st[i][j], floor));
        else
          codes[e[j]] = uint8_t(floor_code(c, st[i][j], floor));
      }
    }
    if (four) {   // whole bytes of the block's rows (every thread of the CTA reaches the barriers)
      __syncthreads();
      const int half = (width + 1) / 2;
      for (int q = lane; q < half * int(blk.height); q += group) {
        const int r = q / half, c = 2 * (q - r * half);
        const uint8_t high = c + 1 < width ? slot[r * width + c + 1] : uint8_t(0);
        a.codes_out[i][(row + r) * a.code_cols + (col0 + c) / 2] = uint8_t(slot[r * width + c] | (high << 4));
      }
      __syncthreads();
    }
    if (active && lane == 0) a.absmax_out[i][b] = m[i];
  }
}

// ---- launches ----------------------------------------------------------------------------

template <int A, typename G, int E>
ffi::Error launch_step(cudaStream_t stream, const StepArgs& a, unsigned grid) {
  const cudaError_t err = launch(step_kernel<A, G, E>, grid, kThreads, stream, a);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("optax8 CUDA step: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The whole-blocks kernel, or the general one with per_thread elements per thread.
template <int A, typename G>
ffi::Error launch_rule(cudaStream_t stream, const StepArgs& a, unsigned grid, int64_t per_thread, bool whole) {
  if (whole) return launch_whole_blocks<A, G>(stream, a);
  switch (per_thread) {
    case 1: return launch_step<A, G, 1>(stream, a, grid);
    case 2: return launch_step<A, G, 2>(stream, a, grid);
    case 4: return launch_step<A, G, 4>(stream, a, grid);
    case 8: return launch_step<A, G, 8>(stream, a, grid);
    default: return launch_step<A, G, 16>(stream, a, grid);
  }
}

template <typename G>
ffi::Error launch_algo(cudaStream_t stream, const StepArgs& a, unsigned grid, int64_t per_thread, bool whole,
                       int64_t algo) {
#define OPTAX8_CASE(A) \
  case A: return launch_rule<A, G>(stream, a, grid, per_thread, whole);
  switch (Algo(algo)) { OPTAX8_FOR_EACH_ALGO(OPTAX8_CASE) }
#undef OPTAX8_CASE
  return ffi::Error::InvalidArgument("optax8 CUDA step: unknown algo " + std::to_string(algo));
}

// Launches the step of one leaf (checked by Step).
ffi::Error StepLeaf(cudaStream_t stream, const StepBuffers& s) {
  if (s.l.elements() == 0) return ffi::Error::Success();
  StepArgs a;
  a.l = s.l;
  a.hyper = s.hyper;
  a.rows_per_hyper = s.rows_per_hyper;
  a.hyper_stride = s.hyper_stride;
  a.g = s.g;
  a.p = s.p;
  a.u = s.u;
  for (int i = 0; i < kMaxStates; ++i) {
    a.codes_in[i] = s.codes_in[i];
    a.absmax_in[i] = s.absmax_in[i];
    a.codes_out[i] = s.codes_out[i];
    a.absmax_out[i] = s.absmax_out[i];
  }
  a.row_index = s.row_index;
  a.col_index = s.col_index;
  a.stochastic_states = s.stochastic_states;
  a.round_params = s.round_params;
  a.bits = s.bits;
  a.code_cols = s.code_cols;
  a.group = int(std::min<int64_t>(s.l.block, kThreads));
  a.with_params = s.with_params;
  a.apply = s.apply;
  const int64_t per_group = kThreads / a.group;
  const int64_t grid = (s.l.blocks() + per_group - 1) / per_group;
  const int64_t per_thread = s.l.block / a.group;
  const bool whole = whole_blocks(s);
  switch (s.dtype) {
    case ffi::DataType::F32: return launch_algo<F32>(stream, a, unsigned(grid), per_thread, whole, s.algo);
    case ffi::DataType::BF16: return launch_algo<BF16>(stream, a, unsigned(grid), per_thread, whole, s.algo);
    default: return launch_algo<F16>(stream, a, unsigned(grid), per_thread, whole, s.algo);
  }
}

// One launch per leaf, all on the call's stream, after every leaf is checked:
// a bad leaf fails the call before any kernel has written anything.
ffi::Error Step(cudaStream_t stream, ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets,
                int64_t algo, int64_t block_size, int64_t leaves, int64_t params_mode, int64_t tile_rows,
                int64_t stochastic, int64_t bits) {
  if (auto e = check_step_call(args, rets, algo, leaves, stochastic, bits); e.failure()) return e;
  if (block_size > kMaxBlock)
    return ffi::Error::InvalidArgument("optax8 CUDA step: block_size above " + std::to_string(kMaxBlock) +
                                       " is not supported");
  std::vector<StepBuffers> bufs(leaves);
  for (int64_t i = 0; i < leaves; ++i) {
    if (auto e = parse_step(hyper, args, rets, i, leaves, algo, block_size, tile_rows, params_mode, stochastic, bits,
                            &bufs[i]);
        e.failure())
      return e;
    const int64_t group = std::min<int64_t>(block_size, kThreads);
    if ((bufs[i].l.blocks() + kThreads / group - 1) / (kThreads / group) > 0x7fffffff)
      return ffi::Error::InvalidArgument("optax8 CUDA step (leaf " + std::to_string(i) +
                                         "): too many blocks for one launch");
  }
  for (const StepBuffers& s : bufs)
    if (auto e = StepLeaf(stream, s); e.failure()) return e;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace cuda_step
}  // namespace optax8

// The fingerprint of the rule of algorithm `algo` compiled here (0: none).
extern "C" uint32_t optax8_cuda_rule_fingerprint(int64_t algo) {
  return algo >= 0 && algo < optax8::kNumAlgos ? optax8::kRuleFingerprints[algo] : 0u;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_step_cuda, optax8::cuda_step::Step, optax8::step_binding<optax8::CudaContext>());

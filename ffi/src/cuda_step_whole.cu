// CUDA step kernel for rows of whole blocks (see cuda_step.cu for the
// handler, the general kernel and the aliasing and exactness rules, which
// hold here too). A translation unit of its own so that the two kernels
// compile in parallel.
#include <algorithm>
#include <cstdint>
#include <string>

#include "optax8/cuda_step.h"

namespace ffi = xla::ffi;

namespace optax8 {
namespace cuda_step {
namespace {

// ---- whole blocks: the fast path ---------------------------------------------------------
//
// A leaf whose rows are whole blocks of 128 to 4096 elements (any such block
// size that divides the last axis) is a flat run of blocks; a matrix cut
// into whole tiles (tile_cols divides the last axis and tile_rows the
// matrix's rows: the usual case) is a run of bands of tile_rows rows, each
// a run of tiles, and a tile's element k lies in its row k / tile_cols.
// W = max(1, block / 512) warps own a block; a CTA of 8 warps holds 8 / W
// blocks at a time and strides over the leaf's blocks, so it loads the
// tables into shared memory once. Each thread owns C = block / (128 W)
// chunks of 4 consecutive elements: one 16-byte load of g and of p (8 bytes
// in 16-bit dtypes) and one 4-byte load of codes per state and chunk, and the
// same stores. absmax is reduced by warp shuffles (for W > 1, then across the
// block's warps in shared memory). A new code is looked up in the compact
// bucket table (optax8.maps.compact_buckets): one byte and one comparison
// with a decision point, the CPU handler's rule; with stochastic rounding
// it moves to stochastic_code's (quantize.h) with the element's draw (a
// chunk's 4 elements lie in one row). 4-bit codes: a chunk's 4 codes are one
// 2-byte access (rows are whole blocks, so chunk e's codes start at byte e / 2). Aliasing as in cuda_step.cu: each
// thread reads its chunks before it writes them, and the absmax is written
// after the reduction that every thread of the block joins after reading it.

constexpr int kWarps = kThreads / 32;

alignas(16) __device__ const uint8_t kBuckets[4][2 * OPTAX8_BUCKET_COUNT] = {
    {OPTAX8_SIGNED_BUCKETS}, {OPTAX8_UNSIGNED_BUCKETS}, {OPTAX8_SIGNED4_BUCKETS}, {OPTAX8_UNSIGNED4_BUCKETS}};

// The tables of the signed and unsigned maps at the call's bits.
struct Tables {
  float values[2][256];
  float mids[2][256];
  alignas(16) uint8_t buckets[2][2 * OPTAX8_BUCKET_COUNT];
};

// Four 4-bit codes (one per half byte of w) as the four bytes of a word, and back.
__device__ __forceinline__ uint32_t widen4(uint32_t w) {
  return (w & 0xfu) | ((w & 0xf0u) << 4) | ((w & 0xf00u) << 8) | ((w & 0xf000u) << 12);
}
__device__ __forceinline__ uint16_t narrow4(uint32_t b) {
  return uint16_t((b & 0xfu) | ((b >> 4) & 0xf0u) | ((b >> 8) & 0xf00u) | ((b >> 12) & 0xf000u));
}

// #{j : mids[j] < v} from the compact bucket table of one map.
__device__ __forceinline__ int table_code(float v, const uint8_t* buckets, const float* mids) {
  const uint32_t bits = float_bits(v);
  const int bucket = min(max(int((bits >> 16) & 0x7fffu), OPTAX8_BUCKET_LO), OPTAX8_BUCKET_HI) - OPTAX8_BUCKET_LO;
  const int c = buckets[(bits >> 31) * OPTAX8_BUCKET_COUNT + bucket];
  return c + (mids[c] < v ? 1 : 0);
}

// Four consecutive elements of a g, p or u buffer as floats.
template <typename G>
struct Chunk4 {  // 16-bit dtypes: one 8-byte access
  __device__ static void load(const void* base, int64_t e, float (&v)[4]) {
    const uint2 r = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + e);
    v[0] = G::load(uint16_t(r.x));
    v[1] = G::load(uint16_t(r.x >> 16));
    v[2] = G::load(uint16_t(r.y));
    v[3] = G::load(uint16_t(r.y >> 16));
  }
  __device__ static void store(void* base, int64_t e, const float (&v)[4]) {
    uint2 r;
    r.x = uint32_t(G::store(v[0])) | (uint32_t(G::store(v[1])) << 16);
    r.y = uint32_t(G::store(v[2])) | (uint32_t(G::store(v[3])) << 16);
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + e) = r;
  }
};
template <>
struct Chunk4<F32> {  // one 16-byte access
  __device__ static void load(const void* base, int64_t e, float (&v)[4]) {
    const float4 r = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + e);
    v[0] = r.x;
    v[1] = r.y;
    v[2] = r.z;
    v[3] = r.w;
  }
  __device__ static void store(void* base, int64_t e, const float (&v)[4]) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + e) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// blocks_per_hyper: consecutive blocks that share a hyperparameter row (vmap).
template <int A, typename G, int C, int W>
__global__ void __launch_bounds__(kThreads, 2)
    step_whole_blocks(const StepArgs a, int64_t nblocks, int64_t blocks_per_hyper) {
  constexpr int n = algo_states(A);
  constexpr int kBlock = 128 * C * W, kPerCta = kWarps / W;
  __shared__ Tables t;
  __shared__ float scratch[kMaxStates][kWarps];
  const bool four = a.bits == 4;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    t.values[k][threadIdx.x] = kStepMapValues[map_with_bits(k, a.bits)][threadIdx.x];
    t.mids[k][threadIdx.x] = kStepMapMids[map_with_bits(k, a.bits)][threadIdx.x];
  }
  const uint4* src = reinterpret_cast<const uint4*>(&kBuckets[four ? 2 : 0][0]);
  uint4* dst = reinterpret_cast<uint4*>(&t.buckets[0][0]);
  for (int w = threadIdx.x; w < int(sizeof(t.buckets) / 16); w += kThreads) dst[w] = src[w];
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int col_shift = 0;  // log2(tile_cols)
  while ((int64_t{1} << col_shift) < a.l.tile_cols) ++col_shift;
  const int col_mask = int(a.l.tile_cols) - 1;
  const int part = warp % W;           // this warp's part of its block
  const int tb = part * 32 + lane;     // this thread's index among the block's W warps
  HyperF<float> h;
  h.one = 1.0f;
  int64_t hyper_row = -1;
  uint32_t param_key = 0;
  // The same trip count for every thread of the CTA (its barriers), inactive warps included.
  for (int64_t first = int64_t(blockIdx.x) * kPerCta; first < nblocks; first += int64_t(gridDim.x) * kPerCta) {
    const int64_t b = first + warp / W;
    const bool active = b < nblocks;
    const int64_t row = active && blocks_per_hyper < nblocks ? b / blocks_per_hyper : 0;
    if (row != hyper_row) {
      hyper_row = row;
      const float* hr = a.hyper + row * a.hyper_stride;
#pragma unroll
      for (int j = 0; j < kNumHyper; ++j) h.v[j] = __ldg(hr + j);
      if (a.round_params) param_key = rounding_key(h.v[kParamRoundingStep], h.v[kRoundingSeed], kParamsState);
    }
    // The block's first element; its element k lies at base + (k >> col_shift) * cols + (k & col_mask).
    int64_t base = b * kBlock;
    if (a.l.tile_rows > 1 && active) {
      const uint32_t band = uint32_t(b) / uint32_t(a.l.row_blocks);
      base = int64_t(band) * a.l.tile_rows * a.l.cols + (int64_t(b) - int64_t(band) * a.l.row_blocks) * a.l.tile_cols;
    }
    float old_absmax[n], m[n], st[n][C][4];
#pragma unroll
    for (int i = 0; i < n; ++i) {
      old_absmax[i] = active ? a.absmax_in[i][b] : 0.0f;
      m[i] = 0.0f;
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int k0 = 4 * (tb + 32 * W * c);
      const int64_t e = base + int64_t(k0 >> col_shift) * a.l.cols + (k0 & col_mask);
      float gv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, pv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, u[4];
      uint32_t code[n];
#pragma unroll
      for (int i = 0; i < n; ++i)
        code[i] = !active ? 0u
                  : four  ? widen4(*reinterpret_cast<const uint16_t*>(a.codes_in[i] + e / 2))
                          : *reinterpret_cast<const uint32_t*>(a.codes_in[i] + e);
      if (active) {
        Chunk4<G>::load(a.g, e, gv);
        if (a.with_params) Chunk4<G>::load(a.p, e, pv);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float s[n];
#pragma unroll
        for (int i = 0; i < n; ++i)
          s[i] = scale_value(t.values[state_map(A, i)][(code[i] >> (8 * k)) & 0xffu], old_absmax[i]);
        const float uk = cuda_rule::step_rule<A>(h, gv[k], pv[k], s);
        u[k] = a.apply ? pv[k] + uk : uk;
        if (a.round_params && active) {   // element e + k: row r, column e - r * cols + k
          const int64_t r = e / a.l.cols;
          u[k] = round_param(u[k], a.row_index[r] + a.col_index[e - r * a.l.cols + k], param_key);
        }
#pragma unroll
        for (int i = 0; i < n; ++i) {
          st[i][c][k] = s[i];
          const bool sign = signs_absmax(state_map(A, i));
          m[i] = fold_absmax(m[i], absmax_term(s[i], sign), sign);
        }
      }
      if (active) Chunk4<G>::store(a.u, e, u);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
      for (int i = 0; i < n; ++i)
        m[i] = fold_absmax(m[i], __shfl_xor_sync(0xffffffffu, m[i], offset), signs_absmax(state_map(A, i)));
    }
    if constexpr (W > 1) {
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < n; ++i) scratch[i][warp] = m[i];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < n; ++i) {
        float x = scratch[i][warp - part];
        for (int w = 1; w < W; ++w) x = fold_absmax(x, scratch[i][warp - part + w], signs_absmax(state_map(A, i)));
        m[i] = x;
      }
      __syncthreads();   // scratch is free for the next blocks
    }
    const bool stochastic = a.stochastic_states && active;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const Normalizer normalize(m[i]);
      const uint8_t* buckets = t.buckets[state_map(A, i)];
      const float* mids = t.mids[state_map(A, i)];
      const int floor = positive_floor(state_map(A, i));
      const uint32_t key = stochastic ? rounding_key(h.v[kRoundingStep], h.v[kRoundingSeed], i) : 0u;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int k0 = 4 * (tb + 32 * W * c);
        const int64_t e = base + int64_t(k0 >> col_shift) * a.l.cols + (k0 & col_mask);
        uint32_t row_index = 0;
        const uint32_t* col_index = nullptr;
        if (stochastic) {
          const int64_t r = e / a.l.cols;
          row_index = a.row_index[r];
          col_index = a.col_index + (e - r * a.l.cols);
        }
        uint32_t packed = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float v = normalize(st[i][c][k]);
          int code = table_code(v, buckets, mids);
          if (stochastic)
            code = stochastic_code(v, code, rounding_draw(row_index + col_index[k], key), t.values[state_map(A, i)]);
          packed |= uint32_t(floor_code(code, st[i][c][k], floor)) << (8 * k);
        }
        if (active && four)
          *reinterpret_cast<uint16_t*>(a.codes_out[i] + e / 2) = narrow4(packed);
        else if (active)
          *reinterpret_cast<uint32_t*>(a.codes_out[i] + e) = packed;
      }
      if (active && tb == 0) a.absmax_out[i][b] = m[i];
    }
  }
}

template <int A, typename G, int C, int W>
ffi::Error launch_whole(cudaStream_t stream, const StepArgs& a, int64_t nblocks, int64_t blocks_per_hyper) {
  constexpr int kPerCta = kWarps / W;
  // One wave of resident CTAs (more would leave a partial second wave behind).
  int device = 0, sms = 1, resident = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, step_whole_blocks<A, G, C, W>, kThreads, 0);
  const int64_t grid = std::min<int64_t>((nblocks + kPerCta - 1) / kPerCta,
                                         int64_t(std::max(sms, 1)) * std::max(resident, 1));
  const cudaError_t err = launch(step_whole_blocks<A, G, C, W>, unsigned(grid), kThreads, stream, a, nblocks,
                                 blocks_per_hyper);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("optax8 CUDA step: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

// The fast path applies: whole blocks of 128 to 4096 elements, under 2**32 of them, and aligned buffers.
bool whole_blocks(const StepBuffers& s) {
  const int64_t block = s.l.block;
  if (block < 128 || block > kMaxBlock || s.l.cols % s.l.tile_cols != 0 || s.l.mat_rows % s.l.tile_rows != 0 ||
      s.l.blocks() >= (int64_t{1} << 32))
    return false;
  const uintptr_t width = s.dtype == ffi::DataType::F32 ? 16 : 8;
  auto aligned = [](const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  bool ok = aligned(s.g, width) && aligned(s.u, width) && (!s.with_params || aligned(s.p, width));
  const uintptr_t codes = s.bits == 4 ? 2 : 4;
  for (int i = 0; i < s.n_states; ++i)
    ok = ok && aligned(s.codes_in[i], codes) && aligned(s.codes_out[i], codes);
  return ok;
}

template <int A, typename G>
ffi::Error launch_whole_blocks(cudaStream_t stream, const StepArgs& a) {
  const int64_t nblocks = a.l.blocks(), bph = a.l.row_blocks * (a.rows_per_hyper / a.l.tile_rows);
  switch (a.l.block) {
    case 128: return launch_whole<A, G, 1, 1>(stream, a, nblocks, bph);
    case 256: return launch_whole<A, G, 2, 1>(stream, a, nblocks, bph);
    case 512: return launch_whole<A, G, 4, 1>(stream, a, nblocks, bph);
    case 1024: return launch_whole<A, G, 4, 2>(stream, a, nblocks, bph);
    case 2048: return launch_whole<A, G, 4, 4>(stream, a, nblocks, bph);
    default: return launch_whole<A, G, 4, 8>(stream, a, nblocks, bph);
  }
}

#define OPTAX8_WHOLE_BLOCKS(A)                                                           \
  template ffi::Error launch_whole_blocks<A, F32>(cudaStream_t, const StepArgs&);         \
  template ffi::Error launch_whole_blocks<A, BF16>(cudaStream_t, const StepArgs&);        \
  template ffi::Error launch_whole_blocks<A, F16>(cudaStream_t, const StepArgs&);
OPTAX8_FOR_EACH_ALGO(OPTAX8_WHOLE_BLOCKS)
#undef OPTAX8_WHOLE_BLOCKS

}  // namespace cuda_step
}  // namespace optax8

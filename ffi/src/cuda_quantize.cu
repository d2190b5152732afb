// CUDA FFI handlers: block-wise quantize and dequantize.
//
// Quantize: a group of min(block, 256) threads owns one quantization block;
// a 256-thread CTA holds 256 / group blocks. Each thread strides over its
// block (row by row of a tile) with coalesced loads, the group reduces absmax in registers (warp
// shuffles) and shared memory, then requantizes by binary search over the
// 256 decision points held in shared memory.
#include <algorithm>
#include <cstdint>
#include <string>

#include "optax8/cuda_platform.h"
#include "optax8/ffi_common.h"
#include "optax8/quantize.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace optax8 {
namespace {

__constant__ float kMapValues[2][256] = {{OPTAX8_SIGNED_MAP}, {OPTAX8_UNSIGNED_MAP}};
__constant__ float kMapMids[2][256] = {{OPTAX8_SIGNED_MIDS}, {OPTAX8_UNSIGNED_MIDS}};

constexpr int kThreads = 256;

// The absmax (fold_absmax) over the `group` consecutive threads (a power of two) that share a block.
__device__ float group_absmax(float v, int group, float* scratch, bool sign) {
  for (int offset = min(group, 32) / 2; offset > 0; offset >>= 1)
    v = fold_absmax(v, __shfl_xor_sync(0xffffffffu, v, offset), sign);
  if (group <= 32) return v;
  const int warp = threadIdx.x / 32, warps = group / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  const int first = (warp / warps) * warps;
  v = scratch[first];
  for (int w = 1; w < warps; ++w) v = fold_absmax(v, scratch[first + w], sign);
  return v;
}

template <typename In>
__global__ void quantize_kernel(const typename In::T* __restrict__ x, uint8_t* __restrict__ codes,
                                float* __restrict__ absmax, BlockLayout l, int group, int kind) {
  __shared__ float mids[256];
  __shared__ float scratch[kThreads / 32];
  mids[threadIdx.x] = kMapMids[kind][threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % group;
  const int64_t b = int64_t(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const bool active = b < l.blocks();
  const Block blk = active ? l.at(b) : Block{0, 0, 1, 0};
  const int len = int(blk.width * blk.height), width = int(blk.width);
  const bool sign = signs_absmax(kind);
  float m = 0.0f;
  for (int k = lane; k < len; k += group)
    m = fold_absmax(m, absmax_term(In::load(x[blk.off + (k / width) * l.cols + k % width]), sign), sign);
  m = group_absmax(m, group, scratch, sign);
  const Normalizer normalize(m);
  for (int k = lane; k < len; k += group) {
    const int64_t e = blk.off + (k / width) * l.cols + k % width;
    const float xe = In::load(x[e]);
    codes[e] = uint8_t(floor_code(search_code(normalize(xe), mids), xe, positive_floor(kind)));
  }
  if (active && lane == 0) absmax[b] = m;
}

template <typename Out>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                  typename Out::T* __restrict__ out, BlockLayout l, int kind) {
  __shared__ float values[256];
  values[threadIdx.x] = kMapValues[kind][threadIdx.x];
  __syncthreads();
  const int64_t n = l.elements();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / l.cols, col = i % l.cols;
    out[i] = Out::store(scale_value(values[codes[i]], absmax[l.block_of(row, col)]));
  }
}

ffi::Error launch_status(cudaError_t err) {
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("optax8 CUDA: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error Quantize(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::U8>> codes,
                    ffi::Result<ffi::Buffer<ffi::F32>> absmax, int64_t block_size, int64_t map_kind,
                    int64_t tile_rows) {
  BlockLayout l;
  if (auto e = make_layout(x.dimensions(), codes->dimensions(), absmax->dimensions(), block_size, tile_rows,
                           map_kind, &l);
      e.failure())
    return e;
  if (l.elements() == 0) return ffi::Error::Success();
  const int group = int(std::min<int64_t>(l.block, kThreads));
  const int64_t grid = (l.blocks() + kThreads / group - 1) / (kThreads / group);
  if (grid > 0x7fffffff) return ffi::Error::InvalidArgument("optax8 CUDA: too many blocks for one launch");
  auto run = [&](auto tag) {
    using In = decltype(tag);
    return launch_status(launch(quantize_kernel<In>, unsigned(grid), kThreads, stream,
                                reinterpret_cast<const typename In::T*>(x.untyped_data()), codes->typed_data(),
                                absmax->typed_data(), l, group, int(map_kind)));
  };
  return by_float_dtype(x.element_type(), run);
}

ffi::Error Dequantize(cudaStream_t stream, ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> absmax,
                      ffi::Result<ffi::AnyBuffer> out, int64_t block_size, int64_t map_kind,
                      int64_t tile_rows) {
  BlockLayout l;
  if (auto e = make_layout(out->dimensions(), codes.dimensions(), absmax.dimensions(), block_size, tile_rows,
                           map_kind, &l);
      e.failure())
    return e;
  if (l.elements() == 0) return ffi::Error::Success();
  const int64_t grid = std::min<int64_t>((l.elements() + kThreads - 1) / kThreads, 65536);
  auto run = [&](auto tag) {
    using Out = decltype(tag);
    return launch_status(launch(dequantize_kernel<Out>, unsigned(grid), kThreads, stream, codes.typed_data(),
                                absmax.typed_data(), reinterpret_cast<typename Out::T*>(out->untyped_data()), l,
                                int(map_kind)));
  };
  return by_float_dtype(out->element_type(), run);
}

}  // namespace
}  // namespace optax8

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_quantize_cuda, optax8::Quantize,
                              ffi::Ffi::Bind()
                                  .Ctx<optax8::CudaContext>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("map_kind")
                                  .Attr<int64_t>("tile_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax8_dequantize_cuda, optax8::Dequantize,
                              ffi::Ffi::Bind()
                                  .Ctx<optax8::CudaContext>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("map_kind")
                                  .Attr<int64_t>("tile_rows"));

// 0 when the kernels can run on the current device, else the CUDA error
// (no device, a driver older than this library's CUDA runtime, or no kernel
// image for the GPU's architecture).
extern "C" int optax8_cuda_probe() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) err = cudaErrorNoDevice;
  if (err == cudaSuccess) {
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, optax8::quantize_kernel<optax8::F32>);
  }
  cudaGetLastError();  // do not leave the error for the next caller
  return int(err);
}

extern "C" const char* optax8_cuda_error_string(int err) { return cudaGetErrorString(cudaError_t(err)); }

extern "C" int64_t optax8_cuda_ffi_api_version() {
  return int64_t{XLA_FFI_API_MAJOR} * 1000 + XLA_FFI_API_MINOR;
}

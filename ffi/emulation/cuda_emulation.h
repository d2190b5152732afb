// A stand-in for the CUDA runtime that runs CUDA kernels on the CPU, for
// testing the CUDA handlers where no GPU exists (see optax8/cuda_platform.h).
//
// A launch runs its CTAs one after another on the calling thread. Each CUDA
// thread of a CTA is a fiber with its own stack; __syncthreads() and the
// warp shuffles are real barriers across the fibers of the CTA or warp, and
// between barriers the fibers run in a random order (a new order for every
// launch and barrier phase), so that a missing barrier changes results.
// __shared__ variables are per-OS-thread statics (one CTA at a time),
// __constant__ ones plain globals. Misuse that CUDA leaves undefined (a
// barrier not reached by every thread, a shuffle whose mask does not match
// the threads that call it) ends the launch with an error that
// cudaGetLastError() returns.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct float4 {
  float x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// The current fiber's indices (set by the scheduler before it runs a fiber).
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};

// Handlers take the XLA:CPU thread pool where CUDA ones take their stream.
using cudaStream_t = xla::ffi::ThreadPool;

struct cudaFuncAttributes {
  int maxThreadsPerBlock = 1024;
};

namespace optax8_emulation {
void run(unsigned grid, unsigned threads, const std::function<void()>& body);
void sync_threads();
uint32_t shuffle_xor(unsigned mask, uint32_t bits, int lane_mask);
cudaError_t last_error();   // and clears it
const char* error_string(cudaError_t err);
}  // namespace optax8_emulation

inline void __syncthreads() { optax8_emulation::sync_threads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = optax8_emulation::shuffle_xor(mask, bits, lane_mask);
  std::memcpy(&v, &bits, 4);
  return v;
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __fsqrt_rn(float x) { return std::sqrt(x); }

template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline cudaError_t cudaGetLastError() { return optax8_emulation::last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return optax8_emulation::error_string(err); }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// Two "multiprocessors": kernels that size their grid by them loop over their work.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 2;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  *attributes = cudaFuncAttributes{};
  return cudaSuccess;
}

namespace optax8 {

using CudaContext = xla::ffi::ThreadPool;

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned grid, unsigned threads, cudaStream_t,
                   Args&&... args) {
  optax8_emulation::run(grid, threads, [&] { kernel(args...); });
  return cudaGetLastError();
}

}  // namespace optax8

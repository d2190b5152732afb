// What the CUDA handlers take from the CUDA runtime and the XLA FFI: the
// runtime API, the handlers' platform context and a kernel launch.
//
// Built with nvcc this is the real runtime: the context is the call's
// stream, and `launch` is `kernel<<<grid, threads, 0, stream>>>(args...)`.
// With OPTAX8_CUDA_EMULATION (a host C++ build, for tests without a GPU)
// the same handlers run on the CPU against ffi/emulation/cuda_emulation.h:
// one fiber per CUDA thread, barriers and warp shuffles across fibers,
// registered as CPU FFI targets.
#pragma once

#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(OPTAX8_CUDA_EMULATION)
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>

namespace optax8 {

using CudaContext = xla::ffi::PlatformStream<cudaStream_t>;

// Launches kernel(args...) on grid x threads CTAs; returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), unsigned grid, unsigned threads, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, threads, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace optax8
#endif

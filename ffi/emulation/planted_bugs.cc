// Kernels with planted synchronisation bugs and their correct versions, run
// through the emulation by tests/test_cuda_emulated.py: each kind of bug
// (a missing __syncthreads, a wrong shuffle mask, an overwrite race) must
// give wrong results or an emulation error.
#include <vector>

#include "cuda_emulation.h"

namespace {

constexpr unsigned kThreads = 256;
constexpr unsigned kGrid = 16;

// Per CTA, the sum of threadIdx.x + 1000 * blockIdx.x over its threads,
// through shared memory; without the barrier thread 0 may sum before the
// others have written (and see the previous CTA's values).
__global__ void block_sum(int* out, bool barrier) {
  __shared__ int v[kThreads];
  v[threadIdx.x] = int(threadIdx.x + 1000 * blockIdx.x);
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned i = 0; i < kThreads; ++i) s += v[i];
    out[blockIdx.x] = s;
  }
}

// Per warp, the sum of its lanes' indices by a butterfly of shuffles.
__global__ void warp_sum(int* out, unsigned mask) {
  int v = int(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset);
  if (threadIdx.x % 32 == 0) out[blockIdx.x * (kThreads / 32) + threadIdx.x / 32] = v;
}

// Rotates a shared array by one in place: each thread reads its right
// neighbour, then overwrites its own element. Without the barrier between
// the read and the write a neighbour may overwrite what is to be read.
__global__ void rotate(int* out, bool barrier) {
  __shared__ int v[kThreads];
  v[threadIdx.x] = int(threadIdx.x + blockIdx.x);
  __syncthreads();
  const int next = v[(threadIdx.x + 1) % kThreads];
  if (barrier) __syncthreads();
  v[threadIdx.x] = next;
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = v[threadIdx.x];
}

}  // namespace

// Runs planted case `which` (0: block_sum, 1: warp_sum, 2: rotate), correct
// or buggy; returns the number of wrong results, or -1 for an emulation error.
extern "C" int optax8_emulation_planted(int which, int buggy) {
  std::vector<int> out(kGrid * kThreads, 0), want(out.size(), 0);
  for (unsigned b = 0; b < kGrid; ++b)
    for (unsigned t = 0; t < kThreads; ++t) {
      if (which == 0 && t == 0) want[b] = int(kThreads * (kThreads - 1) / 2 + 1000 * b * kThreads);
      if (which == 1 && t % 32 == 0) want[b * (kThreads / 32) + t / 32] = int(32 * t + 31 * 32 / 2);
      if (which == 2) want[b * kThreads + t] = int((t + 1) % kThreads + b);
    }
  optax8_emulation::run(kGrid, kThreads, [&] {
    if (which == 0) block_sum(out.data(), !buggy);
    if (which == 1) warp_sum(out.data(), buggy ? 0x0000ffffu : 0xffffffffu);
    if (which == 2) rotate(out.data(), !buggy);
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    cudaGetErrorString(err);   // clears the message
    return -1;
  }
  int wrong = 0;
  for (size_t i = 0; i < out.size(); ++i) wrong += out[i] != want[i];
  return wrong;
}

// The fiber scheduler behind cuda_emulation.h.
//
// Fibers start on their own stacks through makecontext/setcontext and then
// switch with _setjmp/_longjmp (no signal-mask system calls). A fiber runs
// the kernel body for one CUDA thread of the current CTA and yields at every
// barrier; the scheduler releases a barrier when all the threads it waits
// for have reached it, and runs the released fibers in a shuffled order.
#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between stacks
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_emulation.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace optax8_emulation {
namespace {

constexpr size_t kStackBytes = 256 << 10;  // reserved, not committed, per fiber
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kWarp = 32;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  jmp_buf env;
  ucontext_t start;
  void* stack = nullptr;
  bool started = false;
  State state = State::kDone;
  unsigned shuffle_mask = 0;
};

// The scheduler of one OS thread: its fibers (reused by every CTA) and the CTA that runs.
struct Scheduler {
  std::vector<Fiber> fibers;
  jmp_buf env;
  const std::function<void()>* body = nullptr;
  unsigned threads = 0;
  unsigned current = 0;
  uint32_t slots[kMaxThreads / kWarp][kWarp];
  std::mt19937 rng;
  std::string error;
  cudaError_t last_error = cudaSuccess;

  Scheduler() : fibers(kMaxThreads) {
    const char* seed = std::getenv("OPTAX8_EMULATION_SEED");
    rng.seed(seed ? unsigned(std::strtoul(seed, nullptr, 10)) : std::random_device{}());
  }
};

thread_local Scheduler* scheduler = nullptr;
std::atomic<int64_t> launches{0};

Scheduler& self() {
  if (scheduler == nullptr) scheduler = new Scheduler();  // lives as long as its thread
  return *scheduler;
}

// A fiber's whole life: run the body of the CUDA thread it is given, then wait for the next one.
void fiber_main() {
  for (;;) {
    Scheduler& s = self();
    (*s.body)();
    Fiber& f = s.fibers[s.current];
    f.state = State::kDone;
    if (!_setjmp(f.env)) _longjmp(s.env, 1);
  }
}

// Switches from the running fiber back to the scheduler.
void yield(State state) {
  Scheduler& s = self();
  Fiber& f = s.fibers[s.current];
  f.state = state;
  if (!_setjmp(f.env)) _longjmp(s.env, 1);
}

// Runs fiber i until it yields or finishes.
void dispatch(Scheduler& s, unsigned i) {
  Fiber& f = s.fibers[i];
  s.current = i;
  threadIdx = dim3(i);
  if (_setjmp(s.env)) return;
  if (f.started) _longjmp(f.env, 1);
  if (f.stack == nullptr) {
    f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f.stack == MAP_FAILED) std::abort();
  }
  getcontext(&f.start);
  f.start.uc_stack.ss_sp = f.stack;
  f.start.uc_stack.ss_size = kStackBytes;
  f.start.uc_link = nullptr;
  makecontext(&f.start, fiber_main, 0);
  f.started = true;
  setcontext(&f.start);
}

// Releases the warps all of whose live lanes wait at a shuffle; then, if every
// live thread waits at __syncthreads, the block. False if nothing can run.
bool release(Scheduler& s) {
  bool any = false;
  for (unsigned w = 0; w * kWarp < s.threads; ++w) {
    const unsigned first = w * kWarp, last = std::min(s.threads, first + kWarp);
    unsigned live = 0, waiting = 0, masks_agree = 1;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = s.fibers[i];
      if (f.state == State::kDone) continue;
      live |= 1u << (i - first);
      if (f.state == State::kAtWarpBarrier) {
        waiting |= 1u << (i - first);
        masks_agree &= f.shuffle_mask == s.fibers[first + __builtin_ctz(waiting)].shuffle_mask;
      }
    }
    if (waiting == 0 || waiting != live) continue;
    if (!masks_agree || s.fibers[first + __builtin_ctz(waiting)].shuffle_mask != live) {
      s.error = "a warp shuffle's mask does not match the lanes that call it (warp " + std::to_string(w) + ")";
      return false;
    }
    for (unsigned i = first; i < last; ++i)
      if (s.fibers[i].state == State::kAtWarpBarrier) s.fibers[i].state = State::kRunnable;
    any = true;
  }
  if (any) return true;
  bool all = true, live = false;
  for (unsigned i = 0; i < s.threads; ++i) {
    const State st = s.fibers[i].state;
    if (st == State::kDone) continue;
    live = true;
    all &= st == State::kAtBlockBarrier;
  }
  if (!live) return false;
  if (!all) {
    s.error = "__syncthreads() or a warp shuffle is not reached by every thread that must reach it";
    return false;
  }
  for (unsigned i = 0; i < s.threads; ++i)
    if (s.fibers[i].state == State::kAtBlockBarrier) s.fibers[i].state = State::kRunnable;
  return true;
}

}  // namespace

void run(unsigned grid, unsigned threads, const std::function<void()>& body) {
  Scheduler& s = self();
  if (threads == 0 || threads > kMaxThreads || grid == 0 || grid > 0x7fffffffu) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  launches.fetch_add(1);
  s.error.clear();
  s.body = &body;
  s.threads = threads;
  blockDim = dim3(threads);
  gridDim = dim3(grid);
  std::vector<unsigned> order;
  for (unsigned b = 0; b < grid && s.error.empty(); ++b) {
    blockIdx = dim3(b);
    for (unsigned i = 0; i < threads; ++i) s.fibers[i].state = State::kRunnable;
    for (;;) {
      order.clear();
      for (unsigned i = 0; i < threads; ++i)
        if (s.fibers[i].state == State::kRunnable) order.push_back(i);
      if (order.empty()) {
        if (!release(s)) break;
        continue;
      }
      std::shuffle(order.begin(), order.end(), s.rng);
      for (unsigned i : order) dispatch(s, i);
    }
  }
  if (!s.error.empty()) {
    // Fibers stopped mid-kernel are abandoned: each restarts from the top at its next dispatch.
    for (unsigned i = 0; i < threads; ++i) s.fibers[i].started = false;
    s.last_error = cudaErrorLaunchFailure;
  }
}

void sync_threads() { yield(State::kAtBlockBarrier); }

uint32_t shuffle_xor(unsigned mask, uint32_t bits, int lane_mask) {
  Scheduler& s = self();
  const unsigned warp = s.current / kWarp, lane = s.current % kWarp;
  s.fibers[s.current].shuffle_mask = mask;
  s.slots[warp][lane] = bits;
  yield(State::kAtWarpBarrier);   // every lane has written its value
  const unsigned from = lane ^ unsigned(lane_mask);
  const uint32_t out = (from < kWarp && (mask >> from & 1u)) ? s.slots[warp][from] : 0x7fc00000u;  // else NaN
  yield(State::kAtWarpBarrier);   // every lane has read before the next shuffle writes
  return out;
}

cudaError_t last_error() {
  Scheduler& s = self();
  const cudaError_t err = s.last_error;
  s.last_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    default: {
      thread_local std::string text;
      Scheduler& s = self();
      text = "unspecified launch failure (emulation: " + s.error + ")";
      s.error.clear();
      return text.c_str();
    }
  }
}

}  // namespace optax8_emulation

// Launches run so far in this process (tests check that a failed call launched nothing).
extern "C" int64_t optax8_emulation_launches() { return optax8_emulation::launches.load(); }

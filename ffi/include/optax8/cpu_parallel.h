// parallel_for over XLA's intra-op thread pool.
//
// The caller claims chunks too, so it never waits on a task that has not
// started: it waits only for chunks that running tasks have claimed. Tasks
// that start late find no chunk left and touch nothing but the shared
// counters they own a reference to.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace optax8 {

// Calls body(begin, end) over [0, n) in chunks of at least `grain` items.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t max_chunks = (n + grain - 1) / std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(max_chunks, threads * 16);
  if (threads == 1 || chunks <= 1) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  const Body* body_ptr = &body;
  auto run = [shared, body_ptr, chunks, n]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      (*body_ptr)(n * c / chunks, n * (c + 1) / chunks);
      if (shared->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == chunks; });
}

}  // namespace optax8

// Internal: the worker threads of the CPU kernels (replaces OpenMP in src/cpu).
//
// Why not OpenMP: libgomp's idle threads busy-wait (GOMP_SPINCOUNT, read once when the library loads, so a
// program cannot turn it off for itself), and its static schedules wait at every barrier for the slowest
// thread. On a machine where other processes hold cores, a spinning thread takes the core that the thread it
// waits for needs: a decode step of many short parallel loops became up to 100x slower than one thread.
//
// This pool: each calling thread owns its workers (created on first use, joined when the calling thread
// exits). Idle workers sleep on a condition variable, after a short bounded spin (kSpin polls, a few
// microseconds) that keeps the wake-up cheap between the back-to-back loops of one step. Work is claimed
// in chunks from an atomic counter, the caller taking part as worker 0; the caller returns once every chunk
// is done, without waiting for workers that have not started (a worker that wakes late finds nothing left
// and sleeps again). So a worker held off its core by another process delays the call by at most the chunk
// it holds, and a worker that never got the CPU delays nothing.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace ksa::cpu::detail {

// Threads for a call: n > 0 as given, else the hardware threads.
int resolve_threads(int n);

// A non-owning reference to a callable void(int64_t begin, int64_t end, int worker).
class ChunkFn {
 public:
  template <class F>
  requires(!std::is_same_v<std::remove_cv_t<F>, ChunkFn>) ChunkFn(F& f)
      : obj_(&f), call_([](void* o, int64_t b, int64_t e, int w) { (*static_cast<F*>(o))(b, e, w); }) {}
  void operator()(int64_t b, int64_t e, int w) const { call_(obj_, b, e, w); }

 private:
  void* obj_;
  void (*call_)(void*, int64_t, int64_t, int);
};

// Runs body(begin, end, worker) over [0, n) in chunks of `grain` items on up to `threads` threads (worker in
// [0, threads), 0 = the calling thread; each worker index is used by one thread at a time, so per-worker
// scratch indexed by it needs no lock). The first exception a chunk throws is rethrown here (the other
// chunks still run). Nested calls (from inside a body) run serially on the calling thread.
void parallel_chunks(int threads, int64_t n, int64_t grain, ChunkFn body);
template <class F>
void parallel_chunks(int threads, int64_t n, int64_t grain, F&& body) {
  parallel_chunks(threads, n, grain, ChunkFn(body));
}

// body(i, worker) for every i in [0, n), chunks of `grain`.
template <class F>
void parallel_for(int threads, int64_t n, int64_t grain, F&& body) {
  auto chunk = [&](int64_t b, int64_t e, int w) {
    for (int64_t i = b; i < e; ++i) body(i, w);
  };
  parallel_chunks(threads, n, grain, ChunkFn(chunk));
}

// Per-worker state made on a worker's first item (workers that get no item allocate nothing).
template <class T>
class PerWorker {
 public:
  explicit PerWorker(int threads) : v_(size_t(std::max(1, threads))) {}
  template <class... A>
  T& get(int worker, A&&... args) {
    std::unique_ptr<T>& p = v_[size_t(worker)];
    if (!p) p = std::make_unique<T>(std::forward<A>(args)...);
    return *p;
  }

 private:
  std::vector<std::unique_ptr<T>> v_;
};

// Tests: how many worker threads the calling thread's pool has started (0 before its first parallel call).
int pool_workers();

}  // namespace ksa::cpu::detail

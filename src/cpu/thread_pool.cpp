// The CPU kernels' worker threads (see thread_pool.hpp).
#include "cpu/thread_pool.hpp"

#include <pthread.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ksa::cpu::detail {
namespace {

// How long an idle worker (or a caller waiting for the last chunks) polls before it sleeps: long enough to
// cover the gap between the parallel loops of one decode step, far too short to matter to other processes.
constexpr auto kSpin = std::chrono::microseconds(20);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls pred() for at most kSpin; returns its last value.
template <class P>
bool spin_until(P pred) {
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= end) return pred();
  }
}

thread_local bool t_inside = false;  // a pool worker, or a caller inside parallel_chunks

struct Job {
  ChunkFn fn;
  int64_t n, grain;
  int threads;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex m;  // done_cv and err
  std::condition_variable done_cv;
  std::exception_ptr err;
  Job(ChunkFn f, int64_t nn, int64_t g, int t) : fn(f), n(nn), grain(g), threads(t) {}

  // Claims and runs chunks until none is left. fn is called only for a claimed chunk, and the caller returns
  // only once every chunk is done, so fn (which refers to the caller's stack) is alive whenever it is called.
  void work(int worker) {
    for (;;) {
      const int64_t b = next.fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) return;
      const int64_t e = std::min(n, b + grain);
      try {
        fn(b, e, worker);
      } catch (...) {
        std::lock_guard lk(m);
        if (!err) err = std::current_exception();
      }
      if (done.fetch_add(e - b, std::memory_order_acq_rel) + (e - b) == n) {
        { std::lock_guard lk(m); }  // the caller is either before its check or waiting
        done_cv.notify_one();
      }
    }
  }
  bool finished() const { return done.load(std::memory_order_acquire) == n; }
};

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  void run(int threads, int64_t n, int64_t grain, ChunkFn body) {
    while (int(workers_.size()) < threads - 1) {
      const int w = int(workers_.size()) + 1;
      workers_.emplace_back([this, w] { loop(w); });
    }
    auto job = std::make_shared<Job>(body, n, grain, threads);
    {
      std::lock_guard lk(m_);
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    t_inside = true;
    job->work(0);
    t_inside = false;
    if (!spin_until([&] { return job->finished(); })) {
      std::unique_lock lk(job->m);
      job->done_cv.wait(lk, [&] { return job->finished(); });
    }
    {
      std::lock_guard lk(m_);
      if (job_ == job) job_.reset();
    }
    if (job->err) std::rethrow_exception(job->err);
  }

  int workers() const { return int(workers_.size()); }

 private:
  void loop(int w) {
    t_inside = true;
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; });
      std::shared_ptr<Job> job;
      {
        std::unique_lock lk(m_);
        cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_relaxed) != seen; });
        if (stop_) return;
        seen = gen_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job && w < job->threads) job->work(w);
    }
  }

  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> gen_{0};
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// The calling thread's pool. After fork() the child has only the forking thread: its pool's workers do not
// exist there and its mutexes may have been held by them, so the child abandons that pool (leaked, never
// joined) and starts a new one on its next parallel call, as libgomp does for OpenMP.
thread_local std::unique_ptr<Pool> t_pool;

void abandon_pool_in_child() { (void)t_pool.release(); }

Pool& pool() {
  static const int registered = pthread_atfork(nullptr, nullptr, abandon_pool_in_child);
  (void)registered;
  if (!t_pool) t_pool = std::make_unique<Pool>();
  return *t_pool;
}

}  // namespace

int resolve_threads(int n) { return n > 0 ? n : int(std::max(1u, std::thread::hardware_concurrency())); }

void parallel_chunks(int threads, int64_t n, int64_t grain, ChunkFn body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  threads = int(std::min<int64_t>(std::max(1, threads), (n + grain - 1) / grain));
  if (threads == 1 || t_inside) {
    std::exception_ptr err;
    for (int64_t b = 0; b < n; b += grain) {
      try {
        body(b, std::min(n, b + grain), 0);
      } catch (...) {
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
  pool().run(threads, n, grain, body);
}

int pool_workers() { return t_pool ? t_pool->workers() : 0; }

}  // namespace ksa::cpu::detail

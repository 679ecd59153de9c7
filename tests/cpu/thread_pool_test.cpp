// The CPU kernels' worker pool (src/cpu/thread_pool.hpp): every index exactly once, worker indices that are
// never shared by two threads at once, exceptions carried to the caller, nested calls serial, and idle
// workers that sleep (their kernel state, not a timing).
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu/thread_pool.hpp"

namespace ksa::cpu::detail {
namespace {

TEST(ThreadPool, EveryIndexOnceWithExclusiveWorkers) {
  for (int threads : {1, 2, 3, 8}) {
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(1000)}) {
      for (int64_t grain : {int64_t(1), int64_t(5), int64_t(64)}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::vector<std::atomic<int>> busy(static_cast<size_t>(threads));
        std::atomic<bool> shared{false}, out_of_range{false};
        parallel_chunks(threads, n, grain, [&](int64_t b, int64_t e, int w) {
          if (w < 0 || w >= threads) {
            out_of_range = true;
            return;
          }
          if (busy[size_t(w)].fetch_add(1) != 0) shared = true;
          EXPECT_LE(e - b, grain);
          for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
          busy[size_t(w)]--;
        });
        ASSERT_FALSE(out_of_range) << threads << " threads";
        ASSERT_FALSE(shared) << "a worker index used by two threads at once";
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "index " << i << " of " << n;
      }
    }
  }
}

TEST(ThreadPool, ExceptionReachesTheCallerAndOtherChunksStillRun) {
  std::atomic<int> ran{0};
  EXPECT_THROW(parallel_for(4, 100, 1,
                            [&](int64_t i, int) {
                              ++ran;
                              if (i == 37) throw std::runtime_error("item 37");
                            }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 100);
  // The pool is usable afterwards.
  std::atomic<int64_t> sum{0};
  parallel_for(4, 100, 3, [&](int64_t i, int) { sum += i; });
  EXPECT_EQ(sum.load(), 4950);
}

TEST(ThreadPool, NestedCallsRunSerially) {
  std::atomic<int64_t> sum{0};
  parallel_for(3, 10, 1, [&](int64_t, int) {
    const std::thread::id me = std::this_thread::get_id();
    parallel_for(3, 10, 1, [&](int64_t j, int w) {
      EXPECT_EQ(std::this_thread::get_id(), me);
      EXPECT_EQ(w, 0);
      sum += j;
    });
  });
  EXPECT_EQ(sum.load(), 10 * 45);
}

TEST(ThreadPool, OneThreadRunsOnTheCaller) {
  const std::thread::id me = std::this_thread::get_id();
  parallel_for(1, 50, 1, [&](int64_t, int w) {
    EXPECT_EQ(std::this_thread::get_id(), me);
    EXPECT_EQ(w, 0);
  });
}

// Scheduler state letters ('R' running, 'S' sleeping, ...) of this process's threads other than the caller.
std::vector<char> other_thread_states() {
  std::vector<char> states;
  const std::string self = std::to_string(gettid());
  DIR* d = opendir("/proc/self/task");
  if (!d) return states;
  while (dirent* e = readdir(d)) {
    const std::string tid = e->d_name;
    if (tid == "." || tid == ".." || tid == self) continue;
    std::ifstream in("/proc/self/task/" + tid + "/stat");
    std::string line;
    std::getline(in, line);
    const size_t paren = line.rfind(')');  // "tid (comm) S ..."
    if (paren != std::string::npos && paren + 2 < line.size()) states.push_back(line[paren + 2]);
  }
  closedir(d);
  return states;
}

// Idle workers block in the kernel (state S) instead of spinning (state R). Polled, with a generous limit, so
// a loaded machine cannot fail it; a pool that spins while idle never gets there.
TEST(ThreadPool, IdleWorkersSleep) {
  if (access("/proc/self/task", R_OK) != 0) GTEST_SKIP() << "no /proc/self/task";
  std::atomic<int64_t> sum{0};
  parallel_for(4, 1000, 1, [&](int64_t i, int) { sum += i; });
  ASSERT_EQ(sum.load(), 999 * 1000 / 2);
  ASSERT_GE(pool_workers(), 3);
  bool all_sleep = false;
  for (int tries = 0; tries < 500 && !all_sleep; ++tries) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    all_sleep = true;
    for (char s : other_thread_states()) all_sleep = all_sleep && s != 'R';
  }
  EXPECT_TRUE(all_sleep) << "a worker thread is still running (spinning) while the pool is idle";
}

// A child of fork() (PyTorch's DataLoader workers, for one) has none of the parent's workers: its parallel
// calls must still run (on new workers) and it must exit normally. A watchdog alarm ends a hung child.
TEST(ThreadPool, WorksInAForkedChild) {
  std::atomic<int64_t> sum{0};
  parallel_for(2, 100, 1, [&](int64_t i, int) { sum += i; });
  ASSERT_EQ(sum.load(), 4950);
  // Fork once the parent's worker is asleep, not while it may still be freeing the finished job: under
  // AddressSanitizer (clang 14 has no fork handlers for its allocator) a child forked while another thread
  // held the allocator's lock can hang in its first malloc (most likely what CI saw once: the alarm below
  // fired in the sanitizer build). Under glibc's malloc, which locks its arenas around fork, the timing does
  // not matter.
  if (access("/proc/self/task", R_OK) == 0) {
    bool asleep = false;
    for (int tries = 0; tries < 500 && !asleep; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      asleep = true;
      for (char st : other_thread_states()) asleep = asleep && st != 'R';
    }
  }
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(60);
    std::atomic<int64_t> s{0};
    parallel_for(2, 1000, 1, [&](int64_t i, int) { s += i; });
    std::exit(s.load() == 999 * 1000 / 2 && pool_workers() >= 1 ? 0 : 3);  // exit runs the thread_local destructors
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "the child did not exit normally (signal "
                                 << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace ksa::cpu::detail

// A small persistent thread pool for the delegate's parallel loops.
//
// Decode calls Run() a few times per token, each for ~10-100 us of work, so
// workers spin briefly before sleeping: a condition-variable wake-up alone
// costs tens of microseconds. Run() returns as soon as every item is done: it
// never waits for a worker that has not woken up yet (on a busy machine that
// wait is a whole scheduler time slice), the caller just takes the items.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define MM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define MM_CPU_RELAX() asm volatile("yield")
#else
#define MM_CPU_RELAX() ((void)0)
#endif

namespace mm {

class ThreadPool {
 public:
  // num_threads counts the calling thread: 1 means run everything inline.
  explicit ThreadPool(int num_threads) {
    for (int t = 1; t < num_threads; ++t)
      workers_.emplace_back([this, t] { WorkerLoop(t); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return (int)workers_.size() + 1; }

  // Calls fn(item, thread_id) once for every item in [0, n); items are handed
  // out dynamically, so uneven items (e.g. experts with more tokens) balance.
  // Not reentrant: one Run at a time (the delegate serialises its nodes). An item that
  // throws (an allocation failure) does not end its thread: Run throws std::bad_alloc
  // once every item is done, and the pool stays usable.
  void Run(int n, const std::function<void(int, int)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int i = 0; i < n; ++i) fn(i, 0);
      return;
    }
    // The job slot is only rewritten while unpublished and unreferenced.
    job_.fn = &fn;
    job_.n = n;
    job_.next.store(0, std::memory_order_relaxed);
    job_.done.store(0, std::memory_order_relaxed);
    published_.store(true, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    Work(0);
    WaitUntil([&] { return job_.done.load(std::memory_order_acquire) == n; });
    published_.store(false, std::memory_order_release);
    // A worker may still be between taking a reference and seeing that the
    // job is gone; the slot must outlive that.
    WaitUntil([&] { return job_.refs.load(std::memory_order_acquire) == 0; });
    if (job_.failed.exchange(false)) throw std::bad_alloc();
  }

 private:
  static constexpr int kSpinUs = 50;

  struct Job {
    const std::function<void(int, int)>* fn = nullptr;
    int n = 0;
    std::atomic<int> next{0}, done{0}, refs{0};
    std::atomic<bool> failed{false};
  };

  template <class Pred>
  static void WaitUntil(Pred ready) {
    // Spin briefly (the usual case: a worker is finishing its last item),
    // then yield the core so a preempted worker can run.
    for (int spins = 0; !ready(); ++spins) {
      if (spins < 2000) MM_CPU_RELAX();
      else std::this_thread::yield();
    }
  }

  void Work(int tid) {
    for (;;) {
      const int i = job_.next.fetch_add(1, std::memory_order_acq_rel);
      if (i >= job_.n) break;
      try {
        (*job_.fn)(i, tid);
      } catch (...) {  // an exception must not end a worker (std::terminate)
        job_.failed.store(true, std::memory_order_relaxed);
      }
      job_.done.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void WorkerLoop(int tid) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little, then sleep until the next generation.
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        MM_CPU_RELAX();
        if (++spins % 256 == 0) {
          std::this_thread::yield();  // busy machine: let others run
          if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinUs)) {
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait(lock, [&] { return generation_.load() != seen; });
          }
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      job_.refs.fetch_add(1, std::memory_order_acq_rel);
      if (published_.load(std::memory_order_acquire)) Work(tid);
      job_.refs.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  Job job_;
  std::atomic<bool> published_{false};
  std::atomic<uint64_t> generation_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
};

}  // namespace mm

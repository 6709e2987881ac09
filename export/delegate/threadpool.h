// A small persistent thread pool for the delegate's parallel loops.
//
// Decode calls Run() a few times per token, each for ~10-100 us of work, so
// workers spin briefly before sleeping: a condition-variable wake-up alone
// costs tens of microseconds. The spin is short (kSpinUs) so idle workers do
// not steal the cores from the interpreter's own threads for long.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
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
  void Run(int n, const std::function<void(int, int)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || n == 1) {
      for (int i = 0; i < n; ++i) fn(i, 0);
      return;
    }
    fn_ = &fn;
    n_items_ = n;
    next_.store(0, std::memory_order_relaxed);
    pending_.store((int)workers_.size(), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    Work(0);
    // Workers normally finish within microseconds of us; if one was
    // preempted (busy machine), yield the core instead of spinning on it.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 2000) MM_CPU_RELAX();
      else std::this_thread::yield();
    }
    fn_ = nullptr;
  }

 private:
  static constexpr int kSpinUs = 50;

  void Work(int tid) {
    for (;;) {
      int i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items_) break;
      (*fn_)(i, tid);
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
        if (++spins % 256 == 0) std::this_thread::yield();  // let others run
        if (spins % 256 == 0 &&
            std::chrono::steady_clock::now() - t0 >
                std::chrono::microseconds(kSpinUs)) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      Work(tid);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> next_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* fn_ = nullptr;
  int n_items_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> stop_{false};
};

}  // namespace mm

// Timing harness for MoeBlock::Run outside LiteRT (not part of the .so):
// MobileMoE-S's block (D=768, 64 experts of 512, top-4, shared 512; `released`: the
// released S's 60 experts of 384, top-4, shared 1536) with random INT4 weights, NB
// different weight sets so decode streams from DRAM.
// Build: `make -C export/delegate bench_block` (PROFILE=1: time per phase).
//   ./bench_block T [iters] [threads] [group_size (0: channel-wise)] [kernel auto/avx2/scalar]
//                 [weight sets, 8] [busy us between blocks, 0] [weight_tiles, 0 or 16]
//                 [expert_group_axis, in or out] [shape, guess or released]
// Prints the median and 10th percentile wall time per block and the CPU time.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "kernels/moe.h"

using namespace mm;
#ifdef MM_PROFILE
namespace mm { extern double g_phase_ms[8]; }
#endif

int main(int argc, char** argv) {
  const int T = argc > 1 ? atoi(argv[1]) : 1;
  const int iters = argc > 2 ? atoi(argv[2]) : 200;
  const int threads = argc > 3 ? atoi(argv[3]) : 2;
  const int G = argc > 4 ? atoi(argv[4]) : 32;
  const char* kern = argc > 5 ? argv[5] : "auto";
  const int NB = argc > 6 ? atoi(argv[6]) : 8;
  // Busy time between blocks (not timed), standing in for a layer's other ops:
  // long enough and the pool's workers go to sleep between blocks.
  const int gap_us = argc > 7 ? atoi(argv[7]) : 0;
  const int tiles = argc > 8 ? atoi(argv[8]) : 0;
  const bool out = argc > 9 && !strcmp(argv[9], "out");
  const bool released = argc > 10 && !strcmp(argv[10], "released");
  const int E = released ? 60 : 64, D = 768, F = released ? 384 : 512, Fs = released ? 1536 : 512;
  MoeConfig c;
  c.num_experts = E; c.top_k = 4; c.d_model = D; c.d_expert = F; c.d_shared = Fs;
  c.group_size = G;
  c.weight_tiles = tiles;
  c.experts_out = out;
  auto ng = [&](int K) { return G ? K / G : 1; };
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 1.f);
  struct W { std::vector<uint8_t> gq, dq, sgq, sdq; std::vector<float> r, rb, gs, ds, sgs, sds; };
  std::vector<W> ws(NB);
  std::vector<MoeWeights> mw(NB);
  for (int b = 0; b < NB; ++b) {
    W& w = ws[b];
    auto q4 = [&](std::vector<uint8_t>& q, std::vector<float>& s, size_t rows, int K) {
      q.resize(rows * K / 2);
      for (auto& v : q) v = (uint8_t)rng();
      s.resize(rows * ng(K));
      for (auto& v : s) v = (0.5f + (rng() % 1000) / 2000.f) / std::sqrt(K * 10.f);
    };
    w.r.resize((size_t)E * D);
    for (auto& v : w.r) v = nd(rng) / std::sqrt((float)D);
    w.rb.assign(E, 0.f);
    if (out) {  // [E, in, out]: rows are inputs, packed and grouped along the outputs
      q4(w.gq, w.gs, (size_t)E * D, 2 * F);
      q4(w.dq, w.ds, (size_t)E * F, D);
    } else {
      q4(w.gq, w.gs, (size_t)E * 2 * F, D);
      q4(w.dq, w.ds, (size_t)E * D, F);
    }
    q4(w.sgq, w.sgs, 2 * Fs, D);
    q4(w.sdq, w.sds, D, Fs);
    if (tiles) {  // the same weights in 16-row tiles, matrix by matrix
      auto tile = [&](std::vector<uint8_t>& q, int n, int M, int K) {
        std::vector<uint8_t> t(q.size());
        for (int e = 0; e < n; ++e)
          TileRows(q.data() + (size_t)e * M * (K / 2), M, K, t.data() + (size_t)e * M * (K / 2));
        q.swap(t);
      };
      if (!out) { tile(w.gq, E, 2 * F, D); tile(w.dq, E, D, F); }
      tile(w.sgq, 1, 2 * Fs, D); tile(w.sdq, 1, D, Fs);
    }
    mw[b] = {w.r.data(), w.rb.data(), w.gq.data(), w.gs.data(), w.dq.data(), w.ds.data(),
             w.sgq.data(), w.sgs.data(), w.sdq.data(), w.sds.data()};
  }
  const int NX = T == 1 ? 64 : 2;
  std::vector<std::vector<float>> xs(NX, std::vector<float>((size_t)T * D));
  for (auto& x : xs) for (auto& v : x) v = nd(rng);
  std::vector<float> y((size_t)T * D);
  ThreadPool pool(threads);
  MoeBlock block;  // one for all NB weight sets, as the delegate runs a model's blocks
  std::vector<MoeWeightSums> sums(NB);
  RunOptions opt;
  opt.cap = !strcmp(kern, "avx2")     ? IsaCap::kAvx2
            : !strcmp(kern, "avx512") ? IsaCap::kAvx512
            : !strcmp(kern, "scalar") ? IsaCap::kScalar
                                      : IsaCap::kAuto;
  for (int b = 0; b < NB; ++b) {
    mw[b].wsum = sums[b].Get(c, mw[b], &pool, KernelIsa(opt.cap));
    block.Run(c, mw[b], xs[0].data(), T, y.data(), &pool, opt);
  }
#ifdef MM_PROFILE
  for (double& v : g_phase_ms) v = 0;
#endif
  std::vector<double> t;
  timespec c0, c1;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c0);
  double cpu_gap_ms = 0;
  for (int i = 0; i < iters; ++i) {
    double ms = 0;
    for (int b = 0; b < NB; ++b) {
      if (gap_us > 0) {
        const auto g0 = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - g0 < std::chrono::microseconds(gap_us)) {}
        cpu_gap_ms += gap_us * 1e-3;
      }
      const auto t0 = std::chrono::steady_clock::now();
      block.Run(c, mw[b], xs[(i * NB + b) % NX].data(), T, y.data(), &pool, opt);
      ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    t.push_back(ms / NB);
  }
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c1);
  std::sort(t.begin(), t.end());
  const double cpu =
      ((c1.tv_sec - c0.tv_sec) * 1e3 + (c1.tv_nsec - c0.tv_nsec) * 1e-6 - cpu_gap_ms) / iters / NB;
  printf("%s experts=%s T=%d G=%d tiles=%d threads=%d %s: median %.4f ms  p10 %.4f ms  cpu %.4f ms/block  (%d x %d blocks)\n",
         released ? "released-S" : "S-guess", out ? "out" : "in", T, G, tiles, threads, IsaName(KernelIsa(opt.cap)), t[t.size() / 2], t[t.size() / 10], cpu, iters, NB);
#ifdef MM_PROFILE
  const char* names[5] = {"route", "prep x", "gate/up", "silu+prep h", "down+combine"};
  for (int i = 0; i < 5; ++i) printf("  %-13s %.4f ms/block\n", names[i], g_phase_ms[i] / iters / NB);
#endif
  return 0;
}

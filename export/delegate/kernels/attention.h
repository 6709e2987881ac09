// The MobileKvAttention computation: attention of T new tokens (a decode step or a
// prefill chunk) over the KV cache that reads only the slots holding tokens (see
// README.md for the op contract).
//
// The portable graph attends over every cache slot (masking the empty ones) and
// XNNPACK repacks the whole cache operand of each BATCH_MATMUL per call; here a
// token at position p reads slots [max(0, p - window + 1), pos0) plus the new
// rows (causal among them), so a step costs what the context holds, not the cache size.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace mm {

struct KvAttentionConfig {
  int num_heads = 0;     // H
  int num_kv_heads = 0;  // K; query head h reads kv head h / (H / K)
  int head_dim = 0;      // Dh
  int window = 0;        // 0: global; else a key at p_k is seen from p while p - p_k < window
  float scale = 1.f;
};

class KvAttention {
 public:
  // q [T, H, Dh], k_new / v_new [T, K, Dh] (the T new tokens), k_cache
  // [K, P, Dh], v_cache [K, Dh, P] (slots < pos[0] hold the earlier tokens),
  // pos [T] contiguous positions >= 0 -> y [T, H * Dh]. T >= 1.
  void Run(const KvAttentionConfig& c, const float* q, const float* k_new,
           const float* v_new, const float* k_cache, const float* v_cache, int P,
           const int32_t* pos, int T, float* y, ThreadPool* pool, Isa isa);

 private:
  // Calls with at least this many tokens (prefill chunks) read keys and values through
  // the copies below (DotCols); decode reads the cache in place (DotRows, its bits).
  static constexpr int kWideTokens = 16;
  std::vector<std::vector<float>> scores_;  // per thread [H/K, keys] + [H/K, Dh]
  std::vector<float> kt_, vr_;              // [K, Dh, Np + 16], [K, Np, Dh] (+16: DotCols)
};

}  // namespace mm

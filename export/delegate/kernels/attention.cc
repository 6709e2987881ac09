#include "attention.h"

#include <algorithm>
#include <cmath>

namespace mm {

void KvAttention::Run(const KvAttentionConfig& c, const float* q, const float* k_new,
                      const float* v_new, const float* k_cache, const float* v_cache,
                      int P, const int32_t* pos, int T, float* y, ThreadPool* pool,
                      Isa isa) {
  const int H = c.num_heads, K = c.num_kv_heads, Dh = c.head_dim, rep = H / K;
  const int past_end = std::max(0, std::min(pos[0], P));  // slots [0, past_end) hold tokens
  // Small steps (a short context) run on the caller: waking the pool costs more.
  const double work = (double)(past_end + T) * T * H * Dh;
  ThreadPool* run_on = (pool && work >= 65536) ? pool : nullptr;
  const int threads = run_on ? run_on->size() : 1;
  if (T < 1) return;  // the op refuses these before we get here
  // Scores of at most past_end + T keys per query row, sized here: an allocation failure
  // in a pool worker could not be reported.
  // + rep * Dh for the new tokens' share of y, kept apart in a prefill chunk (below).
  const size_t per_thread = (size_t)rep * (past_end + T + Dh);
  if ((int)scores_.size() < threads) scores_.resize(threads);
  for (auto& sc : scores_)
    if (sc.size() < per_thread) sc.resize(per_thread);
  // A prefill chunk's new values transposed, [K, Dh, T]: one head dim over the tokens per
  // row, so their weighted sums are dot products along the tokens like the cache's
  // (DotRows), not T strided row updates of y per query row.
  const bool wide = T >= kWideTokens;
  if (wide) {
    if (v_new_t_.size() < (size_t)K * Dh * T) v_new_t_.resize((size_t)K * Dh * T);
    for (int t = 0; t < T; ++t)
      for (int g = 0; g < K; ++g)
        for (int d = 0; d < Dh; ++d)
          v_new_t_[((size_t)g * Dh + d) * T + t] = v_new[((size_t)t * K + g) * Dh + d];
  }

  // One item per (token, kv head): its query heads share every key and value row read.
  auto item = [&](int i, int tid) {
    const int t = i / K, g = i % K, p = pos[t];
    const int lo = std::min(past_end, c.window ? std::max(0, p - c.window + 1) : 0);
    const int n_past = past_end - lo;
    // The new tokens this one sees: positions are contiguous (the op checks), so they are
    // the run [j0, t] of those within the window.
    const int j0 = c.window ? std::max(0, t - c.window + 1) : 0, n_new = t - j0 + 1;
    const int n = n_past + n_new;
    std::vector<float>& sc = scores_[tid];  // >= rep * n: sized above
    const float* qg = q + ((size_t)t * H + g * rep) * Dh;   // the group's rep query rows
    float* yg = y + ((size_t)t * H + g * rep) * Dh;
    // The values' rows (one head dim each, P floats apart) come from DRAM after a step
    // streamed the weights: ask for them all now, so they arrive while the scores run.
    const float* vg = v_cache + (size_t)g * Dh * P + lo;
    for (int d = 0; d < Dh && n_past; ++d)
      for (int s = 0; s < n_past; s += 16) __builtin_prefetch(vg + (size_t)d * P + s, 0, 2);
    // Scores [rep, n]: the past slots, then the new tokens this one sees.
    DotRows(qg, rep, Dh, k_cache + ((size_t)g * P + lo) * Dh, n_past, Dh, Dh, c.scale,
            sc.data(), n, isa);
    DotRows(qg, rep, Dh, k_new + ((size_t)j0 * K + g) * Dh, n_new, K * Dh, Dh, c.scale,
            sc.data() + n_past, n, isa);
    for (int r = 0; r < rep; ++r) {
      float* s = sc.data() + (size_t)r * n;
      float mx = s[0];
      for (int k = 1; k < n; ++k) mx = std::max(mx, s[k]);
      float sum = 0.f;
      for (int k = 0; k < n; ++k) sum += (s[k] = std::exp(s[k] - mx));
      const float inv = 1.f / sum;
      for (int k = 0; k < n; ++k) s[k] *= inv;
    }
    // y [rep, Dh]: v_cache rows are one head dim over all slots (contiguous in the slot).
    if (n_past) {
      DotRows(sc.data(), rep, n, vg, Dh, P, n_past, 1.f, yg, Dh, isa);
    } else {
      for (int i = 0; i < rep * Dh; ++i) yg[i] = 0.f;
    }
    if (wide) {   // the new tokens' share as dot products over the tokens, then added
      float* y_new = sc.data() + (size_t)rep * (past_end + T);
      DotRows(sc.data() + n_past, rep, n, v_new_t_.data() + (size_t)g * Dh * T + j0, Dh, T,
              n_new, 1.f, y_new, Dh, isa);
      for (int i = 0; i < rep * Dh; ++i) yg[i] += y_new[i];
      return;
    }
    for (int r = 0; r < rep; ++r) {   // decode: a token or a few, each added in turn
      const float* p_new = sc.data() + (size_t)r * n + n_past;
      for (int k = 0; k < n_new; ++k) {
        const float* vr = v_new + ((size_t)(j0 + k) * K + g) * Dh;
        for (int d = 0; d < Dh; ++d) yg[(size_t)r * Dh + d] += p_new[k] * vr[d];
      }
    }
  };
  if (run_on) {
    run_on->Run(T * K, item);
  } else {
    for (int i = 0; i < T * K; ++i) item(i, 0);
  }
}

}  // namespace mm

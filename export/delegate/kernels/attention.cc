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
  // A prefill chunk reads its keys as columns, kt_ [K, Dh, Np], and its values as rows,
  // vr_ [K, Np, Dh] (Np = the filled slots, then the new tokens): its scores and weighted
  // sums are then DotCols, W keys or head dims per vector and no horizontal sums (a dot
  // product per score, as decode's DotRows, spends most of its time summing lanes).
  const bool wide = T >= kWideTokens;
  const int Np = past_end + T, ldk = Np + 16;   // kt_ rows padded: DotCols reads whole vectors
  if (wide) {
    if (kt_.size() < (size_t)K * Dh * ldk) kt_.resize((size_t)K * Dh * ldk);
    if (vr_.size() < (size_t)K * Np * Dh + 16) vr_.resize((size_t)K * Np * Dh + 16);
    auto copy_head = [&](int g, int) {
      float* kt = kt_.data() + (size_t)g * Dh * ldk;
      float* vr = vr_.data() + (size_t)g * Np * Dh;
      for (int s = 0; s < past_end; ++s)
        for (int d = 0; d < Dh; ++d) {
          kt[(size_t)d * ldk + s] = k_cache[((size_t)g * P + s) * Dh + d];
          vr[(size_t)s * Dh + d] = v_cache[((size_t)g * Dh + d) * P + s];
        }
      for (int t = 0; t < T; ++t)
        for (int d = 0; d < Dh; ++d) {
          kt[(size_t)d * ldk + past_end + t] = k_new[((size_t)t * K + g) * Dh + d];
          vr[(size_t)(past_end + t) * Dh + d] = v_new[((size_t)t * K + g) * Dh + d];
        }
    };
    if (run_on) {
      run_on->Run(K, copy_head);
    } else {
      for (int g = 0; g < K; ++g) copy_head(g, 0);
    }
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
    // Scores [rep, n]: the past slots, then the new tokens this one sees.
    const float* vg = v_cache + (size_t)g * Dh * P + lo;
    if (wide) {
      const float* kt = kt_.data() + (size_t)g * Dh * ldk;
      DotCols(qg, rep, Dh, kt + lo, ldk, n_past, Dh, c.scale, sc.data(), n, isa);
      DotCols(qg, rep, Dh, kt + past_end + j0, ldk, n_new, Dh, c.scale, sc.data() + n_past, n, isa);
    } else {
      // The values' rows (one head dim each, P floats apart) come from DRAM after a step
      // streamed the weights: ask for them all now, so they arrive while the scores run.
      for (int d = 0; d < Dh && n_past; ++d)
        for (int s = 0; s < n_past; s += 16) __builtin_prefetch(vg + (size_t)d * P + s, 0, 2);
      DotRows(qg, rep, Dh, k_cache + ((size_t)g * P + lo) * Dh, n_past, Dh, Dh, c.scale,
              sc.data(), n, isa);
      DotRows(qg, rep, Dh, k_new + ((size_t)j0 * K + g) * Dh, n_new, K * Dh, Dh, c.scale,
              sc.data() + n_past, n, isa);
    }
    // Softmax per query row; decode keeps the plain scalar loop (its bits).
    for (int r = 0; r < rep; ++r) Softmax(sc.data() + (size_t)r * n, n, wide ? isa : Isa::kScalar);

    if (wide) {   // y [rep, Dh]: the past slots' share, then the new tokens' added
      const float* vr = vr_.data() + (size_t)g * Np * Dh;
      float* y_new = sc.data() + (size_t)rep * (past_end + T);
      DotCols(sc.data(), rep, n, vr + (size_t)lo * Dh, Dh, Dh, n_past, 1.f, yg, Dh, isa);
      DotCols(sc.data() + n_past, rep, n, vr + (size_t)(past_end + j0) * Dh, Dh, Dh, n_new, 1.f,
              y_new, Dh, isa);
      for (int i = 0; i < rep * Dh; ++i) yg[i] += y_new[i];
      return;
    }
    // y [rep, Dh]: v_cache rows are one head dim over all slots (contiguous in the slot).
    if (n_past) {
      DotRows(sc.data(), rep, n, vg, Dh, P, n_past, 1.f, yg, Dh, isa);
    } else {
      for (int i = 0; i < rep * Dh; ++i) yg[i] = 0.f;
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

// MobileMoeBlock execution: route, then three parallel phases over the active
// experts only. Decode and prefill share this code: with one token each job
// is a GEMV over the selected expert's packed rows; with many tokens each job
// is a GEMM whose dequantised weight tiles are reused across its tokens.
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef MM_PROFILE
#include <chrono>
namespace mm { double g_phase_ms[8]; }
#define MM_TICK(i) do { auto _n = std::chrono::steady_clock::now(); \
  mm::g_phase_ms[i] += std::chrono::duration<double, std::milli>(_n - _t).count(); _t = _n; } while (0)
#define MM_TICK0() auto _t = std::chrono::steady_clock::now()
#else
#define MM_TICK(i) ((void)0)
#define MM_TICK0() ((void)0)
#endif

namespace mm {

namespace {
// Prefill work items; -D overrides for bench_block experiments. With T=128 an expert has
// ~8 tokens, so its GEMMs stream weights much as decode does, and long runs per work item
// beat short ones: a routed expert's whole gate/up is one item (one stream, its tokens read
// by one thread), the shared expert's gate/up is split in kRowTile1 rows, the down
// projections as StreamTile.
#ifndef MM_TILE1
#define MM_TILE1 768
#define MM_TILE3 64
#endif
constexpr int kRowTile1 = MM_TILE1;  // the shared expert's gate/up rows per work item (prefill)
constexpr int kRowTile3 = MM_TILE3;  // the least rows per streaming work item (StreamTile)
#ifndef MM_DECODE_SPLIT
#define MM_DECODE_SPLIT 2
#endif
// Weight streaming (decode-sized steps, and the down projection of any step): each thread
// gets a few long contiguous runs of rows (rows / (split * threads), multiples of 16)
// instead of many short ones, so the prefetchers run ahead within one stream.
int StreamTile(int rows, int threads, int tile) {
  const int per = (rows + MM_DECODE_SPLIT * threads - 1) / (MM_DECODE_SPLIT * threads);
  return std::max(tile, (per + 15) / 16 * 16);
}
// Decode-sized steps split each output-axis expert matrix into this many blocks of input
// rows per thread: each block is one contiguous stream (split by columns, every work item
// read a short piece of every row: ~20% slower); 1 measured faster than 2 or 4.
constexpr int kOutParts = 1;
}  // namespace

void MoeBlock::RouterLogits(const MoeConfig& c, const MoeWeights& w, const float* x, int T,
                            int item, Isa isa) {
  // Item (token t, experts e0 .. e0 + 15) of logits [T, E] = x @ router_w^T, every logit with
  // Dot's bits, so a prefill and the same tokens' decode steps route alike. Prefill-sized
  // steps run the 16 together (DotMany: their lane sums were most of the time); decode-sized
  // ones read the router's rows one after another (from DRAM there; DotMany's 8 interleaved
  // rows measured no faster, slower in one A/B).
  const int E = c.num_experts, D = c.d_model, eb = (E + 15) / 16;
  const int t = item / eb, e0 = (item % eb) * 16, e1 = std::min(E, e0 + 16);
  if (T >= 8)
    return DotMany(x + (size_t)t * D, w.router_w + (size_t)e0 * D, e1 - e0, D,
                   logits_.data() + (size_t)t * E + e0, isa);
  for (int e = e0; e < e1; ++e)
    logits_[(size_t)t * E + e] = Dot(x + (size_t)t * D, w.router_w + (size_t)e * D, D, isa);
}

void MoeBlock::Select(const MoeConfig& c, const MoeWeights& w, int T) {
  const int E = c.num_experts;
  tok_.resize(E);
  wt_.resize(E);
  for (int e = 0; e < E; ++e) { tok_[e].clear(); wt_[e].clear(); }
  std::vector<float> score(E);
  std::vector<char> taken(E);
  std::vector<int> chosen(c.top_k);
  for (int t = 0; t < T; ++t) {
    const float* l = logits_.data() + (size_t)t * E;
    if (c.softmax) {
      float mx = l[0];
      for (int e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.f;
      for (int e = 0; e < E; ++e) sum += (score[e] = std::exp(l[e] - mx));
      for (int e = 0; e < E; ++e) score[e] /= sum;
    } else {
      for (int e = 0; e < E; ++e) score[e] = 1.f / (1.f + std::exp(-l[e]));
    }
    // Top-k by (score + bias); strict '>' keeps the lower index on ties.
    std::fill(taken.begin(), taken.end(), 0);
    float wsum = 0.f;
    for (int j = 0; j < c.top_k; ++j) {
      int best = -1;
      float best_v = 0.f;
      for (int e = 0; e < E; ++e) {
        if (taken[e]) continue;
        const float v = score[e] + (w.router_b ? w.router_b[e] : 0.f);
        if (best < 0 || v > best_v) { best = e; best_v = v; }
      }
      taken[best] = 1;
      chosen[j] = best;
      wsum += score[best];
    }
    for (int j = 0; j < c.top_k; ++j) {
      float wj = score[chosen[j]];
      if (c.norm_topk_prob) wj /= wsum;
      tok_[chosen[j]].push_back(t);
      wt_[chosen[j]].push_back(wj * c.routed_scale);
    }
  }
}

// Expert e's packed gate/up [2F, D] and down [D, F] matrices; e == num_experts
// is the shared expert. Their wsum pointers index `wsum` (laid out as wsum_:
// [E*2F | E*D | 2Fs | D]; null: not set).
static void ExpertMatrices(const MoeConfig& c, const MoeWeights& w, int e, const float* wsum,
                           Q4Matrix* gu, Q4Matrix* dn) {
  const int E = c.num_experts, D = c.d_model;
  const bool shared = e == E;
  const int F = shared ? c.d_shared : c.d_expert;
  // Group size per matrix: its input length when channel-wise (group_size 0).
  const int Gd = c.group_size ? c.group_size : D, Gf = c.group_size ? c.group_size : F;
  if (shared) {
    *gu = {w.shared_gate_up_q, w.shared_gate_up_s, 2 * F, D, Gd};
    *dn = {w.shared_down_q, w.shared_down_s, D, F, Gf};
  } else if (c.experts_out) {
    // [E, in, out], groups of G outputs: no tiles, and no zero-point sums (Acts::rows_f32).
    const int G = c.group_size;
    *gu = {w.gate_up_q + (size_t)e * D * F, w.gate_up_s + (size_t)e * D * (2 * F / G), 2 * F, D, G};
    *dn = {w.down_q + (size_t)e * F * (D / 2), w.down_s + (size_t)e * F * (D / G), D, F, G};
    gu->out_groups = dn->out_groups = true;
    return;
  } else {
    *gu = {w.gate_up_q + (size_t)e * 2 * F * (D / 2), w.gate_up_s + (size_t)e * 2 * F * (D / Gd),
           2 * F, D, Gd};
    *dn = {w.down_q + (size_t)e * D * (F / 2), w.down_s + (size_t)e * D * (F / Gf), D, F, Gf};
  }
  gu->tiles = dn->tiles = c.weight_tiles;
  if (wsum) {
    const size_t routed = (size_t)E * (2 * c.d_expert + D);
    gu->wsum = wsum + (shared ? routed : (size_t)e * 2 * F);
    dn->wsum = wsum + (shared ? routed + 2 * F : (size_t)E * 2 * F + (size_t)e * D);
  }
}

const float* MoeWeightSums::Get(const MoeConfig& c, const MoeWeights& w, ThreadPool* pool,
                                Isa isa) {
  const void* key[4] = {w.gate_up_q, w.down_q, w.shared_gate_up_q, w.shared_down_q};
  if (std::equal(key, key + 4, key_) && !sums_.empty()) return sums_.data();
  const int E = c.num_experts, D = c.d_model, F = c.d_expert, Fs = c.d_shared;
  sums_.assign((size_t)E * (2 * F + D) + (Fs > 0 ? 2 * Fs + D : 0), 0.f);
  // Every input-axis matrix of the block (all experts: any may be routed to later),
  // each with its place in sums_.
  std::vector<Q4Matrix> mats;
  for (int e = c.experts_out ? E : 0; e < E + (Fs > 0); ++e) {
    Q4Matrix gu, dn;
    ExpertMatrices(c, w, e, sums_.data(), &gu, &dn);
    mats.push_back(gu);
    mats.push_back(dn);
  }
  std::vector<float*> outs;
  for (const Q4Matrix& m : mats) outs.push_back(sums_.data() + (m.wsum - sums_.data()));
  WeightRowSums(mats.data(), outs.data(), (int)mats.size(), pool, isa);
  std::copy(key, key + 4, key_);
  return sums_.data();
}

void MoeBlock::Run(const MoeConfig& c, const MoeWeights& w, const float* x,
                   int T, float* y, ThreadPool* pool, const RunOptions& opt) {
  const int E = c.num_experts, D = c.d_model;
  // The block input's group size: D when channel-wise (group_size 0).
  const int Gd = c.group_size ? c.group_size : D;
  const int nthreads = pool->size();
  std::fill(y, y + (size_t)T * D, 0.f);
  if (T == 0) return;
  MM_TICK0();
  const Isa isa = KernelIsa(opt.cap);
  const float* wsum = opt.mode == ActMode::kI8 ? w.wsum : nullptr;
  const Isa x_isa = SimdShapeOk(D, Gd) ? isa : Isa::kScalar;
  // Decode-sized steps run the cheap phases (0, 2) inline: each pool hand-off
  // is a barrier, and on a busy core a barrier can cost a time slice.
  ThreadPool* cheap = T >= 8 ? pool : &inline_pool_;

  // Jobs: every expert with at least one token, then the shared expert. The shared
  // expert needs no routing: its buffers come first in gu_out_ / h_, and its gate/up runs
  // on the pool together with the router's logits (phase 1a), not after them.
  jobs_.clear();
  active_.clear();
  size_t gu_total = 0, h_total = 0;
  auto add_job = [&](Job j) {
    j.gu_off = gu_total;
    j.h_off = h_total;
    gu_total += (size_t)j.n * 2 * j.F;
    h_total += (size_t)j.n * j.F;
    jobs_.push_back(j);
  };
  const bool has_shared = c.d_shared > 0;
  int shared_items = 0, shared_tile = kRowTile1;
  if (has_shared) {
    const int Fs = c.d_shared;
    all_tokens_.resize(T);
    ones_.assign(T, 1.f);
    for (int t = 0; t < T; ++t) all_tokens_[t] = t;
    Job j;
    j.F = Fs;
    j.n = T;
    j.tokens = all_tokens_.data();
    j.weights = ones_.data();
    ExpertMatrices(c, w, E, wsum, &j.gate_up, &j.down);
    add_job(j);
    shared_x_.Resize(T, D, opt.mode, x_isa);
    cheap->Run((T + 15) / 16, [&](int item, int) {
      shared_x_.PrepareRows(x, D, nullptr, item * 16, std::min(T, item * 16 + 16));
    });
    if (T < 8) shared_tile = StreamTile(2 * Fs, nthreads, kRowTile3);
    shared_items = (2 * Fs + shared_tile - 1) / shared_tile;
  }
  gu_out_.resize(gu_total);  // the shared expert's part (grown once routed below)
  logits_.resize((size_t)T * E);
  const int router_items = T * ((E + 15) / 16);
  // Phase 1a: router logits (first: the routed experts wait on them), shared gate/up.
  pool->Run(router_items + shared_items, [&](int item, int) {
    if (item < router_items) return RouterLogits(c, w, x, T, item, isa);
    const Job& jb = jobs_[0];
    const int m0 = (item - router_items) * shared_tile, m1 = std::min(2 * jb.F, m0 + shared_tile);
    Q4Gemm(jb.gate_up, m0, m1, shared_x_, gu_out_.data() + jb.gu_off + m0, 2 * jb.F);
  });
  Select(c, w, T);
  MM_TICK(0);

  for (int e = 0; e < E; ++e) {
    if (tok_[e].empty()) continue;
    active_.push_back(e);
    Job j;
    j.F = c.d_expert;
    j.n = (int)tok_[e].size();
    j.tokens = tok_[e].data();
    j.weights = wt_[e].data();
    ExpertMatrices(c, w, e, wsum, &j.gate_up, &j.down);
    add_job(j);
  }
  // The shared job last, as the routed experts' outputs are added first (phase 3).
  if (has_shared) std::rotate(jobs_.begin(), jobs_.begin() + 1, jobs_.end());
  const int nj = (int)jobs_.size(), nr = nj - has_shared;  // jobs [0, nr) are routed
  if (T < 8 && !c.experts_out) {  // its phases are one hand-off: timed as the last one
    ExpertsDecode(c, x, T, y, pool, opt, isa, nr);
    MM_TICK(4);
    return;
  }

  // Phase 0: each routed job's tokens, prepared (gathered, quantised) for its kernel.
  if ((int)x_acts_.size() < nr) x_acts_.resize(nr);  // never shrink: keep buffers
  if ((int)h_acts_.size() < nj) h_acts_.resize(nj);
  std::vector<int> first_item(nj + 1, 0);
  for (int j = 0; j < nj; ++j) {  // the shared job (prepared above): no items
    if (j < nr) {
      const bool out = jobs_[j].gate_up.out_groups;  // plain fp32 rows, any shape
      x_acts_[j].Resize(jobs_[j].n, D, opt.mode, out ? isa : x_isa, out);
    }
    first_item[j + 1] = first_item[j] + (j < nr ? (jobs_[j].n + 15) / 16 : 0);
  }
  auto job_of = [&](int item) {
    return int(std::upper_bound(first_item.begin(), first_item.begin() + nj + 1, item) -
               first_item.begin()) - 1;
  };
  cheap->Run(first_item[nj], [&](int item, int) {
    const int j = job_of(item);
    const int n0 = (item - first_item[j]) * 16;
    x_acts_[j].PrepareRows(x, D, jobs_[j].tokens, n0, std::min(jobs_[j].n, n0 + 16));
  });

  MM_TICK(1);
  // Phase 1b: gu_out[j] [n, 2F] = x[tokens] @ gate_up^T for the routed jobs, split by row
  // tiles. Decode-sized steps split output-axis experts by input rows instead (kOutParts
  // blocks, each one contiguous stream): partial sums in part_, added up in phase 2.
  gu_out_.resize(gu_total);
  const bool split = T < 8 && c.experts_out;
  const int parts = std::min(kOutParts * nthreads, std::min(D, c.d_expert));
  auto is_split = [&](const Job& jb) { return split && jb.gate_up.out_groups; };
  auto rows_of = [&](int p, int K, int* k0, int* k1) {
    *k0 = (int)((int64_t)p * K / parts);
    *k1 = (int)((int64_t)(p + 1) * K / parts);
  };
  std::vector<size_t> part_off(nj + 1, 0);  // per job: [parts, n, max(2F, D)] floats
  for (int j = 0; j < nj; ++j)
    part_off[j + 1] = part_off[j] + (is_split(jobs_[j]) ? (size_t)parts * jobs_[j].n *
                                     std::max(2 * jobs_[j].F, D) : 0);
  part_.resize(part_off[nj]);
  std::vector<int> tile1(nr);
  for (int j = 0; j < nr; ++j)
    tile1[j] = T < 8 ? StreamTile(2 * jobs_[j].F, nthreads, kRowTile3) : 2 * jobs_[j].F;
  for (int j = 0; j < nj; ++j)
    first_item[j + 1] = first_item[j] + (j >= nr ? 0 : is_split(jobs_[j]) ? parts
                                         : (2 * jobs_[j].F + tile1[j] - 1) / tile1[j]);
  pool->Run(first_item[nj], [&](int item, int) {
    const int j = job_of(item);
    const Job& jb = jobs_[j];
    if (is_split(jb)) {
      const int p = item - first_item[j];
      int k0, k1;
      rows_of(p, D, &k0, &k1);
      Q4GemmOutRows(jb.gate_up, k0, k1, x_acts_[j],
                    part_.data() + part_off[j] + (size_t)p * jb.n * 2 * jb.F, 2 * jb.F);
      return;
    }
    const int m0 = (item - first_item[j]) * tile1[j];
    const int m1 = std::min(2 * jb.F, m0 + tile1[j]);
    Q4Gemm(jb.gate_up, m0, m1, x_acts_[j], gu_out_.data() + jb.gu_off + m0, 2 * jb.F);
  });

  MM_TICK(2);
  // Phase 2: h = silu(gate) * up, then prepare h for the down kernels; work
  // items are 16 tokens (as phase 0's), so no two threads write the same quad or the
  // same lines of the AMX layout (16 tokens' words share each line).
  h_.resize(h_total);
  for (int j = 0; j < nj; ++j) {
    const Job& jb = jobs_[j];
    const bool out = jb.down.out_groups;
    h_acts_[j].Resize(jb.n, jb.F, opt.mode,
                      out || SimdShapeOk(jb.F, jb.down.G) ? isa : Isa::kScalar, out);
    first_item[j + 1] = first_item[j] + (jb.n + 15) / 16;
  }
  cheap->Run(first_item[nj], [&](int item, int) {
    const int j = job_of(item);
    const Job& jb = jobs_[j];
    const int n0 = (item - first_item[j]) * 16, n1 = std::min(jb.n, n0 + 16);
    float* h = h_.data() + jb.h_off;
    for (int n = n0; n < n1; ++n) {
      float* gu = gu_out_.data() + jb.gu_off + (size_t)n * 2 * jb.F;
      if (is_split(jb)) {  // the partial sums of phase 1
        const size_t stride = (size_t)jb.n * 2 * jb.F;
        const float* pt = part_.data() + part_off[j] + (size_t)n * 2 * jb.F;
        std::copy(pt, pt + 2 * jb.F, gu);
        for (int p = 1; p < parts; ++p)
          for (int i = 0; i < 2 * jb.F; ++i) gu[i] += pt[p * stride + i];
      }
      SiluMul(gu, gu + jb.F, h + (size_t)n * jb.F, jb.F, isa);
    }
    h_acts_[j].PrepareRows(h, jb.F, nullptr, n0, n1);
  });

  MM_TICK(3);
  // Phase 3: y[tokens, rows] += weight * (h @ down^T)[rows]. Work items own
  // disjoint output rows and loop over all jobs, so no two threads write the
  // same y element.
  // Split output-axis experts first get their partial sums [parts, n, D] by input rows.
  if (split) {
    for (int j = 0; j < nj; ++j) first_item[j + 1] = first_item[j] + (is_split(jobs_[j]) ? parts : 0);
    pool->Run(first_item[nj], [&](int item, int) {
      const int j = job_of(item);
      const Job& jb = jobs_[j];
      const int p = item - first_item[j];
      int k0, k1;
      rows_of(p, jb.F, &k0, &k1);
      Q4GemmOutRows(jb.down, k0, k1, h_acts_[j],
                    part_.data() + part_off[j] + (size_t)p * jb.n * D, D);
    });
  }
  tmp_.resize(nthreads);
  const int tile3 = StreamTile(D, nthreads, kRowTile3);
  for (auto& t : tmp_) t.resize((size_t)T * tile3);
  pool->Run((D + tile3 - 1) / tile3, [&](int item, int tid) {
    const int m0 = item * tile3, m1 = std::min(D, m0 + tile3);
    float* tmp = tmp_[tid].data();
    for (int j = 0; j < nj; ++j) {
      const Job& jb = jobs_[j];
      if (is_split(jb)) {
        const size_t stride = (size_t)jb.n * D;
        for (int n = 0; n < jb.n; ++n) {
          const float* pt = part_.data() + part_off[j] + (size_t)n * D;
          float* tr = tmp + (size_t)n * tile3 - m0;
          for (int m = m0; m < m1; ++m) tr[m] = pt[m];
          for (int p = 1; p < parts; ++p)
            for (int m = m0; m < m1; ++m) tr[m] += pt[p * stride + m];
        }
      } else {
        Q4Gemm(jb.down, m0, m1, h_acts_[j], tmp, tile3);
      }
      for (int n = 0; n < jb.n; ++n) {
        float* yr = y + (size_t)jb.tokens[n] * D;
        const float wn = jb.weights[n];
        AddScaled(wn, tmp + (size_t)n * tile3, yr + m0, m1 - m0, isa);
      }
    }
  });
  MM_TICK(4);
}

// Decode-sized steps: each routed expert is one work item that runs its whole chain
// (gather x, gate/up, SiLU, quantise h, down), so the routed experts need one pool
// hand-off, not three, and each thread streams an expert's two matrices back to back. The
// shared expert's gate/up ran with the router (jobs_[nr]); its down runs in the same
// hand-off, split by output rows. Every job writes its own output; they are added into y
// in job order afterwards, so y does not depend on which thread ran what.
void MoeBlock::ExpertsDecode(const MoeConfig& c, const float* x, int T, float* y,
                             ThreadPool* pool, const RunOptions& opt, Isa isa, int nr) {
  const int D = c.d_model, F = c.d_expert, nthreads = pool->size();
  const int nj = (int)jobs_.size();  // nr routed jobs, then the shared expert if any
  const Isa x_isa = SimdShapeOk(D, c.group_size ? c.group_size : D) ? isa : Isa::kScalar;
  const Isa h_isa = SimdShapeOk(F, c.group_size ? c.group_size : F) ? isa : Isa::kScalar;
  // Scratch sized here for T tokens: an allocation failure in a pool worker could not be
  // reported (Acts::Resize to fewer rows keeps its buffers).
  scratch_.resize(nthreads);
  for (Scratch& sc : scratch_) {
    sc.x.Resize(T, D, opt.mode, x_isa);
    sc.h.Resize(T, F, opt.mode, h_isa);
    sc.gu.resize((size_t)T * 2 * F);
    sc.hid.resize((size_t)T * F);
  }
  job_out_.resize((size_t)nj * T * D);  // per job [n, D]
  // The shared expert's hidden, from its gate/up (phase 1a).
  int shared_parts = 0, shared_rows = 0;
  if (nj > nr) {
    const Job& sj = jobs_[nr];
    const Isa s_isa = SimdShapeOk(sj.F, sj.down.G) ? isa : Isa::kScalar;
    h_.resize((size_t)T * sj.F);
    shared_h_.Resize(T, sj.F, opt.mode, s_isa);
    for (int n = 0; n < T; ++n) {
      const float* gu = gu_out_.data() + sj.gu_off + (size_t)n * 2 * sj.F;
      SiluMul(gu, gu + sj.F, h_.data() + (size_t)n * sj.F, sj.F, isa);
    }
    shared_h_.PrepareRows(h_.data(), sj.F, nullptr, 0, T);
    shared_rows = (D / nthreads + 15) / 16 * 16;
    shared_parts = (D + shared_rows - 1) / shared_rows;
  }
  pool->Run(nr + shared_parts, [&](int item, int tid) {
    if (item >= nr) {  // the shared expert's down, output rows [m0, m1)
      const int m0 = (item - nr) * shared_rows, m1 = std::min(D, m0 + shared_rows);
      Q4Gemm(jobs_[nr].down, m0, m1, shared_h_, job_out_.data() + (size_t)nr * T * D + m0, D);
      return;
    }
    Scratch& sc = scratch_[tid];
    const Job& jb = jobs_[item];
    sc.x.Resize(jb.n, D, opt.mode, x_isa);
    sc.x.PrepareRows(x, D, jb.tokens, 0, jb.n);
    Q4Gemm(jb.gate_up, 0, 2 * F, sc.x, sc.gu.data(), 2 * F);
    for (int n = 0; n < jb.n; ++n) {
      const float* gu = sc.gu.data() + (size_t)n * 2 * F;
      SiluMul(gu, gu + F, sc.hid.data() + (size_t)n * F, F, isa);
    }
    sc.h.Resize(jb.n, F, opt.mode, h_isa);
    sc.h.PrepareRows(sc.hid.data(), F, nullptr, 0, jb.n);
    Q4Gemm(jb.down, 0, D, sc.h, job_out_.data() + (size_t)item * T * D, D);
  });
  for (int j = 0; j < nj; ++j) {
    const Job& jb = jobs_[j];
    for (int n = 0; n < jb.n; ++n) {
      float* yr = y + (size_t)jb.tokens[n] * D;
      const float wn = jb.weights[n];
      AddScaled(wn, job_out_.data() + ((size_t)j * T + n) * D, yr, D, isa);
    }
  }
}

}  // namespace mm

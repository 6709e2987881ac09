// The MobileMoeBlock computation (see README.md for the op contract).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace mm {

struct MoeConfig {
  int num_experts = 0, top_k = 0;
  int d_model = 0;   // D
  int d_expert = 0;  // F
  int d_shared = 0;  // Fs (0: no shared expert)
  int group_size = 0;  // 0: channel-wise (one scale per row, G = the row length)
  bool softmax = true;  // else sigmoid
  bool norm_topk_prob = false;
  float routed_scale = 1.f;
  int weight_tiles = 0;  // the input-axis INT4 matrices' layout: 0 rows, 16 tiles (Q4Matrix::tiles)
  // Routed experts stored [E, in, out] with groups along the output axis (the released
  // MobileMoE's layout, Q4Matrix::out_groups); the shared expert stays input-axis.
  bool experts_out = false;
};

struct MoeWeights {
  const float* router_w = nullptr;     // [E, D]
  const float* router_b = nullptr;     // [E] or null
  const uint8_t* gate_up_q = nullptr;  // [E, 2F, D/2] (experts_out: [E, D, 2F/2])
  const float* gate_up_s = nullptr;    // [E, 2F, D/G] ([E, 2F, 1] channel-wise; out: [E, D, 2F/G])
  const uint8_t* down_q = nullptr;     // [E, D, F/2] (out: [E, F, D/2])
  const float* down_s = nullptr;       // [E, D, F/G] (out: [E, F, D/G])
  const uint8_t* shared_gate_up_q = nullptr;  // [2Fs, D/2] or null
  const float* shared_gate_up_s = nullptr;
  const uint8_t* shared_down_q = nullptr;     // [D, Fs/2]
  const float* shared_down_s = nullptr;
  // int8 mode: every input-axis matrix's row sums (MoeWeightSums), [E*2F | E*D | 2Fs | D].
  const float* wsum = nullptr;
};

// Per weight row: sum_k W[m,k], for the int8 zero point (kernels.h). Weights are constant
// tensors, so the sums are computed once per weight set (on the pool) and kept by its node.
class MoeWeightSums {
 public:
  const float* Get(const MoeConfig& c, const MoeWeights& w, ThreadPool* pool, Isa isa);

 private:
  std::vector<float> sums_;
  const void* key_[4] = {nullptr, nullptr, nullptr, nullptr};
};

struct RunOptions {
  ActMode mode = ActMode::kI8;
  IsaCap cap = IsaCap::kAuto;
};

// The computation and its scratch buffers, kept between calls. One serves every block of
// a model (the delegate runs one node at a time): the buffers stay warm in the caches from
// one layer to the next, and a model holds one set of them, not one per layer.
class MoeBlock {
 public:
  // y [T, D] = MoE(x [T, D]); int8 mode needs w.wsum.
  void Run(const MoeConfig& c, const MoeWeights& w, const float* x, int T,
           float* y, ThreadPool* pool, const RunOptions& opt);

  // Experts touched by the last Run (routed ones; for tests and stats).
  const std::vector<int>& last_active() const { return active_; }

 private:
  // One expert's work: the tokens routed to it and their combine weights.
  struct Job {
    Q4Matrix gate_up, down;  // [2F, D], [D, F]
    int F = 0, n = 0;
    const int* tokens = nullptr;  // [n] (null: all tokens, shared expert)
    const float* weights = nullptr;
    size_t gu_off = 0, h_off = 0;  // offsets into gu_out_ / h_
  };

  // Routing: logits_ one work item (a token, 16 experts) at a time, then per token the
  // top-k experts into tok_ / wt_.
  void RouterLogits(const MoeConfig& c, const MoeWeights& w, const float* x, int T, int item,
                    Isa isa);
  void Select(const MoeConfig& c, const MoeWeights& w, int T);

  // The experts of a decode-sized step (T < 8, input-axis experts), after routing: jobs_
  // [0, nr) routed, jobs_[nr] the shared expert (its gate/up done). y [T, D] zeroed.
  void ExpertsDecode(const MoeConfig& c, const float* x, int T, float* y, ThreadPool* pool,
                     const RunOptions& opt, Isa isa, int nr);
  struct Scratch {  // one thread's buffers in ExpertsDecode
    Acts x, h;
    std::vector<float> gu, hid;  // [n, 2F], [n, F]
  };
  std::vector<Scratch> scratch_;
  std::vector<float> job_out_;              // ExpertsDecode: per job [n, D]
  Acts shared_h_;                           // ExpertsDecode: the shared expert's hidden

  std::vector<float> logits_;               // [T, E]
  std::vector<std::vector<int>> tok_;       // per expert: token ids
  std::vector<std::vector<float>> wt_;      // per expert: combine weights
  std::vector<int> active_;
  std::vector<Job> jobs_;
  std::vector<int> all_tokens_;
  std::vector<float> ones_;
  std::vector<Acts> x_acts_;                // per routed job: its tokens' x
  Acts shared_x_;                           // the shared expert's (all tokens') x
  std::vector<Acts> h_acts_;                // per job: its SwiGLU hidden
  std::vector<float> gu_out_;               // per job [n, 2F]
  std::vector<float> h_;                    // per job [n, F]
  std::vector<float> part_;                 // decode, output-axis experts: partial sums
  std::vector<std::vector<float>> tmp_;     // per thread [T, tile]
  ThreadPool inline_pool_{1};               // runs items on the caller
};

}  // namespace mm

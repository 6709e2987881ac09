// INT4 channel-wise FULLY_CONNECTED (builtin op) on the delegate's kernels and
// thread pool: y [N, M] = x [N, K] @ W^T, W packed INT4 [M, K] with one fp32
// scale per row (what ai-edge-quantizer writes for int4_channel). With the
// delegate's `fully_connected` option the whole decode step's GEMVs (LM head,
// attention projections, dense FFNs) run on one pool, so a 2-core phone or VM
// does not juggle two thread pools between every op (README.md, "Threads").
#pragma once

#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace mm {

class Int4Fc {
 public:
  // w: q/s/M/K with G == K (channel-wise); x [N, K] (row stride K) -> y [N, M].
  void Run(const Q4Matrix& w, const float* x, int N, float* y, ThreadPool* pool,
           ActMode mode, Isa isa);

 private:
  // Both built once per weight tensor (key_: the tensor's data in the file):
  std::vector<float> wsum_;  // [M] sum_k W[m,k] for the int8 zero point
  // The weight in 16-row tiles (Q4Matrix::tiles), copied from the file's rows:
  // decode streams each tile sequentially. XNNPACK keeps a repacked copy of
  // every FC it runs too; this one replaces it for the FCs we claim.
  std::vector<uint8_t> tiled_;
  const void* key_ = nullptr;
  Acts acts_;
};

}  // namespace mm

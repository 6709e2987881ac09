// INT4 FULLY_CONNECTED (builtin op) on the delegate's kernels and thread pool:
// y [N, M] = x [N, K] @ W^T, W packed INT4 [M, K] with one fp32 scale per row
// (what ai-edge-quantizer writes for int4_channel) or one fp16 scale per block of
// G inputs (LiteRT's block-wise INT4: int4_g32, a released MobileMoE's linears). With the
// delegate's `fully_connected` option the whole decode step's GEMVs (LM head,
// attention projections, dense FFNs) run on one pool, so a 2-core phone or VM
// does not juggle two thread pools between every op (README.md, "Threads").
#pragma once

#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace mm {

// An FC weight as the model stores it.
struct FcWeights {
  Q4Matrix w;                     // w.s: fp32 scales [M, K/G]; null when s16 holds them
  const uint16_t* s16 = nullptr;  // fp16 scales [M, K/G] (block-wise), or null
};

class Int4Fc {
 public:
  // x [N, K] (row stride K) -> y [N, M].
  void Run(const FcWeights& w, const float* x, int N, float* y, ThreadPool* pool,
           ActMode mode, Isa isa);

 private:
  // All built once per weight tensor (key_: the tensor's data in the file):
  std::vector<float> wsum_;  // [M] sum_k W[m,k] for the int8 zero point
  // Block-wise fp16 scales converted to fp32 (exactly: the kernels then compute with
  // the stored values; XNNPACK rounds them to bf16), so no call converts them again.
  std::vector<float> scales_;
  // The weight in 16-row tiles (Q4Matrix::tiles), copied from the file's rows:
  // decode streams each tile sequentially. XNNPACK keeps a repacked copy of
  // every FC it runs too; this one replaces it for the FCs we claim.
  std::vector<uint8_t> tiled_;
  const void* key_ = nullptr;
  Acts acts_;
};

}  // namespace mm

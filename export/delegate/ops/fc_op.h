// Builtin FULLY_CONNECTED nodes with constant INT4 channel-wise or block-wise weights (the
// delegate's `fully_connected` option): the glue between LiteRT tensors and kernels/fc.h's
// Int4Fc.
#pragma once

#include "kernels/fc.h"
#include "ops/op.h"

namespace mm {

class FcOp : public Op {
 public:
  using Config = FcWeights;
  // IsNodeSupported: x f32 [..., K], weights a constant INT4 [M, K], no bias, no fused
  // activation, y f32 [..., M]. The weights' scales: one f32 per row with zero points 0
  // (int4_channel), or block-wise, a constant fp16 tensor [M, K/G] for blocks of G inputs
  // (G even, K % G == 0: int4_g32).
  static bool Check(TfLiteContext* ctx, const TfLiteNode* node, FcWeights* w, std::string* why);
  FcOp(const FcWeights& w, const TfLiteNode* node);  // Init

  const char* name() const override;
  TfLiteStatus Prepare(TfLiteContext* ctx, Partition* part, std::string* why) override;
  TfLiteStatus Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                    std::string* why) override;

 private:
  FcWeights w_;
  Int4Fc fc_;
};

}  // namespace mm

// Builtin FULLY_CONNECTED nodes with constant INT4 channel-wise weights (the delegate's
// `fully_connected` option): the glue between LiteRT tensors and kernels/fc.h's Int4Fc.
#pragma once

#include "kernels/fc.h"
#include "ops/op.h"

namespace mm {

class FcOp : public Op {
 public:
  using Config = Q4Matrix;
  // IsNodeSupported: x f32 [..., K], weights a constant INT4 [M, K] with one scale per row
  // and zero points 0 (int4_channel), no bias, no fused activation, y f32 [..., M].
  static bool Check(TfLiteContext* ctx, const TfLiteNode* node, Q4Matrix* w, std::string* why);
  FcOp(const Q4Matrix& w, const TfLiteNode* node);  // Init

  const char* name() const override;
  TfLiteStatus Prepare(TfLiteContext* ctx, Partition* part, std::string* why) override;
  TfLiteStatus Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                    std::string* why) override;

 private:
  Q4Matrix w_;
  Int4Fc fc_;
};

}  // namespace mm

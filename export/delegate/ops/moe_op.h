// MobileMoeBlock nodes (README.md, "The op contract"): the glue between LiteRT tensors and
// kernels/moe.h's MoeBlock (the delegate's one, RunEnv::moe).
#pragma once

#include "kernels/moe.h"
#include "ops/op.h"

namespace mm {

class MoeOp : public Op {
 public:
  using Config = MoeConfig;
  // IsNodeSupported: options, input count, every tensor's type, shape and bytes, constness.
  static bool Check(TfLiteContext* ctx, const TfLiteNode* node, MoeConfig* c, std::string* why);
  MoeOp(const MoeConfig& c, const TfLiteNode* node);  // Init

  const char* name() const override;
  TfLiteStatus Prepare(TfLiteContext* ctx, Partition* part, std::string* why) override;
  TfLiteStatus Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                    std::string* why) override;

 private:
  // The weights (every slot but x; `in` padded to all slots, -1 absent) against c.
  static bool CheckWeights(const TfLiteContext* ctx, const std::vector<int>& in,
                           const MoeConfig& c, std::string* why);

  MoeConfig cfg_;
  MoeWeightSums sums_;  // this node's weights' row sums (int8 mode)
};

}  // namespace mm

// MobileKvAttention nodes (README.md, "The decode attention op"): the glue between LiteRT
// tensors and kernels/attention.h's KvAttention.
#pragma once

#include "kernels/attention.h"
#include "ops/op.h"

namespace mm {

class AttentionOp : public Op {
 public:
  using Config = KvAttentionConfig;
  // IsNodeSupported: options, six inputs [1,T,H,Dh] ... (1 <= T <= kAttnMaxTokens), output.
  static bool Check(TfLiteContext* ctx, const TfLiteNode* node, KvAttentionConfig* c,
                    std::string* why);
  AttentionOp(const KvAttentionConfig& c, const TfLiteNode* node);  // Init

  const char* name() const override;
  // Our other ops never feed attention directly (projections lie between).
  bool TakesPartitionInputs() const override { return false; }
  TfLiteStatus Prepare(TfLiteContext* ctx, Partition* part, std::string* why) override;
  TfLiteStatus Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                    std::string* why) override;

 private:
  // Every input against c: types, shapes (T from q, P from k_cache), bytes.
  static bool CheckInputs(const TfLiteContext* ctx, const std::vector<int>& in,
                          const KvAttentionConfig& c, std::string* why);

  KvAttentionConfig cfg_;
  KvAttention attn_;
};

}  // namespace mm

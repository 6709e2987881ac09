#include "ops/attention_op.h"

#include <algorithm>
#include <climits>

#include "ops/checks.h"
#include "ops/contract.h"
#include "ops/options.h"

namespace mm {

using namespace contract;

bool AttentionOp::Check(TfLiteContext* ctx, const TfLiteNode* node, KvAttentionConfig* c,
                        std::string* why) {
  if (!ParseAttentionOptions(node->custom_initial_data, node->custom_initial_data_size, c, why))
    return false;
  const TfLiteIntArray* in = node->inputs;
  if (!in || in->size != kAttnSlots || !node->outputs || node->outputs->size != 1) {
    *why = "expected 6 inputs and 1 output";
    return false;
  }
  for (int s = 0; s < kAttnSlots; ++s)
    if (!IndexOk(ctx, in->data[s], false)) {
      *why = "bad or absent input " + std::to_string(s);
      return false;
    }
  return CheckInputs(ctx, std::vector<int>(in->data, in->data + in->size), *c, why) &&
         CheckOutput(ctx, node, why);
}

bool AttentionOp::CheckInputs(const TfLiteContext* ctx, const std::vector<int>& in,
                              const KvAttentionConfig& c, std::string* why) {
  const int H = c.num_heads, K = c.num_kv_heads, Dh = c.head_dim;
  const TfLiteTensor* t = ctx->tensors;
  const TfLiteTensor& q = t[in[kAttnQ]];
  if (q.type != kLiteFloat32 || !q.dims || q.dims->size != 4 || q.dims->data[0] != 1) {
    *why = "q must be float32 [1, T, H, Dh], got " + Dims(q.dims);
    return false;
  }
  const int T = q.dims->data[1];
  const TfLiteTensor& kc = t[in[kAttnKCache]];
  const int P = kc.dims && kc.dims->size == 4 ? kc.dims->data[2] : -1;
  if (T < 1 || T > kAttnMaxTokens) {
    *why = "T = " + std::to_string(T) + " tokens: the op runs 1.." +
           std::to_string(kAttnMaxTokens) + " (longer prefill chunks stay portable)";
    return false;
  }
  if (!CheckF32(q, {1, T, H, Dh}, "q", why) ||
      !CheckF32(t[in[kAttnKNew]], {1, T, K, Dh}, "k_new", why) ||
      !CheckF32(t[in[kAttnVNew]], {1, T, K, Dh}, "v_new", why) ||
      !CheckF32(kc, {1, K, std::max(P, 1), Dh}, "k_cache", why) ||
      !CheckF32(t[in[kAttnVCache]], {1, K, Dh, std::max(P, 1)}, "v_cache", why))
    return false;
  const TfLiteTensor& pos = t[in[kAttnInputPos]];
  if (pos.type != kLiteInt32 || !ShapeIs(pos, {T}) || pos.bytes != (size_t)T * 4) {
    *why = "input_pos must be int32 [T=" + std::to_string(T) + "], got type " +
           std::to_string(pos.type) + " shape " + Dims(pos.dims);
    return false;
  }
  return true;
}

AttentionOp::AttentionOp(const KvAttentionConfig& c, const TfLiteNode* node) : cfg_(c) {
  Init(node, kAttnSlots);
}

const char* AttentionOp::name() const { return kAttnName; }

TfLiteStatus AttentionOp::Prepare(TfLiteContext* ctx, Partition* part, std::string* why) {
  // The app may resize any input after the claim (more tokens, another cache length).
  if (!CheckInputs(ctx, inputs, cfg_, why)) return kLiteError;
  const int T = ctx->tensors[inputs[kAttnQ]].dims->data[1];
  const int HD = cfg_.num_heads * cfg_.head_dim;  // fits: ParseAttentionOptions
  size_t numel;
  if (!NumElements({T, HD}, &numel)) { *why = "output too large"; return kLiteError; }
  return ShapeOutput(ctx, part, {1, T, HD}, numel, false, why);
}

TfLiteStatus AttentionOp::Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                               std::string* why) {
  // Shapes were checked in Prepare; the positions are data, checked here.
  if (!CheckInputs(ctx, inputs, cfg_, why)) return kLiteError;
  auto f32 = [&](int slot) { return (const float*)ctx->tensors[inputs[slot]].data; };
  const TfLiteTensor& q = ctx->tensors[inputs[kAttnQ]];
  const int T = q.dims->data[1], P = ctx->tensors[inputs[kAttnKCache]].dims->data[2];
  const auto* p = (const int32_t*)ctx->tensors[inputs[kAttnInputPos]].data;
  if (!p || !f32(kAttnQ) || !f32(kAttnKNew) || !f32(kAttnVNew) || !f32(kAttnKCache) ||
      !f32(kAttnVCache)) {
    *why = "an input has no data";
    return kLiteError;
  }
  for (int t = 0; t < T; ++t)
    if (p[t] < 0 || (long long)p[t] != (long long)p[0] + t) {
      *why = "input_pos must be contiguous and >= 0";
      return kLiteError;
    }
  float* y = part->Output(ctx, output, (size_t)T * cfg_.num_heads * cfg_.head_dim);
  if (!y) { *why = "output size mismatch"; return kLiteError; }
  attn_.Run(cfg_, f32(kAttnQ), f32(kAttnKNew), f32(kAttnVNew), f32(kAttnKCache),
            f32(kAttnVCache), P, p, T, y, env.pool, KernelIsa(env.cap));
  return kLiteOk;
}

}  // namespace mm

#include "ops/moe_op.h"

#include "ops/checks.h"
#include "ops/contract.h"
#include "ops/options.h"

namespace mm {

using namespace contract;

bool MoeOp::Check(TfLiteContext* ctx, const TfLiteNode* node, MoeConfig* c, std::string* why) {
  if (!ParseMoeOptions(node->custom_initial_data, node->custom_initial_data_size, c, why))
    return false;
  const TfLiteIntArray* in = node->inputs;
  if (!in || (in->size != kMoeSharedGateUpQ && in->size != kMoeSlots) || !node->outputs ||
      node->outputs->size != 1) {
    *why = "expected 7 or 11 inputs and 1 output";
    return false;
  }
  for (int s = 0; s < in->size; ++s)
    if (!IndexOk(ctx, in->data[s], true)) { *why = "bad tensor index"; return false; }
  std::vector<int> slots(in->data, in->data + in->size);
  slots.resize(kMoeSlots, -1);
  for (int s : {kMoeX, kMoeRouterW, kMoeGateUpQ, kMoeGateUpS, kMoeDownQ, kMoeDownS})
    if (slots[s] < 0) { *why = "required input " + std::to_string(s) + " is absent"; return false; }
  if (!IndexOk(ctx, node->outputs->data[0], false)) { *why = "bad output index"; return false; }
  const TfLiteTensor& x = ctx->tensors[slots[kMoeX]];
  const int D = c->d_model;
  if (x.type != kLiteFloat32 || !x.dims || x.dims->size < 1 ||
      x.dims->data[x.dims->size - 1] != D) {
    *why = "x must be float32 [..., d_model=" + std::to_string(D) + "], got " + Dims(x.dims);
    return false;
  }
  return CheckOutput(ctx, node, why) && CheckWeights(ctx, slots, *c, why);
}

bool MoeOp::CheckWeights(const TfLiteContext* ctx, const std::vector<int>& in,
                         const MoeConfig& c, std::string* why) {
  const int E = c.num_experts, D = c.d_model, F = c.d_expert, Fs = c.d_shared;
  // Scales per row: K / G groups, or 1 when channel-wise (G = 0).
  auto ng = [&](int K) { return c.group_size ? K / c.group_size : 1; };
  const TfLiteTensor* T = ctx->tensors;
  if (!CheckF32(T[in[kMoeRouterW]], {E, D}, "router_w", why)) return false;
  if (in[kMoeRouterBias] >= 0 && !CheckF32(T[in[kMoeRouterBias]], {E}, "router_bias", why))
    return false;
  if (c.experts_out) {
    // [E, in, out] with groups of G outputs (group_size > 0: ParseMoeOptions).
    const bool ok = CheckQ4(T[in[kMoeGateUpQ]], E, D, 2 * F, "gate_up_q", why) &&
                    CheckF32(T[in[kMoeGateUpS]], {E, D, 2 * F / c.group_size}, "gate_up_s", why) &&
                    CheckQ4(T[in[kMoeDownQ]], E, F, D, "down_q", why) &&
                    CheckF32(T[in[kMoeDownS]], {E, F, D / c.group_size}, "down_s", why);
    if (!ok) {
      *why += " (expert_group_axis 'out': [E, in, out], groups along out)";
      return false;
    }
  } else if (!CheckQ4(T[in[kMoeGateUpQ]], E, 2 * F, D, "gate_up_q", why) ||
             !CheckF32(T[in[kMoeGateUpS]], {E, 2 * F, ng(D)}, "gate_up_s", why) ||
             !CheckQ4(T[in[kMoeDownQ]], E, D, F, "down_q", why) ||
             !CheckF32(T[in[kMoeDownS]], {E, D, ng(F)}, "down_s", why)) {
    return false;
  }
  bool any_shared = false;
  for (int s = kMoeSharedGateUpQ; s <= kMoeSharedDownS; ++s) any_shared |= in[s] >= 0;
  if (Fs == 0 && any_shared) { *why = "shared expert inputs given but d_shared=0"; return false; }
  if (Fs > 0) {
    for (int s = kMoeSharedGateUpQ; s <= kMoeSharedDownS; ++s)
      if (in[s] < 0) { *why = "d_shared>0 but shared input " + std::to_string(s) + " is absent"; return false; }
    if (!CheckQ4(T[in[kMoeSharedGateUpQ]], 0, 2 * Fs, D, "shared_gate_up_q", why) ||
        !CheckF32(T[in[kMoeSharedGateUpS]], {2 * Fs, ng(D)}, "shared_gate_up_s", why) ||
        !CheckQ4(T[in[kMoeSharedDownQ]], 0, D, Fs, "shared_down_q", why) ||
        !CheckF32(T[in[kMoeSharedDownS]], {D, ng(Fs)}, "shared_down_s", why))
      return false;
  }
  // Weights must be constants: the kernels read them in place every call.
  for (int s = kMoeRouterW; s < kMoeSlots; ++s)
    if (in[s] >= 0 && !IsConstant(T[in[s]])) {
      *why = "input " + std::to_string(s) + " is not a constant tensor";
      return false;
    }
  return true;
}

MoeOp::MoeOp(const MoeConfig& c, const TfLiteNode* node) : cfg_(c) { Init(node, kMoeSlots); }

const char* MoeOp::name() const { return kMoeName; }

TfLiteStatus MoeOp::Prepare(TfLiteContext* ctx, Partition* part, std::string* why) {
  // Tensors may have been resized since the claim: x (the app, or a reshape in front of
  // us) and, in a hostile file, anything else; everything is checked again.
  std::vector<int> dims;
  size_t numel;
  if (!CheckRows(ctx, *part, inputs[kMoeX], cfg_.d_model, "d_model", &dims, &numel, why) ||
      !CheckWeights(ctx, inputs, cfg_, why))
    return kLiteError;
  return ShapeOutput(ctx, part, dims, numel, false, why);   // y has x's shape
}

TfLiteStatus MoeOp::Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                         std::string* why) {
  size_t numel;
  const float* x = part->Input(ctx, inputs[kMoeX], &numel);
  float* y = part->Output(ctx, output, numel);
  const int D = cfg_.d_model;
  if ((!x || !y) && numel) { *why = "output size mismatch"; return kLiteError; }
  if (numel % D || numel > kMaxElements) { *why = "x is not [T, d_model]"; return kLiteError; }
  auto data = [&](int slot) -> const void* {
    const int t = inputs[slot];
    return t < 0 ? nullptr : ctx->tensors[t].data;
  };
  MoeWeights w;
  w.router_w = (const float*)data(kMoeRouterW);
  w.router_b = (const float*)data(kMoeRouterBias);
  w.gate_up_q = (const uint8_t*)data(kMoeGateUpQ);
  w.gate_up_s = (const float*)data(kMoeGateUpS);
  w.down_q = (const uint8_t*)data(kMoeDownQ);
  w.down_s = (const float*)data(kMoeDownS);
  w.shared_gate_up_q = (const uint8_t*)data(kMoeSharedGateUpQ);
  w.shared_gate_up_s = (const float*)data(kMoeSharedGateUpS);
  w.shared_down_q = (const uint8_t*)data(kMoeSharedDownQ);
  w.shared_down_s = (const float*)data(kMoeSharedDownS);
  RunOptions ro;
  ro.mode = env.mode;
  ro.cap = env.cap;
  if (ro.mode == ActMode::kI8) w.wsum = sums_.Get(cfg_, w, env.pool, KernelIsa(env.cap));
  env.moe->Run(cfg_, w, x, (int)(numel / D), y, env.pool, ro);
  return kLiteOk;
}

}  // namespace mm

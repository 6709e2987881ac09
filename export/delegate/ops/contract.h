// Generated from export/delegate/contract.py (the op contracts): do not edit.
// Regenerate: python -m export.delegate.contract > export/delegate/ops/contract.h
#pragma once

namespace mm::contract {

constexpr const char* kMoeName = "MobileMoeBlock";
enum MoeSlot { kMoeX = 0, kMoeRouterW = 1, kMoeRouterBias = 2, kMoeGateUpQ = 3, kMoeGateUpS = 4, kMoeDownQ = 5, kMoeDownS = 6, kMoeSharedGateUpQ = 7, kMoeSharedGateUpS = 8, kMoeSharedDownQ = 9, kMoeSharedDownS = 10, kMoeSlots = 11 };
constexpr const char* kMoeOptNumExperts = "num_experts";  // int, required
constexpr const char* kMoeOptTopK = "top_k";  // int, required
constexpr const char* kMoeOptDModel = "d_model";  // int, required
constexpr const char* kMoeOptDExpert = "d_expert";  // int, required
constexpr const char* kMoeOptGroupSize = "group_size";  // int, required
constexpr const char* kMoeOptDShared = "d_shared";  // int, optional
constexpr const char* kMoeOptScoreFunc = "score_func";  // string, optional
constexpr const char* kMoeOptNormTopkProb = "norm_topk_prob";  // bool, optional
constexpr const char* kMoeOptRoutedScale = "routed_scale";  // float, optional
constexpr const char* kMoeOptAct = "act";  // string, optional
constexpr const char* kMoeOptWeightTiles = "weight_tiles";  // int, optional
constexpr const char* kMoeOptExpertGroupAxis = "expert_group_axis";  // string, optional

constexpr const char* kAttnName = "MobileKvAttention";
enum AttnSlot { kAttnQ = 0, kAttnKNew = 1, kAttnVNew = 2, kAttnKCache = 3, kAttnVCache = 4, kAttnInputPos = 5, kAttnSlots = 6 };
constexpr const char* kAttnOptNumHeads = "num_heads";  // int, required
constexpr const char* kAttnOptNumKvHeads = "num_kv_heads";  // int, required
constexpr const char* kAttnOptHeadDim = "head_dim";  // int, required
constexpr const char* kAttnOptWindow = "window";  // int, required
constexpr const char* kAttnOptScale = "scale";  // float, required
constexpr int kAttnMaxTokens = 8192;

constexpr const char* kFcName = "FULLY_CONNECTED";
enum FcSlot { kFcX = 0, kFcWeights = 1, kFcBias = 2, kFcSlots = 3 };

}  // namespace mm::contract

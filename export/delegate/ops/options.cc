#include "ops/options.h"

#include <cfloat>
#include <climits>
#include <cmath>

#include "flexbuf.h"
#include "ops/checks.h"
#include "ops/contract.h"

namespace mm {

using namespace contract;

namespace {

constexpr int kMaxInt = 1 << 24;  // no dimension of ours comes near it

bool IsInt(const flexbuf::Value& v) { return v.type == flexbuf::kInt || v.type == flexbuf::kUInt; }

// A float option as float32: finite and in float range (a cast of anything else is UB).
bool ToFloat(const flexbuf::Value& v, float* out) {
  const double d = v.type == flexbuf::kFloat ? v.f : IsInt(v) ? (double)v.i : NAN;
  if (!std::isfinite(d) || std::fabs(d) > FLT_MAX) return false;
  *out = (float)d;
  return true;
}

// A string option for a message: printable and short (it comes from the file).
std::string Shown(const std::string& s) {
  return Printable(s.size() > 64 ? s.substr(0, 64) + "..." : s);
}

}  // namespace

bool ParseMoeOptions(const void* data, int size, MoeConfig* c, std::string* why) {
  if (!data || size <= 0) { *why = "no custom_options"; return false; }
  flexbuf::MapReader m((const uint8_t*)data, (size_t)size);
  if (!m.ok()) { *why = "custom_options is not a flexbuffer map"; return false; }
  flexbuf::Value v;
  auto get_int = [&](const char* key, int* out, bool required) {
    if (!m.Find(key, &v)) {
      if (required) *why = std::string("missing option '") + key + "'";
      return !required;
    }
    if (!IsInt(v)) {
      *why = std::string("option '") + key + "' is not an int";
      return false;
    }
    if (v.i < 0 || v.i > kMaxInt) {
      *why = std::string("option '") + key + "' out of range: " + std::to_string(v.i);
      return false;
    }
    *out = (int)v.i;
    return true;
  };
  if (!get_int(kMoeOptNumExperts, &c->num_experts, true) ||
      !get_int(kMoeOptTopK, &c->top_k, true) ||
      !get_int(kMoeOptDModel, &c->d_model, true) ||
      !get_int(kMoeOptDExpert, &c->d_expert, true) ||
      !get_int(kMoeOptGroupSize, &c->group_size, true) ||
      !get_int(kMoeOptDShared, &c->d_shared, false) ||
      !get_int(kMoeOptWeightTiles, &c->weight_tiles, false))
    return false;
  if (m.Find(kMoeOptScoreFunc, &v)) {
    if (v.type != flexbuf::kString || (v.s != "softmax" && v.s != "sigmoid")) {
      *why = "unsupported score_func '" + Shown(v.s) + "' (softmax|sigmoid)";
      return false;
    }
    c->softmax = v.s == "softmax";
  }
  if (m.Find(kMoeOptExpertGroupAxis, &v)) {
    if (v.type != flexbuf::kString || (v.s != "in" && v.s != "out")) {
      *why = "unsupported expert_group_axis '" + Shown(v.s) + "' (in|out)";
      return false;
    }
    c->experts_out = v.s == "out";
  }
  if (m.Find(kMoeOptAct, &v) && (v.type != flexbuf::kString || v.s != "silu")) {
    *why = "unsupported act '" + Shown(v.s) + "' (only silu)";
    return false;
  }
  if (m.Find(kMoeOptNormTopkProb, &v)) {
    if (v.type != flexbuf::kBool && !IsInt(v)) {
      *why = "norm_topk_prob is not a bool";
      return false;
    }
    c->norm_topk_prob = v.i != 0;
  }
  if (m.Find(kMoeOptRoutedScale, &v) && !ToFloat(v, &c->routed_scale)) {
    *why = "routed_scale is not a finite number";
    return false;
  }
  const int E = c->num_experts, k = c->top_k, D = c->d_model, F = c->d_expert,
            Fs = c->d_shared, G = c->group_size;
  if (E < 1) { *why = "num_experts must be >= 1"; return false; }
  if (k < 1 || k > E) { *why = "top_k must be in [1, num_experts]"; return false; }
  // group_size 0: channel-wise, one scale per weight row (the group is the whole row).
  if (G != 0 && (G < 2 || G % 2)) { *why = "group_size must be 0 (channel-wise) or even and >= 2"; return false; }
  if (D < 1 || F < 1 || D % 2 || F % 2 || Fs % 2 || (G && (D % G || F % G || Fs % G))) {
    *why = "d_model, d_expert, d_shared must be positive (even) multiples of group_size "
           "(got D=" + std::to_string(D) + " F=" + std::to_string(F) + " Fs=" +
           std::to_string(Fs) + " G=" + std::to_string(G) + ")";
    return false;
  }
  // Output-axis groups run along each column of [in, out]: there is no channel-wise form.
  if (c->experts_out && G == 0) {
    *why = "expert_group_axis 'out' needs group_size > 0 (groups of outputs)";
    return false;
  }
  // weight_tiles 16: every input-axis matrix [rows, K] in 16-row tiles (moe_op.py tile_rows);
  // 'out' experts keep their [in, out] rows.
  if (c->weight_tiles != 0 && c->weight_tiles != kTileRows) {
    *why = "weight_tiles must be 0 (rows) or 16, got " + std::to_string(c->weight_tiles);
    return false;
  }
  if (c->weight_tiles && !((c->experts_out || (TilesOk(2 * F, D) && TilesOk(D, F))) &&
                           (Fs == 0 || (TilesOk(2 * Fs, D) && TilesOk(D, Fs))))) {
    *why = "weight_tiles 16 needs d_model, d_expert and d_shared to be multiples of 128 "
           "(got D=" + std::to_string(D) + " F=" + std::to_string(F) + " Fs=" +
           std::to_string(Fs) + ")";
    return false;
  }
  return true;
}

bool ParseAttentionOptions(const void* data, int size, KvAttentionConfig* c, std::string* why) {
  if (!data || size <= 0) { *why = "no custom_options"; return false; }
  flexbuf::MapReader m((const uint8_t*)data, (size_t)size);
  if (!m.ok()) { *why = "custom_options is not a flexbuffer map"; return false; }
  flexbuf::Value v;
  for (auto [key, out] : {std::pair<const char*, int*>{kAttnOptNumHeads, &c->num_heads},
                          {kAttnOptNumKvHeads, &c->num_kv_heads}, {kAttnOptHeadDim, &c->head_dim},
                          {kAttnOptWindow, &c->window}}) {
    if (!m.Find(key, &v) || !IsInt(v) || v.i < 0 || v.i > kMaxInt) {
      *why = std::string("option '") + key + "' missing or not a non-negative int";
      return false;
    }
    *out = (int)v.i;
  }
  if (!m.Find(kAttnOptScale, &v) || (v.type != flexbuf::kFloat && v.type != flexbuf::kInt) ||
      !ToFloat(v, &c->scale)) {
    *why = "option 'scale' missing or not a finite number";
    return false;
  }
  const int H = c->num_heads, K = c->num_kv_heads, Dh = c->head_dim;
  if (H < 1 || K < 1 || Dh < 1 || H % K) {
    *why = "num_heads must be a positive multiple of num_kv_heads, head_dim positive";
    return false;
  }
  if ((long long)H * Dh > INT_MAX) { *why = "num_heads * head_dim too large"; return false; }
  return true;
}

}  // namespace mm

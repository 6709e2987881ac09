// LiteRT external delegate that claims MobileMoeBlock custom-op nodes and runs
// them with the sparse INT4 kernels in moe.cc, and MobileKvAttention nodes
// (decode attention over the filled KV-cache slots, attention.cc), and with the
// `fully_connected` option INT4 channel-wise FULLY_CONNECTED nodes (fc.cc). Loaded from
// Python with ai_edge_litert.interpreter.load_delegate(path, options).
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "abi.h"
#include "attention.h"
#include "fc.h"
#include "flexbuf.h"
#include "moe.h"

namespace {

constexpr const char* kOpName = "MobileMoeBlock";
constexpr const char* kAttentionOpName = "MobileKvAttention";
constexpr int kMaxAttentionTokens = 64;  // attention.cc's per-item list of new tokens
constexpr const char* kFcName = "FULLY_CONNECTED";

struct Options {
  int num_threads = 0;  // 0: the interpreter's recommended thread count
  mm::ActMode mode = mm::ActMode::kI8;
  mm::IsaCap kernel = mm::IsaCap::kAuto;
  bool verbose = false;
  bool fully_connected = false;  // also claim INT4 channel-wise FULLY_CONNECTED nodes
};

struct MoeDelegate {
  TfLiteDelegate base;  // first member: TfLiteDelegate* <-> MoeDelegate*
  Options opts;
  int claimed = 0, refused = 0, invokes = 0;
  std::string messages;  // why nodes were refused, newest last
  std::mutex run_mu;     // one node runs at a time: the pool is shared
  std::unique_ptr<mm::ThreadPool> pool;

  mm::ThreadPool* Pool(int recommended) {
    if (!pool) {
      int n = opts.num_threads > 0 ? opts.num_threads : recommended;
      pool.reset(new mm::ThreadPool(std::max(1, std::min(n, 64))));
    }
    return pool.get();
  }
};

MoeDelegate* Self(TfLiteDelegate* d) { return reinterpret_cast<MoeDelegate*>(d); }

// ---- Validation: a node is claimed only if everything below holds. ----

// Input slots of the op contract.
enum { kX = 0, kRouterW, kRouterB, kGateUpQ, kGateUpS, kDownQ, kDownS,
       kSharedGateUpQ, kSharedGateUpS, kSharedDownQ, kSharedDownS };

std::string Dims(const TfLiteIntArray* d) {
  if (!d) return "null";
  std::string s = "[";
  for (int i = 0; i < d->size; ++i) s += (i ? "," : "") + std::to_string(d->data[i]);
  return s + "]";
}

bool ShapeIs(const TfLiteTensor& t, std::initializer_list<int> want) {
  if (!t.dims || t.dims->size != (int)want.size()) return false;
  int i = 0;
  for (int w : want) if (t.dims->data[i++] != w) return false;
  return true;
}

bool ParseConfig(const void* data, int size, mm::MoeConfig* c, std::string* why) {
  if (!data || size <= 0) { *why = "no custom_options"; return false; }
  flexbuf::MapReader m((const uint8_t*)data, (size_t)size);
  if (!m.ok()) { *why = "custom_options is not a flexbuffer map"; return false; }
  flexbuf::Value v;
  auto get_int = [&](const char* key, int* out, bool required) {
    if (!m.Find(key, &v)) {
      if (required) *why = std::string("missing option '") + key + "'";
      return !required;
    }
    if (v.type != flexbuf::kInt && v.type != flexbuf::kUInt) {
      *why = std::string("option '") + key + "' is not an int";
      return false;
    }
    if (v.i < 0 || v.i > (1 << 24)) {
      *why = std::string("option '") + key + "' out of range: " + std::to_string(v.i);
      return false;
    }
    *out = (int)v.i;
    return true;
  };
  if (!get_int("num_experts", &c->num_experts, true) ||
      !get_int("top_k", &c->top_k, true) ||
      !get_int("d_model", &c->d_model, true) ||
      !get_int("d_expert", &c->d_expert, true) ||
      !get_int("group_size", &c->group_size, true) ||
      !get_int("d_shared", &c->d_shared, false) ||
      !get_int("weight_tiles", &c->weight_tiles, false))
    return false;
  if (m.Find("score_func", &v)) {
    if (v.type != flexbuf::kString || (v.s != "softmax" && v.s != "sigmoid")) {
      *why = "unsupported score_func '" + v.s + "' (softmax|sigmoid)";
      return false;
    }
    c->softmax = v.s == "softmax";
  }
  if (m.Find("act", &v) && (v.type != flexbuf::kString || v.s != "silu")) {
    *why = "unsupported act '" + v.s + "' (only silu)";
    return false;
  }
  if (m.Find("norm_topk_prob", &v)) {
    if (v.type != flexbuf::kBool && v.type != flexbuf::kInt && v.type != flexbuf::kUInt) {
      *why = "norm_topk_prob is not a bool";
      return false;
    }
    c->norm_topk_prob = v.i != 0;
  }
  if (m.Find("routed_scale", &v)) {
    if (v.type == flexbuf::kFloat) c->routed_scale = (float)v.f;
    else if (v.type == flexbuf::kInt || v.type == flexbuf::kUInt) c->routed_scale = (float)v.i;
    else { *why = "routed_scale is not a number"; return false; }
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
  // weight_tiles 16: every matrix [rows, K] in 16-row tiles (moe_op.py tile_rows).
  if (c->weight_tiles != 0 && c->weight_tiles != mm::kTileRows) {
    *why = "weight_tiles must be 0 (rows) or 16, got " + std::to_string(c->weight_tiles);
    return false;
  }
  if (c->weight_tiles && !(mm::TilesOk(2 * F, D) && mm::TilesOk(D, F) &&
                           (Fs == 0 || (mm::TilesOk(2 * Fs, D) && mm::TilesOk(D, Fs))))) {
    *why = "weight_tiles 16 needs d_model, d_expert and d_shared to be multiples of 128 "
           "(got D=" + std::to_string(D) + " F=" + std::to_string(F) + " Fs=" +
           std::to_string(Fs) + ")";
    return false;
  }
  return true;
}

// Checks an INT4 weight: uint8/int8 bytes [..., rows, K/2] or INT4 [..., rows, K].
bool CheckQ4(const TfLiteTensor& t, int lead, int rows, int K, const char* name,
             std::string* why) {
  const bool bytes = t.type == kLiteUInt8 || t.type == kLiteInt8;
  const int last = bytes ? K / 2 : K;
  const bool shape = lead > 0 ? ShapeIs(t, {lead, rows, last}) : ShapeIs(t, {rows, last});
  if ((!bytes && t.type != kLiteInt4) || !shape ||
      t.bytes != (size_t)std::max(lead, 1) * rows * (K / 2)) {
    *why = std::string(name) + ": expected packed int4 " +
           (lead > 0 ? "[" + std::to_string(lead) + "," : "[") + std::to_string(rows) +
           "," + std::to_string(K / 2) + "] bytes (uint8), got type " +
           std::to_string(t.type) + " shape " + Dims(t.dims);
    return false;
  }
  return true;
}

bool CheckF32(const TfLiteTensor& t, std::initializer_list<int> want,
              const char* name, std::string* why) {
  size_t n = 1;
  for (int w : want) n *= (size_t)w;
  if (t.type != kLiteFloat32 || !ShapeIs(t, want) || t.bytes != n * 4) {
    std::string s = "[";
    for (int w : want) s += (s.size() > 1 ? "," : "") + std::to_string(w);
    *why = std::string(name) + ": expected float32 " + s + "], got type " +
           std::to_string(t.type) + " shape " + Dims(t.dims);
    return false;
  }
  return true;
}

bool CheckNode(TfLiteContext* ctx, const TfLiteNode* node, mm::MoeConfig* c,
               std::string* why) {
  if (!ParseConfig(node->custom_initial_data, node->custom_initial_data_size, c, why))
    return false;
  const TfLiteIntArray* in = node->inputs;
  if (!in || (in->size != 7 && in->size != 11) || !node->outputs ||
      node->outputs->size != 1) {
    *why = "expected 7 or 11 inputs and 1 output";
    return false;
  }
  auto idx = [&](int slot) { return slot < in->size ? in->data[slot] : -1; };
  for (int s = 0; s < in->size; ++s) {
    if (in->data[s] < -1 || in->data[s] >= (int)ctx->tensors_size) {
      *why = "bad tensor index";
      return false;
    }
  }
  const int E = c->num_experts, D = c->d_model, F = c->d_expert, Fs = c->d_shared;
  // Scales per row: K / G groups, or 1 when channel-wise (G = 0).
  auto ng = [&](int K) { return c->group_size ? K / c->group_size : 1; };
  for (int s : {kX, kRouterW, kGateUpQ, kGateUpS, kDownQ, kDownS})
    if (idx(s) < 0) { *why = "required input " + std::to_string(s) + " is absent"; return false; }
  const TfLiteTensor* T = ctx->tensors;
  const TfLiteTensor& x = T[idx(kX)];
  const int out_idx = node->outputs->data[0];
  if (out_idx < 0 || out_idx >= (int)ctx->tensors_size) { *why = "bad output index"; return false; }
  if (x.type != kLiteFloat32 || !x.dims || x.dims->size < 1 ||
      x.dims->data[x.dims->size - 1] != D) {
    *why = "x must be float32 [..., d_model=" + std::to_string(D) + "], got " + Dims(x.dims);
    return false;
  }
  if (T[out_idx].type != kLiteFloat32) { *why = "output must be float32"; return false; }
  if (!CheckF32(T[idx(kRouterW)], {E, D}, "router_w", why)) return false;
  if (idx(kRouterB) >= 0 && !CheckF32(T[idx(kRouterB)], {E}, "router_bias", why)) return false;
  if (!CheckQ4(T[idx(kGateUpQ)], E, 2 * F, D, "gate_up_q", why) ||
      !CheckF32(T[idx(kGateUpS)], {E, 2 * F, ng(D)}, "gate_up_s", why) ||
      !CheckQ4(T[idx(kDownQ)], E, D, F, "down_q", why) ||
      !CheckF32(T[idx(kDownS)], {E, D, ng(F)}, "down_s", why))
    return false;
  bool any_shared = false;
  for (int s = kSharedGateUpQ; s <= kSharedDownS; ++s) any_shared |= idx(s) >= 0;
  if (Fs == 0 && any_shared) { *why = "shared expert inputs given but d_shared=0"; return false; }
  if (Fs > 0) {
    for (int s = kSharedGateUpQ; s <= kSharedDownS; ++s)
      if (idx(s) < 0) { *why = "d_shared>0 but shared input " + std::to_string(s) + " is absent"; return false; }
    if (!CheckQ4(T[idx(kSharedGateUpQ)], 0, 2 * Fs, D, "shared_gate_up_q", why) ||
        !CheckF32(T[idx(kSharedGateUpS)], {2 * Fs, ng(D)}, "shared_gate_up_s", why) ||
        !CheckQ4(T[idx(kSharedDownQ)], 0, D, Fs, "shared_down_q", why) ||
        !CheckF32(T[idx(kSharedDownS)], {D, ng(Fs)}, "shared_down_s", why))
      return false;
  }
  // Weights must be constants: the kernels read them in place every call.
  for (int s = 1; s < in->size; ++s)
    if (idx(s) >= 0 && T[idx(s)].allocation_type != kLiteMmapRo) {
      *why = "input " + std::to_string(s) + " is not a constant tensor";
      return false;
    }
  return true;
}

// MobileKvAttention: q [1,T,H,Dh], k_new / v_new [1,T,K,Dh], k_cache [1,K,P,Dh],
// v_cache [1,K,Dh,P], input_pos [T] int32 -> y [1,T,H*Dh] (README.md).
enum { kQ = 0, kKNew, kVNew, kKCache, kVCache, kPos };

bool CheckAttentionNode(TfLiteContext* ctx, const TfLiteNode* node,
                        mm::KvAttentionConfig* c, std::string* why) {
  const void* data = node->custom_initial_data;
  const int size = node->custom_initial_data_size;
  if (!data || size <= 0) { *why = "no custom_options"; return false; }
  flexbuf::MapReader m((const uint8_t*)data, (size_t)size);
  if (!m.ok()) { *why = "custom_options is not a flexbuffer map"; return false; }
  flexbuf::Value v;
  for (auto [key, out] : {std::pair<const char*, int*>{"num_heads", &c->num_heads},
                          {"num_kv_heads", &c->num_kv_heads}, {"head_dim", &c->head_dim},
                          {"window", &c->window}}) {
    if (!m.Find(key, &v) || (v.type != flexbuf::kInt && v.type != flexbuf::kUInt) ||
        v.i < 0 || v.i > (1 << 24)) {
      *why = std::string("option '") + key + "' missing or not a non-negative int";
      return false;
    }
    *out = (int)v.i;
  }
  if (!m.Find("scale", &v) || (v.type != flexbuf::kFloat && v.type != flexbuf::kInt)) {
    *why = "option 'scale' missing or not a number";
    return false;
  }
  c->scale = v.type == flexbuf::kFloat ? (float)v.f : (float)v.i;
  const int H = c->num_heads, K = c->num_kv_heads, Dh = c->head_dim;
  if (H < 1 || K < 1 || Dh < 1 || H % K) {
    *why = "num_heads must be a positive multiple of num_kv_heads, head_dim positive";
    return false;
  }
  const TfLiteIntArray* in = node->inputs;
  if (!in || in->size != 6 || !node->outputs || node->outputs->size != 1) {
    *why = "expected 6 inputs and 1 output";
    return false;
  }
  for (int s = 0; s < 6; ++s)
    if (in->data[s] < 0 || in->data[s] >= (int)ctx->tensors_size) {
      *why = "bad or absent input " + std::to_string(s);
      return false;
    }
  const int out = node->outputs->data[0];
  if (out < 0 || out >= (int)ctx->tensors_size) { *why = "bad output index"; return false; }
  const TfLiteTensor* t = ctx->tensors;
  const TfLiteTensor& q = t[in->data[kQ]];
  if (q.type != kLiteFloat32 || !q.dims || q.dims->size != 4 || q.dims->data[0] != 1) {
    *why = "q must be float32 [1, T, H, Dh], got " + Dims(q.dims);
    return false;
  }
  const int T = q.dims->data[1];
  const TfLiteTensor& kc = t[in->data[kKCache]];
  const int P = kc.dims && kc.dims->size == 4 ? kc.dims->data[2] : -1;
  if (T < 1 || T > kMaxAttentionTokens) {
    *why = "T = " + std::to_string(T) + " tokens: the op runs 1.." +
           std::to_string(kMaxAttentionTokens) + " (decode); prefill stays portable";
    return false;
  }
  if (!CheckF32(q, {1, T, H, Dh}, "q", why) ||
      !CheckF32(t[in->data[kKNew]], {1, T, K, Dh}, "k_new", why) ||
      !CheckF32(t[in->data[kVNew]], {1, T, K, Dh}, "v_new", why) ||
      !CheckF32(kc, {1, K, std::max(P, 1), Dh}, "k_cache", why) ||
      !CheckF32(t[in->data[kVCache]], {1, K, Dh, std::max(P, 1)}, "v_cache", why))
    return false;
  const TfLiteTensor& pos = t[in->data[kPos]];
  if (pos.type != kLiteInt32 || !ShapeIs(pos, {T})) {
    *why = "input_pos must be int32 [T=" + std::to_string(T) + "], got type " +
           std::to_string(pos.type) + " shape " + Dims(pos.dims);
    return false;
  }
  if (t[out].type != kLiteFloat32) { *why = "output must be float32"; return false; }
  return true;
}

// FULLY_CONNECTED (with the fully_connected option): x f32 [..., K], weights a
// constant INT4 [M, K] with one scale per row and zero points 0 (int4_channel),
// no bias, no fused activation, y f32 [..., M].
bool CheckFcNode(TfLiteContext* ctx, const TfLiteNode* node, mm::Q4Matrix* w,
                 std::string* why) {
  const TfLiteIntArray* in = node->inputs;
  if (!in || in->size < 2 || in->size > 3 || !node->outputs || node->outputs->size != 1) {
    *why = "expected 2-3 inputs and 1 output";
    return false;
  }
  for (int s = 0; s < in->size; ++s)
    if (in->data[s] < -1 || in->data[s] >= (int)ctx->tensors_size || (s < 2 && in->data[s] < 0)) {
      *why = "bad tensor index";
      return false;
    }
  if (in->size == 3 && in->data[2] >= 0) { *why = "has a bias"; return false; }
  const auto* p = (const TfLiteFullyConnectedParams*)node->builtin_data;
  if (!p || p->activation != 0) { *why = "fused activation"; return false; }
  const TfLiteTensor& wt = ctx->tensors[in->data[1]];
  if (wt.type != kLiteInt4 || !wt.dims || wt.dims->size != 2 || wt.allocation_type != kLiteMmapRo) {
    *why = "weights are not a constant INT4 [M, K] tensor";
    return false;
  }
  const int M = wt.dims->data[0], K = wt.dims->data[1];
  const auto* aq = (const TfLiteAffineQuantization*)wt.quantization.params;
  if (wt.quantization.type != kLiteAffineQuantization || !aq || !aq->scale ||
      aq->scale->size != M || aq->quantized_dimension != 0 || K % 2 ||
      wt.bytes != (size_t)M * (K / 2)) {
    *why = "INT4 weights are not channel-wise (one scale per output row)";
    return false;
  }
  for (int i = 0; aq->zero_point && i < aq->zero_point->size; ++i)
    if (aq->zero_point->data[i] != 0) { *why = "non-zero weight zero point"; return false; }
  const TfLiteTensor& x = ctx->tensors[in->data[0]];
  const TfLiteTensor& y = ctx->tensors[node->outputs->data[0]];
  if (x.type != kLiteFloat32 || !x.dims || x.dims->size < 1 || x.dims->data[x.dims->size - 1] != K ||
      y.type != kLiteFloat32 || !y.dims || y.dims->size < 1 || y.dims->data[y.dims->size - 1] != M) {
    *why = "x / y must be float32 [..., K] / [..., M]";
    return false;
  }
  *w = {(const uint8_t*)wt.data, aq->scale->data, M, K, K};
  return true;
}

// ---- The delegate kernel: one per partition of claimed nodes. ----

struct Op {
  const char* kind = kOpName;  // kOpName, kAttentionOpName or kFcName
  bool attention() const { return kind == kAttentionOpName; }
  mm::MoeConfig cfg;
  mm::KvAttentionConfig acfg;
  mm::Q4Matrix fcw{};
  mm::Int4Fc fc;
  std::vector<int> inputs;  // tensor index per slot (-1: absent)
  int output = -1;
  mm::MoeBlock block;
  mm::KvAttention attn;
};

// Which of our ops a node is (nullptr: not ours).
const char* OurOp(const TfLiteRegistration* reg, const Options& o) {
  if (o.fully_connected && reg->builtin_code == kLiteBuiltinFullyConnected) return kFcName;
  if (reg->builtin_code != kLiteBuiltinCustom || !reg->custom_name) return nullptr;
  for (const char* name : {kOpName, kAttentionOpName})
    if (strcmp(reg->custom_name, name) == 0) return name;
  return nullptr;
}

bool CheckOurNode(TfLiteContext* ctx, const TfLiteNode* node, const char* name, Op* op,
                  std::string* why) {
  op->kind = name;
  if (name == kFcName) return CheckFcNode(ctx, node, &op->fcw, why);
  return name == kAttentionOpName ? CheckAttentionNode(ctx, node, &op->acfg, why)
                                  : CheckNode(ctx, node, &op->cfg, why);
}

struct Kernel {
  MoeDelegate* del = nullptr;
  std::vector<std::unique_ptr<Op>> ops;  // execution order
  // Tensors produced and consumed inside the partition are not allocated by
  // the runtime (only partition outputs are), so we keep them here.
  std::vector<int> internal;
  std::vector<std::vector<float>> internal_buf;
  std::vector<std::vector<int>> internal_dims;

  int InternalSlot(int tensor) const {
    for (size_t i = 0; i < internal.size(); ++i) if (internal[i] == tensor) return (int)i;
    return -1;
  }

  // An f32 input's data and element count: our buffer if internal, else the runtime's.
  const float* Input(TfLiteContext* ctx, int tensor, size_t* numel) const {
    const int i = InternalSlot(tensor);
    if (i >= 0) {
      *numel = internal_buf[i].size();
      return internal_buf[i].data();
    }
    *numel = ctx->tensors[tensor].bytes / sizeof(float);
    return (const float*)ctx->tensors[tensor].data;
  }

  // An f32 output's data if it holds `numel` elements (null otherwise).
  float* Output(TfLiteContext* ctx, int tensor, size_t numel) {
    const int i = InternalSlot(tensor);
    if (i >= 0) return internal_buf[i].size() == numel ? internal_buf[i].data() : nullptr;
    TfLiteTensor& t = ctx->tensors[tensor];
    return t.bytes == numel * sizeof(float) ? (float*)t.data : nullptr;
  }
};

void* KernelInit(TfLiteContext* ctx, const char* buffer, size_t) {
  const auto* params = reinterpret_cast<const TfLiteDelegateParams*>(buffer);
  auto* k = new Kernel;
  k->del = Self(params->delegate);
  std::vector<int> outs(params->output_tensors->data,
                        params->output_tensors->data + params->output_tensors->size);
  for (int i = 0; i < params->nodes_to_replace->size; ++i) {
    TfLiteNode* node;
    TfLiteRegistration* reg;
    ctx->GetNodeAndRegistration(ctx, params->nodes_to_replace->data[i], &node, &reg);
    auto op = std::make_unique<Op>();
    std::string why;
    const char* name = OurOp(reg, k->del->opts);
    if (!name || !CheckOurNode(ctx, node, name, op.get(), &why)) {  // checked in Prepare
      ctx->ReportError(ctx, "MobileMoE delegate: node became invalid: %s", why.c_str());
      delete k;
      return nullptr;
    }
    op->inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
    op->inputs.resize(11, -1);
    for (int t : op->inputs)
      if (op->attention() && t >= 0 && k->InternalSlot(t) >= 0) {
        // Our ops never feed attention directly (projections lie between).
        ctx->ReportError(ctx, "MobileMoE delegate: attention input made inside the partition");
        delete k;
        return nullptr;
      }
    op->output = node->outputs->data[0];
    if (std::find(outs.begin(), outs.end(), op->output) == outs.end()) {
      k->internal.push_back(op->output);
      k->internal_buf.emplace_back();
      k->internal_dims.emplace_back();
    }
    k->ops.push_back(std::move(op));
  }
  return k;
}

void KernelFree(TfLiteContext*, void* buffer) { delete static_cast<Kernel*>(buffer); }

TfLiteStatus KernelPrepare(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<Kernel*>(node->user_data);
  if (!k) return kLiteError;
  for (auto& op : k->ops) {
    // The output's shape: x's (MoE; FC with the last dim M), from the runtime or
    // our own record if internal; [1, T, H * Dh] (attention).
    std::vector<int> dims;
    const bool fc = op->kind == kFcName;
    const int xs = op->attention() ? -1 : k->InternalSlot(op->inputs[kX]);
    if (op->attention()) {
      const TfLiteIntArray* q = ctx->tensors[op->inputs[kQ]].dims;
      if (!q || q->size != 4) return kLiteError;
      dims = {1, q->data[1], op->acfg.num_heads * op->acfg.head_dim};
    } else if (xs >= 0) {
      dims = k->internal_dims[xs];
    } else {
      const TfLiteIntArray* d = ctx->tensors[op->inputs[kX]].dims;
      dims.assign(d->data, d->data + d->size);
    }
    const int want_last = fc ? op->fcw.K : op->cfg.d_model;
    if (!op->attention() && (dims.empty() || dims.back() != want_last)) {
      ctx->ReportError(ctx, "MobileMoE delegate: %s input's last dim must be %d", op->kind,
                       want_last);
      return kLiteError;
    }
    if (fc) dims.back() = op->fcw.M;
    size_t numel = 1;
    for (int d : dims) numel *= (size_t)std::max(d, 0);
    const int ys = k->InternalSlot(op->output);
    if (ys >= 0) {
      k->internal_dims[ys] = dims;
      k->internal_buf[ys].resize(numel);
      continue;
    }
    TfLiteTensor* y = &ctx->tensors[op->output];
    if (fc && y->bytes == numel * sizeof(float)) continue;  // [N, M] without keep_num_dims
    bool same = y->dims && y->dims->size == (int)dims.size();
    for (size_t i = 0; same && i < dims.size(); ++i) same = y->dims->data[i] == dims[i];
    if (!same) {
      // ResizeTensor takes ownership: the array must come from malloc.
      auto* nd = (TfLiteIntArray*)malloc(sizeof(int) * (1 + dims.size()));
      nd->size = (int)dims.size();
      std::copy(dims.begin(), dims.end(), nd->data);
      if (ctx->ResizeTensor(ctx, y, nd) != kLiteOk) return kLiteError;
    }
  }
  return kLiteOk;
}

TfLiteStatus RunAttention(TfLiteContext* ctx, Kernel* k, Op* op, mm::ThreadPool* pool) {
  auto f32 = [&](int slot) { return (const float*)ctx->tensors[op->inputs[slot]].data; };
  const TfLiteTensor& q = ctx->tensors[op->inputs[kQ]];
  const TfLiteTensor& pos = ctx->tensors[op->inputs[kPos]];
  const int T = q.dims->data[1], P = ctx->tensors[op->inputs[kKCache]].dims->data[2];
  const auto* p = (const int32_t*)pos.data;
  if (!p || !f32(kQ) || !f32(kKNew) || !f32(kVNew) || !f32(kKCache) || !f32(kVCache))
    return kLiteError;
  for (int t = 0; t < T; ++t)
    if (p[t] < 0 || p[t] != p[0] + t) {
      ctx->ReportError(ctx, "MobileKvAttention: input_pos must be contiguous and >= 0");
      return kLiteError;
    }
  float* y = k->Output(ctx, op->output, (size_t)T * op->acfg.num_heads * op->acfg.head_dim);
  if (!y) return kLiteError;
  op->attn.Run(op->acfg, f32(kQ), f32(kKNew), f32(kVNew), f32(kKCache), f32(kVCache), P, p,
               T, y, pool, mm::KernelIsa(k->del->opts.kernel));
  return kLiteOk;
}

TfLiteStatus RunFc(TfLiteContext* ctx, Kernel* k, Op* op, mm::ThreadPool* pool) {
  size_t numel;
  const float* x = k->Input(ctx, op->inputs[kX], &numel);
  const int K = op->fcw.K, M = op->fcw.M;
  const size_t N = numel / K;
  float* y = k->Output(ctx, op->output, N * M);
  if (!x || !y || numel % K) return kLiteError;
  op->fc.Run(op->fcw, x, (int)N, y, pool, k->del->opts.mode, mm::KernelIsa(k->del->opts.kernel));
  return kLiteOk;
}

TfLiteStatus KernelInvoke(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<Kernel*>(node->user_data);
  MoeDelegate* del = k->del;
  std::lock_guard<std::mutex> lock(del->run_mu);
  mm::ThreadPool* pool = del->Pool(ctx->recommended_num_threads);
  mm::RunOptions ro;
  ro.mode = del->opts.mode;
  ro.cap = del->opts.kernel;
  for (auto& op : k->ops) {
    auto data = [&](int slot) -> const void* {
      const int t = op->inputs[slot];
      return t < 0 ? nullptr : ctx->tensors[t].data;
    };
    if (op->attention()) {
      if (RunAttention(ctx, k, op.get(), pool) != kLiteOk) return kLiteError;
      continue;
    }
    if (op->kind == kFcName) {
      if (RunFc(ctx, k, op.get(), pool) != kLiteOk) return kLiteError;
      continue;
    }
    size_t numel;
    const float* x = k->Input(ctx, op->inputs[kX], &numel);
    float* y = k->Output(ctx, op->output, numel);
    if (!y && numel) {
      ctx->ReportError(ctx, "MobileMoE delegate: output size mismatch");
      return kLiteError;
    }
    const int D = op->cfg.d_model;
    if ((!x && numel) || (!y && numel) || numel % D) return kLiteError;
    mm::MoeWeights w;
    w.router_w = (const float*)data(kRouterW);
    w.router_b = (const float*)data(kRouterB);
    w.gate_up_q = (const uint8_t*)data(kGateUpQ);
    w.gate_up_s = (const float*)data(kGateUpS);
    w.down_q = (const uint8_t*)data(kDownQ);
    w.down_s = (const float*)data(kDownS);
    w.shared_gate_up_q = (const uint8_t*)data(kSharedGateUpQ);
    w.shared_gate_up_s = (const float*)data(kSharedGateUpS);
    w.shared_down_q = (const uint8_t*)data(kSharedDownQ);
    w.shared_down_s = (const float*)data(kSharedDownS);
    op->block.Run(op->cfg, w, x, (int)(numel / D), y, pool, ro);
  }
  del->invokes++;
  return kLiteOk;
}

// ---- Delegate entry points. ----

TfLiteStatus DelegatePrepare(TfLiteContext* ctx, TfLiteDelegate* d) {
  MoeDelegate* del = Self(d);
  TfLiteIntArray* plan = nullptr;
  if (ctx->GetExecutionPlan(ctx, &plan) != kLiteOk) return kLiteError;
  std::vector<int> nodes;
  for (int i = 0; i < plan->size; ++i) {
    TfLiteNode* node;
    TfLiteRegistration* reg;
    if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kLiteOk) continue;
    const char* name = OurOp(reg, del->opts);
    if (!name) continue;
    Op op;
    std::string why;
    if (CheckOurNode(ctx, node, name, &op, &why)) {
      nodes.push_back(plan->data[i]);
    } else {
      // The interpreter then reports an unresolved custom op; this says why.
      std::string msg = "MobileMoE delegate: not claiming " + std::string(name) +
                        " node " + std::to_string(plan->data[i]) + ": " + why;
      ctx->ReportError(ctx, "%s\n", msg.c_str());
      fprintf(stderr, "%s\n", msg.c_str());
      del->messages += msg + "\n";
      del->refused++;
    }
  }
  if (nodes.empty()) return kLiteOk;
  auto* arr = (TfLiteIntArray*)malloc(sizeof(int) * (1 + nodes.size()));
  arr->size = (int)nodes.size();
  std::copy(nodes.begin(), nodes.end(), arr->data);
  TfLiteRegistration reg;
  memset(&reg, 0, sizeof(reg));  // every field, incl. ones we never use
  reg.init = KernelInit;
  reg.free = KernelFree;
  reg.prepare = KernelPrepare;
  reg.invoke = KernelInvoke;
  reg.custom_name = "MobileMoeDelegate";
  reg.version = 1;
  TfLiteStatus st = ctx->ReplaceNodeSubsetsWithDelegateKernels(ctx, reg, arr, d);
  free(arr);
  if (st == kLiteOk) del->claimed += (int)nodes.size();
  if (del->opts.verbose)
    fprintf(stderr, "MobileMoE delegate: claimed %zu node(s) (%s, %s)\n", nodes.size(), kOpName,
            kAttentionOpName);
  return st;
}

bool ParseOptions(const char* const* keys, const char* const* values, int n,
                  Options* o, std::string* err) {
  for (int i = 0; i < n; ++i) {
    const std::string k = keys[i] ? keys[i] : "", v = values[i] ? values[i] : "";
    if (k == "num_threads") {
      char* end;
      long t = strtol(v.c_str(), &end, 10);
      if (*end || t < 0 || t > 64) { *err = "num_threads must be an int in [0, 64]"; return false; }
      o->num_threads = (int)t;
    } else if (k == "activations") {
      if (v == "int8") o->mode = mm::ActMode::kI8;
      else if (v == "fp32") o->mode = mm::ActMode::kF32;
      else { *err = "activations must be 'int8' or 'fp32'"; return false; }
    } else if (k == "kernel") {
      if (v == "auto") o->kernel = mm::IsaCap::kAuto;
      else if (v == "avx2") o->kernel = mm::IsaCap::kAvx2;
      else if (v == "scalar") o->kernel = mm::IsaCap::kScalar;
      else { *err = "kernel must be 'auto', 'avx2' or 'scalar'"; return false; }
    } else if (k == "verbose") {
      o->verbose = v == "1" || v == "true";
    } else if (k == "fully_connected") {
      if (v != "0" && v != "1") { *err = "fully_connected must be 0 or 1"; return false; }
      o->fully_connected = v == "1";
    } else {
      *err = "unknown option '" + k + "' (num_threads, activations, kernel, verbose, "
             "fully_connected)";
      return false;
    }
  }
  return true;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) TfLiteDelegate* tflite_plugin_create_delegate(
    const char* const* keys, const char* const* values, size_t num_options,
    void (*report_error)(const char*)) {
  // Python passes the count as a C int: the upper half of the register is junk.
  const int n = (int)(num_options & 0xffffffffu);
  Options opts;
  std::string err;
  if (!ParseOptions(keys, values, n, &opts, &err)) {
    err = "MobileMoE delegate: " + err;
    if (report_error) report_error(err.c_str());
    return nullptr;
  }
  auto* del = new MoeDelegate;
  memset(&del->base, 0, sizeof(del->base));
  del->base.data_ = del;
  del->base.Prepare = DelegatePrepare;
  del->base.flags = kLiteDelegateFlagsAllowDynamicTensors;
  del->opts = opts;
  return &del->base;
}

__attribute__((visibility("default"))) void tflite_plugin_destroy_delegate(
    TfLiteDelegate* d) {
  delete Self(d);
}

// Introspection for tests and benchmarks (call through ctypes with the
// pointer load_delegate returned).
__attribute__((visibility("default"))) int mobilemoe_delegate_claimed(TfLiteDelegate* d) {
  return Self(d)->claimed;
}
__attribute__((visibility("default"))) int mobilemoe_delegate_refused(TfLiteDelegate* d) {
  return Self(d)->refused;
}
__attribute__((visibility("default"))) int mobilemoe_delegate_invokes(TfLiteDelegate* d) {
  return Self(d)->invokes;
}
__attribute__((visibility("default"))) const char* mobilemoe_delegate_messages(
    TfLiteDelegate* d) {
  return Self(d)->messages.c_str();
}
// 1 in the ASan/UBSan build (lets the sanitizer test check what it loaded).
__attribute__((visibility("default"))) int mobilemoe_sanitized() {
#if defined(__SANITIZE_ADDRESS__)
  return 1;
#else
  return 0;
#endif
}
__attribute__((visibility("default"))) const char* mobilemoe_kernel_isa() {
  return mm::IsaName(mm::KernelIsa(mm::IsaCap::kAuto));
}
// The kernels this delegate runs (its `kernel` option applied; shapes that
// the SIMD kernels do not fit still run the scalar code).
__attribute__((visibility("default"))) const char* mobilemoe_delegate_isa(TfLiteDelegate* d) {
  return mm::IsaName(mm::KernelIsa(Self(d)->opts.kernel));
}

}  // extern "C"

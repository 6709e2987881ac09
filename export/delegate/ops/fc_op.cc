#include "ops/fc_op.h"

#include "ops/checks.h"
#include "ops/contract.h"

namespace mm {

using namespace contract;

namespace {

// Channel-wise scales: one f32 per output row, zero points 0.
bool ChannelScales(const TfLiteTensor& wt, int M, int K, FcWeights* w, std::string* why) {
  const auto* aq = (const TfLiteAffineQuantization*)wt.quantization.params;
  if (!aq || !aq->scale || aq->scale->size != M || aq->quantized_dimension != 0) {
    *why = "INT4 weights are not channel-wise (one scale per output row)";
    return false;
  }
  for (int i = 0; aq->zero_point && i < aq->zero_point->size; ++i)
    if (aq->zero_point->data[i] != 0) { *why = "non-zero weight zero point"; return false; }
  w->w = {nullptr, aq->scale->data, M, K, K};
  return true;
}

// Block-wise scales: a constant fp16 tensor [M, K/G], no zero points.
bool BlockScales(const TfLiteContext* ctx, const TfLiteTensor& wt, int M, int K, FcWeights* w,
                 std::string* why) {
  const auto* bq = (const TfLiteBlockwiseQuantization*)wt.quantization.params;
  if (!bq || bq->quantized_dimension != 0) {
    *why = "block-wise INT4 weights not quantized along dimension 0";
    return false;
  }
  if (bq->zero_point != -1) { *why = "block-wise INT4 weights with zero points"; return false; }
  const int G = bq->blocksize;
  if (G < 2 || G % 2 || K % G) {
    *why = "block size " + std::to_string(G) + " must be even and divide K = " + std::to_string(K);
    return false;
  }
  if (!IndexOk(ctx, bq->scale, false)) { *why = "bad block scales tensor index"; return false; }
  const TfLiteTensor& st = ctx->tensors[bq->scale];
  size_t n;
  if (st.type != kLiteFloat16 || !ShapeIs(st, {M, K / G}) || !NumElements({M, K / G}, &n) ||
      st.bytes != n * 2 || !IsConstant(st)) {
    *why = "block scales must be a constant float16 [" + std::to_string(M) + "," +
           std::to_string(K / G) + "], got type " + std::to_string(st.type) + " shape " +
           Dims(st.dims);
    return false;
  }
  w->w = {nullptr, nullptr, M, K, G};
  w->s16 = (const uint16_t*)st.data;
  return true;
}

}  // namespace

bool FcOp::Check(TfLiteContext* ctx, const TfLiteNode* node, FcWeights* w, std::string* why) {
  const TfLiteIntArray* in = node->inputs;
  if (!in || in->size < 2 || in->size > kFcSlots || !node->outputs || node->outputs->size != 1) {
    *why = "expected 2-3 inputs and 1 output";
    return false;
  }
  for (int s = 0; s < in->size; ++s)
    if (!IndexOk(ctx, in->data[s], s == kFcBias)) { *why = "bad tensor index"; return false; }
  if (in->size == kFcSlots && in->data[kFcBias] >= 0) { *why = "has a bias"; return false; }
  const auto* p = (const TfLiteFullyConnectedParams*)node->builtin_data;
  if (!p || p->activation != 0) { *why = "fused activation"; return false; }
  const TfLiteTensor& wt = ctx->tensors[in->data[kFcWeights]];
  if (wt.type != kLiteInt4 || !wt.dims || wt.dims->size != 2 || !IsConstant(wt)) {
    *why = "weights are not a constant INT4 [M, K] tensor";
    return false;
  }
  const int M = wt.dims->data[0], K = wt.dims->data[1];
  size_t bytes;
  if (M < 1 || K < 2 || K % 2 || !NumElements({M, K / 2}, &bytes) || wt.bytes != bytes) {
    *why = "INT4 weights [" + std::to_string(M) + "," + std::to_string(K) + "] of " +
           std::to_string(wt.bytes) + " bytes (K must be even, the bytes M * K / 2)";
    return false;
  }
  if (wt.quantization.type == kLiteAffineQuantization) {
    if (!ChannelScales(wt, M, K, w, why)) return false;
  } else if (wt.quantization.type == kLiteBlockwiseQuantization) {
    if (!BlockScales(ctx, wt, M, K, w, why)) return false;
  } else {
    *why = "INT4 weights neither channel-wise nor block-wise (quantization type " +
           std::to_string(wt.quantization.type) + ")";
    return false;
  }
  const TfLiteTensor& x = ctx->tensors[in->data[kFcX]];
  if (!IndexOk(ctx, node->outputs->data[0], false)) { *why = "bad output index"; return false; }
  const TfLiteTensor& y = ctx->tensors[node->outputs->data[0]];
  if (x.type != kLiteFloat32 || !x.dims || x.dims->size < 1 || x.dims->data[x.dims->size - 1] != K ||
      y.type != kLiteFloat32 || !y.dims || y.dims->size < 1 || y.dims->data[y.dims->size - 1] != M) {
    *why = "x / y must be float32 [..., K] / [..., M]";
    return false;
  }
  if (!CheckOutput(ctx, node, why)) return false;
  w->w.q = (const uint8_t*)wt.data;
  return true;
}

FcOp::FcOp(const FcWeights& w, const TfLiteNode* node) : w_(w) { Init(node, kFcSlots); }

const char* FcOp::name() const { return kFcName; }

TfLiteStatus FcOp::Prepare(TfLiteContext* ctx, Partition* part, std::string* why) {
  // x may have been resized since the claim; the output is [..., M] (or [N, M]).
  std::vector<int> dims;
  size_t numel, y_numel;
  if (!CheckRows(ctx, *part, inputs[kFcX], w_.w.K, "K", &dims, &numel, why)) return kLiteError;
  dims.back() = w_.w.M;
  if (!NumElements(dims, &y_numel)) { *why = "output too large"; return kLiteError; }
  return ShapeOutput(ctx, part, dims, y_numel, true, why);
}

TfLiteStatus FcOp::Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                        std::string* why) {
  size_t numel;
  const float* x = part->Input(ctx, inputs[kFcX], &numel);
  const int K = w_.w.K, M = w_.w.M;
  const size_t N = numel / K;
  float* y = part->Output(ctx, output, N * M);
  if (!x || !y || numel % K) { *why = "input / output size mismatch"; return kLiteError; }
  fc_.Run(w_, x, (int)N, y, env.pool, env.mode, KernelIsa(env.cap));
  return kLiteOk;
}

}  // namespace mm

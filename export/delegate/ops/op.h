// The delegate's op interface, in the shape of TFLite's simple_delegate: each op class
// (moe_op.h, attention_op.h, fc_op.h) has
//   static bool Check(ctx, node, Config*, why)  IsNodeSupported: may the delegate claim it?
//   its constructor                             Init: the claimed config and tensor slots
//   Prepare(ctx, partition, why)                every input/output re-validated, output shaped
//   Eval(ctx, partition, env, why)              runs the kernels (kernels/)
// A node that fails Check is left to the interpreter with the reason; Prepare and Eval
// fail with an error status and a reason, never by touching memory they were not given.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "abi.h"
#include "kernels/kernels.h"
#include "kernels/moe.h"
#include "kernels/threadpool.h"
#include "ops/checks.h"

namespace mm {

// What the delegate's options choose for every op it runs.
struct RunEnv {
  ThreadPool* pool = nullptr;
  MoeBlock* moe = nullptr;  // the MoE blocks' computation and scratch, shared by their nodes
  ActMode mode = ActMode::kI8;
  IsaCap cap = IsaCap::kAuto;
};

// The tensors of one delegate partition (a run of claimed nodes). Tensors produced and
// consumed inside it are not allocated by the runtime (only partition outputs are), so
// the partition keeps them; every op reads and writes through here.
class Partition {
 public:
  bool IsInternal(int tensor) const { return Slot(tensor) >= 0; }
  void AddInternal(int tensor) {
    internal_.push_back(tensor);
    buf_.emplace_back();
    dims_.emplace_back();
  }

  // An f32 tensor's shape: our record if internal, else the runtime's (false: none).
  bool Dims(TfLiteContext* ctx, int tensor, std::vector<int>* dims) const {
    const int i = Slot(tensor);
    if (i >= 0) {
      *dims = dims_[i];
      return true;
    }
    const TfLiteIntArray* d = ctx->tensors[tensor].dims;
    if (!d || d->size < 0) return false;
    dims->assign(d->data, d->data + d->size);
    return true;
  }

  // An f32 input's data and element count: our buffer if internal, else the runtime's.
  const float* Input(TfLiteContext* ctx, int tensor, size_t* numel) const {
    const int i = Slot(tensor);
    if (i >= 0) {
      *numel = buf_[i].size();
      return buf_[i].data();
    }
    *numel = ctx->tensors[tensor].bytes / sizeof(float);
    return (const float*)ctx->tensors[tensor].data;
  }

  // An f32 output's data if it holds `numel` elements (null otherwise).
  float* Output(TfLiteContext* ctx, int tensor, size_t numel) {
    const int i = Slot(tensor);
    if (i >= 0) return buf_[i].size() == numel ? buf_[i].data() : nullptr;
    TfLiteTensor& t = ctx->tensors[tensor];
    return t.bytes == numel * sizeof(float) ? (float*)t.data : nullptr;
  }

  // Gives an output the shape `dims` (numel elements): our buffer if internal, else the
  // runtime tensor (resized unless it already has that shape, or, with `flat_ok`, the
  // same number of elements: FULLY_CONNECTED's [N, M] without keep_num_dims).
  TfLiteStatus SetOutput(TfLiteContext* ctx, int tensor, const std::vector<int>& dims,
                         size_t numel, bool flat_ok) {
    const int i = Slot(tensor);
    if (i >= 0) {
      dims_[i] = dims;
      buf_[i].resize(numel);
      return kLiteOk;
    }
    TfLiteTensor* y = &ctx->tensors[tensor];
    if (flat_ok && y->bytes == numel * sizeof(float)) return kLiteOk;
    bool same = y->dims && y->dims->size == (int)dims.size();
    for (size_t d = 0; same && d < dims.size(); ++d) same = y->dims->data[d] == dims[d];
    if (same) return kLiteOk;
    // ResizeTensor takes ownership: the array must come from malloc.
    auto* nd = (TfLiteIntArray*)malloc(sizeof(int) * (1 + dims.size()));
    if (!nd) return kLiteError;
    nd->size = (int)dims.size();
    std::copy(dims.begin(), dims.end(), nd->data);
    return ctx->ResizeTensor(ctx, y, nd);
  }

 private:
  int Slot(int tensor) const {
    for (size_t i = 0; i < internal_.size(); ++i) if (internal_[i] == tensor) return (int)i;
    return -1;
  }
  std::vector<int> internal_;
  std::vector<std::vector<float>> buf_;
  std::vector<std::vector<int>> dims_;
};

// One claimed node (see the top of this file).
class Op {
 public:
  virtual ~Op() = default;
  virtual const char* name() const = 0;
  // Whether inputs may be tensors made inside the partition (Partition's own buffers).
  virtual bool TakesPartitionInputs() const { return true; }
  virtual TfLiteStatus Prepare(TfLiteContext* ctx, Partition* part, std::string* why) = 0;
  virtual TfLiteStatus Eval(TfLiteContext* ctx, Partition* part, const RunEnv& env,
                            std::string* why) = 0;

  std::vector<int> inputs;  // tensor index per contract slot (-1: absent)
  int output = -1;

 protected:
  // Records the node's inputs (padded with -1 to `slots`) and its output.
  void Init(const TfLiteNode* node, int slots) {
    inputs.assign(node->inputs->data, node->inputs->data + node->inputs->size);
    inputs.resize(std::max((int)inputs.size(), slots), -1);
    output = node->outputs->data[0];
  }

  // Prepare's first step for a row input x: float32 [..., `last_name`=last] (it may have
  // been resized since the claim) and, for a runtime tensor, its bytes.
  static bool CheckRows(TfLiteContext* ctx, const Partition& part, int x, int last,
                        const char* last_name, std::vector<int>* dims, size_t* numel,
                        std::string* why) {
    if (!part.Dims(ctx, x, dims) || dims->empty() || dims->back() != last ||
        !NumElements(*dims, numel)) {
      *why = std::string("x must be float32 [..., ") + last_name + "=" + std::to_string(last) +
             "], got " + Dims(*dims);
      return false;
    }
    if (!part.IsInternal(x) && ctx->tensors[x].bytes != *numel * sizeof(float)) {
      *why = "x holds " + std::to_string(ctx->tensors[x].bytes) + " bytes for shape " + Dims(*dims);
      return false;
    }
    return true;
  }

  // Prepare's last step: the output (writable runtime memory unless the partition holds
  // it) given its shape.
  TfLiteStatus ShapeOutput(TfLiteContext* ctx, Partition* part, const std::vector<int>& dims,
                           size_t numel, bool flat_ok, std::string* why) const {
    if (!part->IsInternal(output) && !IsWritable(ctx->tensors[output])) {
      *why = "output is not writable";
      return kLiteError;
    }
    return part->SetOutput(ctx, output, dims, numel, flat_ok);
  }
};

}  // namespace mm

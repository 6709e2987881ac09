// LiteRT external delegate that claims MobileMoeBlock custom-op nodes (sparse INT4 experts,
// ops/moe_op.h), MobileKvAttention nodes (attention over the filled KV-cache slots,
// ops/attention_op.h) and, with the `fully_connected` option, INT4 channel-wise or
// block-wise FULLY_CONNECTED nodes (ops/fc_op.h), and runs them on the kernels in
// kernels/. Loaded from Python with ai_edge_litert.interpreter.load_delegate(path, options).
//
// Every entry point the runtime calls is a C function: none lets an exception out (a
// hostile model can make an allocation fail); each turns one into an error status.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "abi.h"
#include "ops/attention_op.h"
#include "ops/checks.h"
#include "ops/contract.h"
#include "ops/fc_op.h"
#include "ops/moe_op.h"

namespace {

struct Options {
  int num_threads = 0;  // 0: the interpreter's recommended thread count
  mm::ActMode mode = mm::ActMode::kI8;
  mm::IsaCap kernel = mm::IsaCap::kAuto;
  bool verbose = false;
  bool fully_connected = false;  // also claim INT4 FULLY_CONNECTED nodes
  bool profile = false;          // time every op and the gaps between partitions (Profile)
};

// Wall time per claimed op, and between our partitions (the interpreter's other ops, or
// the app between two invokes), summed by label: where a decode step goes, per op.
struct Profile {
  using Clock = std::chrono::steady_clock;
  // A gap longer than this is the app between steps, not ops of the interpreter.
  static constexpr double kIdleUs = 1000;
  struct Stat { long count = 0; double us = 0; };
  std::map<std::string, Stat> stats;
  Clock::time_point last_end;
  std::string last;  // the label of the op that ran last ("": none yet)

  static double Us(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  }
  void Add(const std::string& key, double us) {
    Stat& s = stats[key];
    s.count++;
    s.us += us;
  }
  std::string Text() const {
    std::string out;
    for (const auto& [key, s] : stats)
      out += key + "\t" + std::to_string(s.count) + "\t" + std::to_string(s.us) + "\n";
    return out;
  }
};

struct MoeDelegate {
  TfLiteDelegate base;  // first member: TfLiteDelegate* <-> MoeDelegate*
  Options opts;
  int claimed = 0, refused = 0, invokes = 0;
  std::string messages;  // why nodes were refused, newest last
  std::mutex run_mu;     // one node runs at a time: the pool is shared
  std::unique_ptr<mm::ThreadPool> pool;
  mm::MoeBlock moe;      // every MoE node's computation and scratch (run_mu: one at a time)
  Profile profile;
  std::string profile_text;  // Profile::Text() as of the last mobilemoe_delegate_profile call

  mm::ThreadPool* Pool(int recommended) {
    if (!pool) {
      int n = opts.num_threads > 0 ? opts.num_threads : recommended;
      pool.reset(new mm::ThreadPool(std::max(1, std::min(n, 64))));
    }
    return pool.get();
  }
};

MoeDelegate* Self(TfLiteDelegate* d) { return reinterpret_cast<MoeDelegate*>(d); }

// ---- The ops: which nodes are ours, and the op class that checks and runs each. ----

template <class T>
std::unique_ptr<mm::Op> Claim(TfLiteContext* ctx, const TfLiteNode* node, std::string* why) {
  typename T::Config c;
  if (!T::Check(ctx, node, &c, why)) return nullptr;
  return std::make_unique<T>(c, node);
}

using ClaimFn = std::unique_ptr<mm::Op> (*)(TfLiteContext*, const TfLiteNode*, std::string*);

// The op class for a node (null: not ours), and its name for messages.
ClaimFn OurOp(const TfLiteRegistration* reg, const Options& o, const char** name) {
  namespace c = mm::contract;
  if (o.fully_connected && reg->builtin_code == kLiteBuiltinFullyConnected) {
    *name = c::kFcName;
    return Claim<mm::FcOp>;
  }
  if (reg->builtin_code != kLiteBuiltinCustom || !reg->custom_name) return nullptr;
  *name = reg->custom_name;
  if (strcmp(reg->custom_name, c::kMoeName) == 0) return Claim<mm::MoeOp>;
  if (strcmp(reg->custom_name, c::kAttnName) == 0) return Claim<mm::AttentionOp>;
  return nullptr;
}

// ---- The delegate kernel: one per partition of claimed nodes. ----

struct Kernel {
  MoeDelegate* del = nullptr;
  std::vector<std::unique_ptr<mm::Op>> ops;  // execution order
  mm::Partition part;
  std::vector<std::string> labels;  // per op, for the profile: name [output shape]
  std::string first;                // the first op's label: where a gap before us ends
};

std::string Label(TfLiteContext* ctx, const mm::Op& op, const mm::Partition& part) {
  std::vector<int> dims;
  part.Dims(ctx, op.output, &dims);
  return std::string(op.name()) + " " + mm::Dims(dims);
}

void Report(TfLiteContext* ctx, const char* op, const std::string& why) {
  ctx->ReportError(ctx, "MobileMoE delegate: %s: %s", op, why.c_str());
}

void* KernelInit(TfLiteContext* ctx, const char* buffer, size_t) {
  try {
    const auto* params = reinterpret_cast<const TfLiteDelegateParams*>(buffer);
    auto k = std::make_unique<Kernel>();
    k->del = Self(params->delegate);
    const TfLiteIntArray* outs = params->output_tensors;
    for (int i = 0; i < params->nodes_to_replace->size; ++i) {
      TfLiteNode* node;
      TfLiteRegistration* reg;
      if (ctx->GetNodeAndRegistration(ctx, params->nodes_to_replace->data[i], &node, &reg) !=
          kLiteOk)
        return nullptr;
      const char* name = "node";
      std::string why;
      ClaimFn claim = OurOp(reg, k->del->opts, &name);
      std::unique_ptr<mm::Op> op = claim ? claim(ctx, node, &why) : nullptr;
      if (!op) {  // checked in DelegatePrepare: the node changed since
        ctx->ReportError(ctx, "MobileMoE delegate: node became invalid: %s", why.c_str());
        return nullptr;
      }
      for (int t : op->inputs)
        if (!op->TakesPartitionInputs() && t >= 0 && k->part.IsInternal(t)) {
          ctx->ReportError(ctx, "MobileMoE delegate: %s input made inside the partition",
                           op->name());
          return nullptr;
        }
      for (const auto& prev : k->ops)
        if (prev->output == op->output) {
          ctx->ReportError(ctx, "MobileMoE delegate: two nodes write tensor %d", op->output);
          return nullptr;
        }
      if (!std::count(outs->data, outs->data + outs->size, op->output))
        k->part.AddInternal(op->output);
      k->ops.push_back(std::move(op));
    }
    return k.release();
  } catch (...) {
    ctx->ReportError(ctx, "MobileMoE delegate: out of memory claiming nodes");
    return nullptr;
  }
}

void KernelFree(TfLiteContext*, void* buffer) { delete static_cast<Kernel*>(buffer); }

TfLiteStatus KernelPrepare(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<Kernel*>(node->user_data);
  if (!k) return kLiteError;
  for (auto& op : k->ops) {
    std::string why;
    TfLiteStatus st = kLiteError;
    try {
      st = op->Prepare(ctx, &k->part, &why);
    } catch (...) {
      why = "out of memory";
    }
    if (st != kLiteOk) {
      Report(ctx, op->name(), why.empty() ? "could not size the output" : why);
      return kLiteError;
    }
  }
  try {
    k->labels.clear();
    for (auto& op : k->ops) k->labels.push_back(Label(ctx, *op, k->part));
    k->first = k->labels.empty() ? "" : k->labels[0];
  } catch (...) {
    Report(ctx, "prepare", "out of memory");
    return kLiteError;
  }
  return kLiteOk;
}

TfLiteStatus KernelInvoke(TfLiteContext* ctx, TfLiteNode* node) {
  auto* k = static_cast<Kernel*>(node->user_data);
  if (!k) return kLiteError;
  MoeDelegate* del = k->del;
  std::string why;
  const char* failed = "invoke";
  try {
    std::lock_guard<std::mutex> lock(del->run_mu);
    mm::RunEnv env;
    env.pool = del->Pool(ctx->recommended_num_threads);
    env.moe = &del->moe;
    env.mode = del->opts.mode;
    env.cap = del->opts.kernel;
    Profile& prof = del->profile;
    const bool timed = del->opts.profile;
    Profile::Clock::time_point t = timed ? Profile::Clock::now() : Profile::Clock::time_point();
    if (timed && !prof.last.empty()) {
      const double gap = Profile::Us(prof.last_end, t);
      prof.Add(gap > Profile::kIdleUs ? "idle (gap > 1 ms)"
                                      : "outside, " + prof.last + " -> " + k->first, gap);
    }
    for (size_t i = 0; i < k->ops.size(); ++i) {
      if (k->ops[i]->Eval(ctx, &k->part, env, &why) != kLiteOk) {
        failed = k->ops[i]->name();
        break;
      }
      if (timed) {
        const auto t1 = Profile::Clock::now();
        prof.Add(k->labels[i], Profile::Us(t, t1));
        t = t1;
      }
    }
    if (timed && !k->labels.empty()) {
      prof.last_end = Profile::Clock::now();
      prof.last = k->labels.back();
    }
    if (why.empty()) {
      del->invokes++;
      return kLiteOk;
    }
  } catch (...) {
    why = "out of memory";
  }
  Report(ctx, failed, why);
  return kLiteError;
}

// ---- Delegate entry points. ----

TfLiteStatus DelegatePrepareImpl(TfLiteContext* ctx, TfLiteDelegate* d) {
  MoeDelegate* del = Self(d);
  TfLiteIntArray* plan = nullptr;
  if (ctx->GetExecutionPlan(ctx, &plan) != kLiteOk || !plan) return kLiteError;
  std::vector<int> nodes;
  for (int i = 0; i < plan->size; ++i) {
    TfLiteNode* node;
    TfLiteRegistration* reg;
    if (ctx->GetNodeAndRegistration(ctx, plan->data[i], &node, &reg) != kLiteOk) continue;
    const char* name = nullptr;
    ClaimFn claim = OurOp(reg, del->opts, &name);
    if (!claim) continue;
    std::string why;
    if (claim(ctx, node, &why)) {
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
  if (!arr) return kLiteError;
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
    fprintf(stderr, "MobileMoE delegate: claimed %zu node(s) (%s, %s)\n", nodes.size(),
            mm::contract::kMoeName, mm::contract::kAttnName);
  return st;
}

TfLiteStatus DelegatePrepare(TfLiteContext* ctx, TfLiteDelegate* d) {
  try {
    return DelegatePrepareImpl(ctx, d);
  } catch (...) {
    ctx->ReportError(ctx, "MobileMoE delegate: out of memory checking nodes");
    return kLiteError;
  }
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
      else if (v == "avx512") o->kernel = mm::IsaCap::kAvx512;
      else if (v == "avx2") o->kernel = mm::IsaCap::kAvx2;
      else if (v == "scalar") o->kernel = mm::IsaCap::kScalar;
      else { *err = "kernel must be 'auto', 'avx512', 'avx2' or 'scalar'"; return false; }
    } else if (k == "verbose") {
      o->verbose = v == "1" || v == "true";
    } else if (k == "fully_connected") {
      if (v != "0" && v != "1") { *err = "fully_connected must be 0 or 1"; return false; }
      o->fully_connected = v == "1";
    } else if (k == "profile") {
      if (v != "0" && v != "1") { *err = "profile must be 0 or 1"; return false; }
      o->profile = v == "1";
    } else {
      *err = "unknown option '" + k + "' (num_threads, activations, kernel, verbose, "
             "fully_connected, profile)";
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
  MoeDelegate* del = nullptr;
  try {
    if (ParseOptions(keys, values, n, &opts, &err)) del = new MoeDelegate;
  } catch (...) {
    err = "out of memory";
  }
  if (!del) {
    err = "MobileMoE delegate: " + err;
    if (report_error) report_error(err.c_str());
    return nullptr;
  }
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
// The `profile` option's table: one line per label, "label\tcount\tmicroseconds".
__attribute__((visibility("default"))) const char* mobilemoe_delegate_profile(
    TfLiteDelegate* d) {
  try {
    Self(d)->profile_text = Self(d)->profile.Text();
  } catch (...) {
    Self(d)->profile_text.clear();
  }
  return Self(d)->profile_text.c_str();
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

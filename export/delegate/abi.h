// Minimal declarations of the LiteRT (TFLite) C ABI used by the delegate.
//
// No package ships the TFLite C headers, so we declare only what we touch,
// written from the layout of the public tflite/core/c/common.h (ai-edge-litert
// 2.3). Structs the runtime hands us are declared up to the last field we read;
// structs we hand to the runtime (TfLiteRegistration, TfLiteDelegate) are
// declared in full. The static_asserts pin sizes/offsets for LP64 targets
// (x86-64 and arm64 Linux/Android): if a future runtime moves a field, the
// build breaks instead of the process.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

typedef int TfLiteStatus;  // enum in the header: 0 ok, 1 error
enum { kLiteOk = 0, kLiteError = 1 };

// TfLiteType values we care about.
enum {
  kLiteFloat32 = 1,
  kLiteInt32 = 2,
  kLiteUInt8 = 3,
  kLiteInt8 = 9,
  kLiteFloat16 = 10,
  kLiteInt4 = 18,
};

// TfLiteAllocationType values: constants mapped from the model file, and the runtime's
// writable memory (arena, persistent arena, dynamic).
enum { kLiteMmapRo = 1, kLiteArenaRw = 2, kLiteArenaRwPersistent = 3, kLiteDynamic = 4 };

// BuiltinOperator codes in the schema.
enum { kLiteBuiltinFullyConnected = 9, kLiteBuiltinCustom = 32 };

// TfLiteQuantization.type: per-channel (affine) and block-wise quantization.
enum { kLiteAffineQuantization = 1, kLiteBlockwiseQuantization = 2 };

struct TfLiteIntArray {
  int size;
  int data[];
};

struct TfLiteQuantization {
  int type;
  void* params;  // TfLiteAffineQuantization* or TfLiteBlockwiseQuantization*
};

struct TfLiteFloatArray {
  int size;
  float data[];
};

struct TfLiteAffineQuantization {
  TfLiteFloatArray* scale;
  TfLiteIntArray* zero_point;
  int32_t quantized_dimension;
};

// Block-wise: the scales are another tensor of the subgraph (fp16 [M, K / blocksize] for
// an FC weight [M, K]), blocks of `blocksize` along the last axis.
struct TfLiteBlockwiseQuantization {
  int32_t scale;       // tensor index
  int32_t zero_point;  // tensor index, -1: none (symmetric)
  int32_t blocksize;
  int32_t quantized_dimension;
};

// TfLiteNode.builtin_data of FULLY_CONNECTED.
struct TfLiteFullyConnectedParams {
  int activation;  // TfLiteFusedActivation: 0 = none
  int weights_format;
  bool keep_num_dims;
  bool asymmetric_quantize_inputs;
  int quantized_bias_type;
};

struct TfLiteTensor {
  int type;
  void* data;
  TfLiteIntArray* dims;
  float params_scale;       // legacy TfLiteQuantizationParams {scale,
  int32_t params_zero_point;  //                                 zero_point}
  int allocation_type;
  size_t bytes;
  const void* allocation;
  const char* name;
  void* delegate;
  int buffer_handle;
  bool data_is_stale;
  bool is_variable;
  TfLiteQuantization quantization;
  void* sparsity;
  const TfLiteIntArray* dims_signature;
};

struct TfLiteNode {
  TfLiteIntArray* inputs;
  TfLiteIntArray* outputs;
  TfLiteIntArray* intermediates;
  TfLiteIntArray* temporaries;
  void* user_data;
  void* builtin_data;
  const void* custom_initial_data;
  int custom_initial_data_size;
  void* delegate;
  bool might_have_side_effect;
};

struct TfLiteContext;
struct TfLiteDelegate;

// Passed BY VALUE to ReplaceNodeSubsetsWithDelegateKernels: every field must be
// declared and zeroed, or the runtime reads garbage past our struct.
struct TfLiteRegistration {
  void* (*init)(TfLiteContext*, const char* buffer, size_t length);
  void (*free)(TfLiteContext*, void* buffer);
  TfLiteStatus (*prepare)(TfLiteContext*, TfLiteNode*);
  TfLiteStatus (*invoke)(TfLiteContext*, TfLiteNode*);
  const char* (*profiling_string)(const TfLiteContext*, const TfLiteNode*);
  int32_t builtin_code;
  const char* custom_name;
  int version;
  void* registration_external;
  void* (*async_kernel)(TfLiteContext*, TfLiteNode*);
  uint64_t inplace_operator;
};

struct TfLiteContext {
  size_t tensors_size;
  TfLiteStatus (*GetExecutionPlan)(TfLiteContext*, TfLiteIntArray** plan);
  TfLiteTensor* tensors;
  void* impl_;
  // Takes ownership of new_size, which must come from malloc.
  TfLiteStatus (*ResizeTensor)(TfLiteContext*, TfLiteTensor*,
                               TfLiteIntArray* new_size);
  void (*ReportError)(TfLiteContext*, const char* msg, ...);
  TfLiteStatus (*AddTensors)(TfLiteContext*, int n, int* first_new);
  TfLiteStatus (*GetNodeAndRegistration)(TfLiteContext*, int node_index,
                                         TfLiteNode** node,
                                         TfLiteRegistration** reg);
  TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(
      TfLiteContext*, TfLiteRegistration reg,
      const TfLiteIntArray* nodes_to_replace, TfLiteDelegate* delegate);
  int recommended_num_threads;
  // More fields follow in the runtime; we never read them.
};

// What init() receives as `buffer` for a delegate kernel.
struct TfLiteDelegateParams {
  TfLiteDelegate* delegate;
  TfLiteIntArray* nodes_to_replace;
  TfLiteIntArray* input_tensors;
  TfLiteIntArray* output_tensors;
};

enum { kLiteDelegateFlagsAllowDynamicTensors = 1 };

struct TfLiteDelegate {
  void* data_;
  TfLiteStatus (*Prepare)(TfLiteContext*, TfLiteDelegate*);
  void* CopyFromBufferHandle;
  void* CopyToBufferHandle;
  void* FreeBufferHandle;
  int64_t flags;
  void* opaque_delegate_builder;  // must stay NULL: Prepare is used instead
};

}  // extern "C"

static_assert(sizeof(void*) == 8, "ABI declarations assume an LP64 target");
static_assert(offsetof(TfLiteTensor, data) == 8, "TfLiteTensor.data");
static_assert(offsetof(TfLiteTensor, dims) == 16, "TfLiteTensor.dims");
static_assert(offsetof(TfLiteTensor, allocation_type) == 32, "alloc type");
static_assert(offsetof(TfLiteTensor, bytes) == 40, "TfLiteTensor.bytes");
static_assert(offsetof(TfLiteTensor, name) == 56, "TfLiteTensor.name");
static_assert(offsetof(TfLiteTensor, quantization) == 80, "quantization");
static_assert(sizeof(TfLiteTensor) == 112, "TfLiteTensor size");
static_assert(offsetof(TfLiteNode, user_data) == 32, "TfLiteNode.user_data");
static_assert(offsetof(TfLiteNode, builtin_data) == 40, "builtin_data");
static_assert(offsetof(TfLiteNode, custom_initial_data_size) == 56, "opts");
static_assert(sizeof(TfLiteNode) == 80, "TfLiteNode size");
static_assert(offsetof(TfLiteRegistration, builtin_code) == 40, "code");
static_assert(offsetof(TfLiteRegistration, custom_name) == 48, "name");
static_assert(offsetof(TfLiteRegistration, inplace_operator) == 80, "inplace");
static_assert(sizeof(TfLiteRegistration) == 88, "TfLiteRegistration size");
static_assert(offsetof(TfLiteContext, tensors) == 16, "ctx.tensors");
static_assert(offsetof(TfLiteContext, ResizeTensor) == 32, "ctx.Resize");
static_assert(offsetof(TfLiteContext, ReportError) == 40, "ctx.ReportError");
static_assert(offsetof(TfLiteContext, GetNodeAndRegistration) == 56, "ctx.GNR");
static_assert(offsetof(TfLiteContext, ReplaceNodeSubsetsWithDelegateKernels) ==
                  64, "ctx.Replace");
static_assert(offsetof(TfLiteContext, recommended_num_threads) == 72, "thr");
static_assert(sizeof(TfLiteDelegateParams) == 32, "TfLiteDelegateParams");
static_assert(offsetof(TfLiteFloatArray, data) == 4, "TfLiteFloatArray.data");
static_assert(offsetof(TfLiteAffineQuantization, quantized_dimension) == 16, "affine.dim");
static_assert(sizeof(TfLiteBlockwiseQuantization) == 16, "TfLiteBlockwiseQuantization");
static_assert(sizeof(TfLiteFullyConnectedParams) == 16, "TfLiteFullyConnectedParams");
static_assert(offsetof(TfLiteDelegate, flags) == 40, "delegate.flags");
static_assert(sizeof(TfLiteDelegate) == 56, "TfLiteDelegate size");

// The custom ops' flexbuffer options (custom_options), parsed into the kernels' configs.
// Apart from the op glue so the options fuzzer (fuzz/options_fuzzer.cc) links them alone.
#pragma once

#include <cstddef>
#include <string>

#include "kernels/attention.h"
#include "kernels/moe.h"

namespace mm {

// MobileMoeBlock (README.md, "The op contract"): false with a reason on anything else.
bool ParseMoeOptions(const void* data, int size, MoeConfig* c, std::string* why);
// MobileKvAttention: num_heads, num_kv_heads, head_dim, window, scale.
bool ParseAttentionOptions(const void* data, int size, KvAttentionConfig* c, std::string* why);

}  // namespace mm

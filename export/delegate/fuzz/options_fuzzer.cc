// libFuzzer target: the custom ops' option parsers (ops/options.cc, over flexbuf.h) on
// arbitrary bytes, as a hostile .tflite's custom_options would hand them over. Built with
// clang's -fsanitize=fuzzer,address,undefined (`make -C export/delegate options_fuzzer`);
// tests/test_delegate_hostile.py runs it briefly, README.md ("Hostile models") has the long run.
#include <cstddef>
#include <cstdint>
#include <string>

#include "flexbuf.h"
#include "ops/options.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (1u << 20)) return 0;  // custom_options_size is an int; keep runs fast
  std::string why;
  mm::MoeConfig moe;
  mm::ParseMoeOptions(data, (int)size, &moe, &why);
  mm::KvAttentionConfig attn;
  mm::ParseAttentionOptions(data, (int)size, &attn, &why);
  // Keys the parsers never ask for: the first bytes of the input, as a key.
  flexbuf::MapReader m(data, size);
  flexbuf::Value v;
  std::string key((const char*)data, size < 8 ? size : 8);
  m.Find(key.c_str(), &v);
  return 0;
}

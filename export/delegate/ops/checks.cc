#include "ops/checks.h"

#include <cstdio>

namespace mm {

bool MulOk(size_t a, long long b, size_t* out) {
  if (b < 0 || a > kMaxElements || (size_t)b > kMaxElements) return false;
  const unsigned long long p = (unsigned long long)a * (unsigned long long)b;  // < 2^62
  if (p > kMaxElements) return false;
  *out = (size_t)p;
  return true;
}

bool NumElements(const int* dims, size_t n, size_t* out) {
  size_t p = 1;
  for (size_t i = 0; i < n; ++i)
    if (!MulOk(p, dims[i], &p)) return false;
  *out = p;
  return true;
}

bool NumElements(const std::vector<int>& dims, size_t* out) {
  return NumElements(dims.data(), dims.size(), out);
}

bool NumElements(std::initializer_list<int> dims, size_t* out) {
  return NumElements(dims.begin(), dims.size(), out);
}

std::string Dims(const TfLiteIntArray* d) {
  if (!d) return "null";
  if (d->size < 0) return "[size " + std::to_string(d->size) + "]";
  return Dims(std::vector<int>(d->data, d->data + d->size));
}

std::string Dims(const std::vector<int>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += (char)c;
    } else {
      char b[8];
      snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    }
  }
  return out;
}

bool ShapeIs(const TfLiteTensor& t, std::initializer_list<int> want) {
  if (!t.dims || t.dims->size != (int)want.size()) return false;
  int i = 0;
  for (int w : want) if (t.dims->data[i++] != w) return false;
  return true;
}

bool IndexOk(const TfLiteContext* ctx, int index, bool absent_ok) {
  return (absent_ok && index == -1) || (index >= 0 && (size_t)index < ctx->tensors_size);
}

bool CheckF32(const TfLiteTensor& t, std::initializer_list<int> want, const char* name,
              std::string* why) {
  size_t n = 0;
  const bool sized = NumElements(want, &n);
  if (!sized || t.type != kLiteFloat32 || !ShapeIs(t, want) || t.bytes != n * 4) {
    std::string s = "[";
    for (int w : want) s += (s.size() > 1 ? "," : "") + std::to_string(w);
    *why = std::string(name) + ": expected float32 " + s + "], got type " +
           std::to_string(t.type) + " shape " + Dims(t.dims);
    if (!sized) *why += " (too many elements)";
    return false;
  }
  return true;
}

bool CheckQ4(const TfLiteTensor& t, int lead, int rows, int K, const char* name,
             std::string* why) {
  const bool bytes = t.type == kLiteUInt8 || t.type == kLiteInt8;
  const int last = bytes ? K / 2 : K;
  const bool shape = lead > 0 ? ShapeIs(t, {lead, rows, last}) : ShapeIs(t, {rows, last});
  size_t n = 0;
  const bool sized = NumElements({std::max(lead, 1), rows, K / 2}, &n);
  if ((!bytes && t.type != kLiteInt4) || !shape || !sized || t.bytes != n) {
    *why = std::string(name) + ": expected packed int4 " +
           (lead > 0 ? "[" + std::to_string(lead) + "," : "[") + std::to_string(rows) +
           "," + std::to_string(K / 2) + "] bytes (uint8), got type " +
           std::to_string(t.type) + " shape " + Dims(t.dims);
    if (!sized) *why += " (too many elements)";
    return false;
  }
  return true;
}

bool IsConstant(const TfLiteTensor& t) {
  return t.allocation_type == kLiteMmapRo && t.data != nullptr;
}

bool IsWritable(const TfLiteTensor& t) {
  return t.allocation_type == kLiteArenaRw || t.allocation_type == kLiteArenaRwPersistent ||
         t.allocation_type == kLiteDynamic;
}

bool CheckOutput(const TfLiteContext* ctx, const TfLiteNode* node, std::string* why) {
  if (!node->outputs || node->outputs->size != 1) { *why = "expected 1 output"; return false; }
  const int out = node->outputs->data[0];
  if (!IndexOk(ctx, out, false)) { *why = "bad output index"; return false; }
  const TfLiteTensor& y = ctx->tensors[out];
  if (y.type != kLiteFloat32) { *why = "output must be float32"; return false; }
  if (!IsWritable(y)) {
    *why = "output is not writable runtime memory (allocation type " +
           std::to_string(y.allocation_type) + ", e.g. a constant of the model)";
    return false;
  }
  for (int i = 0; node->inputs && i < node->inputs->size; ++i)
    if (node->inputs->data[i] == out) { *why = "output is also an input"; return false; }
  return true;
}

}  // namespace mm

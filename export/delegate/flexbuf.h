// A tiny read-only FlexBuffers map reader: just enough to read the scalar and
// string options of a custom op (custom_options is a flexbuffer map). The bytes come
// from the model file, so from an attacker: every offset, count and length is checked
// against the buffer without arithmetic that can wrap (compare `x > size - loc`, never
// `loc + x > size`), so malformed options give "not a map" or "missing key", never a
// read outside the buffer. Fuzzed by fuzz/options_fuzzer.cc.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace flexbuf {

// FlexBuffers value types we understand (see the FlexBuffers format spec).
enum Type { kNull = 0, kInt = 1, kUInt = 2, kFloat = 3, kKey = 4, kString = 5,
            kIndirectInt = 6, kIndirectUInt = 7, kIndirectFloat = 8, kMap = 9,
            kBool = 26 };

struct Value {
  int type = kNull;
  int64_t i = 0;
  double f = 0;
  std::string s;
};

class MapReader {
 public:
  MapReader(const uint8_t* buf, size_t size) : buf_(buf), size_(size) {
    // The buffer ends with [root value][root packed type][root byte width].
    if (size < 3) return;
    int root_width = buf[size - 1];
    int packed = buf[size - 2];
    if (!ValidWidth(root_width) || size < 2 + (size_t)root_width) return;
    size_t root_loc = size - 2 - root_width;
    if ((packed >> 2) != kMap) return;
    uint64_t off;
    if (!ReadU(root_loc, root_width, &off) || off > root_loc) return;
    map_ = root_loc - off;      // first value of the map
    width_ = 1 << (packed & 3);  // byte width of the map's elements
    uint64_t n, keys_off, keys_width;
    if (map_ < 3 * (size_t)width_) return;
    if (!ReadU(map_ - width_, width_, &n) ||
        !ReadU(map_ - 2 * width_, width_, &keys_width) ||
        !ReadU(map_ - 3 * width_, width_, &keys_off))
      return;
    size_t keys_field = map_ - 3 * width_;
    if (keys_off > keys_field || keys_width > 8 || !ValidWidth((int)keys_width)) return;
    keys_ = keys_field - keys_off;
    keys_width_ = (int)keys_width;
    // Values, then one packed type byte per value (map_ < size_); the n key offsets.
    if (n > (size_ - map_) / (size_t)(width_ + 1) ||
        n > (size_ - keys_) / (size_t)keys_width_)
      return;
    n_ = (size_t)n;
    ok_ = true;
  }

  bool ok() const { return ok_; }

  // Looks `key` up; returns false if absent or unreadable.
  bool Find(const char* key, Value* out) const {
    if (!ok_) return false;
    for (size_t i = 0; i < n_; ++i) {
      uint64_t koff;
      size_t kloc = keys_ + i * keys_width_;
      if (!ReadU(kloc, keys_width_, &koff) || koff > kloc) return false;
      size_t kstr = kloc - koff;
      size_t klen = strnlen((const char*)buf_ + kstr, size_ - kstr);
      if (kstr + klen >= size_) return false;
      if (strcmp((const char*)buf_ + kstr, key) != 0) continue;
      return ReadValue(map_ + i * width_, buf_[map_ + n_ * width_ + i], out);
    }
    return false;
  }

 private:
  static bool ValidWidth(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

  bool ReadU(size_t loc, int w, uint64_t* v) const {
    if (loc > size_ || (size_t)w > size_ - loc) return false;
    uint64_t r = 0;
    for (int b = w - 1; b >= 0; --b) r = (r << 8) | buf_[loc + b];  // LE
    *v = r;
    return true;
  }
  bool ReadI(size_t loc, int w, int64_t* v) const {
    uint64_t u = 0;
    if (!ReadU(loc, w, &u)) return false;
    int shift = 64 - 8 * w;  // sign-extend from w bytes
    *v = (int64_t)(u << shift) >> shift;
    return true;
  }
  bool ReadF(size_t loc, int w, double* v) const {
    uint64_t u = 0;
    if (!ReadU(loc, w, &u)) return false;
    if (w == 4) { float f; uint32_t u32 = (uint32_t)u; memcpy(&f, &u32, 4); *v = f; return true; }
    if (w == 8) { memcpy(v, &u, 8); return true; }
    return false;
  }

  bool ReadValue(size_t loc, int packed, Value* out) const {
    int type = packed >> 2;
    int child_width = 1 << (packed & 3);
    out->type = type;
    switch (type) {
      case kInt: return ReadI(loc, width_, &out->i);
      case kBool:
      case kUInt: { uint64_t u = 0; bool ok = ReadU(loc, width_, &u); out->i = (int64_t)u; return ok; }
      case kFloat: return ReadF(loc, width_, &out->f);
      default: break;
    }
    // Everything else is stored behind an offset.
    uint64_t off;
    if (!ReadU(loc, width_, &off) || off > loc) return false;
    size_t child = loc - off;
    switch (type) {
      case kIndirectInt: out->type = kInt; return ReadI(child, child_width, &out->i);
      case kIndirectUInt: {
        uint64_t u = 0; bool ok = ReadU(child, child_width, &u);
        out->type = kUInt; out->i = (int64_t)u; return ok;
      }
      case kIndirectFloat: out->type = kFloat; return ReadF(child, child_width, &out->f);
      case kString: {
        uint64_t len;
        if (child < (size_t)child_width || !ReadU(child - child_width, child_width, &len) ||
            len > size_ - child)
          return false;
        out->s.assign((const char*)buf_ + child, (size_t)len);
        return true;
      }
      default: return false;
    }
  }

  const uint8_t* buf_;
  size_t size_;
  bool ok_ = false;
  size_t map_ = 0, keys_ = 0, n_ = 0;
  int width_ = 1, keys_width_ = 1;
};

}  // namespace flexbuf

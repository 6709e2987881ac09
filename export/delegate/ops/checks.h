// Tensor checks shared by the ops. A hostile .tflite chooses every shape, type, byte
// count, index and allocation below, so each check is written to be safe on any of them:
// products are overflow-checked, indices bounds-checked, and a "why" always says which
// tensor failed and how.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <vector>

#include "abi.h"

namespace mm {

// The most elements (and bytes) one tensor may have: the kernels index with int.
constexpr size_t kMaxElements = (size_t)1 << 31;

// a * b, false when it exceeds kMaxElements (or either is negative).
bool MulOk(size_t a, long long b, size_t* out);
// The product of dims, false when a dim is negative or the product exceeds kMaxElements.
bool NumElements(const int* dims, size_t n, size_t* out);
bool NumElements(const std::vector<int>& dims, size_t* out);
bool NumElements(std::initializer_list<int> dims, size_t* out);

std::string Dims(const TfLiteIntArray* d);
std::string Dims(const std::vector<int>& d);
// Bytes from the model (option strings, names), printable: others as \xNN.
std::string Printable(const std::string& s);

bool ShapeIs(const TfLiteTensor& t, std::initializer_list<int> want);
// Index of a node's input/output: in range (or -1 where `absent_ok`).
bool IndexOk(const TfLiteContext* ctx, int index, bool absent_ok);
// Float32 with exactly this shape and byte count.
bool CheckF32(const TfLiteTensor& t, std::initializer_list<int> want, const char* name,
              std::string* why);
// An INT4 weight: uint8/int8 bytes [lead,] rows, K/2] or INT4 [lead,] rows, K] (lead 0: none).
bool CheckQ4(const TfLiteTensor& t, int lead, int rows, int K, const char* name,
             std::string* why);
// A constant the kernels may read in place on every call: mapped from the model, with data.
bool IsConstant(const TfLiteTensor& t);
// An output the delegate may write: runtime memory, never a constant of the model.
bool IsWritable(const TfLiteTensor& t);
// The node's one output: in range, float32, writable, and not one of its inputs.
bool CheckOutput(const TfLiteContext* ctx, const TfLiteNode* node, std::string* why);

}  // namespace mm

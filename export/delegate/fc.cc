#include "fc.h"

#include <algorithm>

namespace mm {

void Int4Fc::Run(const Q4Matrix& w_in, const float* x, int N, float* y, ThreadPool* pool,
                 ActMode mode, Isa isa) {
  if (N <= 0) return;
  Q4Matrix w = w_in;
  const Isa a_isa = SimdShapeOk(w.K, w.G) ? isa : Isa::kScalar;
  // Output rows per work item: decode streams the weights, so a few long runs
  // per thread (the prefetchers follow one stream); a batch takes 256-row tiles.
  const int threads = pool->size();
  const int rows = N < 8 ? std::max(256, (w.M / (2 * threads) + 15) / 16 * 16) : 256;
  const int items = (w.M + rows - 1) / rows;
  if (mode == ActMode::kI8 && wsum_key_ != w.q) {
    // sum_k W[m,k] = W @ ones (fp32 kernels), once per weight tensor.
    wsum_.assign(w.M, 0.f);
    ones_.Resize(1, w.K, ActMode::kF32, a_isa);
    const std::vector<float> one(w.K, 1.f);
    ones_.PrepareRows(one.data(), w.K, nullptr, 0, 1);
    pool->Run(items, [&](int i, int) {
      const int m0 = i * rows, m1 = std::min(w.M, m0 + rows);
      Q4Gemm(w, m0, m1, ones_, wsum_.data() + m0, w.M);
    });
    wsum_key_ = w.q;
  }
  w.wsum = mode == ActMode::kI8 ? wsum_.data() : nullptr;
  acts_.Resize(N, w.K, mode, a_isa);
  acts_.PrepareRows(x, w.K, nullptr, 0, N);
  pool->Run(items, [&](int i, int) {
    const int m0 = i * rows, m1 = std::min(w.M, m0 + rows);
    Q4Gemm(w, m0, m1, acts_, y + m0, w.M);
  });
}

}  // namespace mm

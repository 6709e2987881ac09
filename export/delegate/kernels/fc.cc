#include "fc.h"

#include <algorithm>

namespace mm {

void Int4Fc::Run(const FcWeights& fw, const float* x, int N, float* y, ThreadPool* pool,
                 ActMode mode, Isa isa) {
  if (N <= 0) return;
  Q4Matrix w = fw.w;
  const Isa a_isa = SimdShapeOk(w.K, w.G) ? isa : Isa::kScalar;
  // Output rows per work item: decode streams the weights, so up to two long runs per
  // thread (the prefetchers follow one stream), split evenly so both threads stay busy
  // to the end (768 rows in 256-row runs left one thread a third of the work alone);
  // at least 128 rows (48 KB at K = 768) per hand-off. A batch takes 256-row tiles.
  const int threads = pool->size();
  const int rows = N < 8 ? std::max(128, (w.M / (2 * threads) + 15) / 16 * 16) : 256;
  const int items = (w.M + rows - 1) / rows;
  const bool tile = a_isa != Isa::kScalar && TilesOk(w.M, w.K);
  const bool fresh = key_ != fw.w.q;   // a new weight tensor: once per node (constant)
  key_ = fw.w.q;
  if (fw.s16) {
    if (fresh) {
      scales_.resize((size_t)w.M * (w.K / w.G));
      for (size_t i = 0; i < scales_.size(); ++i) scales_[i] = HalfToFloat(fw.s16[i]);
    }
    w.s = scales_.data();
  }
  if (tile) {
    if (fresh) {
      tiled_.resize((size_t)w.M * (w.K / 2));
      pool->Run((w.M + 4095) / 4096, [&](int i, int) {
        const int m0 = i * 4096, m1 = std::min(w.M, m0 + 4096);
        TileRows(w.q + (size_t)m0 * (w.K / 2), m1 - m0, w.K, tiled_.data() + (size_t)m0 * (w.K / 2));
      });
    }
    w.q = tiled_.data();
    w.tiles = kTileRows;
  }
  if (mode == ActMode::kI8 && fresh) {
    wsum_.assign(w.M, 0.f);
    float* out = wsum_.data();
    WeightRowSums(&w, &out, 1, pool, isa);
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

// Code shared by the SIMD kernel files (AVX-512, AVX2, NEON): the GEMM tile
// loop, and SiLU written once with GCC vector extensions. Each file
// instantiates these with its own widths and compiles them with its own -m
// flags; everything here has internal linkage and no STL, so no SIMD code can
// leak into functions shared with the portable build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mm {
namespace {

constexpr int kQuad = 4;  // tokens per activation quad (kernels.h)

// Where a weight row's 64-byte blocks (128 k's each) lie: the file's row layout
// (rows K/2 bytes apart) or 16-row tiles (kernels.h, Q4Matrix::tiles): a tile
// is [K/128 blocks][16 rows][64 bytes], one sequential stream. `ahead` is the
// software prefetch distance in bytes: the same rows of a later tile in both.
struct WStride {
  size_t row, block, ahead;
};
inline WStride Strides(int ldw, int tiles, int prefetch_rows) {
  const size_t ahead = (size_t)prefetch_rows * ldw;
  return tiles ? WStride{64, 1024, ahead} : WStride{(size_t)ldw, 64, ahead};
}
// Row m's first block (tiles: m's tile must hold the tile kernel's R rows).
inline const uint8_t* RowPtr(const uint8_t* q, int m, int ldw, int tiles) {
  return tiles ? q + (size_t)(m / 16) * 16 * ldw + (size_t)(m % 16) * 64 : q + (size_t)m * ldw;
}

// Fully unrolls the tiles' row / token loops: the accumulators are arrays
// indexed by them, and a loop GCC leaves rolled keeps them on the stack (a
// store and a load per dpbusd pair) instead of in registers.
#define MM_UNROLL _Pragma("GCC unroll 16")

template <int V>
struct Int {
  static constexpr int value = V;
};

template <int R, class Tile>
inline void DispatchTokens(Tile& tile, int nt, int m, int n0) {
  switch (nt) {
    case 1: tile(Int<R>(), Int<1>(), m, n0); break;
    case 2: tile(Int<R>(), Int<2>(), m, n0); break;
    case 3: tile(Int<R>(), Int<3>(), m, n0); break;
    default: tile(Int<R>(), Int<4>(), m, n0); break;
  }
}

// Calls tile(Int<rows>, Int<tokens>, m, n0) over rows [m0, m1) in tiles of R
// rows (single rows at the end) and N tokens in quads (the last one 1..4):
// activations are reused across a tile's rows. Row tiles are the outer loop, so
// a tile's weight rows come from DRAM / L2 once and stay in L1 for all the quads
// (quads outer re-read each work item's rows per quad: ~5-8% slower prefill).
template <int R, class Tile>
inline void ForEachTile(int m0, int m1, int N, Tile tile) {
  int m = m0;
  for (; m + R <= m1; m += R)
    for (int n0 = 0; n0 < N; n0 += kQuad)
      DispatchTokens<R>(tile, N - n0 < kQuad ? N - n0 : kQuad, m, n0);
  for (; m < m1; ++m)
    for (int n0 = 0; n0 < N; n0 += kQuad)
      DispatchTokens<1>(tile, N - n0 < kQuad ? N - n0 : kQuad, m, n0);
}

// Prefetches the first rows of a GEMM call (bytes [0, n) of each of `rows` rows
// ldw apart): the tiles prefetch kPrefetchRows ahead of themselves, so without
// this the first rows of every call (one expert's rows for one work item) would
// wait for DRAM with nothing in flight.
inline void PrefetchHead(const void* p, size_t ldw, int rows, size_t n) {
  const char* c = (const char*)p;
  for (int r = 0; r < rows; ++r)
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(c + r * ldw + i, 0, 3);
}

// The x86 files' GemmI8 / GemmF32 (declared in kernels.cc): their own TileI8,
// TileF32 and ScaleMap over ForEachTile with R-row tiles; channel-wise int8
// (G == K) runs TileI8C (int32 sums over all of K, one convert per row and
// token) over RC-row tiles, after the file's DecodeRowsC (one token: rows it did).
#define MM_DEFINE_X86_GEMMS(R, RC)                                                  \
  void GemmI8(const uint8_t* q, int tiles, const float* s, int K, int G, int m0,   \
              int m1, const int8_t* xq, const int32_t* corr, const int32_t* csum,  \
              const float* xs, int N, float* out, int ldo) {                       \
    const int ldw = K / 2, lds = K / G, nb = K / 128;                              \
    const WStride st = Strides(ldw, tiles, kPrefetchRows);                         \
    const int head = m1 - m0 < kPrefetchRows ? m1 - m0 : kPrefetchRows;            \
    PrefetchHead(RowPtr(q, m0, ldw, tiles), ldw, head, ldw);                       \
    PrefetchHead(s + (size_t)m0 * lds, 0, 1, (size_t)head * lds * 4);              \
    if (G == K) {                                                                  \
      /* one token: the file's own 16-row decode tiles first (or none) */          \
      const int m_done = N == 1 ? DecodeRowsC(q, tiles, ldw, s, nb, xq, csum, xs, m0, m1, out) \
                                : m0;                                              \
      ForEachTile<RC>(m_done, m1, N, [&](auto r, auto nt, int m, int n0) {         \
        TileI8C<decltype(r)::value, decltype(nt)::value>(                          \
            RowPtr(q, m, ldw, tiles), st, s + m, nb, xq + (size_t)n0 * K, csum + n0, \
            xs + n0, out + (size_t)n0 * ldo + (m - m0), ldo);                      \
      });                                                                          \
      return;                                                                      \
    }                                                                              \
    const ScaleMap sm(G);                                                          \
    ForEachTile<R>(m0, m1, N, [&](auto r, auto nt, int m, int n0) {                \
      TileI8<decltype(r)::value, decltype(nt)::value>(                             \
          RowPtr(q, m, ldw, tiles), st, s + (size_t)m * lds, lds, nb, sm,          \
          xq + (size_t)n0 * K, corr + (size_t)n0 * (K / 8), xs + n0,               \
          out + (size_t)n0 * ldo + (m - m0), ldo);                                 \
    });                                                                            \
  }                                                                                \
  void GemmF32(const uint8_t* q, int tiles, const float* s, int K, int G, int m0,  \
               int m1, const float* xf, int N, float* out, int ldo) {              \
    const int ldw = K / 2, lds = K / G, nb = K / 128;                              \
    const WStride st = Strides(ldw, tiles, kPrefetchRows);                         \
    ForEachTile<R>(m0, m1, N, [&](auto r, auto nt, int m, int n0) {                \
      TileF32<decltype(r)::value, decltype(nt)::value>(                            \
          RowPtr(q, m, ldw, tiles), st, s + (size_t)m * lds, lds, nb, G,           \
          xf + (size_t)n0 * K, out + (size_t)n0 * ldo + (m - m0), ldo);            \
    });                                                                            \
  }

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

// Output-axis groups (kernels.h Q4Matrix::out_groups; the released experts [in, out]).
// Each input row k adds x[n,k] * s[k,g] * q[k, cols] to NT tokens' accumulators over CB
// bytes (2 * CB columns) of the row: the weights are unpacked once per row chunk and reused
// across tokens. One token: the scale folds into its coefficient x * s (one multiply per
// group, not per weight); more: into the weights (one multiply per vector, shared by the
// tokens, whose x then needs only a broadcast). Accumulators hold even (low nibble) and odd
// (high nibble) columns apart, interleaved once at the end. W-byte vectors never straddle
// two groups (the caller's columns start at a multiple of 2W; (G/2) % W == 0).
constexpr int kOutPrefetchRows = 16;  // software prefetch distance, in input rows (8 and 32 were slower)

// U (each SIMD file's): W floats per vector, U::Unpack(p, lo, hi): the W bytes at p as
// fp32 vectors of their signed low and high nibbles.
template <class U, int CB, int NT>
inline void TileOut(const uint8_t* q, size_t ldw, const float* s, size_t lds, int j0, int G2,
                    int K, const float* x, int ldx, float* out, int ldo) {
  constexpr int W = U::W;
  using F = typename Vec<W>::F;
  constexpr int NV = CB / W;
  F lo[NT][NV], hi[NT][NV];
  MM_UNROLL for (int n = 0; n < NT; ++n)
    MM_UNROLL for (int v = 0; v < NV; ++v) lo[n][v] = hi[n][v] = F{};
  int sg[NV];  // each vector's group, from the row's first scale
  for (int v = 0; v < NV; ++v) sg[v] = (j0 + v * W) / G2;
  for (int k = 0; k < K; ++k) {
    const uint8_t* row = q + (size_t)k * ldw + j0;
    __builtin_prefetch(row + kOutPrefetchRows * ldw, 0, 3);
    __builtin_prefetch(row + kOutPrefetchRows * ldw + CB - 1, 0, 3);  // a chunk may span two lines
    const float* sr = s + (size_t)k * lds;
    F wl[NV], wh[NV];
    MM_UNROLL for (int v = 0; v < NV; ++v) U::Unpack(row + v * W, wl[v], wh[v]);
    if constexpr (NT == 1) {
      const float xk = x[k];
      MM_UNROLL for (int v = 0; v < NV; ++v) {
        const F c = F{} + xk * sr[sg[v]];
        lo[0][v] += c * wl[v];
        hi[0][v] += c * wh[v];
      }
    } else {
      MM_UNROLL for (int v = 0; v < NV; ++v) {
        const F sc = F{} + sr[sg[v]];
        wl[v] *= sc;
        wh[v] *= sc;
      }
      MM_UNROLL for (int n = 0; n < NT; ++n) {
        const F xn = F{} + x[(size_t)n * ldx + k];
        MM_UNROLL for (int v = 0; v < NV; ++v) {
          lo[n][v] += xn * wl[v];
          hi[n][v] += xn * wh[v];
        }
      }
    }
  }
  MM_UNROLL for (int n = 0; n < NT; ++n)
    MM_UNROLL for (int v = 0; v < NV; ++v) {
      float l[W], h[W];
      std::memcpy(l, &lo[n][v], sizeof(l));
      std::memcpy(h, &hi[n][v], sizeof(h));
      float* o = out + (size_t)n * ldo + 2 * v * W;
      for (int j = 0; j < W; ++j) {
        o[2 * j] = l[j];
        o[2 * j + 1] = h[j];
      }
    }
}

// TileOut for nt tokens (1 <= nt <= NT), as a compile-time count.
template <class U, int CB, int NT>
inline void TileOutTokens(int nt, const uint8_t* q, size_t ldw, const float* s, size_t lds,
                          int j0, int G2, int K, const float* x, int ldx, float* out, int ldo) {
  if constexpr (NT > 1) {
    if (nt < NT)
      return TileOutTokens<U, CB, NT - 1>(nt, q, ldw, s, lds, j0, G2, K, x, ldx, out, ldo);
  }
  TileOut<U, CB, NT>(q, ldw, s, lds, j0, G2, K, x, ldx, out, ldo);
}

// Columns [m0, m1) (multiples of 2W) of q [K, M/2], s [K, M/G] for N tokens x (rows ldx apart):
// one token in chunks of CB1 bytes, more in chunks of CBN bytes x NTN tokens, the rest
// one vector (2W columns) at a time.
template <class U, int CB1, int CBN, int NTN>
inline void GemmOutVec(const uint8_t* q, const float* s, int K, int M, int G, int m0, int m1,
                       const float* x, int ldx, int N, float* out, int ldo) {
  constexpr int W = U::W;
  const size_t ldw = M / 2, lds = M / G;
  const int G2 = G / 2, j1 = m1 / 2;
  auto tokens = [&](auto cb, int j) {
    constexpr int C = decltype(cb)::value;
    for (int n0 = 0; n0 < N; n0 += NTN)
      TileOutTokens<U, C, NTN>(N - n0 < NTN ? N - n0 : NTN, q, ldw, s, lds, j, G2, K,
                               x + (size_t)n0 * ldx, ldx, out + (size_t)n0 * ldo + (2 * j - m0), ldo);
  };
  int j = m0 / 2;
  if (N == 1) {
    for (; j + CB1 <= j1; j += CB1)
      TileOut<U, CB1, 1>(q, ldw, s, lds, j, G2, K, x, ldx, out + (2 * j - m0), ldo);
  } else {
    for (; j + CBN <= j1; j += CBN) tokens(Int<CBN>(), j);
  }
  for (; j + W <= j1; j += W) tokens(Int<W>(), j);
}

// exp(x) for x <= 0 (SiLU only needs exp(-|g|)): 2^n * p(r), |rel err| ~1e-7.
template <int W>
inline typename Vec<W>::F ExpNeg(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  x = x < -87.0f ? F{} - 87.0f : x;
  const F big = F{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest int
  const F n = (x * 1.44269504088896341f + big) - big;
  F r = x - n * 0.693359375f;  // r = x - n ln2, ln2 split in two for accuracy
  r = r - n * -2.12194440e-4f;
  // exp(r) ~ 1 + r + r^2 * P(r), P's coefficients highest first (Horner)
  static constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  F p = F{} + kP[0];
  for (int i = 1; i < 6; ++i) p = p * r + kP[i];
  p = p * (r * r) + (r + 1.0f);
  // 2^n from the exponent bits; n in [-126, 0]
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &e, sizeof(F));
  return p * scale;
}

// sum a[i] * b[i] (the router's logits), 2W floats at a time.
template <int W>
inline float DotVec(const float* a, const float* b, int n) {
  using F = typename Vec<W>::F;
  F acc0 = {}, acc1 = {}, x, y;
  int i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    std::memcpy(&x, a + i, sizeof(F));
    std::memcpy(&y, b + i, sizeof(F));
    acc0 += x * y;
    std::memcpy(&x, a + i + W, sizeof(F));
    std::memcpy(&y, b + i + W, sizeof(F));
    acc1 += x * y;
  }
  acc0 += acc1;
  float sum = 0.f;
  for (int j = 0; j < W; ++j) sum += acc0[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Sum of a W-lane vector's lanes in lane order: the attention's scores and values keep
// the rounding of a plain loop over the lanes (a halving tree would change the last bits,
// and a greedy decode can flip on them).
template <int W>
inline float HSum(typename Vec<W>::F v) {
  float sum = 0.f;
  for (int j = 0; j < W; ++j) sum += v[j];
  return sum;
}

// Rows [i, n) of DotRowsVec for NR query rows: each row is loaded once for all NR, whose
// sums stay in registers. The row kDotPrefetchRows ahead is prefetched: the values' rows are
// one head dim over the cache slots, P floats apart, each a new stream.
constexpr int kDotPrefetchRows = 8;
template <int W, int NR>
inline void DotRowsNR(const float* q, int ldq, const float* rows, int n, int ldr, int len,
                      float scale, float* out, int ldo) {
  using F = typename Vec<W>::F;
  for (int i = 0; i < n; ++i) {
    const float* row = rows + (size_t)i * ldr;
    if (i + kDotPrefetchRows < n)
      for (int k = 0; k < len; k += 16) __builtin_prefetch(row + (size_t)kDotPrefetchRows * ldr + k);
    F acc[NR] = {};
    int k = 0;
    for (; k + W <= len; k += W) {
      F x;
      std::memcpy(&x, row + k, sizeof(F));
      MM_UNROLL for (int r = 0; r < NR; ++r) {
        F y;
        std::memcpy(&y, q + (size_t)r * ldq + k, sizeof(F));
        acc[r] += x * y;
      }
    }
    MM_UNROLL for (int r = 0; r < NR; ++r) {
      float sum = HSum<W>(acc[r]);
      for (int kk = k; kk < len; ++kk) sum += q[(size_t)r * ldq + kk] * row[kk];
      out[(size_t)r * ldo + i] = sum * scale;
    }
  }
}

// Calls f(Int<NR>(), r) for query rows r = 0, 4, 8, ... < rep, NR = min(4, rep - r): the
// attention's kernels keep up to 4 query rows of a KV group in registers per pass.
template <class F>
inline void ByFourRows(int rep, F f) {
  for (int r = 0; r < rep; r += 4) {
    switch (rep - r) {
      case 1: f(Int<1>(), r); break;
      case 2: f(Int<2>(), r); break;
      case 3: f(Int<3>(), r); break;
      default: f(Int<4>(), r); break;
    }
  }
}

// out[r * ldo + i] = scale * sum_k q[r * ldq + k] * rows[i * ldr + k] for r < rep, i < n:
// the attention's scores (rows = keys) and values (rows = one head dim over the slots),
// up to 4 query rows per pass over the rows.
template <int W>
inline void DotRowsVec(const float* q, int rep, int ldq, const float* rows, int n, int ldr,
                       int len, float scale, float* out, int ldo) {
  ByFourRows(rep, [&](auto nr, int r) {
    DotRowsNR<W, decltype(nr)::value>(q + (size_t)r * ldq, ldq, rows, n, ldr, len, scale,
                                      out + (size_t)r * ldo, ldo);
  });
}

// Columns [i, i + C * W) of DotColsVec for NR rows: the rows' coefficients are broadcast,
// C * NR accumulators, no horizontal sums (each output is one lane, summed in k order).
template <int W, int NR, int C>
inline void DotColsNR(const float* q, int ldq, const float* cols, int ldc, int i, int len,
                      float scale, float* out, int ldo) {
  using F = typename Vec<W>::F;
  F acc[NR][C] = {};
  for (int k = 0; k < len; ++k) {
    const float* ck = cols + (size_t)k * ldc + i;
    F c[C];
    MM_UNROLL for (int j = 0; j < C; ++j) std::memcpy(&c[j], ck + j * W, sizeof(F));
    MM_UNROLL for (int r = 0; r < NR; ++r) {
      const float a = q[(size_t)r * ldq + k];
      MM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] += a * c[j];
    }
  }
  MM_UNROLL for (int r = 0; r < NR; ++r)
    MM_UNROLL for (int j = 0; j < C; ++j) {
      const F v = acc[r][j] * scale;
      std::memcpy(out + (size_t)r * ldo + i + j * W, &v, sizeof(F));
    }
}

template <int W, int NR>
inline void DotColsRows(const float* q, int ldq, const float* cols, int ldc, int n, int len,
                        float scale, float* out, int ldo) {
  int i = 0;
  for (; i + 2 * W <= n; i += 2 * W) DotColsNR<W, NR, 2>(q, ldq, cols, ldc, i, len, scale, out, ldo);
  for (; i + W <= n; i += W) DotColsNR<W, NR, 1>(q, ldq, cols, ldc, i, len, scale, out, ldo);
  if (i < n) {   // the last n - i columns: a whole vector (cols readable that far), kept in part
    float tail[NR * W];
    DotColsNR<W, NR, 1>(q, ldq, cols + i, ldc, 0, len, scale, tail, W);
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < n - i; ++j) out[(size_t)r * ldo + i + j] = tail[r * W + j];
  }
}

// out[r * ldo + i] = scale * sum_k q[r * ldq + k] * cols[k * ldc + i] for r < rep, i < n: a
// prefill chunk's attention scores against keys stored as columns, and its values' weighted
// sums (value rows as columns of head dims), up to 4 rows per pass over the columns. Each
// row of cols must be readable up to n rounded up to W (the last vector is read whole).
template <int W>
inline void DotColsVec(const float* q, int rep, int ldq, const float* cols, int ldc, int n,
                       int len, float scale, float* out, int ldo) {
  ByFourRows(rep, [&](auto nr, int r) {
    DotColsRows<W, decltype(nr)::value>(q + (size_t)r * ldq, ldq, cols, ldc, n, len, scale,
                                        out + (size_t)r * ldo, ldo);
  });
}

// s[i] = exp(s[i] - max(s)) / sum, W at a time (ExpNeg: |rel err| ~1e-7 against std::exp).
template <int W>
inline void SoftmaxVec(float* s, int n) {
  using F = typename Vec<W>::F;
  float mx = s[0];
  for (int i = 1; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
  F acc = {};
  int i = 0;
  for (; i + W <= n; i += W) {
    F x;
    std::memcpy(&x, s + i, sizeof(F));
    x = ExpNeg<W>(x - mx);
    acc += x;
    std::memcpy(s + i, &x, sizeof(F));
  }
  float sum = 0.f;
  for (int j = 0; j < W; ++j) sum += acc[j];
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  const float inv = 1.f / sum;
  for (i = 0; i < n; ++i) s[i] *= inv;
}

// h[i] = silu(g[i]) * u[i], W floats at a time.
template <int W>
inline void SiluMulVec(const float* g, const float* u, float* h, int n) {
  using F = typename Vec<W>::F;
  int i = 0;
  for (; i + W <= n; i += W) {
    F x, up;
    std::memcpy(&x, g + i, sizeof(F));
    std::memcpy(&up, u + i, sizeof(F));
    // sigmoid(x) = 1/(1+e^-x) for x>=0, e^x/(1+e^x) for x<0: never overflows
    const F e = ExpNeg<W>(x < 0 ? x : -x);
    const F inv = 1.0f / (1.0f + e);
    const F sig = x < 0 ? e * inv : inv;
    const F y = x * sig * up;
    std::memcpy(h + i, &y, sizeof(F));
  }
  for (; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace
}  // namespace mm

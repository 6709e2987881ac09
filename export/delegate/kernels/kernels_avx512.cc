// AVX-512 (+VNNI) kernels. This file alone is compiled with -mavx512*; it uses
// only raw pointers (no STL), so no AVX-512 code leaks into inline functions
// shared with the portable build. Called only after a runtime CPU check.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd_shared.h"

namespace mm {
namespace avx512 {

// Scales for the 16 int32 lanes of one 128-k block. Lane j of a dpbusd on the
// [even|odd] layout covers k = 8j .. 8j+7, so it belongs to group (8j)/G; the
// lane -> group index vector and load mask are computed once per call.
struct ScaleMap {
  __m512i idx;
  __mmask16 mask;
  int G;
  explicit ScaleMap(int g) : G(g) {
    alignas(64) int32_t lanes[16];
    for (int j = 0; j < 16; ++j) lanes[j] = g >= 128 ? 0 : (8 * j) / g;
    idx = _mm512_load_si512(lanes);
    const int n = g >= 128 ? 1 : 128 / g;  // groups per block: 4 for G=32
    mask = (__mmask16)((1u << n) - 1);
  }
  inline __m512 At(const float* s_row, int b) const {
    const __m512 v = _mm512_maskz_loadu_ps(mask, s_row + (b * 128) / G);
    return _mm512_permutexvar_ps(idx, v);
  }
};

static inline float Hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Horizontal sums of 16 vectors at once: lane i of the result = sum of v[i]'s
// lanes (45 shuffles/adds instead of 16 separate reductions of ~9 each; used by
// the block-32 4x4 tile, ~6% of a T=128 block single-threaded. The same for
// the channel-wise int32 tile measured slower, so that one reduces per output.)
static inline __m512 Reduce16(const __m512* v) {
  __m512 u[4];
  for (int q = 0; q < 4; ++q) {
    __m512 p[2];
    for (int h = 0; h < 2; ++h) {  // 32-bit interleave: [a b a b] partials per 128-bit chunk
      const __m512 a = v[4 * q + 2 * h], b = v[4 * q + 2 * h + 1];
      p[h] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // 64-bit interleave: chunk k = [sum_k v0, sum_k v1, sum_k v2, sum_k v3]
    const __m512d a = _mm512_castps_pd(p[0]), b = _mm512_castps_pd(p[1]);
    u[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 w[2];
  for (int h = 0; h < 2; ++h)  // chunks (0+1, 2+3) of u[2h] and u[2h+1]
    w[h] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * h], u[2 * h + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[n * ldo + r] = v[4n + r] (a 4x4 tile's outputs, token-major lanes).
static inline void Store4x4(__m512 v, float* out, int ldo) {
  _mm_storeu_ps(out, _mm512_castps512_ps128(v));
  _mm_storeu_ps(out + ldo, _mm512_extractf32x4_ps(v, 1));
  _mm_storeu_ps(out + 2 * ldo, _mm512_extractf32x4_ps(v, 2));
  _mm_storeu_ps(out + 3 * ldo, _mm512_extractf32x4_ps(v, 3));
}

// Activation tiles are "quad-interleaved": for each group of 4 tokens the
// layout is [block][4 tokens][128 k's] (kQuad = 4), so the tile needs a single pointer.
#ifndef MM_PF_ROWS
#define MM_PF_ROWS 16
#endif
constexpr int kPrefetchRows = MM_PF_ROWS;  // software prefetch distance, in weight rows

// Int8 activations: R weight rows x NT tokens (NT <= 4), whole K.
// Weights: (nibble ^ 8) = q + 8 in [0, 15] is the unsigned operand of dpbusd;
// corr holds -8 * sum(x) per lane so the int32 result is exactly sum(q * x).
template <int R, int NT>
static void TileI8(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb,
                   const ScaleMap& sm, const int8_t* xq, const int32_t* corr,
                   const float* xs, float* out, int ldo) {
  __m512 acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm512_setzero_ps();
  const __m512i lo_mask = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8((char)0x88);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    const int32_t* cb = corr + (size_t)b * kQuad * 16;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      // Rows 16 ahead (four 4-row tiles): weights stream from DRAM and the
      // hardware prefetcher alone leaves the VNNI units waiting.
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      if (b == 0) _mm_prefetch((const char*)(ws + (size_t)(r + kPrefetchRows) * lds), _MM_HINT_T0);
      __m512i v = _mm512_loadu_si512(wrow);
      v = _mm512_xor_si512(v, flip);
      const __m512i lo = _mm512_and_si512(v, lo_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
      const __m512 sc = sm.At(ws + (size_t)r * lds, b);
      MM_UNROLL
      for (int n = 0; n < NT; ++n) {
        __m512i t = _mm512_loadu_si512(cb + n * 16);
        t = _mm512_dpbusd_epi32(t, lo, _mm512_loadu_si512(xb + n * 128));
        t = _mm512_dpbusd_epi32(t, hi, _mm512_loadu_si512(xb + n * 128 + 64));
        acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[r][n]);
      }
    }
  }
  if constexpr (R == 4 && NT == 4) {
    __m512 v[16];
    for (int n = 0; n < 4; ++n)
      for (int r = 0; r < 4; ++r) v[4 * n + r] = acc[r][n];
    const __m512 x4 = _mm512_permutexvar_ps(  // xs[n] in lanes 4n..4n+3
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
        _mm512_castps128_ps512(_mm_loadu_ps(xs)));
    Store4x4(_mm512_mul_ps(Reduce16(v), x4), out, ldo);
    return;
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = xs[n] * Hsum(acc[r][n]);
}

// Channel-wise int8 (G == K, one scale per row): the int32 dot products are
// exact over all of K, so they are summed as integers and converted once per
// row and token; csum[n] = -8 * sum(x_n) removes the +8 of (nibble ^ 8). The
// tokens' activations are loaded once per block for all R rows. With one or
// two tokens each (row, token) gets two accumulators (low / high nibbles) so
// the dpbusd chains stay independent.
template <int R, int NT>
static void TileI8C(const uint8_t* wq, const WStride& st, const float* ws, int nb, const int8_t* xq,
                    const int32_t* csum, const float* xs, float* out, int ldo) {
  constexpr int A = NT <= 2 ? 2 : 1;
  __m512i acc[R][NT][A];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n)
      MM_UNROLL
      for (int a = 0; a < A; ++a) acc[r][n][a] = _mm512_setzero_si512();
  const __m512i lo_mask = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8((char)0x88);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    __m512i xl[NT], xh[NT];
    MM_UNROLL
    for (int n = 0; n < NT; ++n) {
      xl[n] = _mm512_loadu_si512(xb + n * 128);
      xh[n] = _mm512_loadu_si512(xb + n * 128 + 64);
    }
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wrow), flip);
      const __m512i lo = _mm512_and_si512(v, lo_mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
      MM_UNROLL
      for (int n = 0; n < NT; ++n) {
        acc[r][n][0] = _mm512_dpbusd_epi32(acc[r][n][0], lo, xl[n]);
        acc[r][n][A - 1] = _mm512_dpbusd_epi32(acc[r][n][A - 1], hi, xh[n]);
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) {
      __m512i t = acc[r][n][0];
      if (A == 2) t = _mm512_add_epi32(t, acc[r][n][A - 1]);
      out[n * ldo + r] = xs[n] * ws[r] * (float)(_mm512_reduce_add_epi32(t) + csum[n]);
    }
}

// Signed nibble -> int8 lookup, for the fp32 path.
static inline __m512i NibbleLut() {
  return _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1));
}

// Fp32 activations: dequantise 16 weights at a time to fp32 and FMA.
// Requires G % 32 == 0 so each 16-lane chunk (32 k's) is in one group.
template <int R, int NT>
static void TileF32(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb,
                    int G, const float* xf, float* out, int ldo) {
  __m512 acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm512_setzero_ps();
  const __m512i lo_mask = _mm512_set1_epi8(0x0F);
  const __m512i lut = NibbleLut();
  for (int b = 0; b < nb; ++b) {
    const float* xb = xf + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      if (b == 0) _mm_prefetch((const char*)(ws + (size_t)(r + kPrefetchRows) * lds), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wrow);
      const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, lo_mask));
      const __m512i hi = _mm512_shuffle_epi8(
          lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask));
      const float* srow = ws + (size_t)r * lds;
#define MM_CHUNK(c)                                                           \
  {                                                                           \
    const __m512 sc = _mm512_set1_ps(srow[(b * 128 + (c) * 32) / G]);         \
    const __m512 we = _mm512_mul_ps(                                          \
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(lo, c))), sc); \
    const __m512 wo = _mm512_mul_ps(                                          \
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(hi, c))), sc); \
    for (int n = 0; n < NT; ++n) {                                            \
      const float* x = xb + n * 128 + (c) * 16;                               \
      acc[r][n] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x), acc[r][n]);         \
      acc[r][n] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 64), acc[r][n]);    \
    }                                                                         \
  }
      MM_CHUNK(0) MM_CHUNK(1) MM_CHUNK(2) MM_CHUNK(3)
#undef MM_CHUNK
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = Hsum(acc[r][n]);
}

// One token, channel-wise (decode): 16 weight rows per tile, one int32
// accumulator each, their 16 sums reduced together (Reduce16) and scaled and
// stored as one vector, instead of a horizontal reduction and scalar store per
// row. Sums are converted to fp32 before the reduction: exact while
// |sum| < 2^24 (K * 8 * 128 < 2^24 for K <= 16384; larger K rounds at 2^-24).
static int DecodeRowsC(const uint8_t* q, int tiles, int ldw, const float* s, int nb, const int8_t* xq,
                       const int32_t* csum, const float* xs, int m0, int m1, float* out) {
  const __m512i lo_mask = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8((char)0x88);
  const __m512 scale_x = _mm512_set1_ps(xs[0]);
  const __m512 fix = _mm512_set1_ps((float)csum[0]);
  const WStride st = Strides(ldw, tiles, kPrefetchRows);
  int m = m0;  // tiles: Q4Gemm starts tiled calls at a tile's first row
  for (; m + 16 <= m1; m += 16) {
    const uint8_t* wq = RowPtr(q, m, ldw, tiles);
    __m512i acc[16];
    MM_UNROLL
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_si512();
    for (int b = 0; b < nb; ++b) {
      const __m512i xl = _mm512_loadu_si512(xq + (size_t)b * kQuad * 128);
      const __m512i xh = _mm512_loadu_si512(xq + (size_t)b * kQuad * 128 + 64);
      MM_UNROLL
      for (int r = 0; r < 16; ++r) {
        const uint8_t* wrow = wq + r * st.row + b * st.block;
        _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wrow), flip);
        acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_and_si512(v, lo_mask), xl);
        acc[r] = _mm512_dpbusd_epi32(
            acc[r], _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask), xh);
      }
    }
    __m512 f[16];
    MM_UNROLL
    for (int r = 0; r < 16; ++r) f[r] = _mm512_cvtepi32_ps(acc[r]);
    const __m512 sums = _mm512_add_ps(Reduce16(f), fix);
    _mm512_storeu_ps(out + (m - m0),
                     _mm512_mul_ps(_mm512_mul_ps(sums, scale_x), _mm512_loadu_ps(s + m)));
  }
  return m;
}

// out[n * ldo + (m - m0)] for rows [m0, m1) and N quad-interleaved tokens;
// 4-row tiles (32 zmm registers).
MM_DEFINE_X86_GEMMS(4, 4)

// Output-axis groups: one token over 64-byte chunks (a cache line, 8 zmm accumulators),
// more over 32-byte chunks x 6 tokens (24; 6 tokens ran T=128 ~12% faster than 4, and
// reach ~80% of this core's fp32 FMA peak).
struct OutNibbles {
  static constexpr int W = 16;
  using F = Vec<W>::F;
  // vpermps reads only an index's low 4 bits: the nibble itself picks its value.
  static void Unpack(const uint8_t* p, F& lo, F& hi) {
    const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i i = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    lo = (F)_mm512_permutexvar_ps(i, values);
    hi = (F)_mm512_permutexvar_ps(_mm512_srli_epi32(i, 4), values);
  }
};
void GemmOut(const uint8_t* q, const float* s, int K, int M, int G, int m0, int m1,
             const float* x, int ldx, int N, float* out, int ldo) {
  GemmOutVec<OutNibbles, 64, 32, 6>(q, s, K, M, G, m0, m1, x, ldx, N, out, ldo);
}

// Prepares one activation row for the kernels above (SIMD layout, see
// kernels.h): q/f point at this token's slot in block 0, successive blocks
// are kQuad*128 elements apart. Int8 mode also writes corr and the scale.
void MinMax(const float* x, int K, float* mn, float* mx) {
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  *mn = _mm512_reduce_min_ps(lo);
  *mx = _mm512_reduce_max_ps(hi);
}

// q = clip(rint(x * inv) + zp, -128, 127) (inv, zp from kernels.cc); corr lane j of block b
// = -8 * (the sum of k = 8j .. 8j+7): one dpbusd with ones over the block's 64 even q's
// (lane j: 4 evens) plus one over its odds. Returns the sum of corr (csum).
int32_t PrepRowI8(const float* x, int K, float inv_s, float zp_s, int8_t* q, int32_t* corr) {
  const __m512 inv = _mm512_set1_ps(inv_s), zp = _mm512_set1_ps(zp_s);
  const __m512 lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  // rint(v) + zp, clamped in fp32: max/min_ps return their second operand
  // when the first is NaN, so NaN becomes -128 as in the scalar path.
  auto quant = [&](__m512 v) {
    v = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi)));
  };
  __m512i total = zero;
  for (int b = 0; b < K / 128; ++b) {
    const float* xb = x + b * 128;
    __m512i ev = zero, od = zero;  // 32 k's per chunk c -> its 16 evens and 16 odds
#define MM_CHUNK(C)                                                                   \
  {                                                                                   \
    const __m512 a = _mm512_loadu_ps(xb + C * 32), a2 = _mm512_loadu_ps(xb + C * 32 + 16); \
    ev = _mm512_inserti32x4(ev, quant(_mm512_permutex2var_ps(a, ie, a2)), C);         \
    od = _mm512_inserti32x4(od, quant(_mm512_permutex2var_ps(a, io, a2)), C);         \
  }
    MM_CHUNK(0) MM_CHUNK(1) MM_CHUNK(2) MM_CHUNK(3)
#undef MM_CHUNK
    int8_t* qb = q + (size_t)b * kQuad * 128;
    _mm512_storeu_si512(qb, ev);
    _mm512_storeu_si512(qb + 64, od);
    const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, ev), ones, od);
    const __m512i c = _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 3));
    _mm512_storeu_si512(corr + (size_t)b * kQuad * 16, c);
    total = _mm512_add_epi32(total, c);
  }
  return _mm512_reduce_add_epi32(total);
}

// Token n's AMX B-tile columns (Acts::tq) from its row in the quad layout (qslot: block b's
// even k's at qslot + b * 512, odd k's 64 bytes on): per block and half, its 16 k-quads
// scattered 64 bytes apart into dst (dst: the token's first column, (n % 16) * 4 bytes
// into its group).
void AmxColumns(const int8_t* qslot, int K, int8_t* dst) {
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(64));
  for (int b = 0; b < K / 128; ++b)
    for (int h = 0; h < 2; ++h)
      _mm512_i32scatter_epi32(dst + (size_t)b * 2048 + h * 1024, idx,
                              _mm512_loadu_si512(qslot + (size_t)b * kQuad * 128 + h * 64), 1);
}

// DotVec<16>'s arithmetic (Dot) for up to 16 rows: per row two accumulators over the halves
// of each 32 inputs, added, then the 16 lanes summed in lane order; the rows' chains
// interleaved (8 at a time) and the 16 lane sums done together, lane j of every row by one
// gather. Rows of other lengths: Dot per row.
void DotMany(const float* a, const float* rows, int n, int len, float* out) {
  if (len % 32) {
    for (int i = 0; i < n; ++i) out[i] = DotVec<16>(a, rows + (size_t)i * len, len);
    return;
  }
  alignas(64) float v[16][16];
  for (int h = 0; h < n; h += 8) {
    const int m = n - h < 8 ? n - h : 8;
    __m512 acc0[8], acc1[8];
    for (int i = 0; i < 8; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int k = 0; k < len; k += 32) {
      const __m512 x0 = _mm512_loadu_ps(a + k), x1 = _mm512_loadu_ps(a + k + 16);
      MM_UNROLL for (int i = 0; i < 8; ++i) {
        if (i >= m) break;
        const float* r = rows + (size_t)(h + i) * len + k;
        acc0[i] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(r), acc0[i]);
        acc1[i] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(r + 16), acc1[i]);
      }
    }
    for (int i = 0; i < m; ++i) _mm512_store_ps(v[h + i], _mm512_add_ps(acc0[i], acc1[i]));
  }
  const __m512i row = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16));
  const __mmask16 live = (__mmask16)((1u << n) - 1);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < 16; ++j)
    sum = _mm512_add_ps(sum, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                      _mm512_add_epi32(row, _mm512_set1_epi32(j)),
                                                      &v[0][0], 4));
  _mm512_mask_storeu_ps(out, live, sum);
}

// y[i] += a * x[i], the product rounded before the add (the empty asm keeps the compiler from
// fusing them into an FMA): the bits of the portable loop in kernels.cc.
void AddScaled(float a, const float* x, float* y, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 p = _mm512_mul_ps(av, _mm512_loadu_ps(x + i));
    __asm__("" : "+v"(p));
    _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), p));
  }
  for (; i < n; ++i) {
    float p = a * x[i];
    __asm__("" : "+v"(p));
    y[i] += p;
  }
}

void PrepRowF32(const float* x, int K, float* f) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
  for (int b = 0; b < K / 128; ++b) {
    float* fb = f + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int c = 0; c < 4; ++c) {
      const float* xc = x + b * 128 + c * 32;
      const __m512 a = _mm512_loadu_ps(xc), a2 = _mm512_loadu_ps(xc + 16);
      _mm512_storeu_ps(fb + c * 16, _mm512_permutex2var_ps(a, ie, a2));
      _mm512_storeu_ps(fb + 64 + c * 16, _mm512_permutex2var_ps(a, io, a2));
    }
  }
}

float Dot(const float* a, const float* b, int n) { return DotVec<16>(a, b, n); }

void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo) {
  DotRowsVec<16>(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
}

void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo) {
  DotColsVec<16>(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
}

void Softmax(float* s, int n) { SoftmaxVec<16>(s, n); }

void SiluMul(const float* g, const float* u, float* h, int n) { SiluMulVec<16>(g, u, h, n); }

}  // namespace avx512
}  // namespace mm

// AVX2 + FMA kernels for x86 CPUs without AVX-512. Same activation layout and
// integer math as kernels_avx512.cc, on 256-bit registers: a
// 128-k block's 64 packed weight bytes are two halves of 8 octets (8 k's per
// int32 lane). Like that file: raw pointers only, called after a CPU check.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd_shared.h"

namespace mm {
namespace avx2 {

constexpr int kPrefetchRows = 16;  // software prefetch distance, in weight rows

// sum over each lane's 4 bytes of u[i] * s[i] (u unsigned, s signed), added to acc.
// (AVX-VNNI's vpdpbusd would do this in one instruction; not used yet, so the
// same code runs on every AVX2 CPU.)
static inline __m256i DotU8S8(__m256i acc, __m256i u, __m256i s) {
  // u <= 15 and |s| <= 127: the int16 pair sums cannot saturate.
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scales for the 8 lanes of each half of a 128-k block: lane j of half h is
// octet 8h + j, i.e. group (8 * (8h + j)) / G counted from the block's first.
struct ScaleMap {
  __m256i idx[2];
  __m256i mask;
  int G;
  explicit ScaleMap(int g) : G(g) {
    alignas(32) int32_t lanes[2][8], m[8];
    MM_UNROLL
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 8; ++j) lanes[h][j] = g >= 128 ? 0 : (8 * (8 * h + j)) / g;
    const int n = g >= 128 ? 1 : 128 / g;  // groups per block
    for (int j = 0; j < 8; ++j) m[j] = j < n ? -1 : 0;
    idx[0] = _mm256_load_si256((const __m256i*)lanes[0]);
    idx[1] = _mm256_load_si256((const __m256i*)lanes[1]);
    mask = _mm256_load_si256((const __m256i*)m);
  }
  inline __m256 Load(const float* s_row, int b) const {
    return _mm256_maskload_ps(s_row + (b * 128) / G, mask);
  }
};

// Int8 activations: R weight rows x NT tokens (NT <= 4), whole K; see
// kernels_avx512.cc TileI8 for the (nibble ^ 8) / corr scheme.
template <int R, int NT>
static void TileI8(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb,
                   const ScaleMap& sm, const int8_t* xq, const int32_t* corr,
                   const float* xs, float* out, int ldo) {
  __m256 acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_setzero_ps();
  const __m256i lo_mask = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8((char)0x88);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    const int32_t* cb = corr + (size_t)b * kQuad * 16;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      const __m256 s4 = sm.Load(ws + (size_t)r * lds, b);
      MM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wrow + 32 * h)), flip);
        const __m256i lo = _mm256_and_si256(v, lo_mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
        const __m256 sc = _mm256_permutevar8x32_ps(s4, sm.idx[h]);
        MM_UNROLL
        for (int n = 0; n < NT; ++n) {
          const int8_t* x = xb + n * 128 + 32 * h;
          __m256i t = _mm256_loadu_si256((const __m256i*)(cb + n * 16 + 8 * h));
          t = DotU8S8(t, lo, _mm256_loadu_si256((const __m256i*)x));
          t = DotU8S8(t, hi, _mm256_loadu_si256((const __m256i*)(x + 64)));
          acc[r][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc[r][n]);
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = xs[n] * Hsum(acc[r][n]);
}

// Channel-wise int8 (G == K): as kernels_avx512.cc TileI8C, integer sums over
// all of K and one convert per row and token.
template <int R, int NT>
static void TileI8C(const uint8_t* wq, const WStride& st, const float* ws, int nb, const int8_t* xq,
                    const int32_t* csum, const float* xs, float* out, int ldo) {
  __m256i acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_setzero_si256();
  const __m256i lo_mask = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8((char)0x88);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      MM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wrow + 32 * h)), flip);
        const __m256i lo = _mm256_and_si256(v, lo_mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
        MM_UNROLL
        for (int n = 0; n < NT; ++n) {
          const int8_t* x = xb + n * 128 + 32 * h;
          // (q+8) * x pairs <= 2 * 15 * 128: no int16 saturation (see DotU8S8).
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)x)),
                                             _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(x + 64))));
          acc[r][n] = _mm256_add_epi32(acc[r][n], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) {
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc[r][n]), _mm256_extracti128_si256(acc[r][n], 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      out[n * ldo + r] = xs[n] * ws[r] * (float)(_mm_cvtsi128_si32(t) + csum[n]);
    }
}

// Fp32 activations: 8 packed bytes (16 k's, one group as G >= 32) at a time,
// nibbles -> int8 -> fp32 times the group scale, FMA with the even / odd x's.
template <int R, int NT>
static void TileF32(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb,
                    int G, const float* xf, float* out, int ldo) {
  __m256 acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_setzero_ps();
  const __m128i lo_mask = _mm_set1_epi8(0x0F);
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  for (int b = 0; b < nb; ++b) {
    const float* xb = xf + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* wrow = wq + r * st.row + b * st.block;
      _mm_prefetch((const char*)(wrow + st.ahead), _MM_HINT_T0);
      const float* srow = ws + (size_t)r * lds;
      MM_UNROLL
      for (int c = 0; c < 8; ++c) {  // bytes 8c .. 8c+7
        const __m128i v = _mm_loadl_epi64((const __m128i*)(wrow + 8 * c));
        const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, lo_mask));
        const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), lo_mask));
        const __m256 sc = _mm256_set1_ps(srow[(b * 128 + 16 * c) / G]);
        const __m256 we = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), sc);
        const __m256 wo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), sc);
        MM_UNROLL
        for (int n = 0; n < NT; ++n) {
          const float* x = xb + n * 128 + 8 * c;
          acc[r][n] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x), acc[r][n]);
          acc[r][n] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + 64), acc[r][n]);
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = Hsum(acc[r][n]);
}

// Same contract as the AVX-512 ones. Two rows per tile: 16 ymm registers
// hold 2 x 4 accumulators plus the unpacked weights.
// No separate one-token tiles here: TileI8C handles decode too.
static int DecodeRowsC(const uint8_t*, int, int, const float*, int, const int8_t*, const int32_t*,
                       const float*, int m0, int, float*) {
  return m0;
}

MM_DEFINE_X86_GEMMS(2, 2)

// Output-axis groups: one token over 32-byte chunks (8 ymm accumulators), more over
// 8-byte chunks x 6 tokens (12 of the 16 registers; T=128 ran 1.3x faster than 16 x 2).
struct OutNibbles {
  static constexpr int W = 8;
  using F = Vec<W>::F;
  static void Unpack(const uint8_t* p, F& lo, F& hi) {
    const __m256i i = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
    lo = (F)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(i, 28), 28));
    hi = (F)_mm256_cvtepi32_ps(_mm256_srai_epi32(i, 4));
  }
};
void GemmOut(const uint8_t* q, const float* s, int K, int M, int G, int m0, int m1,
             const float* x, int ldx, int N, float* out, int ldo) {
  GemmOutVec<OutNibbles, 32, 8, 6>(q, s, K, M, G, m0, m1, x, ldx, N, out, ldo);
}

float Dot(const float* a, const float* b, int n) { return DotVec<8>(a, b, n); }

void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo) {
  DotRowsVec<8>(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
}

void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo) {
  DotColsVec<8>(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
}

void Softmax(float* s, int n) { SoftmaxVec<8>(s, n); }

void SiluMul(const float* g, const float* u, float* h, int n) { SiluMulVec<8>(g, u, h, n); }

}  // namespace avx2
}  // namespace mm

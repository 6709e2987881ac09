// NEON kernels for arm64 phones (ARMv8.2 dot product: sdot). Compiled only on
// aarch64 with +dotprod and called after a run-time HWCAP check. Same
// activation layout as the AVX-512 path (kernels.h); sdot is signed x signed,
// so the int4 nibbles are sign-extended in registers and need no correction.
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cstddef>
#include <cstdint>

#include "simd_shared.h"

namespace mm {
namespace neon {

// Int8 activations: R weight rows x NT tokens over the whole K. Each 16-byte
// weight vector covers 32 consecutive k's (16 even in the low nibbles, 16 odd
// in the high ones), all in one scale group because G % 32 == 0.
template <int R, int NT>
static void TileI8(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb, int G,
                   const int8_t* xq, const float* xs, float* out, int ldo) {
  float32x4_t acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = vdupq_n_f32(0.f);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* w = wq + r * st.row + b * st.block;
      const float* srow = ws + (size_t)r * lds;
      MM_UNROLL
      for (int c = 0; c < 4; ++c) {
        const int8x16_t v = vreinterpretq_s8_u8(vld1q_u8(w + 16 * c));
        const int8x16_t lo = vshrq_n_s8(vshlq_n_s8(v, 4), 4);  // sign-extend low nibble
        const int8x16_t hi = vshrq_n_s8(v, 4);                 // arithmetic: high nibble
        const float sc = srow[(b * 128 + 32 * c) / G];
        MM_UNROLL
        for (int n = 0; n < NT; ++n) {
          const int8_t* x = xb + n * 128 + 16 * c;
          int32x4_t t = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(x));
          t = vdotq_s32(t, hi, vld1q_s8(x + 64));
          acc[r][n] = vfmaq_n_f32(acc[r][n], vcvtq_f32_s32(t), sc);
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = xs[n] * vaddvq_f32(acc[r][n]);
}

// Channel-wise int8 (G == K, one scale per row): sdot sums are exact, so they
// are kept as int32 over all of K and converted once per row and token.
template <int R, int NT>
static void TileI8C(const uint8_t* wq, const WStride& st, const float* ws, int nb, const int8_t* xq,
                    const float* xs, float* out, int ldo) {
  int32x4_t acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = vdupq_n_s32(0);
  for (int b = 0; b < nb; ++b) {
    const int8_t* xb = xq + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* w = wq + r * st.row + b * st.block;
      MM_UNROLL
      for (int c = 0; c < 4; ++c) {
        const int8x16_t v = vreinterpretq_s8_u8(vld1q_u8(w + 16 * c));
        const int8x16_t lo = vshrq_n_s8(vshlq_n_s8(v, 4), 4);
        const int8x16_t hi = vshrq_n_s8(v, 4);
        MM_UNROLL
        for (int n = 0; n < NT; ++n) {
          const int8_t* x = xb + n * 128 + 16 * c;
          acc[r][n] = vdotq_s32(vdotq_s32(acc[r][n], lo, vld1q_s8(x)), hi, vld1q_s8(x + 64));
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = xs[n] * ws[r] * (float)vaddvq_s32(acc[r][n]);
}

// Fp32 activations: widen the nibbles to fp32, scale, FMA.
template <int R, int NT>
static void TileF32(const uint8_t* wq, const WStride& st, const float* ws, int lds, int nb, int G,
                    const float* xf, float* out, int ldo) {
  float32x4_t acc[R][NT];
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) acc[r][n] = vdupq_n_f32(0.f);
  for (int b = 0; b < nb; ++b) {
    const float* xb = xf + (size_t)b * kQuad * 128;
    MM_UNROLL
    for (int r = 0; r < R; ++r) {
      const uint8_t* w = wq + r * st.row + b * st.block;
      const float* srow = ws + (size_t)r * lds;
      MM_UNROLL
      for (int c = 0; c < 4; ++c) {
        const int8x16_t v = vreinterpretq_s8_u8(vld1q_u8(w + 16 * c));
        const int8x16_t half[2] = {vshrq_n_s8(vshlq_n_s8(v, 4), 4), vshrq_n_s8(v, 4)};
        const float sc = srow[(b * 128 + 32 * c) / G];
        MM_UNROLL
        for (int h = 0; h < 2; ++h) {  // h=0: even k's, h=1: odd k's (+64 in x)
          const int16x8_t w16[2] = {vmovl_s8(vget_low_s8(half[h])), vmovl_s8(vget_high_s8(half[h]))};
          MM_UNROLL
          for (int q = 0; q < 4; ++q) {
            const int16x4_t w4 = q % 2 ? vget_high_s16(w16[q / 2]) : vget_low_s16(w16[q / 2]);
            const float32x4_t wf = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(w4)), sc);
            MM_UNROLL
            for (int n = 0; n < NT; ++n)
              acc[r][n] = vfmaq_f32(acc[r][n], wf, vld1q_f32(xb + n * 128 + h * 64 + 16 * c + 4 * q));
          }
        }
      }
    }
  }
  MM_UNROLL
  for (int r = 0; r < R; ++r)
    MM_UNROLL
    for (int n = 0; n < NT; ++n) out[n * ldo + r] = vaddvq_f32(acc[r][n]);
}

void GemmI8(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, int m1,
            const int8_t* xq, const float* xs, int N,
            float* out, int ldo) {
  const int ldw = K / 2, lds = K / G, nb = K / 128;
  const WStride st = Strides(ldw, tiles, 0);
  if (G == K) {  // channel-wise
    ForEachTile<4>(m0, m1, N, [&](auto r, auto nt, int m, int n0) {
      TileI8C<decltype(r)::value, decltype(nt)::value>(
          RowPtr(q, m, ldw, tiles), st, s + m, nb, xq + (size_t)n0 * K, xs + n0,
          out + (size_t)n0 * ldo + (m - m0), ldo);
    });
    return;
  }
  ForEachTile<4>(m0, m1, N, [&](auto r, auto nt, int m, int n0) {
    TileI8<decltype(r)::value, decltype(nt)::value>(
        RowPtr(q, m, ldw, tiles), st, s + (size_t)m * lds, lds, nb, G, xq + (size_t)n0 * K, xs + n0,
        out + (size_t)n0 * ldo + (m - m0), ldo);
  });
}

void GemmF32(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, int m1,
             const float* xf, int N, float* out, int ldo) {
  const int ldw = K / 2, lds = K / G, nb = K / 128;
  const WStride st = Strides(ldw, tiles, 0);
  ForEachTile<4>(m0, m1, N, [&](auto r, auto nt, int m, int n0) {
    TileF32<decltype(r)::value, decltype(nt)::value>(
        RowPtr(q, m, ldw, tiles), st, s + (size_t)m * lds, lds, nb, G, xf + (size_t)n0 * K,
        out + (size_t)n0 * ldo + (m - m0), ldo);
  });
}

// Output-axis groups: one token over 32-byte chunks (16 q-register accumulators), more
// over 8-byte chunks x 6 tokens (24 of the 32 registers, as the AVX2 kernel's shape).
struct OutNibbles {
  static constexpr int W = 4;
  using F = Vec<W>::F;
  static void Unpack(const uint8_t* p, F& lo, F& hi) {
    uint32_t b;
    std::memcpy(&b, p, 4);
    const int32x4_t i = vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(b)))));
    lo = (F)vcvtq_f32_s32(vshrq_n_s32(vshlq_n_s32(i, 28), 28));
    hi = (F)vcvtq_f32_s32(vshrq_n_s32(i, 4));
  }
};
void GemmOut(const uint8_t* q, const float* s, int K, int M, int G, int m0, int m1,
             const float* x, int ldx, int N, float* out, int ldo) {
  GemmOutVec<OutNibbles, 32, 8, 6>(q, s, K, M, G, m0, m1, x, ldx, N, out, ldo);
}

// The fp32 helpers on 4-lane vectors (simd_shared.h): router logits, attention, SiLU.
float Dot(const float* a, const float* b, int n) { return DotVec<4>(a, b, n); }

void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo) {
  DotRowsVec<4>(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
}

void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo) {
  DotColsVec<4>(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
}

void Softmax(float* s, int n) { SoftmaxVec<4>(s, n); }

void SiluMul(const float* g, const float* u, float* h, int n) { SiluMulVec<4>(g, u, h, n); }

}  // namespace neon
}  // namespace mm
#endif  // __aarch64__

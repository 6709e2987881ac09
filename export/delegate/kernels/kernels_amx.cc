// AMX-INT8 kernel: channel-wise int8 GEMMs (G == K) of several tokens on the tile
// unit. This file alone is compiled with -mamx-*; raw pointers only (see
// kernels_avx512.cc), called only after kernels.cc's AmxReady().
//
// One TDPBUSD multiplies a 16 x 64 u8 tile A by a 64 x 16 s8 tile B (stored as 16
// rows of 16 x 4 bytes) into 16 x 16 int32 sums: 16 weight rows x 16 tokens x 64 k's
// in one instruction, where a VNNI dpbusd does one row x one token x 64 k's. A is
// 16 weight rows' nibbles of one 128-k block, unpacked here to bytes (nibble ^ 8 =
// q + 8, as the VNNI kernels; csum removes the 8 * sum(x) again), low nibbles (even
// k's) and high nibbles (odd k's) as two tiles; B is the tokens' int8 values in the
// matching order, prepared once per call of PrepareRows (Acts::tq).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace mm {
namespace amx {

namespace {

// Tile registers: 0-3 sums (one per group of 16 tokens), 4/5 weights (even / odd k's), 6/7
// tokens (even / odd k's).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Block b's A tiles for 16 rows: a[half][row][64], the nibbles ^ 8 as bytes.
inline void Unpack(const uint8_t* q, size_t row, size_t block, size_t ahead, int b, uint8_t* a) {
  const __m512i lo_mask = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8((char)0x88);
  for (int r = 0; r < 16; ++r) {
    const uint8_t* w = q + r * row + b * block;
    _mm_prefetch((const char*)(w + ahead), _MM_HINT_T0);
    const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w), flip);
    _mm512_store_si512(a + r * 64, _mm512_and_si512(v, lo_mask));
    _mm512_store_si512(a + 1024 + r * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask));
  }
}

// A product rounded on its own: the empty asm hides it from the compiler, which would fuse
// a product and the subtraction after it into one FMA (one rounding: other bits than
// TileI8C and ZeroPointFix give).
inline __m512 Rounded(__m512 p) {
  __asm__("" : "+v"(p));
  return p;
}

}  // namespace

// out[n * ldo + (m - m0)] = xs[n] * s[m] * (sum_k (q[m,k] + 8) x_n[k] + csum[n])
// - (xs[n] * zp[n]) * wsum[m] for rows [m0, m1) in whole 16-row tiles (the caller:
// (m1 - m0) % 16 == 0; tiled weights start at a tile) and N tokens: the same integers and the
// same float expressions as the AVX-512 channel-wise tile (TileI8C) followed by kernels.cc's
// ZeroPointFix, so the same bits, in one pass over out.
void GemmI8C(const uint8_t* q, int tiles, const float* s, int K, int m0, int m1,
             const int8_t* tq, const int32_t* csum, const float* xs, const float* zp,
             const float* wsum, int N, float* out, int ldo) {
  const size_t ldw = K / 2, gs = (size_t)(K / 128) * 2048;  // gs: one token group's B tiles
  const int nb = K / 128;
  // Where row r's block b lies: tiles (kernels.h) keep a 16-row tile's blocks together.
  const size_t row = tiles ? 64 : ldw, block = tiles ? 1024 : 64, ahead = 16 * ldw;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  // Two blocks' A tiles: block b + 1 is unpacked while the tile unit works on block b.
  alignas(64) uint8_t a[2][2048];
  alignas(64) int32_t c[16 * 16];
  const __m512i col = _mm512_mullo_epi32(  // lane r: c's offset of row r
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(16));
  for (int m = m0; m < m1; m += 16) {
    const uint8_t* wq = q + (size_t)m * ldw;  // either layout: m starts a tile
    const __m512 sr = _mm512_loadu_ps(s + m), ws = _mm512_loadu_ps(wsum + m);
    for (int g0 = 0; g0 < N; g0 += 64) {  // up to 4 groups of 16 tokens per pass
      const int ng = (N - g0 + 15) / 16 < 4 ? (N - g0 + 15) / 16 : 4;
      const bool one = ng == 1;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      Unpack(wq, row, block, ahead, 0, a[0]);
      for (int b = 0; b < nb; ++b) {
        if (b + 1 < nb) Unpack(wq, row, block, ahead, b + 1, a[(b + 1) % 2]);
        _tile_loadd(4, a[b % 2], 64);
        _tile_loadd(5, a[b % 2] + 1024, 64);
        // The groups' B tiles of block b (Acts::tq: [group][block][half][1024]).
        const int8_t* tb = tq + ((size_t)(g0 / 16) * nb + b) * 2048;
        if (one) {  // back to back into one tile: measured as fast as two tiles added after
          _tile_loadd(6, tb, 64);
          _tile_loadd(7, tb + 1024, 64);
          _tile_dpbusd(0, 4, 6);
          _tile_dpbusd(0, 5, 7);
          continue;
        }
        // Every group's even k's, then every group's odd k's.
#define MM_GROUP(G, A, B, HALF)                   \
  if (ng > G) {                                   \
    _tile_loadd(B, tb + G * gs + HALF * 1024, 64); \
    _tile_dpbusd(G, A, B);                        \
  }
        MM_GROUP(0, 4, 6, 0) MM_GROUP(1, 4, 7, 0) MM_GROUP(2, 4, 6, 0) MM_GROUP(3, 4, 7, 0)
        MM_GROUP(0, 5, 6, 1) MM_GROUP(1, 5, 7, 1) MM_GROUP(2, 5, 6, 1) MM_GROUP(3, 5, 7, 1)
#undef MM_GROUP
      }
      for (int g = 0; g < ng; ++g) {
        switch (g) {  // tile numbers are immediates
          case 0: _tile_stored(0, c, 64); break;
          case 1: _tile_stored(1, c, 64); break;
          case 2: _tile_stored(2, c, 64); break;
          default: _tile_stored(3, c, 64); break;
        }
        // Token n's 16 rows are column n - n0 of c: a gather (measured no slower than a
        // 16 x 16 transpose), then TileI8C's expression (xs[n] * s[m + r]) * (float)(sum +
        // csum[n]) - (xs[n] * zp[n]) * wsum[m + r], 16 rows at a time.
        const int n0 = g0 + 16 * g, n1 = N - n0 < 16 ? N : n0 + 16;
        for (int n = n0; n < n1; ++n) {
          const __m512i idx = _mm512_add_epi32(col, _mm512_set1_epi32(n - n0));
          __m512i sum = _mm512_add_epi32(_mm512_i32gather_epi32(idx, c, 4),
                                         _mm512_set1_epi32(csum[n]));
          const __m512 v = Rounded(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(xs[n]), sr),
                                                 _mm512_cvtepi32_ps(sum)));
          const __m512 z = Rounded(_mm512_mul_ps(_mm512_set1_ps(xs[n] * zp[n]), ws));
          _mm512_storeu_ps(out + (size_t)n * ldo + (m - m0), _mm512_sub_ps(v, z));
        }
      }
    }
  }
  _tile_release();
}

}  // namespace amx
}  // namespace mm

// Portable parts of the INT4 kernels: activation preparation, the scalar
// fallback, and dispatch to the AVX-512 VNNI kernels when the CPU has them.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
namespace mm {
namespace avx512 {
void GemmI8(const uint8_t* q, const float* s, int K, int G, int m0, int m1,
            const int8_t* const* xq, const int32_t* const* corr,
            const float* xs, int N, float* out, int ldo);
void GemmF32(const uint8_t* q, const float* s, int K, int G, int m0, int m1,
             const float* const* xf, int N, float* out, int ldo);
float Dot(const float* a, const float* b, int n);
void SiluMul(const float* g, const float* u, float* h, int n);
}  // namespace avx512
}  // namespace mm
#endif

namespace mm {

bool SimdAvailable() {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

bool SimdShapeOk(int K, int G) {
  // 128-k blocks; groups of a power of two >= 32 so a 16-lane chunk never
  // straddles two scales.
  return K % 128 == 0 && G >= 32 && (G & (G - 1)) == 0 && K % G == 0;
}

void Acts::Resize(int n, int k, ActMode m, bool use_simd) {
  N = n;
  K = k;
  mode = m;
  simd = use_simd;
  if (mode == ActMode::kF32) {
    f.resize((size_t)N * K);
  } else {
    q.resize((size_t)N * K);
    scale.resize(N);
    if (simd) corr.resize((size_t)N * (K / 8));
  }
}

// Position of k inside the SIMD layout ([64 evens | 64 odds] per 128 block).
static inline int SimdPos(int k) {
  const int b = k / 128, i = k % 128;
  return b * 128 + (i % 2) * 64 + i / 2;
}

void Acts::PrepareRows(const float* x, int ldx, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const float* xr = x + (size_t)n * ldx;
    if (mode == ActMode::kF32) {
      float* dst = f.data() + (size_t)n * K;
      if (!simd) {
        std::memcpy(dst, xr, sizeof(float) * K);
      } else {
        for (int k = 0; k < K; ++k) dst[SimdPos(k)] = xr[k];
      }
      continue;
    }
    // Dynamic symmetric int8 per row: x ~= scale * q, q in [-127, 127].
    float amax = 0.f;
    for (int k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[n] = amax / 127.f;
    int8_t* dst = q.data() + (size_t)n * K;
    for (int k = 0; k < K; ++k) {
      float v = std::nearbyint(xr[k] * inv);
      if (!(v > -127.f)) v = -127.f;  // also catches NaN: no UB in the cast
      if (!(v < 127.f)) v = 127.f;
      dst[simd ? SimdPos(k) : k] = (int8_t)v;
    }
    if (simd) {
      // Each dpbusd lane j of block b sums k = 8j..8j+7 of that block; the
      // kernel adds 8 to every weight (unsigned operand), this undoes it.
      int32_t* c = corr.data() + (size_t)n * (K / 8);
      for (int l = 0; l < K / 8; ++l) {
        int32_t s = 0;
        for (int k = 8 * l; k < 8 * l + 8; ++k) s += dst[SimdPos(k)];
        c[l] = -8 * s;
      }
    }
  }
}

// Scalar reference kernels on the plain layout (any K, any even G).
static inline int Nibble(const uint8_t* row, int k) {
  const int v = (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
  return v >= 8 ? v - 16 : v;
}

static void ScalarGemm(const Q4Matrix& w, int m0, int m1, const Acts& a,
                       const int* rows, int N, float* out, int ldo) {
  const int K = w.K, G = w.G, ng = K / G;
  for (int n = 0; n < N; ++n) {
    const int r = rows ? rows[n] : n;
    for (int m = m0; m < m1; ++m) {
      const uint8_t* wq = w.q + (size_t)m * (K / 2);
      const float* ws = w.s + (size_t)m * ng;
      float acc = 0.f;
      if (a.mode == ActMode::kF32) {
        const float* x = a.f.data() + (size_t)r * K;
        for (int g = 0; g < ng; ++g) {
          float gs = 0.f;
          for (int k = g * G; k < (g + 1) * G; ++k) gs += Nibble(wq, k) * x[k];
          acc += ws[g] * gs;
        }
      } else {
        const int8_t* x = a.q.data() + (size_t)r * K;
        for (int g = 0; g < ng; ++g) {
          int32_t gs = 0;
          for (int k = g * G; k < (g + 1) * G; ++k) gs += Nibble(wq, k) * x[k];
          acc += ws[g] * (float)gs;
        }
        acc *= a.scale[r];
      }
      out[(size_t)n * ldo + (m - m0)] = acc;
    }
  }
}

void Q4Gemm(const Q4Matrix& w, int m0, int m1, const Acts& a, const int* rows,
            int N, float* out, int ldo) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (a.simd) {
    // The kernels take per-row pointers; pass them in chunks from the stack.
    constexpr int kChunk = 64;
    for (int n0 = 0; n0 < N; n0 += kChunk) {
      const int nn = std::min(kChunk, N - n0);
      float* o = out + (size_t)n0 * ldo;
      if (a.mode == ActMode::kI8) {
        const int8_t* xq[kChunk];
        const int32_t* corr[kChunk];
        float xs[kChunk];
        for (int i = 0; i < nn; ++i) {
          const int r = rows ? rows[n0 + i] : n0 + i;
          xq[i] = a.q.data() + (size_t)r * a.K;
          corr[i] = a.corr.data() + (size_t)r * (a.K / 8);
          xs[i] = a.scale[r];
        }
        avx512::GemmI8(w.q, w.s, w.K, w.G, m0, m1, xq, corr, xs, nn, o, ldo);
      } else {
        const float* xf[kChunk];
        for (int i = 0; i < nn; ++i) {
          const int r = rows ? rows[n0 + i] : n0 + i;
          xf[i] = a.f.data() + (size_t)r * a.K;
        }
        avx512::GemmF32(w.q, w.s, w.K, w.G, m0, m1, xf, nn, o, ldo);
      }
    }
    return;
  }
#endif
  ScalarGemm(w, m0, m1, a, rows, N, out, ldo);
}

float Dot(const float* a, const float* b, int n) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (SimdAvailable()) return avx512::Dot(a, b, n);
#endif
  float s[4] = {0, 0, 0, 0};
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void SiluMul(const float* g, const float* u, float* h, int n) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (SimdAvailable()) return avx512::SiluMul(g, u, h, n);
#endif
  for (int i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace mm

// Portable parts of the INT4 kernels: activation preparation, the scalar
// fallback, and dispatch to the SIMD kernels the CPU has (AVX-512 VNNI, AVX2,
// NEON dot product).
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "threadpool.h"

// The output-axis GEMM every SIMD file defines (simd_shared.h GemmOutVec): columns
// [m0, m1) of q [K, M/2], m0 and m1 multiples of 2 * OutVecBytes (Q4Gemm splits the rest off);
// x: N rows of K, ldx apart.
#define MM_GEMM_OUT_DECL                                                      \
  void GemmOut(const uint8_t* q, const float* s, int K, int M, int G, int m0, int m1, \
               const float* x, int ldx, int N, float* out, int ldo);

#if defined(__x86_64__)
// Entry points of the x86 kernel files, each in its own namespace.
#define MM_X86_KERNELS                                                        \
  void GemmI8(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, \
              int m1, const int8_t* xq, const int32_t* corr, const int32_t* csum, \
              const float* xs, int N, float* out, int ldo);                   \
  void GemmF32(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, \
               int m1, const float* xf, int N, float* out, int ldo);          \
  float Dot(const float* a, const float* b, int n);                           \
  void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, \
               int len, float scale, float* out, int ldo);                    \
  void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, \
               int len, float scale, float* out, int ldo);                    \
  void Softmax(float* s, int n);                                              \
  void SiluMul(const float* g, const float* u, float* h, int n);              \
  MM_GEMM_OUT_DECL
namespace mm {
#if defined(MM_HAVE_AVX512)
namespace avx512 {
MM_X86_KERNELS
void MinMax(const float* x, int K, float* mn, float* mx);
int32_t PrepRowI8(const float* x, int K, float inv, float zp, int8_t* q, int32_t* corr);
void AmxColumns(const int8_t* qslot, int K, int8_t* dst);
void AddScaled(float a, const float* x, float* y, int n);
void DotMany(const float* a, const float* rows, int n, int len, float* out);
void PrepRowF32(const float* x, int K, float* f);
}  // namespace avx512
#endif
#if defined(MM_HAVE_AVX2)
namespace avx2 {
MM_X86_KERNELS
}  // namespace avx2
#endif
}  // namespace mm
#undef MM_X86_KERNELS
#if defined(MM_HAVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
namespace mm {
namespace amx {
void GemmI8C(const uint8_t* q, int tiles, const float* s, int K, int m0, int m1,
             const int8_t* tq, const int32_t* csum, const float* xs, const float* zp,
             const float* wsum, int N, float* out, int ldo);
}  // namespace amx
}  // namespace mm
#endif
#endif

#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
#include <sys/auxv.h>
namespace mm {
namespace neon {
void GemmI8(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, int m1,
            const int8_t* xq, const float* xs, int N, float* out, int ldo);
void GemmF32(const uint8_t* q, int tiles, const float* s, int K, int G, int m0, int m1,
             const float* xf, int N, float* out, int ldo);
MM_GEMM_OUT_DECL
float Dot(const float* a, const float* b, int n);
void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo);
void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo);
void Softmax(float* s, int n);
void SiluMul(const float* g, const float* u, float* h, int n);
}  // namespace neon
}  // namespace mm
#endif

namespace mm {

#if defined(__x86_64__) && defined(MM_HAVE_AMX)
// AMX-TILE and AMX-INT8 in CPUID, the tile state enabled by the OS (XCR0 bits 17-18),
// and Linux's permission for this process to use it (arch_prctl; refused e.g. under a
// hypervisor or kernel that does not pass AMX through). Asked once per process.
static bool AmxReady() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25)))
      return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ready;
}
#endif

// The vector kernels an ISA runs (kAmx: AVX-512's, AMX only in GemmRows).
static Isa VecIsa(Isa isa) { return isa == Isa::kAmx ? Isa::kAvx512 : isa; }

Isa KernelIsa(IsaCap cap) {
  if (cap == IsaCap::kScalar) return Isa::kScalar;
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512vnni");
#if defined(MM_HAVE_AMX)
  if (cap == IsaCap::kAuto && avx512 && AmxReady()) return Isa::kAmx;
#endif
  if ((cap == IsaCap::kAuto || cap == IsaCap::kAvx512) && avx512) return Isa::kAvx512;
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return Isa::kAvx2;
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  static const bool dot = (getauxval(AT_HWCAP) & (1UL << 20)) != 0;  // HWCAP_ASIMDDP
  if (cap == IsaCap::kAuto && dot) return Isa::kNeon;
#endif
  return Isa::kScalar;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512-vnni";
    case Isa::kAmx: return "avx512-amx";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon-dot";
    default: return "scalar";
  }
}

bool SimdShapeOk(int K, int G) {
  // 128-k blocks; groups of a power of two >= 32 so a 16-lane chunk never
  // straddles two scales, or channel-wise (G == K: one scale per row).
  return K % 128 == 0 && (G == K || (G >= 32 && (G & (G - 1)) == 0 && K % G == 0));
}

void Acts::Resize(int n, int k, ActMode m, Isa kernel_isa, bool f32_rows) {
  N = n;
  K = k;
  mode = m;
  isa = kernel_isa;
  rows_f32 = f32_rows;
  simd = isa != Isa::kScalar && !rows_f32;  // the quad layout (rows_f32: plain rows)
  const size_t rows = simd ? (size_t)(N + 3) / 4 * 4 : (size_t)N;  // whole quads
  if (mode == ActMode::kF32 || rows_f32) f.resize(rows * K);
  if (mode == ActMode::kI8) {
    q.resize(rows * K);
    scale.resize(N);
    zp.resize(N);
    if (simd) {
      corr.resize(rows * (K / 8));
      csum.resize(rows);
    }
    if (amx_tiles()) tq.resize((size_t)(N + 15) / 16 * 16 * K);
  }
}

// Offset of (token n, k) in the SIMD layout, in elements (see kernels.h).
static inline size_t SimdPos(int n, int k, int K) {
  const int b = k / 128, i = k % 128;
  return (size_t)(n / 4) * 4 * K + (size_t)b * 4 * 128 + (n % 4) * 128 +
         (i % 2) * 64 + i / 2;
}

// A rounded fp32 product: the volatile keeps the compiler from fusing it into
// an FMA with the following add (arm64), which would round differently.
static inline float Mul(float a, float b) {
  volatile float p = a * b;
  return p;
}

// XNNPACK's per-row parameters, operation for operation as grid.py's
// quantize_act_int8_asym in fp32. Comparisons are written so NaN/inf rows
// give finite parameters.
static void AsymParams(float mn, float mx, float* inv, float* zp) {
  const float rmin = mn < 0.f ? mn : 0.f, rmax = mx > 0.f ? mx : 0.f;
  const float span = rmax - rmin;
  *inv = span > 0.f ? 255.f / span : 1.f;
  const float lo = Mul(rmin, *inv), hi = Mul(rmax, *inv);
  const float from_min = -128.f - lo, from_max = 127.f - hi;
  float z = (-128.f + lo) + (127.f + hi) > 0.f ? from_min : from_max;
  if (!(z > -128.f)) z = -128.f;
  if (!(z < 127.f)) z = 127.f;
  *zp = std::nearbyint(z);  // half to even (default rounding mode), like numpy.round
}

static inline int8_t QuantAsym(float x, float inv, float zp) {
  float v = std::nearbyint(x * inv) + zp;
  if (!(v > -128.f)) v = -128.f;  // also catches NaN: no UB in the cast
  if (!(v < 127.f)) v = 127.f;
  return (int8_t)v;
}

void Acts::PrepareRows(const float* x, int ldx, const int* rows, int n0, int n1) {
  std::vector<int8_t> tmp;
  for (int n = n0; n < n1; ++n) {
    const float* xr = x + (size_t)(rows ? rows[n] : n) * ldx;
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
    if (simd && VecIsa(isa) == Isa::kAvx512) {
      const size_t slot = (size_t)(n / 4) * 4 * K + (n % 4) * 128;
      if (mode == ActMode::kF32) {
        avx512::PrepRowF32(xr, K, f.data() + slot);
      } else {
        float mn, mx, inv;
        avx512::MinMax(xr, K, &mn, &mx);
        AsymParams(mn, mx, &inv, &zp[n]);
        scale[n] = 1.f / inv;
        int32_t* c = corr.data() + (size_t)(n / 4) * 4 * (K / 8) + (n % 4) * 16;
        csum[n] = avx512::PrepRowI8(xr, K, inv, zp[n], q.data() + slot, c);
        // The AMX B tiles (kernels_amx.cc): per 16 tokens and 128-k block, the block's even
        // k's then its odd k's (the quad layout's halves), each as [16 k-quads][16 tokens][4].
        if (amx_tiles())
          avx512::AmxColumns(q.data() + slot, K, tq.data() + (size_t)(n / 16) * 16 * K + (n % 16) * 4);
      }
      continue;
    }
#endif
    if (mode == ActMode::kF32) {
      if (!simd) {
        std::memcpy(f.data() + (size_t)n * K, xr, sizeof(float) * K);
      } else {
        for (int k = 0; k < K; ++k) f[SimdPos(n, k, K)] = xr[k];
      }
      continue;
    }
    // Dynamic asymmetric int8 per row: x ~= scale * (q - zp), q in [-128, 127].
    float mn = 0.f, mx = 0.f, inv;
    for (int k = 0; k < K; ++k) {
      mn = std::min(mn, xr[k]);
      mx = std::max(mx, xr[k]);
    }
    AsymParams(mn, mx, &inv, &zp[n]);
    scale[n] = 1.f / inv;
    int8_t* dst = simd ? (tmp.resize(K), tmp.data()) : q.data() + (size_t)n * K;
    for (int k = 0; k < K; ++k) dst[k] = QuantAsym(xr[k], inv, zp[n]);
    if (rows_f32) {
      float* fr = f.data() + (size_t)n * K;
      for (int k = 0; k < K; ++k) fr[k] = ((float)dst[k] - zp[n]) * scale[n];
    }
    if (!simd) continue;
    for (int k = 0; k < K; ++k) q[SimdPos(n, k, K)] = dst[k];
    // dpbusd lane j of a block sums k = 8j..8j+7 of that block; the kernel adds
    // 8 to every weight (unsigned operand) and this removes 8 * sum(x) again.
    int32_t* c = corr.data() + (size_t)(n / 4) * 4 * (K / 8) + (n % 4) * 16;
    int32_t cs = 0;
    for (int l = 0; l < K / 8; ++l) {
      int32_t s = 0;
      for (int k = 8 * l; k < 8 * l + 8; ++k) s += dst[k];
      c[(size_t)(l / 16) * 4 * 16 + l % 16] = -8 * s;
      cs += -8 * s;
    }
    csum[n] = cs;
  }
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;             // inf, NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;  // normal: rebias the exponent
  } else {
    const float v = std::ldexp((float)man, -24);       // zero, subnormal: man * 2^-24
    return sign ? -v : v;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void ZeroPointSums(const uint8_t* q, const float* s, int M, int K, int G, float* wsum) {
  for (int m = 0; m < M; ++m) {
    const uint8_t* row = q + (size_t)m * (K / 2);
    float acc = 0.f;
    for (int g = 0; g < K / G; ++g) {
      int32_t gs = 0;
      for (int k = g * G; k < (g + 1) * G; ++k) {
        const int v = (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
        gs += v >= 8 ? v - 16 : v;
      }
      acc += s[(size_t)m * (K / G) + g] * (float)gs;
    }
    wsum[m] = acc;
  }
}

// The SIMD int8 kernels return scale * sum_k W[m,k] q_k; this removes
// scale * zp * wsum[m], a rank-one term, in one vectorisable pass over out.
static void ZeroPointFix(const Q4Matrix& w, int m0, int m1, const Acts& a, float* out,
                         int ldo) {
  const float* __restrict ws = w.wsum + m0;
  for (int n = 0; n < a.N; ++n) {
    const float c = a.scale[n] * a.zp[n];
    float* __restrict o = out + (size_t)n * ldo;
    for (int m = 0; m < m1 - m0; ++m) o[m] -= c * ws[m];
  }
}

void TileRows(const uint8_t* rows, int M, int K, uint8_t* tiled) {
  const Q4Matrix t{tiled, nullptr, M, K, K, nullptr, kTileRows};
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < K / 128; ++b)
      std::memcpy(const_cast<uint8_t*>(WeightByte(t, m, b * 128)),
                  rows + (size_t)m * (K / 2) + b * 64, 64);
}

// Scalar reference kernels (any K, any even G; either layout).
static inline int Nibble(const Q4Matrix& w, int m, int k) {
  const int v = (*WeightByte(w, m, k) >> ((k & 1) * 4)) & 0xF;
  return v >= 8 ? v - 16 : v;
}

static void ScalarGemm(const Q4Matrix& w, int m0, int m1, const Acts& a,
                       float* out, int ldo) {
  const int K = w.K, G = w.G, ng = K / G;
  for (int n = 0; n < a.N; ++n) {
    for (int m = m0; m < m1; ++m) {
      const float* ws = w.s + (size_t)m * ng;
      float acc = 0.f;
      if (a.mode == ActMode::kF32) {
        const float* x = a.f.data() + (size_t)n * K;
        for (int g = 0; g < ng; ++g) {
          float gs = 0.f;
          for (int k = g * G; k < (g + 1) * G; ++k) gs += Nibble(w, m, k) * x[k];
          acc += ws[g] * gs;
        }
      } else {
        const int8_t* x = a.q.data() + (size_t)n * K;
        for (int g = 0; g < ng; ++g) {
          int32_t gs = 0;
          for (int k = g * G; k < (g + 1) * G; ++k) gs += Nibble(w, m, k) * x[k];
          acc += ws[g] * (float)gs;
        }
        acc = a.scale[n] * (acc - a.zp[n] * w.wsum[m]);
      }
      out[(size_t)n * ldo + (m - m0)] = acc;
    }
  }
}

// Output-axis groups (Q4Matrix::out_groups), columns [m0, m1) for N rows of x (ldx apart):
// the SIMD kernels' math, out[n, m] = sum_k (x[n,k] * s[k, m/G]) * q[k,m], row by row.
static void ScalarGemmOut(const Q4Matrix& w, int m0, int m1, const float* x, int ldx, int N,
                          float* out, int ldo) {
  const int K = w.K, ldw = w.M / 2, lds = w.M / w.G;
  for (int n = 0; n < N; ++n) {
    float* o = out + (size_t)n * ldo;
    std::fill(o, o + (m1 - m0), 0.f);
    const float* xn = x + (size_t)n * ldx;
    for (int k = 0; k < K; ++k) {
      const uint8_t* row = w.q + (size_t)k * ldw;
      const float* sr = w.s + (size_t)k * lds;
      for (int m = m0; m < m1; ++m) {
        const int v = (row[m >> 1] >> ((m & 1) * 4)) & 0xF;
        o[m - m0] += xn[k] * sr[m / w.G] * (float)(v >= 8 ? v - 16 : v);
      }
    }
  }
}

// Bytes per SIMD vector of the output-axis kernels (simd_shared.h GemmOutVec's W); 0: none.
static int OutVecBytes(Isa isa) {
  switch (VecIsa(isa)) {
    case Isa::kAvx512: return 16;
    case Isa::kAvx2: return 8;
    case Isa::kNeon: return 4;
    default: return 0;
  }
}

static void GemmOutCols(const Q4Matrix& w, int m0, int m1, const float* x, int ldx, int N,
                        Isa isa, float* out, int ldo) {
  const int vb = OutVecBytes(isa), c = 2 * vb;
  // SIMD columns: whole vectors inside one group each; the ragged ends go scalar.
  const int s0 = vb && (w.G / 2) % vb == 0 ? std::min(m1, (m0 + c - 1) / c * c) : m1;
  const int s1 = std::max(s0, vb ? m1 / c * c : m1);
  if (m0 < s0) ScalarGemmOut(w, m0, s0, x, ldx, N, out, ldo);
  if (s1 < m1) ScalarGemmOut(w, s1, m1, x, ldx, N, out + (s1 - m0), ldo);
  if (s0 >= s1) return;
  float* o = out + (s0 - m0);
  isa = VecIsa(isa);
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (isa == Isa::kAvx512) return avx512::GemmOut(w.q, w.s, w.K, w.M, w.G, s0, s1, x, ldx, N, o, ldo);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::GemmOut(w.q, w.s, w.K, w.M, w.G, s0, s1, x, ldx, N, o, ldo);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::GemmOut(w.q, w.s, w.K, w.M, w.G, s0, s1, x, ldx, N, o, ldo);
#endif
  ScalarGemmOut(w, s0, s1, x, ldx, N, o, ldo);
}

void Q4GemmOutRows(const Q4Matrix& w, int k0, int k1, const Acts& a, float* out, int ldo) {
  Q4Matrix part = w;
  part.q += (size_t)k0 * (w.M / 2);
  part.s += (size_t)k0 * (w.M / w.G);
  part.K = k1 - k0;
  GemmOutCols(part, 0, w.M, a.f.data() + k0, a.K, a.N, a.isa, out, ldo);
}

#if defined(__x86_64__)
// The x86 families share one signature (int8 path with the corr lanes).
using GemmI8Fn = void (*)(const uint8_t*, int, const float*, int, int, int, int,
                          const int8_t*, const int32_t*, const int32_t*, const float*, int,
                          float*, int);
using GemmF32Fn = void (*)(const uint8_t*, int, const float*, int, int, int, int,
                           const float*, int, float*, int);
static void X86Gemm(GemmI8Fn i8, GemmF32Fn f32, const Q4Matrix& w, int m0, int m1,
                    const Acts& a, float* out, int ldo) {
  if (a.mode == ActMode::kI8) {
    i8(w.q, w.tiles, w.s, w.K, w.G, m0, m1, a.q.data(), a.corr.data(), a.csum.data(), a.scale.data(),
       a.N, out, ldo);
    ZeroPointFix(w, m0, m1, a, out, ldo);
  } else {
    f32(w.q, w.tiles, w.s, w.K, w.G, m0, m1, a.f.data(), a.N, out, ldo);
  }
}
#endif

static void GemmRows(const Q4Matrix& w, int m0, int m1, const Acts& a, float* out, int ldo) {
#if defined(__x86_64__) && defined(MM_HAVE_AMX)
  // Channel-wise int8, several tokens: whole 16-row tiles on AMX, the rest on AVX-512.
  if (a.amx_tiles() && w.G == w.K && m1 - m0 >= 16) {
    const int m = m0 + (m1 - m0) / 16 * 16;
    amx::GemmI8C(w.q, w.tiles, w.s, w.K, m0, m, a.tq.data(), a.csum.data(), a.scale.data(),
                 a.zp.data(), w.wsum, a.N, out, ldo);  // its zero point included
    if (m == m1) return;
    avx512::GemmI8(w.q, w.tiles, w.s, w.K, w.G, m, m1, a.q.data(), a.corr.data(),
                   a.csum.data(), a.scale.data(), a.N, out + (m - m0), ldo);
    return ZeroPointFix(w, m, m1, a, out + (m - m0), ldo);
  }
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(a.isa) == Isa::kAvx512) return X86Gemm(avx512::GemmI8, avx512::GemmF32, w, m0, m1, a, out, ldo);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (a.isa == Isa::kAvx2) return X86Gemm(avx2::GemmI8, avx2::GemmF32, w, m0, m1, a, out, ldo);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (a.isa == Isa::kNeon) {
    if (a.mode == ActMode::kI8) {
      neon::GemmI8(w.q, w.tiles, w.s, w.K, w.G, m0, m1, a.q.data(), a.scale.data(), a.N, out, ldo);
      ZeroPointFix(w, m0, m1, a, out, ldo);
    } else {
      neon::GemmF32(w.q, w.tiles, w.s, w.K, w.G, m0, m1, a.f.data(), a.N, out, ldo);
    }
    return;
  }
#endif
  ScalarGemm(w, m0, m1, a, out, ldo);
}

void Q4Gemm(const Q4Matrix& w, int m0, int m1, const Acts& a, float* out, int ldo) {
  if (w.out_groups) return GemmOutCols(w, m0, m1, a.f.data(), a.K, a.N, a.isa, out, ldo);
  // Tiles: the SIMD row tiles (4, 2 or 16 rows from m0) must not straddle two,
  // so rows before the first tile start go one by one (one-row calls).
  const int head = w.tiles && m0 % kTileRows ? std::min(m1, (m0 / kTileRows + 1) * kTileRows) : m0;
  for (int m = m0; m < head; ++m) GemmRows(w, m, m + 1, a, out + (m - m0), ldo);
  if (head < m1) GemmRows(w, head, m1, a, out + (head - m0), ldo);
}

void WeightRowSums(const Q4Matrix* mats, float* const* outs, int n, ThreadPool* pool, Isa isa) {
  // One row of ones per input length and kernel layout.
  std::vector<std::unique_ptr<Acts>> ones;
  std::vector<const Acts*> ones_of;
  for (int i = 0; i < n; ++i) {
    const Isa a_isa = SimdShapeOk(mats[i].K, mats[i].G) ? isa : Isa::kScalar;
    const Acts* found = nullptr;
    for (const auto& a : ones)
      if (a->K == mats[i].K && a->isa == a_isa) found = a.get();
    if (!found) {
      ones.push_back(std::make_unique<Acts>());
      ones.back()->Resize(1, mats[i].K, ActMode::kF32, a_isa);
      const std::vector<float> one(mats[i].K, 1.f);
      ones.back()->PrepareRows(one.data(), mats[i].K, nullptr, 0, 1);
      found = ones.back().get();
    }
    ones_of.push_back(found);
  }
  constexpr int kRows = 256;
  std::vector<int> first(n + 1, 0);
  for (int i = 0; i < n; ++i) first[i + 1] = first[i] + (mats[i].M + kRows - 1) / kRows;
  pool->Run(first.back(), [&](int item, int) {
    const int i = int(std::upper_bound(first.begin(), first.end(), item) - first.begin()) - 1;
    const int m0 = (item - first[i]) * kRows, m1 = std::min(mats[i].M, m0 + kRows);
    Q4Matrix m = mats[i];
    m.wsum = nullptr;   // fp32 mode reads no sums; these calls are what computes them
    Q4Gemm(m, m0, m1, *ones_of[i], outs[i] + m0, m.M);
  });
}

float Dot(const float* a, const float* b, int n, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::Dot(a, b, n);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::Dot(a, b, n);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::Dot(a, b, n);
#endif
  float s[4] = {0, 0, 0, 0};
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void DotMany(const float* a, const float* rows, int n, int len, float* out, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::DotMany(a, rows, n, len, out);
#endif
  for (int i = 0; i < n; ++i) out[i] = Dot(a, rows + (size_t)i * len, len, isa);
}

void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::DotRows(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::DotRows(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::DotRows(q, rep, ldq, rows, n, ldr, len, scale, out, ldo);
#endif
  for (int r = 0; r < rep; ++r)
    for (int i = 0; i < n; ++i)
      out[(size_t)r * ldo + i] = Dot(q + (size_t)r * ldq, rows + (size_t)i * ldr, len, isa) * scale;
}

void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::DotCols(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::DotCols(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::DotCols(q, rep, ldq, cols, ldc, n, len, scale, out, ldo);
#endif
  for (int r = 0; r < rep; ++r)
    for (int i = 0; i < n; ++i) {
      float sum = 0.f;
      for (int k = 0; k < len; ++k) sum += q[(size_t)r * ldq + k] * cols[(size_t)k * ldc + i];
      out[(size_t)r * ldo + i] = sum * scale;
    }
}

void Softmax(float* s, int n, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::Softmax(s, n);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::Softmax(s, n);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::Softmax(s, n);
#endif
  float mx = s[0];
  for (int k = 1; k < n; ++k) mx = std::max(mx, s[k]);
  float sum = 0.f;
  for (int k = 0; k < n; ++k) sum += (s[k] = std::exp(s[k] - mx));
  const float inv = 1.f / sum;
  for (int k = 0; k < n; ++k) s[k] *= inv;
}

void AddScaled(float a, const float* x, float* y, int n, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::AddScaled(a, x, y, n);
#endif
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

void SiluMul(const float* g, const float* u, float* h, int n, Isa isa) {
#if defined(__x86_64__) && defined(MM_HAVE_AVX512)
  if (VecIsa(isa) == Isa::kAvx512) return avx512::SiluMul(g, u, h, n);
#endif
#if defined(__x86_64__) && defined(MM_HAVE_AVX2)
  if (isa == Isa::kAvx2) return avx2::SiluMul(g, u, h, n);
#endif
#if defined(__aarch64__) && defined(MM_HAVE_NEON_DOT)
  if (isa == Isa::kNeon) return neon::SiluMul(g, u, h, n);
#endif
  for (int i = 0; i < n; ++i) h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace mm

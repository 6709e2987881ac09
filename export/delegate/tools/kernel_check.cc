// Self-check of the SIMD kernels against the scalar ones, without LiteRT:
// random INT4 matrices and activations, every (K, G, N, M, mode) combination
// (G == K: channel-wise, one scale per row), and the 16-row tiled layout
// against the row layout (M % 16 == 0: whole matrix, from row 16, from row 5),
// for each SIMD family this CPU runs (AMX, AVX-512 and AVX2 on x86, NEON on arm64); and the
// output-axis layout (Q4Matrix::out_groups, CheckOut) over odd shapes and column ranges;
// DotCols and Softmax (prefill attention), AddScaled (the combine) and DotMany (the router) bit for bit; and HalfToFloat (block-wise FC scales) on every fp16 value.
// Used by tests/test_delegate_kernels.py (natively, and arm64 under qemu).
//   g++ -std=c++17 -O2 -I export/delegate [-DMM_HAVE_...] tools/kernel_check.cc
//       kernels/kernels.cc [kernels/kernels_<isa>.cc ...] && ./a.out
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/kernels.h"

using namespace mm;

// Output-axis groups: SIMD vs scalar on fp32 rows (Acts::rows_f32) in both modes; ragged
// column ranges make the SIMD kernels hand their ends to the scalar code.
static int CheckOut(Isa isa, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  int checks = 0;
  for (int K : {1, 7, 64, 384})
  for (int G : {32, 64})
  for (int M : {32, 96, 160, 768}) {
    if (M % G) continue;
    std::vector<uint8_t> q((size_t)K * M / 2);
    for (auto& b : q) b = (uint8_t)rng();
    std::vector<float> s((size_t)K * M / G);
    for (auto& v : s) v = 0.01f + 0.05f * std::fabs(u(rng));
    Q4Matrix w{q.data(), s.data(), M, K, G};
    w.out_groups = true;
    for (int N : {1, 2, 3, 5, 9}) {
      std::vector<float> x((size_t)N * K);
      for (auto& v : x) v = u(rng);
      for (ActMode mode : {ActMode::kF32, ActMode::kI8}) {
        Acts simd, plain;
        simd.Resize(N, K, mode, isa, true);
        plain.Resize(N, K, mode, Isa::kScalar, true);
        simd.PrepareRows(x.data(), K, nullptr, 0, N);
        plain.PrepareRows(x.data(), K, nullptr, 0, N);
        // SIMD vs scalar on one call (ragged columns [m0, m1), or rows [k0, M) when m0 < 0:
        // decode's split by input rows, x rows K apart).
        auto same = [&](int m0, int m1, int k0) {
          std::vector<float> a((size_t)N * M, 7.f), b((size_t)N * M, 7.f);
          if (m0 >= 0) {
            Q4Gemm(w, m0, m1, simd, a.data(), M);
            Q4Gemm(w, m0, m1, plain, b.data(), M);
          } else {
            Q4GemmOutRows(w, k0, K, simd, a.data(), M);
            Q4GemmOutRows(w, k0, K, plain, b.data(), M);
          }
          float err = 0, scale = 0;
          for (size_t i = 0; i < a.size(); ++i) {
            err = std::fmax(err, std::fabs(a[i] - b[i]));
            scale = std::fmax(scale, std::fabs(b[i]));
          }
          ++checks;
          if (err <= 1e-5f * scale + 1e-6f) return true;
          printf("MISMATCH %s out_groups K=%d G=%d M=%d N=%d cols=[%d,%d) rows from %d mode=%d "
                 "err=%g scale=%g\n", IsaName(isa), K, G, M, N, m0, m1, k0, (int)mode, err, scale);
          return false;
        };
        if (!same(0, M, 0) || !same(6, M - 10, 0) || !same(32, M, 0) || !same(-1, -1, K / 3))
          return -1;
      }
    }
  }
  return checks;
}

static int Check(Isa isa) {
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  int checks = 0;
  for (int K : {128, 256, 384, 768}) {
    for (int G : {32, 64, 128, 256, 0}) {  // 0: channel-wise (G = K)
      if (G == 0) G = K;
      else if (K % G || G == K) continue;
      for (int N : {1, 3, 4, 9, 21, 70})  // 21, 70: AMX's partial and several token groups
      for (int M : {13, 37, 48}) {  // row tiles plus tail rows; 48: also tiled
        std::vector<uint8_t> q((size_t)M * K / 2);
        for (auto& b : q) b = (uint8_t)rng();
        std::vector<float> s((size_t)M * K / G), x((size_t)N * K);
        for (auto& v : s) v = 0.01f + 0.05f * std::fabs(u(rng));
        for (auto& v : x) v = u(rng);
        for (int n = 0; n < N; n += 3)  // one-signed rows: zero points at the ends
          for (int k = 0; k < K; ++k) x[(size_t)n * K + k] = (n % 2 ? -1.f : 1.f) * std::fabs(x[(size_t)n * K + k]);
        std::vector<float> wsum(M);
        ZeroPointSums(q.data(), s.data(), M, K, G, wsum.data());
        const Q4Matrix w{q.data(), s.data(), M, K, G, wsum.data()};
        for (ActMode mode : {ActMode::kF32, ActMode::kI8}) {
          Acts simd, plain;
          simd.Resize(N, K, mode, isa);
          plain.Resize(N, K, mode, Isa::kScalar);
          simd.PrepareRows(x.data(), K, nullptr, 0, N);
          plain.PrepareRows(x.data(), K, nullptr, 0, N);
          std::vector<float> a((size_t)N * M), b((size_t)N * M);
          Q4Gemm(w, 0, M, simd, a.data(), M);
          Q4Gemm(w, 0, M, plain, b.data(), M);
          auto same = [&](const std::vector<float>& got, int m0, const char* what) {
            float err = 0, scale = 0;
            for (int n = 0; n < N; ++n)
              for (int m = m0; m < M; ++m) {
                const float g = got[(size_t)n * M + m - m0], want = b[(size_t)n * M + m];
                err = std::fmax(err, std::fabs(g - want));
                scale = std::fmax(scale, std::fabs(want));
              }
            if (!(err <= 1e-5f * scale + 1e-6f))
              printf("MISMATCH %s %s K=%d G=%d N=%d M=%d m0=%d mode=%d err=%g scale=%g\n",
                     IsaName(isa), what, K, G, N, M, m0, (int)mode, err, scale);
            ++checks;
            return err <= 1e-5f * scale + 1e-6f;
          };
          if (!same(a, 0, "rows")) return -1;
          if (isa == Isa::kAmx && mode == ActMode::kI8) {
            // The AMX tiles sum the same integers as the AVX-512 kernels: the same bits.
            Acts vnni;
            vnni.Resize(N, K, mode, Isa::kAvx512);
            vnni.PrepareRows(x.data(), K, nullptr, 0, N);
            std::vector<float> v((size_t)N * M);
            Q4Gemm(w, 0, M, vnni, v.data(), M);
            ++checks;
            if (v != a) {
              printf("MISMATCH avx512-amx vs avx512-vnni K=%d G=%d N=%d M=%d\n", K, G, N, M);
              return -1;
            }
          }
          if (TilesOk(M, K)) {
            std::vector<uint8_t> tq(q.size());
            TileRows(q.data(), M, K, tq.data());
            Q4Matrix t = w;
            t.q = tq.data();
            t.tiles = kTileRows;
            for (int m0 : {0, 16, 5}) {  // 5: not a tile start (rows 5..15 one by one)
              std::vector<float> c((size_t)N * M);
              Q4Gemm(t, m0, M, simd, c.data(), M);
              if (!same(c, m0, "tiles")) return -1;
              Q4Gemm(t, m0, M, plain, c.data(), M);
              if (!same(c, m0, "tiles, scalar")) return -1;
            }
          }
        }
      }
    }
  }
  // Router dot products and SwiGLU, against the portable code.
  std::vector<float> g(1000), up(1000), h1(1000), h2(1000);
  for (size_t i = 0; i < g.size(); ++i) { g[i] = 12 * u(rng); up[i] = u(rng); }
  SiluMul(g.data(), up.data(), h1.data(), (int)g.size(), isa);
  SiluMul(g.data(), up.data(), h2.data(), (int)g.size(), Isa::kScalar);
  for (size_t i = 0; i < g.size(); ++i)
    if (!(std::fabs(h1[i] - h2[i]) <= 1e-5f * (1 + std::fabs(h2[i])))) {
      printf("MISMATCH %s SiluMul g=%g: %g vs %g\n", IsaName(isa), g[i], h1[i], h2[i]);
      return -1;
    }
  // The combine y += w * x: the same bits as the portable loop (no FMA), a partial vector too.
  h1 = up;
  h2 = up;
  AddScaled(0.37f, g.data(), h1.data(), 999, isa);
  AddScaled(0.37f, g.data(), h2.data(), 999, Isa::kScalar);
  for (size_t i = 0; i < h1.size(); ++i)
    if (h1[i] != h2[i]) {
      printf("MISMATCH %s AddScaled i=%zu: %.9g vs %.9g\n", IsaName(isa), i, h1[i], h2[i]);
      return -1;
    }
  // The router's DotMany: the bits of one Dot per row (1-16 rows; lengths with and without
  // whole blocks of 32).
  std::vector<float> rows(16 * 100);
  for (auto& v : rows) v = u(rng);
  for (int len : {96, 100})
    for (int n : {1, 7, 16}) {
      float many[16];
      DotMany(up.data(), rows.data(), n, len, many, isa);
      ++checks;
      for (int i = 0; i < n; ++i) {
        const float one = Dot(up.data(), rows.data() + (size_t)i * len, len, isa);
        if (many[i] != one) {
          printf("MISMATCH %s DotMany len=%d n=%d i=%d: %.9g vs %.9g\n", IsaName(isa), len, n, i,
                 many[i], one);
          return -1;
        }
      }
    }
  const float d1 = Dot(g.data(), up.data(), 999, isa), d2 = Dot(g.data(), up.data(), 999, Isa::kScalar);
  if (!(std::fabs(d1 - d2) <= 1e-4f * (1 + std::fabs(d2)))) {
    printf("MISMATCH %s Dot: %g vs %g\n", IsaName(isa), d1, d2);
    return -1;
  }
  // DotCols (prefill attention): 1-5 rows, column counts with and without a partial vector.
  for (int rep : {1, 3, 5})
    for (int n : {1, 16, 45, 64}) {
      const int len = 37, ldc = n + 16, ldq = len + 3;
      std::vector<float> q((size_t)rep * ldq), cols((size_t)len * ldc);
      for (auto& v : q) v = u(rng);
      for (auto& v : cols) v = u(rng);
      std::vector<float> a((size_t)rep * n), b((size_t)rep * n);
      DotCols(q.data(), rep, ldq, cols.data(), ldc, n, len, 0.5f, a.data(), n, isa);
      DotCols(q.data(), rep, ldq, cols.data(), ldc, n, len, 0.5f, b.data(), n, Isa::kScalar);
      ++checks;
      for (size_t i = 0; i < a.size(); ++i)
        if (!(std::fabs(a[i] - b[i]) <= 1e-5f * (1 + std::fabs(b[i])))) {
          printf("MISMATCH %s DotCols rep=%d n=%d: %g vs %g\n", IsaName(isa), rep, n, a[i], b[i]);
          return -1;
        }
    }
  for (int n : {1, 15, 16, 77}) {   // Softmax: SIMD exp vs std::exp
    std::vector<float> a(n), b(n);
    for (int i = 0; i < n; ++i) a[i] = b[i] = 20 * u(rng);
    Softmax(a.data(), n, isa);
    Softmax(b.data(), n, Isa::kScalar);
    ++checks;
    for (int i = 0; i < n; ++i)
      if (!(std::fabs(a[i] - b[i]) <= 1e-6f * (1e-3f + b[i]))) {
        printf("MISMATCH %s Softmax n=%d: %g vs %g\n", IsaName(isa), n, a[i], b[i]);
        return -1;
      }
  }
  const int out = CheckOut(isa, rng);
  return out < 0 ? -1 : checks + 2 + out;
}

// HalfToFloat on all 65536 fp16 bit patterns against the value the IEEE format defines.
static bool CheckHalf() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    const double mag = exp == 0 ? std::ldexp((double)man, -24)
                                : std::ldexp(1024.0 + man, exp - 25);
    const float got = HalfToFloat((uint16_t)h);
    const bool neg = h & 0x8000;
    const bool ok = exp == 0x1f ? (man ? std::isnan(got) : std::isinf(got) && (got < 0) == neg)
                                : got == (float)(neg ? -mag : mag) && std::signbit(got) == neg;
    if (!ok) {
      printf("MISMATCH HalfToFloat(0x%04x) = %g, want %g\n", h, got, neg ? -mag : mag);
      return false;
    }
  }
  return true;
}

int main() {
  if (!CheckHalf()) return 1;
  printf("ok fp16 -> fp32: 65536 values\n");
  std::vector<Isa> isas;
  for (IsaCap cap : {IsaCap::kAuto, IsaCap::kAvx512, IsaCap::kAvx2}) {
    const Isa isa = KernelIsa(cap);
    if (isa != Isa::kScalar && (isas.empty() || isas.back() != isa)) isas.push_back(isa);
  }
  if (isas.empty()) {
    printf("no SIMD kernels on this CPU/build\n");
    return 2;
  }
  for (Isa isa : isas) {
    const int n = Check(isa);
    if (n < 0) return 1;
    printf("ok %s: %d checks\n", IsaName(isa), n);
  }
  return 0;
}

// Self-check of the SIMD kernels against the scalar ones, without LiteRT:
// random INT4 matrices and activations, every (K, G, N, mode) combination.
// Used by tests/test_delegate_neon.py to run the arm64 build under qemu.
//   g++ -std=c++17 -O2 [-DMM_HAVE_...] kernel_check.cc kernels.cc [simd .cc] && ./a.out
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels.h"

using namespace mm;

int main() {
  if (!SimdAvailable()) {
    printf("no SIMD kernels on this CPU/build\n");
    return 2;
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  int checks = 0;
  for (int K : {128, 256, 768}) {
    for (int G : {32, 64, 128, 256}) {
      if (K % G) continue;
      for (int N : {1, 3, 4, 9}) {
        const int M = 13;
        std::vector<uint8_t> q((size_t)M * K / 2);
        for (auto& b : q) b = (uint8_t)rng();
        std::vector<float> s((size_t)M * K / G), x((size_t)N * K);
        for (auto& v : s) v = 0.01f + 0.05f * std::fabs(u(rng));
        for (auto& v : x) v = u(rng);
        const Q4Matrix w{q.data(), s.data(), M, K, G};
        for (ActMode mode : {ActMode::kF32, ActMode::kI8}) {
          Acts simd, plain;
          simd.Resize(N, K, mode, true);
          plain.Resize(N, K, mode, false);
          simd.PrepareRows(x.data(), K, nullptr, 0, N);
          plain.PrepareRows(x.data(), K, nullptr, 0, N);
          std::vector<float> a((size_t)N * M), b((size_t)N * M);
          Q4Gemm(w, 0, M, simd, a.data(), M);
          Q4Gemm(w, 0, M, plain, b.data(), M);
          float err = 0, scale = 0;
          for (size_t i = 0; i < a.size(); ++i) {
            err = std::fmax(err, std::fabs(a[i] - b[i]));
            scale = std::fmax(scale, std::fabs(b[i]));
          }
          if (!(err <= 1e-5f * scale + 1e-6f)) {
            printf("MISMATCH K=%d G=%d N=%d mode=%d err=%g scale=%g\n", K, G, N, (int)mode, err, scale);
            return 1;
          }
          ++checks;
        }
      }
    }
  }
  printf("ok %d checks\n", checks);
  return 0;
}

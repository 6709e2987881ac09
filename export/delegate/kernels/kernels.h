// INT4 group-wise weight kernels shared by decode and prefill.
//
// A weight matrix W [M, K] is stored as packed signed int4 (two per byte along
// K, low nibble = even k) plus fp32 scales S [M, K/G]:  W[m,k] = q[m,k] *
// S[m, k/G]. Kernels compute out[n, m] = sum_k W[m,k] * x[n,k] for a range of
// rows m and a list of activation rows n, dequantising in registers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace mm {

enum class ActMode { kF32, kI8 };

// Kernel families. Isa::kScalar is the portable C++ (any shape); the others
// need SimdShapeOk. On x86 the best the CPU has is picked at run time:
// AVX-512 VNNI plus AMX-INT8 tiles, else AVX-512 VNNI, else AVX2 + FMA (with
// AVX-VNNI's dot product when present). kAmx is the AVX-512 family whose
// channel-wise int8 GEMMs of kAmxMinTokens+ tokens run on the AMX tiles.
enum class Isa { kScalar, kAvx2, kAvx512, kNeon, kAmx };
// A cap on that choice (the delegate's `kernel` option): kAvx512 runs without
// AMX, kAvx2 the AVX2 kernels even on an AVX-512 CPU, e.g. to test them.
enum class IsaCap { kAuto, kAvx512, kAvx2, kScalar };
// Fewer tokens than this stay on the VNNI kernels (decode: a GEMV streams its weights once).
constexpr int kAmxMinTokens = 4;

// The kernels this CPU and build run under `cap`.
Isa KernelIsa(IsaCap cap);
const char* IsaName(Isa isa);
bool SimdShapeOk(int K, int G);

// std::vector storage on 64-byte boundaries: AMX tile rows that straddle two cache lines
// loaded ~3.7x slower (kernels_amx.cc).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};

// N activation rows of length K, laid out for the kernel that will read them.
// Scalar layout: plain [N, K]. SIMD layout: tokens in quads, each quad stored
// as [K/128 blocks][4 tokens][128], and inside a block [64 even k's, 64 odd
// k's] to match the low/high nibbles of 64 packed weight bytes.
struct Acts {
  int N = 0, K = 0;
  ActMode mode = ActMode::kF32;
  Isa isa = Isa::kScalar;  // whose kernels read these rows (layout: see above)
  bool simd = false;       // isa != kScalar
  std::vector<float> f;       // fp32 mode
  // int8 mode: XNNPACK's asymmetric per-row grid (mobilemoe_jax/quant/grid.py,
  // quantize_act_int8_asym), x ~= scale[n] * (q - zp[n]), q in [-128, 127].
  std::vector<int8_t> q;
  std::vector<int32_t> corr;  // simd int8: -8 * (sum of 8 q's) per lane, see .cc
  std::vector<int32_t> csum;  // simd int8: [N] -8 * (sum of the row's q's), channel-wise kernels
  std::vector<float> scale;   // [N] int8 mode: 1 / inv
  std::vector<float> zp;      // [N] int8 mode: integer-valued zero point
  // kAmx int8: the tokens again as AMX B tiles (kernels_amx.cc): per 16 tokens and 128-k
  // block, [even k | odd k] x [16 k-quads][16 tokens][4 k's].
  std::vector<int8_t, Aligned64<int8_t>> tq;
  // Rows for output-axis matrices (Q4Matrix::out_groups): f holds plain fp32 rows [N, K] in
  // either mode, in int8 mode the grid's values (q - zp) * scale (grid.fake_quant_act).
  bool rows_f32 = false;

  void Resize(int n, int k, ActMode m, Isa kernel_isa, bool f32_rows = false);
  // Whether the GEMMs read these rows through the AMX tiles (and tq is prepared).
  bool amx_tiles() const { return simd && isa == Isa::kAmx && mode == ActMode::kI8 && N >= kAmxMinTokens; }
  // Prepares tokens [n0, n1): token n is row rows[n] (or n) of x, row stride
  // ldx. Tokens are independent, so callers may split them across threads
  // (at multiples of 4 to keep quads apart).
  void PrepareRows(const float* x, int ldx, const int* rows, int n0, int n1);
};

struct Q4Matrix {
  const uint8_t* q;  // [M, K/2] (layout: see tiles)
  const float* s;    // [M, K/G]
  int M, K, G;       // G == K: channel-wise (one scale per row; integer sums over all of K)
  // [M] sum_k W[m,k] (see ZeroPointSums); int8 mode needs it for the zero point.
  const float* wsum = nullptr;
  // 0: the file's row layout. 16: rows in tiles of 16 (TileRows), so a one-token
  // GEMV reads each tile as one sequential stream (~1.2-1.5x the row layout's
  // DRAM rate here); needs M % 16 == 0 and K % 128 == 0 (TilesOk).
  int tiles = 0;
  // Output-axis groups (the released MobileMoE's experts, stored [in, out]): q [K, M/2],
  // two outputs per byte (low nibble = even output), s [K, M/G]:
  // W[m,k] = q[k,m] * s[k, m/G]. Read from Acts::rows_f32 rows; no wsum, no tiles.
  bool out_groups = false;
};

// The 16-row tiled layout: tile t = rows 16t..16t+15 stored as [K/128 blocks]
// [16 rows][64 bytes]; byte j of row m is at (m/16)*16*(K/2) + (j/64)*1024 +
// (m%16)*64 + j%64 (export/moe_op.py tile_rows writes it).
constexpr int kTileRows = 16;
inline bool TilesOk(int M, int K) { return M % kTileRows == 0 && K % 128 == 0; }
// tiled[...] = rows[...] for one matrix (rows: [M, K/2] bytes, the file's layout).
void TileRows(const uint8_t* rows, int M, int K, uint8_t* tiled);
// The byte holding k's nibble in row m of w (either layout).
inline const uint8_t* WeightByte(const Q4Matrix& w, int m, int k) {
  const std::size_t j = (std::size_t)k >> 1, ldw = (std::size_t)w.K / 2;
  if (!w.tiles) return w.q + m * ldw + j;
  return w.q + (std::size_t)(m / kTileRows) * kTileRows * ldw + (j / 64) * 1024 +
         (std::size_t)(m % kTileRows) * 64 + j % 64;
}

// wsum[m] = sum_g S[m,g] * sum_{k in g} q[m,k]: the int8 kernels compute
// sum_k W[m,k] q_k and subtract zp * wsum[m] to get sum_k W[m,k] (q_k - zp).
// Scalar reference (kernel_check); MoeBlock gets the same sums from the GEMV
// kernels on a row of ones (MobileMoE-S first decode call: 1.08 -> 0.06 s).
void ZeroPointSums(const uint8_t* q, const float* s, int M, int K, int G, float* wsum);

class ThreadPool;

// outs[i][m] = sum_k W_i[m,k] for every row of each of the n matrices (what
// ZeroPointSums computes), on the pool: the fp32 GEMV kernels on a row of ones,
// at DRAM speed (the scalar nibble loop took ~1 s per signature at MobileMoE-S's
// size on the first call). The same sums up to fp32 rounding order.
void WeightRowSums(const Q4Matrix* mats, float* const* outs, int n, ThreadPool* pool, Isa isa);

// out[n * ldo + (m - m0)] = (W x_n)[m] for m in [m0, m1), n in [0, a.N).
void Q4Gemm(const Q4Matrix& w, int m0, int m1, const Acts& a, float* out, int ldo);
// An out_groups matrix's partial sums over input rows [k0, k1), all M columns:
// out[n * ldo + m] = sum_{k0 <= k < k1} W[m,k] x_n[k]. Decode splits these matrices by
// input rows, so each work item streams one contiguous block of them.
void Q4GemmOutRows(const Q4Matrix& w, int k0, int k1, const Acts& a, float* out, int ldo);

// IEEE fp16 bits -> the same value in fp32 (exact: every fp16 is an fp32, subnormals,
// infinities and NaNs included): LiteRT's block-wise scales (kernels/fc.h).
float HalfToFloat(uint16_t h);

float Dot(const float* a, const float* b, int n, Isa isa);
// out[i] = Dot(a, rows + i * len, len, isa) for i < n <= 16: the same bits as n calls (the
// router's logits); AVX-512 runs them interleaved and sums their lanes together.
void DotMany(const float* a, const float* rows, int n, int len, float* out, Isa isa);

// out[r * ldo + i] = scale * (q_r . row_i) for r < rep, i < n (q_r = q + r * ldq,
// row_i = rows + i * ldr, both of length len): attention scores and values.
void DotRows(const float* q, int rep, int ldq, const float* rows, int n, int ldr, int len,
             float scale, float* out, int ldo, Isa isa);

// out[r * ldo + i] = scale * sum_k q[r * ldq + k] * cols[k * ldc + i] for r < rep, i < n
// (a prefill chunk's attention: keys, or value rows, stored as columns; no horizontal sums).
// Each row of cols must be readable up to i = n + 15 (SIMD reads the last vector whole).
void DotCols(const float* q, int rep, int ldq, const float* cols, int ldc, int n, int len,
             float scale, float* out, int ldo, Isa isa);

// s[i] = exp(s[i] - max(s)) / sum_k exp(s[k] - max(s)), n >= 1 (SIMD: a polynomial exp,
// |rel err| ~1e-7; the scalar code is the plain loop with std::exp).
void Softmax(float* s, int n, Isa isa);

// y[i] += a * x[i] (the combine of expert outputs): the same bits on every ISA.
void AddScaled(float a, const float* x, float* y, int n, Isa isa);

// h[i] = silu(g[i]) * u[i]
void SiluMul(const float* g, const float* u, float* h, int n, Isa isa);

}  // namespace mm

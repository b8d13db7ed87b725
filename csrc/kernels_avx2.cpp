// AVX2 + FMA kernels (8 floats per vector), compiled for that target by the pragma below.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#include <immintrin.h>

namespace adsparse {
namespace {

struct Vec {
  using V = __m256;
  static constexpr bool kBf16Dot = false;  // bf16 blocks are widened to floats
  static constexpr int W = 8;
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  // VMASKMOVPS does not fault on masked-off lanes, so tails never read past the tensor.
  static inline V loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  // bf16 blocks: 8 x 16 bits widened to the upper halves of 8 floats.
  static inline V load(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline V loadn(const bf16* p, int n) {
    alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) t[i] = p[i].bits;
    return load(reinterpret_cast<const bf16*>(t));
  }
  static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  // max(0, v) with v second: MAXPS returns its second operand when one is NaN, so NaN survives.
  static inline V relu(V v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void storen(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  // Sum of each of kGemvRows vectors.
  template <int G>
  static inline void hsum_rows(const V (&acc)[G], float* out) {
    for (int g = 0; g < G; ++g) out[g] = hsum(acc[g]);
  }
  // Plain 16 x 16 transpose (only AVX-512 has a register version worth its code).
  static inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
  static inline float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

// 16 ymm registers: 12 accumulators + the loaded vectors + one broadcast.
constexpr int kMR = 6;        // spmm: 6 rows x 2 vectors (a 16-wide block) = 12 accumulators
constexpr int kNR1 = 12;
constexpr int kNR2 = 6;
constexpr int kMaxNV = 2;
constexpr int kGemvRows = 8;
constexpr int kMinAcc = 8;  // spmm: accumulators a short tile keeps (1 row: 4 sets x 2 vectors)
constexpr const char* kIsaName = "avx2";

#include "kernels_impl.h"

// int8: VPMADDWD on int16 (weights widened with VPMOVSXBW as they are loaded). Exact: a pair of
// products is at most 2 * 127 * 127, far from the int16 saturation that VPMADDUBSW (u8 x s8 ->
// saturating s16 pairs) would hit with full-range 8-bit operands. One vector is 4 columns x
// 2 partial sums (k 0+1, k 2+3), added in store_cols.
struct Q {
  using XA = int16_t;
  static constexpr int kXShift = 0;
  static constexpr int kCols = 4;
  using Acc = __m256i;
  using Wv = __m256i;
  static inline Acc zero() { return _mm256_setzero_si256(); }
  static inline Wv loadw(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline Acc madd(Acc c, const XA* x, Wv w) {
    long long q;
    std::memcpy(&q, x, sizeof q);  // x[0..3] as int16, broadcast to every column
    return _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_set1_epi64x(q), w));
  }
  static inline Acc wsum(Acc c, Wv) { return c; }
  static inline void store_cols(Acc acc, Acc, int32_t* d) {
    const __m128i s = _mm_hadd_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), s);
  }
  // A full tile's row (2 vectors of 4 columns) as qfinish computes it, in one vector.
  static constexpr int kFinishCols = 8;
  static inline void finish(const int32_t* s, float sx, const float* sw, const float* bias,
                            int relu, float* o) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(sx));
    y = _mm256_mul_ps(y, _mm256_loadu_ps(sw));
    if (bias) y = _mm256_add_ps(y, _mm256_loadu_ps(bias));
    if (relu) y = _mm256_max_ps(_mm256_setzero_ps(), y);  // NaN (second operand) passes
    _mm256_storeu_ps(o, y);
  }
  static constexpr int kQW = 8;
  static inline uint32_t absmax_bits(const float* x, int64_t n) {
    const __m256i bits = _mm256_set1_epi32(0x7fffffff);
    __m256i m = _mm256_setzero_si256();
    for (int64_t k = 0; k < n; k += kQW) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      m = _mm256_max_epu32(m, _mm256_and_si256(v, bits));
    }
    __m128i h = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xB1));
    return static_cast<uint32_t>(_mm_cvtsi128_si32(h));
  }
  static inline void quantize(const float* x, int64_t n, float inv, int8_t* q) {
    const __m256 s = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < n; k += kQW) {
      const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), s),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i i = _mm256_cvtps_epi32(v);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
    }
  }
};

// 16 ymm registers: 12 accumulators + 2 weight vectors + one broadcast.
constexpr int kQMR = 6;
constexpr int kQMaxNV = 2;

#include "qkernels_impl.h"

}  // namespace

const KernelTable& kernels_avx2() { return kTable; }
const QKernelTable& qkernels_avx2() { return kQTable; }

}  // namespace adsparse
#pragma GCC pop_options
#endif  // x86

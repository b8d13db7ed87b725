// AVX2 + FMA kernels (8 floats per vector), compiled for that target by the pragma below.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#include <immintrin.h>

namespace adsparse {
namespace {

struct Vec {
  using V = __m256;
  static constexpr int W = 8;
  static inline __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  // VMASKMOVPS does not fault on masked-off lanes, so tails never read past the tensor.
  static inline V loadn(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
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
constexpr const char* kIsaName = "avx2";

#include "kernels_impl.h"

}  // namespace

const KernelTable& kernels_avx2() { return kTable; }

}  // namespace adsparse
#pragma GCC pop_options
#endif  // x86

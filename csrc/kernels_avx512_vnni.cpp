// int8 serving kernels for AVX-512 VNNI: VPDPBUSD multiplies 4 unsigned by 4 signed bytes and adds
// the four products to an int32 lane (no intermediate saturation). Activations are made unsigned
// by adding 128 (qx + 128 in [1, 255]); the kernel sums each weight column alongside (one more
// VPDPBUSD with all-ones bytes per depth step, shared by the 16 rows of a tile) and subtracts
// 128 * that sum. Compiled for this target by the pragma below; cpu_isa.cpp calls it only on
// CPUs that report AVX512_VNNI as well as the AVX-512 features of the fp32 kernels.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,bmi,bmi2")
// See kernels_avx512.cpp: GCC 12's AVX-512 headers trip -W(maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace adsparse {
namespace {

struct Q {
  using XA = uint8_t;
  static constexpr int kXShift = 128;
  static constexpr int kCols = 16;
  using Acc = __m512i;
  using Wv = __m512i;
  static inline Acc zero() { return _mm512_setzero_si512(); }
  static inline Wv loadw(const int8_t* p) { return _mm512_loadu_si512(p); }
  static inline Acc madd(Acc c, const XA* x, Wv w) {
    int32_t q;
    std::memcpy(&q, x, sizeof q);  // x[0..3] as bytes, broadcast to every column
    return _mm512_dpbusd_epi32(c, _mm512_set1_epi32(q), w);
  }
  static inline Acc wsum(Acc c, Wv w) {
    return _mm512_dpbusd_epi32(c, _mm512_set1_epi32(0x01010101), w);
  }
  static inline void store_cols(Acc acc, Acc ws, int32_t* d) {
    _mm512_storeu_si512(d, _mm512_sub_epi32(acc, _mm512_slli_epi32(ws, 7)));
  }
  // A full tile's row (16 columns, kQMaxNV = 1) as qfinish computes it, in one vector. Written
  // out: GCC's vectorized loop checked at run time, per row, that out, sw and bias do not alias.
  static constexpr int kFinishCols = 16;
  static inline void finish(const int32_t* s, float sx, const float* sw, const float* bias,
                            int relu, float* o) {
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(s)), _mm512_set1_ps(sx));
    y = _mm512_mul_ps(y, _mm512_loadu_ps(sw));
    if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias));
    if (relu) y = _mm512_max_ps(_mm512_setzero_ps(), y);  // NaN (second operand) passes
    _mm512_storeu_ps(o, y);
  }
  static constexpr int kQW = 16;
  static inline uint32_t absmax_bits(const float* x, int64_t n) {
    const __m512i bits = _mm512_set1_epi32(0x7fffffff);
    __m512i m = _mm512_setzero_si512();
    for (int64_t k = 0; k < n; k += kQW) {
      m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(x + k), bits));
    }
    return _mm512_reduce_max_epu32(m);
  }
  static inline void quantize(const float* x, int64_t n, float inv, int8_t* q) {
    const __m512 s = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < n; k += kQW) {
      const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), s),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
  }
};

// 32 zmm registers: 16 accumulators + weights + column sums + broadcast.
constexpr int kQMR = 16;
constexpr int kQMaxNV = 1;
constexpr const char* kIsaName = "avx512_vnni";

#include "qkernels_impl.h"

}  // namespace

const QKernelTable& qkernels_avx512_vnni() { return kQTable; }

}  // namespace adsparse
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // x86

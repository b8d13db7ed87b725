// AVX-512 kernels for CPUs with AVX512_BF16 as well (Cooper Lake, Sapphire Rapids, Zen 4): the
// AVX-512 Vec plus a bf16 dot product, so the bf16 serving form's spmm runs on VDPBF16PS (per
// fp32 lane, acc + a0*w0 + a1*w1 over a pair of bf16: 32 multiply-adds per instruction, twice
// an FMA's) instead of widening the blocks to floats. The fp32 kernels are the same body as
// kernels_avx512.cpp's. Compiled for this target by the pragma below; cpu_isa.cpp calls this
// table only on CPUs that report AVX512_BF16 as well as the AVX-512 features of the fp32 kernels.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,bmi,bmi2")
// See kernels_avx512.cpp: GCC 12's AVX-512 headers trip -W(maybe-)uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace adsparse {
namespace {

#include "vec_avx512.h"

struct Vec : VecAvx512 {
  static constexpr bool kBf16Dot = true;
  // Lane j (32 bits) of the result takes 16-bit element j of the first operand (row k) and
  // then element j of the second (row k + 1): the two rows as 16 k-pairs.
  static inline __m512i pair_index() {
#define ADSPARSE_PAIR(j) ((j) | ((32 + (j)) << 16))
    return _mm512_setr_epi32(ADSPARSE_PAIR(0), ADSPARSE_PAIR(1), ADSPARSE_PAIR(2),
                             ADSPARSE_PAIR(3), ADSPARSE_PAIR(4), ADSPARSE_PAIR(5),
                             ADSPARSE_PAIR(6), ADSPARSE_PAIR(7), ADSPARSE_PAIR(8),
                             ADSPARSE_PAIR(9), ADSPARSE_PAIR(10), ADSPARSE_PAIR(11),
                             ADSPARSE_PAIR(12), ADSPARSE_PAIR(13), ADSPARSE_PAIR(14),
                             ADSPARSE_PAIR(15));
#undef ADSPARSE_PAIR
  }
  static inline __m256i load_row(const bf16* p, int n, bool partial) {
    return partial ? _mm256_maskz_loadu_epi16(mask(n), p)
                   : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  // 16 columns (n valid if PARTIAL; masked-off lanes are not read) of rows k (p) and k + 1
  // (p + ldp) of a bf16 block [depth][ldp], as k-pairs; !HI: row k + 1 is past the block's
  // depth and reads as zero.
  template <bool PARTIAL, bool HI>
  static inline V load_pairs(const bf16* p, int64_t ldp, int n) {
    const __m256i lo = load_row(p, n, PARTIAL);
    if (!HI) return _mm512_castsi512_ps(_mm512_cvtepu16_epi32(lo));
    const __m256i hi = load_row(p + ldp, n, PARTIAL);
    return _mm512_castsi512_ps(_mm512_permutex2var_epi16(
        _mm512_castsi256_si512(lo), pair_index(), _mm512_castsi256_si512(hi)));
  }
  // The panel of the dot-product step for 16 full rows of x (stride ldx, `cols` columns), when
  // every block column starts at an even k (even bk): o [ceil(cols / 2)][16], pair j of row i at
  // o[j * 16 + i] = (bf16(x[i][2j]), bf16(x[i][2j + 1])), zero past `cols`. Per 32 columns: one
  // VCVTNE2PS2BF16 per row turns them into its 16 pairs in order, and a 16 x 16 transpose of
  // 32-bit lanes makes pairs of rows into rows of pairs. VCVTNE2PS2BF16 rounds to nearest even
  // like round_to_bf16 but flushes denormals to zero, which VDPBF16PS does to its inputs anyway.
  static inline void pack_pairs16(const float* x, int64_t ldx, int64_t cols, uint32_t* o) {
    for (int64_t k0 = 0; k0 < cols; k0 += 32) {
      const int64_t n = cols - k0 < 32 ? cols - k0 : 32;
      const __mmask16 m0 = mask(n >= 16 ? 16 : static_cast<int>(n));
      const __mmask16 m1 = mask(n >= 32 ? 16 : n > 16 ? static_cast<int>(n - 16) : 0);
      V r[16];
      for (int i = 0; i < 16; ++i) {
        const float* xi = x + i * ldx + k0;
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, xi + 16),
                                               _mm512_maskz_loadu_ps(m0, xi));
        r[i] = _mm512_castsi512_ps((__m512i)h);
      }
      transpose16(r);
      const int64_t pairs = (n + 1) / 2;
      uint32_t* d = o + k0 / 2 * 16;
      for (int j = 0; j < pairs; ++j) _mm512_storeu_ps(reinterpret_cast<float*>(d + j * 16), r[j]);
    }
  }
  // acc + a.lo * w.lo + a.hi * w.hi per lane, the pair *a broadcast to all 16 lanes (exact
  // products, fp32 sums rounded to nearest even; bf16 denormals count as zero).
  static inline V dot_pairs(V acc, const uint32_t* a, V w) {
    const __m512i x = _mm512_set1_epi32(static_cast<int>(*a));
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)_mm512_castps_si512(w));
  }
};

constexpr const char* kIsaName = "avx512_bf16";

#include "kernels_impl.h"

}  // namespace

const KernelTable& kernels_avx512_bf16() { return kTable; }

}  // namespace adsparse
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // x86

// Portable kernels: the same code over an 8-float array type in plain C++. Compiled with the
// baseline flags only, so it runs on any x86-64 (the compiler may still use SSE2) and elsewhere.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace adsparse {
namespace {

struct Vec {
  static constexpr int W = 8;
  static constexpr bool kBf16Dot = false;  // bf16 blocks are widened to floats
  struct V {
    float f[W];
  };
  static inline V zero() {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = 0.0f;
    return r;
  }
  static inline V load(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = p[i];
    return r;
  }
  static inline V loadn(const float* p, int n) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = i < n ? p[i] : 0.0f;
    return r;
  }
  static inline float widen(bf16 h) {
    const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline V load(const bf16* p) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = widen(p[i]);
    return r;
  }
  static inline V loadn(const bf16* p, int n) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = i < n ? widen(p[i]) : 0.0f;
    return r;
  }
  static inline V bcast(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.f[i] = *p;
    return r;
  }
  static inline V fma(V a, V b, V c) {
    for (int i = 0; i < W; ++i) c.f[i] += a.f[i] * b.f[i];
    return c;
  }
  static inline V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.f[i] += b.f[i];
    return a;
  }
  static inline V relu(V v) {
    for (int i = 0; i < W; ++i) v.f[i] = v.f[i] < 0.0f ? 0.0f : v.f[i];  // NaN stays NaN
    return v;
  }
  static inline void store(float* p, V v) {
    for (int i = 0; i < W; ++i) p[i] = v.f[i];
  }
  static inline void storen(float* p, V v, int n) {
    for (int i = 0; i < n; ++i) p[i] = v.f[i];
  }
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
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v.f[i];
    return s;
  }
};

constexpr int kMR = 4;
constexpr int kNR1 = 4;
constexpr int kNR2 = 4;
constexpr int kMaxNV = 2;
constexpr int kGemvRows = 4;
constexpr int kMinAcc = 1;  // no split: arrays of floats, not registers (extra sets spill)
constexpr const char* kIsaName = "scalar";

#include "kernels_impl.h"

// int8 in plain C++: int32 sums of int16 products of 8 columns at a time.
struct Q {
  using XA = int16_t;
  static constexpr int kXShift = 0;
  static constexpr int kCols = 8;
  struct Acc {
    int32_t v[kCols];
  };
  struct Wv {
    int8_t b[kCols * 4];
  };
  static inline Acc zero() {
    Acc r;
    for (int c = 0; c < kCols; ++c) r.v[c] = 0;
    return r;
  }
  static inline Wv loadw(const int8_t* p) {
    Wv w;
    std::memcpy(w.b, p, sizeof w.b);
    return w;
  }
  static inline Acc madd(Acc acc, const XA* x, const Wv& w) {
    for (int c = 0; c < kCols; ++c) {
      int32_t s = 0;
      for (int t = 0; t < 4; ++t) s += static_cast<int32_t>(x[t]) * w.b[c * 4 + t];
      acc.v[c] += s;
    }
    return acc;
  }
  static inline Acc wsum(Acc acc, const Wv&) { return acc; }
  static inline void store_cols(const Acc& acc, const Acc&, int32_t* d) {
    for (int c = 0; c < kCols; ++c) d[c] = acc.v[c];
  }
  static constexpr int kFinishCols = 0;  // qfinish's loop
  static inline void finish(const int32_t*, float, const float*, const float*, int, float*) {}
  static constexpr int kQW = 8;
  static inline uint32_t absmax_bits(const float* x, int64_t n) {
    uint32_t r = 0;
    for (int64_t k = 0; k < n; ++k) {
      uint32_t u;
      std::memcpy(&u, x + k, sizeof u);
      u &= 0x7fffffffu;
      r = u > r ? u : r;
    }
    return r;
  }
  static inline void quantize(const float* x, int64_t n, float inv, int8_t* q) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = x[k] * inv;
      q[k] = static_cast<int8_t>(std::nearbyint(v));
    }
  }
};

constexpr int kQMR = 4;
constexpr int kQMaxNV = 1;

#include "qkernels_impl.h"

}  // namespace

const KernelTable& kernels_scalar() { return kTable; }
const QKernelTable& qkernels_scalar() { return kQTable; }

}  // namespace adsparse

// Portable kernels: the same code over an 8-float array type in plain C++. Compiled with the
// baseline flags only, so it runs on any x86-64 (the compiler may still use SSE2) and elsewhere.
#include <cstdint>

#include "kernels.h"

namespace adsparse {
namespace {

struct Vec {
  static constexpr int W = 8;
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
constexpr const char* kIsaName = "scalar";

#include "kernels_impl.h"

}  // namespace

const KernelTable& kernels_scalar() { return kTable; }

}  // namespace adsparse

// The AVX-512 vector type of the kernel bodies (16 floats per vector) and its register-blocking
// constants, shared by the two AVX-512 units: kernels_avx512.cpp (F/VL/BW/DQ) and
// kernels_avx512_bf16.cpp (the same plus AVX512_BF16, whose Vec extends this one). Included
// inside each unit's anonymous namespace after its `#pragma GCC target`, so each unit compiles
// its own copy for its own target (see kernels_impl.h).
struct VecAvx512 {
  using V = __m512;
  static constexpr bool kBf16Dot = false;  // no VDPBF16PS (kernels_avx512_bf16.cpp has it)
  static constexpr int W = 16;
  static inline __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  // Masked-off lanes are not read (no fault), so tails never touch memory past the tensor.
  static inline V loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  // bf16 blocks: 16 x 16 bits widened to the upper halves of 16 floats.
  static inline V load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline V loadn(const bf16* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  // max(0, v) with v second: MAXPS returns its second operand when one is NaN, so NaN survives.
  static inline V relu(V v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void storen(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
  // 16 x 16 transpose in registers: unpack pairs of rows, then shuffle 2-float, 4-float and
  // 8-float groups (64 shuffles for 256 elements).
  static inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
    V r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
  }
  // The same in registers: r[i] lane j -> r[j] lane i.
  static inline void transpose16(V (&r)[16]) {
    V t[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8) {
      for (int i = 0; i < 4; ++i) {
        t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
        t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
      }
    }
    for (int i = 0; i < 8; ++i) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
  }
  // The 16 row sums of 16 accumulators in one shuffle tree (15 adds instead of 16 reductions).
  // After the four levels, element 4*L + m of r holds row 4*m + L, undone by one permute.
  template <int G>
  static inline void hsum_rows(const V (&acc)[G], float* out) {
    static_assert(G == 16, "the shuffle tree reduces exactly 16 vectors");
    V c[8], e[4], f[2];
    for (int p = 0; p < 8; ++p) {  // 512 -> 256 bits per row: lanes [a02, a13, b02, b13]
      c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0x44),
                           _mm512_shuffle_f32x4(acc[2 * p], acc[2 * p + 1], 0xEE));
    }
    for (int q = 0; q < 4; ++q) {  // -> 128 bits per row: lane L is row 4q + L
      e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
    }
    for (int s = 0; s < 2; ++s) {  // -> 64 bits per row
      f[s] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * s], e[2 * s + 1], 0x44),
                           _mm512_shuffle_ps(e[2 * s], e[2 * s + 1], 0xEE));
    }
    const V r = _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], 0x88),
                              _mm512_shuffle_ps(f[0], f[1], 0xDD));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(idx, r));
  }
};

constexpr int kMR = 16;        // spmm rows per tile: 16 accumulators of one vector each
constexpr int kMaxNV = 1;      // (two vectors would need 32 accumulators: more than 32 registers)
constexpr int kNR1 = 16;       // sddmm rows per tile with one vector of columns
constexpr int kNR2 = 12;       // ... with two vectors
constexpr int kGemvRows = 16;  // gemv rows of W accumulated at once
constexpr int kMinAcc = 8;     // spmm: accumulators a short tile keeps (FMA/VDPBF16PS latency)

// The int8 serving kernel body, written once over an integer vector type. Each ISA translation
// unit defines, inside an anonymous namespace, `struct Q` and the constants kQMR (rows of a
// panel) and kQMaxNV (accumulator vectors per row), then includes this file:
//
//   Q::XA        activation element in the per-thread panel (int16_t, or uint8_t when the
//                multiply needs unsigned activations: then Q::kXShift = 128 is added to each)
//   Q::kCols     output columns covered by one accumulator vector
//   Q::Acc, Wv   accumulator and loaded-weight vector types
//   zero()       an all-zero accumulator
//   loadw(p)     kCols columns x 4 k of the packed weights (kCols * 4 int8)
//   madd(c,x,w)  c + per column sum_{t<4} x[t] * w[column][t], exact int32
//   wsum(c,w)    c + per column sum_{t<4} w[column][t] (only used when kXShift != 0)
//   store_cols(acc, wsum, dst)  the kCols int32 dot products: acc - kXShift * wsum
//   kFinishCols, finish(s, sx, sw, bias, relu, o)  qfinish of kFinishCols columns (a full tile's
//                row) in vectors; kFinishCols = 0 where there is none (then qfinish does it)
//   kQW, absmax_bits(x, n), quantize(x, n, inv, q)  the activation quantization's vector parts,
//                for n a multiple of kQW (the tails are done here, element by element)
//
// Everything has internal linkage, so each unit gets its own copy compiled for its own target.
// The weights are packed once, when a layer is quantized (kernels.h, QArgs), so no call
// repacks them; a call quantizes and converts its panels of activations (kQMR rows) once per
// task.

inline int64_t qmin(int64_t a, int64_t b) { return a < b ? a : b; }

float qquantize_row(const float* x, int64_t n, int8_t* q);

// Rows [p * kQMR, + kQMR) of x, quantized (their scales to psx) and as Q::XA (+ kXShift), zero
// past K, into ws [kQMR][ldx]; qrow is scratch for one quantized row whose tail [K, ldx) the
// caller zeroed. Only the rows of the batch are converted: a partial panel is computed by
// one-row tiles, which read no other row.
inline void pack_qpanel(const QArgs& a, int64_t p, typename Q::XA* ws, float* psx,
                        int8_t* qrow) {
  using XA = typename Q::XA;
  // Locals, not a.ldx: stores through uint8_t may alias `a`, which kept the loop scalar.
  const int64_t row0 = p * kQMR, rv = qmin(kQMR, a.rows - row0), ldx = a.ldx, K = a.K;
  for (int64_t i = 0; i < rv; ++i) {
    psx[i] = qquantize_row(a.x + (row0 + i) * K, K, qrow);
    const int8_t* __restrict src = qrow;
    XA* __restrict dst = ws + i * ldx;
    for (int64_t k = 0; k < ldx; ++k) dst[k] = static_cast<XA>(src[k] + Q::kXShift);
  }
}

// y[c] = act(s[c] * sx * sw[c] + bias[c]) for the n columns of one row of a tile: the products
// in that order, rounded one by one (Q::finish, the vector form of full tiles, computes the same).
inline void qfinish(const int32_t* s, int64_t n, float sx, const float* sw, const float* bias,
                    int relu, float* o) {
  for (int64_t c = 0; c < n; ++c) {
    float y = static_cast<float>(s[c]) * sx;
    y = y * sw[c];
    if (bias) y = y + bias[c];
    if (relu) y = y < 0.0f ? 0.0f : y;  // keeps NaN (a non-finite row has sx = NaN)
    o[c] = y;
  }
}

// ROWS rows (xp: the first one, stride ldx) x NV accumulator vectors of block row r, starting at
// column c0 of the block; `ncols` of them valid (all NV * kCols unless PARTIAL). The loads never
// leave the block: its packed width bn16 is a multiple of NV * kCols.
template <int ROWS, int NV, bool PARTIAL>
void qtile(const QArgs& a, const typename Q::XA* xp, const float* psx, int64_t row0, int64_t r,
           int64_t c0, int64_t ncols) {
  using Acc = typename Q::Acc;
  using Wv = typename Q::Wv;
  constexpr int C = Q::kCols;
  Acc acc[ROWS][NV];
  Acc ws[NV];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = Q::zero();
  for (int v = 0; v < NV; ++v) ws[v] = Q::zero();
  const int64_t gstride = a.bn16 * kQGroup;
  const int64_t j1 = a.offsets[r + 1];
  for (int64_t j = a.offsets[r]; j < j1; ++j) {
    const int8_t* wb = a.w + j * a.groups * gstride + c0 * kQGroup;
    const typename Q::XA* xb = xp + a.idx[j] * a.bk;
    for (int64_t g = 0; g < a.groups; ++g, wb += gstride, xb += kQGroup) {
      Wv w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = Q::loadw(wb + v * C * kQGroup);
      if (Q::kXShift != 0) {
        for (int v = 0; v < NV; ++v) ws[v] = Q::wsum(ws[v], w[v]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = Q::madd(acc[i][v], xb + i * a.ldx, w[v]);
    }
  }
  const int64_t n0 = r * a.bn + c0;
  const float* sw = a.sw + n0;
  const float* bias = a.bias ? a.bias + n0 : nullptr;
  for (int i = 0; i < ROWS; ++i) {
    int32_t s[NV * C];
    for (int v = 0; v < NV; ++v) Q::store_cols(acc[i][v], ws[v], s + v * C);
    float* o = a.out + (row0 + i) * a.N + n0;
    if (!PARTIAL && Q::kFinishCols == NV * C) {
      Q::finish(s, psx[i], sw, bias, a.relu, o);
    } else {
      qfinish(s, PARTIAL ? ncols : NV * C, psx[i], sw, bias, a.relu, o);
    }
  }
}

template <int ROWS>
void qtile_row(const QArgs& a, const typename Q::XA* xp, const float* psx, int64_t row0,
               int64_t r) {
  constexpr int CW = kQMaxNV * Q::kCols;
  const int64_t nvalid = qmin(a.bn, a.N - r * a.bn);
  for (int64_t c0 = 0; c0 < nvalid; c0 += CW) {
    const int64_t nc = qmin(CW, nvalid - c0);
    if (nc == CW) {
      qtile<ROWS, kQMaxNV, false>(a, xp, psx, row0, r, c0, nc);
    } else {
      qtile<ROWS, kQMaxNV, true>(a, xp, psx, row0, r, c0, nc);
    }
  }
}

// Full panels take the kQMR-row tile; the rows of a last, partial panel (and every row of a
// batch smaller than kQMR: the small-batch path) take one-row tiles, so no padded row is computed.
void qspmm(const QArgs& a, void* ws_raw, int64_t begin, int64_t end) {
  static_assert(kQColPad % (kQMaxNV * Q::kCols) == 0, "a tile must not cross the padded block");
  // The scratch as kernels.h lays it out: panel, row scales, one quantized row.
  auto* ws = static_cast<typename Q::XA*>(ws_raw);
  float* psx = reinterpret_cast<float*>(
      static_cast<char*>(ws_raw) + qspmm_panel_bytes(a.ldx, kQMR, sizeof(typename Q::XA)));
  int8_t* qrow = reinterpret_cast<int8_t*>(psx + kQMR);
  std::fill(qrow + a.K, qrow + a.ldx, static_cast<int8_t>(0));  // quantize_row writes [0, K)
  int64_t packed = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / a.num_out_blocks, r = item % a.num_out_blocks;
    if (p != packed) {
      pack_qpanel(a, p, ws, psx, qrow);
      packed = p;
    }
    const int64_t row0 = p * kQMR, rv = qmin(kQMR, a.rows - row0);
    if (rv == kQMR) {
      qtile_row<kQMR>(a, ws, psx, row0, r);
    } else {
      for (int64_t i = 0; i < rv; ++i) qtile_row<1>(a, ws + i * a.ldx, psx + i, row0 + i, r);
    }
  }
}

// ---------------------------------------------------------------- activation quantization
inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u & 0x7fffffffu;
}

uint32_t qabsmax_bits(const float* x, int64_t n) {
  const int64_t nv = n / Q::kQW * Q::kQW;
  uint32_t r = Q::absmax_bits(x, nv);
  for (int64_t k = nv; k < n; ++k) r = r > abs_bits(x[k]) ? r : abs_bits(x[k]);
  return r;
}

void qquantize(const float* x, int64_t n, float inv, int8_t* q) {
  const int64_t nv = n / Q::kQW * Q::kQW;
  Q::quantize(x, nv, inv, q);
  for (int64_t k = nv; k < n; ++k) {
    const float v = x[k] * inv;  // a separate, rounded product: nearbyint is no add to fuse
    q[k] = static_cast<int8_t>(std::nearbyint(v));
  }
}

float qquantize_row(const float* x, int64_t n, int8_t* q) {
  const uint32_t bits = qabsmax_bits(x, n);
  float amax;
  std::memcpy(&amax, &bits, sizeof amax);
  if (bits >= 0x7f800000u) {  // inf or NaN: the whole row's outputs become NaN
    std::fill(q, q + n, static_cast<int8_t>(0));
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (amax < kQuantTinyRow) {  // zero (or negligible) row: 127 / amax may overflow
    std::fill(q, q + n, static_cast<int8_t>(0));
    return 0.0f;
  }
  // |x * inv| <= amax * (127 / amax) < 127.5, so no value needs clamping.
  qquantize(x, n, 127.0f / amax, q);
  return amax / 127.0f;
}

const QKernelTable kQTable = {kIsaName, kQMR, static_cast<int>(sizeof(typename Q::XA)), &qspmm,
                              &qquantize_row};

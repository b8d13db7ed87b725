// The kernel bodies, written once over a vector type. Each ISA translation unit defines, inside
// an anonymous namespace, `struct Vec` (V, W, zero, load, loadn, bcast, fma, add, relu, store,
// storen, hsum, hsum_rows, transpose16, kBf16Dot; where kBf16Dot, also load_pairs, dot_pairs and
// pack_pairs16) and the register-blocking constants kMR, kMaxNV, kNR1, kNR2, kGemvRows, kMinAcc,
// then includes this file. Everything here has internal linkage, so each unit
// gets its own copy compiled for its own target.
//
// The element type of the packed blocks is a template parameter TW of the spmm body (float for
// the trainable layers, bf16 for the serving form): Vec::load/loadn have one overload per TW that
// widens to the float vector, so a new block dtype is one more overload and one instantiation.
// Where the ISA has a bf16 dot product (Vec::kBf16Dot), bf16 blocks are multiplied by k-pairs
// instead (Step<bf16, true> below): the same body, two depth rows a step.
//
// Register blocking (why these shapes): the output is computed in tiles of MR rows x NV vectors;
// every depth step loads NV vectors of the packed block once and broadcasts MR values of A, so a
// tile costs MR*NV FMAs per (NV loads + MR broadcasts). With 16x16 blocks on AVX-512 that is one
// 16-wide vector per depth step and 16 accumulators (MR=16), enough independent FMA chains to
// hide the FMA latency, and the broadcasts fold into the FMA as memory operands. MR=16 also
// divides the usual batch sizes, so no padded rows are computed.

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline int clamp_width(int64_t n) {
  return n <= 0 ? 0 : (n >= Vec::W ? Vec::W : static_cast<int>(n));
}

// ---------------------------------------------------------------- spmm (forward, input grad)
// How a depth step of the packed blocks is multiplied, per block element type: Step<TW>.
//   kDepth  depth rows of a block consumed by one step
//   P       element of the packed panel of A: one per row of the panel and step
//   load<PARTIAL, HI>(pp, ldp, n)  the step's weights for W columns from pp (n valid if
//           PARTIAL); HI = false only for the last step of an odd depth (no row past it is read)
//   madd(acc, a, w)  acc + the step's products of one row of A (from a) with w
// By default a step is one depth row: the blocks are widened to floats as they are loaded
// (bf16: a 16-bit shift), the panel holds floats (rounded to bf16 for bf16 blocks) and a step
// is one FMA per row of A.
// (X is Vec, a template parameter only so that Step<TW, true> names X's bf16 members lazily.)
template <typename TW, bool DOT = std::is_same<TW, bf16>::value && Vec::kBf16Dot, typename X = Vec>
struct Step {
  using V = typename Vec::V;
  using P = float;
  static constexpr int kDepth = 1;
  template <bool PARTIAL, bool HI>
  static inline V load(const TW* pp, int64_t, int n) {
    return PARTIAL ? Vec::loadn(pp, n) : Vec::load(pp);
  }
  static inline V madd(V acc, const P* a, V w) { return Vec::fma(Vec::bcast(a), w, acc); }
  static inline void pack16(const float*, int64_t, int64_t, uint32_t*) {}  // pairs only
};

// bf16 blocks on an ISA with a bf16 dot product (Vec::kBf16Dot: AVX512_BF16's VDPBF16PS, per
// fp32 lane acc + a0*w0 + a1*w1 over a pair of bf16): a step is two depth rows. The two rows of
// the block are interleaved into k-pairs as they are loaded (one permute per W columns, shared
// by the panel's rows; the stored layout stays [bk][bn], which every path reads), and the panel
// holds the activations as bf16 pairs (k, k+1) in 32-bit lanes (pack_pairs).
template <typename TW, typename X>
struct Step<TW, true, X> {
  using V = typename X::V;
  using P = uint32_t;
  static constexpr int kDepth = 2;
  template <bool PARTIAL, bool HI>
  static inline V load(const TW* pp, int64_t ldp, int n) {
    return X::template load_pairs<PARTIAL, HI>(pp, ldp, n);
  }
  static inline V madd(V acc, const P* a, V w) { return X::dot_pairs(acc, a, w); }
  // The pairs of 16 full rows of A when every block column starts at an even k (kMR = 16).
  static inline void pack16(const float* x, int64_t ldx, int64_t cols, uint32_t* o) {
    X::pack_pairs16(x, ldx, cols, o);
  }
};

// One depth step of a tile: NV vectors of the block, times ROWS rows of the panel from `aa`.
template <typename TW, int ROWS, int NV, bool PARTIAL, bool HI>
inline void spmm_step(typename Vec::V (&acc)[ROWS][NV], const TW* pp, int64_t ldp,
                      const int (&nv)[NV], const typename Step<TW>::P* aa) {
  using V = typename Vec::V;
  using S = Step<TW>;
  constexpr int W = Vec::W;
  V w[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) w[v] = S::template load<PARTIAL, HI>(pp + v * W, ldp, nv[v]);
#pragma GCC unroll 32
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = S::madd(acc[i][v], aa + i, w[v]);
}

// ROWS rows of the packed panel from `ap` on (ROWS = kMR, or 4 or 1 for the rows of a partial panel
// of bf16 blocks: the serving form's small batches); the panel's row stride stays kMR. Block
// column c of A starts at step c * ceil(depth_block / kDepth) of the panel.
// A short tile (a few rows of a partial panel) would be one dependent chain of FMAs (or dot
// products) per accumulator, bound by their latency: it then keeps SPLIT sets of accumulators,
// used by consecutive depth steps in turn, and adds them up at the end. Tiles of at least
// kMinAcc accumulators (every full-panel tile) have SPLIT = 1.
template <typename TW, int ROWS, int NV, bool PARTIAL>
void spmm_tile(const SpmmArgsT<TW>& a, const typename Step<TW>::P* ap, int64_t row0,
               int64_t rows_valid, int64_t ob, int64_t col0, int64_t wv) {
  using V = typename Vec::V;
  using S = Step<TW>;
  constexpr int MR = ROWS;
  constexpr int W = Vec::W;
  constexpr int SPLIT = MR * NV >= kMinAcc ? 1 : kMinAcc / (MR * NV);
  V acc[SPLIT][MR][NV];
#pragma GCC unroll 8
  for (int u = 0; u < SPLIT; ++u)
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[u][i][v] = Vec::zero();
  int nv[NV];
  for (int v = 0; v < NV; ++v) nv[v] = clamp_width(wv - v * W);

  const int64_t steps_block = (a.depth_block + S::kDepth - 1) / S::kDepth;
  const int64_t ldp = a.ldp;
  const int64_t j1 = a.offsets[ob + 1];
  for (int64_t j = a.offsets[ob]; j < j1; ++j) {
    const int64_t blk = a.ids ? a.ids[j] : j;
    const int64_t c = a.idx[j];
    const int64_t depth = imin(a.depth_block, a.a_cols - c * a.depth_block);
    const TW* pp = a.panel + blk * a.panel_stride + (col0 - ob * a.width_block);
    const typename S::P* aa = ap + c * steps_block * kMR;
    const int64_t full = depth / S::kDepth;
    int64_t t = 0;
    if (SPLIT > 1) {
      for (; t + SPLIT <= full; t += SPLIT) {
#pragma GCC unroll 8
        for (int u = 0; u < SPLIT; ++u, pp += S::kDepth * ldp, aa += kMR)
          spmm_step<TW, MR, NV, PARTIAL, true>(acc[u], pp, ldp, nv, aa);
      }
    }
    for (; t < full; ++t, pp += S::kDepth * ldp, aa += kMR)
      spmm_step<TW, MR, NV, PARTIAL, true>(acc[0], pp, ldp, nv, aa);
    if (S::kDepth > 1 && full * S::kDepth < depth)
      spmm_step<TW, MR, NV, PARTIAL, false>(acc[SPLIT - 1], pp, ldp, nv, aa);
  }
#pragma GCC unroll 8
  for (int u = 1; u < SPLIT; ++u)
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][i][v] = Vec::add(acc[0][i][v], acc[u][i][v]);

  V bias[NV];
  for (int v = 0; v < NV; ++v)
    bias[v] = a.bias ? Vec::loadn(a.bias + col0 + v * W, nv[v]) : Vec::zero();
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i) {
    if (i >= rows_valid) break;
    float* o = a.out + (row0 + i) * a.out_cols + col0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      V r = Vec::add(acc[0][i][v], bias[v]);
      if (a.relu) r = Vec::relu(r);
      if (PARTIAL) {
        Vec::storen(o + v * W, r, nv[v]);
      } else {
        Vec::store(o + v * W, r);
      }
    }
  }
}

void pack_panel(const float* a, int64_t rows, int64_t cols, int64_t p, float* o);

// The bits of a float rounded to the nearest bfloat16 (ties to even; low 16 bits zero). NaN
// stays NaN (quieted, then truncated); a finite value past the largest bf16 becomes inf.
inline uint32_t bf16_round_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  return u & 0xffff0000u;
}

// Rounds floats to the nearest bfloat16, in place: the activations of the bf16 serving form,
// rounded in the L2-resident panel instead of in two passes over all of x.
inline void round_to_bf16(float* p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t u = bf16_round_bits(p[k]);
    std::memcpy(p + k, &u, sizeof u);
  }
}

// The bf16 pairs of one row of one block column: element k at src[k * stride], pair s (k = 2s,
// 2s + 1; low half k) to d[s * kMR]; the high half of a last odd pair is zero.
inline void pair_up(const float* src, int64_t stride, int64_t depth, uint32_t* d) {
  int64_t s = 0;
  for (; 2 * s + 1 < depth; ++s)
    d[s * kMR] = (bf16_round_bits(src[2 * s * stride]) >> 16) |
                 bf16_round_bits(src[(2 * s + 1) * stride]);
  if (2 * s < depth) d[s * kMR] = bf16_round_bits(src[2 * s * stride]) >> 16;
}

// The panel of the bf16 dot-product step (Step<bf16, true>): from the packed float panel f
// [cols][kMR], the pair (k, k+1) = (c * bk + 2s, + 1) of block column c at [c * ceil(bk/2) + s]
// [kMR], both rounded to bf16, low half k; the high half is zero past the block's depth (an odd
// bk, or the last block column's tail), so a pair never mixes two block columns.
inline void pack_pairs(const float* f, int64_t cols, int64_t bk, uint32_t* o) {
  const int64_t hp = (bk + 1) / 2;
  for (int64_t c = 0; c * bk < cols; ++c) {
    const int64_t depth = imin(bk, cols - c * bk);
    for (int i = 0; i < kMR; ++i)
      pair_up(f + c * bk * kMR + i, kMR, depth, o + c * hp * kMR + i);
  }
}

// The same pairs for rows [row0, row0 + rv) of A [rows][cols], straight from A, for a partial
// panel (rv < kMR): its rows run as tiles of their own, so the panel's other rows are not
// written, and the float panel is not needed.
inline void pack_pairs_rows(const float* a, int64_t cols, int64_t row0, int64_t rv, int64_t bk,
                            uint32_t* o) {
  const int64_t hp = (bk + 1) / 2;
  for (int64_t i = 0; i < rv; ++i) {
    const float* x = a + (row0 + i) * cols;
    for (int64_t c = 0; c * bk < cols; ++c)
      pair_up(x + c * bk, 1, imin(bk, cols - c * bk), o + c * hp * kMR + i);
  }
}

// Rows [row0, row0 + rv) of A rounded to bf16 into the float panel o [cols][kMR], for a partial
// panel of bf16 blocks on the widening step (like pack_pairs_rows: the other rows of the panel
// are not read, so they are not written).
inline void pack_rows_bf16(const float* a, int64_t cols, int64_t row0, int64_t rv, float* o) {
  for (int64_t i = 0; i < rv; ++i) {
    const float* x = a + (row0 + i) * cols;
    for (int64_t k = 0; k < cols; ++k) {
      const uint32_t u = bf16_round_bits(x[k]);
      std::memcpy(o + k * kMR + i, &u, sizeof u);
    }
  }
}

// The column tiles of one (rows, block-column) pair.
template <typename TW, int ROWS>
void spmm_cols(const SpmmArgsT<TW>& a, const typename Step<TW>::P* ap, int64_t row0,
               int64_t rows_valid, int64_t ob) {
  constexpr int W = Vec::W;
  constexpr int NV2 = kMaxNV >= 2 ? 2 : 1;
  const int64_t cbase = ob * a.width_block;
  const int64_t valid = imin(a.width_block, a.out_cols - cbase);
  int64_t c0 = 0;
  while (c0 < valid) {
    const int64_t rem = valid - c0;
    if (kMaxNV >= 2 && rem >= 2 * W) {
      spmm_tile<TW, ROWS, NV2, false>(a, ap, row0, rows_valid, ob, cbase + c0, 2 * W);
      c0 += 2 * W;
    } else if (kMaxNV >= 2 && rem > W) {
      spmm_tile<TW, ROWS, NV2, true>(a, ap, row0, rows_valid, ob, cbase + c0, rem);
      c0 = valid;
    } else if (rem >= W) {
      spmm_tile<TW, ROWS, 1, false>(a, ap, row0, rows_valid, ob, cbase + c0, W);
      c0 += W;
    } else {
      spmm_tile<TW, ROWS, 1, true>(a, ap, row0, rows_valid, ob, cbase + c0, rem);
      c0 = valid;
    }
  }
}

// Items are panel-major, so a task packs each of its panels once into `ws` (a_cols x MR floats,
// L2-resident) right before using it, instead of packing all of A into a buffer as large as A;
// the dot-product step packs its bf16 pairs after them (spmm_ws_floats in kernels.h).
// A partial panel of bf16 blocks (the serving form, where B = 1..15 is the common case) runs
// tiles of 4 rows and of one instead of computing kMR rows for a few.
template <typename TW>
void spmm(const SpmmArgsT<TW>& a, float* ws, int64_t begin, int64_t end) {
  using S = Step<TW>;
  constexpr bool kPairs = S::kDepth == 2;
  // The dot-product step's bf16 pairs follow the float panel in ws (spmm_ws_floats).
  uint32_t* pairs = reinterpret_cast<uint32_t*>(ws + a.a_cols * kMR);
  const auto* ap = reinterpret_cast<const typename S::P*>(kPairs ? static_cast<void*>(pairs)
                                                                 : static_cast<void*>(ws));
  int64_t packed = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p = item / a.num_out_blocks, ob = item % a.num_out_blocks;
    const int64_t row0 = p * kMR;
    const int64_t rows_valid = imin(kMR, a.rows - row0);
    if (p != packed) {
      if (kPairs && rows_valid < kMR) {
        pack_pairs_rows(a.a, a.a_cols, row0, rows_valid, a.depth_block, pairs);
      } else if (!std::is_same<TW, float>::value && rows_valid < kMR) {
        pack_rows_bf16(a.a, a.a_cols, row0, rows_valid, ws);
      } else if (kPairs && kMR == 16 && a.depth_block % 2 == 0) {
        S::pack16(a.a + row0 * a.a_cols, a.a_cols, a.a_cols, pairs);  // no float panel
      } else {
        pack_panel(a.a, a.rows, a.a_cols, p, ws);
        if (kPairs) {
          pack_pairs(ws, a.a_cols, a.depth_block, pairs);
        } else if (!std::is_same<TW, float>::value) {
          round_to_bf16(ws, a.a_cols * kMR);
        }
      }
      packed = p;
    }
    if (std::is_same<TW, float>::value || rows_valid == kMR) {
      spmm_cols<TW, kMR>(a, ap, row0, rows_valid, ob);
    } else {
      // Rows of a partial panel: tiles of 4 rows, then of one (kMR = 4 has no partial 4).
      int64_t i = 0;
      for (; kMR > 4 && i + 4 <= rows_valid; i += 4)
        spmm_cols<TW, (kMR > 4 ? 4 : 1)>(a, ap + i, row0 + i, 4, ob);
      for (; i < rows_valid; ++i) spmm_cols<TW, 1>(a, ap + i, row0 + i, 1, ob);
    }
  }
}

// ---------------------------------------------------------------- sddmm (weight grad)
// One tile: NR rows of the block (broadcast from dy) x NV vectors of its columns (loaded from x),
// summed over the whole batch. FULL_ROWS lets the common case drop the row guard.
template <int NV, bool PARTIAL, bool FULL_ROWS>
void sddmm_tile(const SddmmArgs& a, const float* gp, int64_t nr, const float* xp, int64_t wv,
                float* dst) {
  using V = typename Vec::V;
  constexpr int NR = NV == 1 ? kNR1 : kNR2;
  constexpr int W = Vec::W;
  V acc[NR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::zero();
  int nv[NV];
  for (int v = 0; v < NV; ++v) nv[v] = clamp_width(wv - v * W);
  for (int64_t b = 0; b < a.B; ++b, gp += a.bn, xp += a.bk) {
    V xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      xv[v] = PARTIAL ? Vec::loadn(xp + v * W, nv[v]) : Vec::load(xp + v * W);
#pragma GCC unroll 32
    for (int i = 0; i < NR; ++i) {
      if (FULL_ROWS || i < nr) {
        const V gb = Vec::bcast(gp + i);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = Vec::fma(gb, xv[v], acc[i][v]);
      }
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < NR; ++i) {
    if (!FULL_ROWS && i >= nr) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (PARTIAL) {
        Vec::storen(dst + i * a.bk + v * W, acc[i][v], nv[v]);
      } else {
        Vec::store(dst + i * a.bk + v * W, acc[i][v]);
      }
    }
  }
}

template <int NV, bool PARTIAL>
void sddmm_rows(const SddmmArgs& a, const float* gblk, int64_t nvalid, const float* xp, int64_t wv,
                float* dst) {
  constexpr int NR = NV == 1 ? kNR1 : kNR2;
  for (int64_t n = 0; n < nvalid; n += NR) {
    const int64_t nr = imin(NR, nvalid - n);
    if (nr == NR) {
      sddmm_tile<NV, PARTIAL, true>(a, gblk + n, nr, xp, wv, dst + n * a.bk);
    } else {
      sddmm_tile<NV, PARTIAL, false>(a, gblk + n, nr, xp, wv, dst + n * a.bk);
    }
  }
}

void sddmm(const SddmmArgs& a, int64_t begin, int64_t end) {
  constexpr int W = Vec::W;
  const int64_t bsz = a.bn * a.bk;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t n0 = a.block_row[j] * a.bn, k0 = a.block_col[j] * a.bk;
    const int64_t nvalid = imin(a.bn, a.N - n0), kvalid = imin(a.bk, a.K - k0);
    const float* gblk = a.g + a.block_row[j] * a.B * a.bn;
    const float* xblk = a.x + a.block_col[j] * a.B * a.bk;
    float* dvj = a.dv + j * bsz;
    if (nvalid < a.bn || kvalid < a.bk) {
      for (int64_t e = 0; e < bsz; ++e) dvj[e] = 0.0f;  // padding of tail blocks stays zero
    }
    int64_t c0 = 0;
    while (c0 < kvalid) {
      const int64_t rem = kvalid - c0;
      if (rem >= 2 * W) {
        sddmm_rows<2, false>(a, gblk, nvalid, xblk + c0, 2 * W, dvj + c0);
        c0 += 2 * W;
      } else if (rem > W) {
        sddmm_rows<2, true>(a, gblk, nvalid, xblk + c0, rem, dvj + c0);
        c0 = kvalid;
      } else if (rem == W) {
        sddmm_rows<1, false>(a, gblk, nvalid, xblk + c0, W, dvj + c0);
        c0 = kvalid;
      } else {
        sddmm_rows<1, true>(a, gblk, nvalid, xblk + c0, rem, dvj + c0);
        c0 = kvalid;
      }
    }
  }
}

// ---------------------------------------------------------------- gemv (forward, small batch)
// G rows of W at a time, each accumulated as a vector along k, reduced once per block row, so
// the blocks are read in place (no transposition, which would cost as much as the product).
// VECS > 0: every block is exactly VECS vectors deep (bk == VECS * W and K % bk == 0, e.g. 16x16
// blocks, K = 1024), so no load is masked and the G rows of a block are constant offsets from one
// pointer. With masked tails in the same loop GCC keeps acc[] in memory, storing and reloading
// all G accumulators at every block (the 1024 x 1024 B = 1 product took ~1.6x as long).
// sums[g] = the lane sum of acc[g] for the gv accumulators in use: one shuffle tree for a full
// set (FULL: gv == kGemvRows), one reduction each otherwise.
template <bool FULL>
inline void sum_accumulators(const typename Vec::V (&acc)[kGemvRows], int64_t gv, float* sums) {
  if (FULL) {
    Vec::hsum_rows(acc, sums);
  } else {
    for (int g = 0; g < gv; ++g) sums[g] = Vec::hsum(acc[g]);
  }
}

template <bool FULL, int VECS>
void gemv_rows(const GemvArgs& a, const float* xb, int64_t r, int64_t ng, int64_t gv, float* yb) {
  using V = typename Vec::V;
  constexpr int G = kGemvRows;
  constexpr int W = Vec::W;
  V acc[G];
#pragma GCC unroll 32
  for (int g = 0; g < G; ++g) acc[g] = Vec::zero();
  const int64_t n0 = r * a.bn;
  const int64_t j1 = a.offsets[r + 1];
  for (int64_t j = a.offsets[r]; j < j1; ++j) {
    const int64_t k0 = a.idx[j] * a.bk;
    const int64_t bk = VECS > 0 ? VECS * W : a.bk;
    const int64_t kvalid = VECS > 0 ? bk : imin(bk, a.K - k0);
    const float* blk = a.values + (j * a.bn + ng) * bk;
    for (int64_t kc = 0; kc < kvalid; kc += W) {
      const int n = VECS > 0 ? W : clamp_width(kvalid - kc);
      if (n == W) {
        const V xv = Vec::load(xb + k0 + kc);
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g)
          if (FULL || g < gv) acc[g] = Vec::fma(Vec::load(blk + g * bk + kc), xv, acc[g]);
      } else {
        const V xv = Vec::loadn(xb + k0 + kc, n);
#pragma GCC unroll 32
        for (int g = 0; g < G; ++g)
          if (FULL || g < gv) acc[g] = Vec::fma(Vec::loadn(blk + g * bk + kc, n), xv, acc[g]);
      }
    }
  }
  float sums[G];
  sum_accumulators<FULL>(acc, gv, sums);
  for (int g = 0; g < G; ++g) {
    if (!FULL && g >= gv) break;
    const int64_t n = n0 + ng + g;
    float s = sums[g] + (a.bias ? a.bias[n] : 0.0f);
    if (a.relu) s = s < 0.0f ? 0.0f : s;  // keeps NaN (max(0, NaN) would drop it)
    yb[n] = s;
  }
}

template <int VECS>
void gemv_batch(const GemvArgs& a, int64_t begin, int64_t end) {
  for (int64_t b = 0; b < a.B; ++b) {
    const float* xb = a.x + b * a.K;
    float* yb = a.y + b * a.N;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nvalid = imin(a.bn, a.N - r * a.bn);
      for (int64_t ng = 0; ng < nvalid; ng += kGemvRows) {
        const int64_t gv = imin(kGemvRows, nvalid - ng);
        if (gv == kGemvRows) {
          gemv_rows<true, VECS>(a, xb, r, ng, gv, yb);
        } else {
          gemv_rows<false, VECS>(a, xb, r, ng, gv, yb);
        }
      }
    }
  }
}

void gemv(const GemvArgs& a, int64_t begin, int64_t end) {
  const bool whole = a.K % a.bk == 0;
  if (whole && a.bk == Vec::W) {
    gemv_batch<1>(a, begin, end);
  } else if (whole && a.bk == 2 * Vec::W) {
    gemv_batch<2>(a, begin, end);
  } else {
    gemv_batch<0>(a, begin, end);
  }
}

// ---------------------------------------------------------------- packing
// Transposes a rows x cols tile (at most 16 x 16); full 16 x 16 tiles go through the ISA's
// register transpose, which is several times faster than element-wise strided stores.
inline void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                           int64_t cols) {
  if (rows == 16 && cols == 16) {
    Vec::transpose16(src, lds, dst, ldd);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Panel p of a [rows][cols] as [cols][MR] (rows past `rows` zero): the micro-kernel then
// broadcasts the MR values of one column from one pointer.
void pack_panel(const float* a, int64_t rows, int64_t cols, int64_t p, float* o) {
  constexpr int64_t MR = kMR;
  const int64_t rv = imin(MR, rows - p * MR);
  const float* s = a + p * MR * cols;
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t cw = imin(16, cols - c0);
    if (MR == 16 && rv == 16) {
      transpose_tile(s + c0, cols, o + c0 * MR, MR, 16, cw);
      continue;
    }
    for (int64_t c = 0; c < cw; ++c) {
      float* oc = o + (c0 + c) * MR;
      for (int64_t i = 0; i < rv; ++i) oc[i] = s[i * cols + c0 + c];
      for (int64_t i = rv; i < MR; ++i) oc[i] = 0.0f;
    }
  }
}


void transpose_blocks(const float* src, float* dst, int64_t bn, int64_t bk, int64_t begin,
                      int64_t end) {
  const int64_t bsz = bn * bk;
  for (int64_t j = begin; j < end; ++j) {
    const float* s = src + j * bsz;
    float* d = dst + j * bsz;
    for (int64_t n0 = 0; n0 < bn; n0 += 16)
      for (int64_t k0 = 0; k0 < bk; k0 += 16)
        transpose_tile(s + n0 * bk + k0, bk, d + k0 * bn + n0, bn, imin(16, bn - n0),
                       imin(16, bk - k0));
  }
}

#include "interact_impl.h"

const KernelTable kTable = {kIsaName, kMR,   {kTileI, kTileJ},  &spmm<float>, &spmm<bf16>,
                            &sddmm,   &gemv, &transpose_blocks, &interact};

// The dot interaction's kernel body (adsparse::dot_interaction, csrc/interaction.cpp), written
// once over the ISA's vector type. Included by kernels_impl.h inside each ISA unit's anonymous
// namespace, after Vec, kGemvRows and the gemv helpers (sum_accumulators, clamp_width, imin).
// No include guard and no includes: each unit compiles its own copy for its own target.

// ---------------------------------------------------------------- dot interaction (serving)
// A row's dots are entries of the Gram matrix of its V = F + 1 vectors. They are computed in
// tiles of kTileI x kTileJ entries (rows i, columns j): per step of W along d a tile loads
// kTileI + kTileJ vectors for kTileI * kTileJ FMAs (4 + 4 for 16 on AVX-512), where one pair at a
// time loads 2 per FMA, and its kGemvRows accumulators are reduced by one shuffle tree, as gemv
// reduces its rows. Entries a tile computes but no pair asks for (the diagonal, the upper
// triangle of a diagonal tile, padding) are dropped; the driver (interaction.cpp) plans the
// tiles once per call. On the wide preset (27 vectors, d = 64) that is 28 tiles: 1792 FMAs for
// 351 x 4 useful ones, but 896 loads instead of 2808 and no per-pair pointer arithmetic; one
// pair at a time ran ~5k cycles a row on Zen 4.

constexpr int kTileJ = kGemvRows >= 8 ? 4 : 2;
constexpr int kTileI = kGemvRows / kTileJ;
static_assert(kTileI * kTileJ == kGemvRows, "a tile's accumulators are one gemv set");

// Vector i of row b: the bottom output (i = 0) or field i - 1's table row.
inline const float* interact_vector(const InteractArgs& a, const float* bottom,
                                    const int64_t* ids, int64_t i) {
  return i == 0 ? bottom : a.tables[i - 1] + ids[i - 1] * a.d;
}

// One tile: dots[slot] = <vec[i0 + r], vec[j0 + c]> for every slot asked for.
template <bool WHOLE>
void interact_tile(const float* const* vec, int64_t d, const int64_t* tile, float* dots) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V acc[kGemvRows] = {};  // zero: Vec::zero() is all-bits-zero on every ISA
  const float* const* x = vec + tile[0];
  const float* const* y = vec + tile[1];
  const int64_t whole = WHOLE ? d : d / W * W;
  for (int64_t k = 0; k < whole; k += W) {
    V xs[kTileI];
#pragma GCC unroll 8
    for (int r = 0; r < kTileI; ++r) xs[r] = Vec::load(x[r] + k);
#pragma GCC unroll 8
    for (int c = 0; c < kTileJ; ++c) {
      const V yc = Vec::load(y[c] + k);
#pragma GCC unroll 8
      for (int r = 0; r < kTileI; ++r) acc[r * kTileJ + c] = Vec::fma(xs[r], yc, acc[r * kTileJ + c]);
    }
  }
  if (!WHOLE && whole < d) {
    const int n = clamp_width(d - whole);
    for (int c = 0; c < kTileJ; ++c) {
      const V yc = Vec::loadn(y[c] + whole, n);
      for (int r = 0; r < kTileI; ++r)
        acc[r * kTileJ + c] = Vec::fma(Vec::loadn(x[r] + whole, n), yc, acc[r * kTileJ + c]);
    }
  }
  float sums[kGemvRows];
  sum_accumulators<true>(acc, kGemvRows, sums);
  const int64_t* slots = tile + 2;
  for (int s = 0; s < kGemvRows; ++s)
    if (slots[s] >= 0) dots[slots[s]] = sums[s];
}

template <bool WHOLE>
void interact_rows(const InteractArgs& a, int64_t begin, int64_t end) {
  const int64_t V = a.F + 1;
  const int64_t stride = 2 + kGemvRows;
  const float* vec[kMaxInteractVectors + kGemvRows];
  for (int64_t b = begin; b < end; ++b) {
    const float* bottom = a.bottom + b * a.d;
    const int64_t* ids = a.ids + b * a.F;
    float* o = a.out + b * (a.d + a.P);
    for (int64_t k = 0; k < a.d; ++k) o[k] = bottom[k];
    for (int64_t i = 0; i < a.padded; ++i)
      vec[i] = i < V ? interact_vector(a, bottom, ids, i) : bottom;
    float* dots = o + a.d;
    for (int64_t t = 0; t < a.ntiles; ++t)
      interact_tile<WHOLE>(vec, a.d, a.tiles + t * stride, dots);
    for (int64_t r = 0; r < a.nrepeats; ++r)
      dots[a.repeats[2 * r]] = dots[a.repeats[2 * r + 1]];
  }
}

void interact(const InteractArgs& a, int64_t begin, int64_t end) {
  if (a.d % Vec::W == 0) {
    interact_rows<true>(a, begin, end);
  } else {
    interact_rows<false>(a, begin, end);
  }
}

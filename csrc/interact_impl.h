// The dot interaction's kernel body (adsparse::dot_interaction, csrc/interaction.cpp), written
// once over the ISA's vector type. Included by kernels_impl.h inside each ISA unit's anonymous
// namespace, after Vec, kGemvRows and the gemv helpers (sum_accumulators, clamp_width, imin).
// No include guard and no includes: each unit compiles its own copy for its own target.

// ---------------------------------------------------------------- dot interaction (serving)
// G pairs at a time, each accumulated as a vector along d and reduced by one shuffle tree, as
// gemv reduces G rows. WHOLE: d is a multiple of W (16, 64: no masked load, which would make GCC
// keep acc[] in memory, see gemv_rows).

// Vector i of row b: the bottom output (i = 0) or field i - 1's table row.
inline const float* interact_vector(const InteractArgs& a, const float* bottom,
                                    const int64_t* ids, int64_t i) {
  return i == 0 ? bottom : a.tables[i - 1] + ids[i - 1] * a.d;
}

template <bool FULL, bool WHOLE>
void interact_pairs(const InteractArgs& a, const float* bottom, const int64_t* ids, int64_t p0,
                    int64_t gv, float* o) {
  using V = typename Vec::V;
  constexpr int G = kGemvRows;
  constexpr int W = Vec::W;
  V acc[G] = {};  // zero: Vec::zero() is all-bits-zero on every ISA
  const float* x[G];
  const float* y[G];
  for (int g = 0; g < G; ++g) {
    const int64_t p = p0 + (FULL || g < gv ? g : 0);
    x[g] = interact_vector(a, bottom, ids, a.pair_i[p]);
    y[g] = interact_vector(a, bottom, ids, a.pair_j[p]);
  }
  const int64_t whole = WHOLE ? a.d : a.d / W * W;
  for (int64_t k = 0; k < whole; k += W) {
#pragma GCC unroll 32
    for (int g = 0; g < G; ++g)
      if (FULL || g < gv) acc[g] = Vec::fma(Vec::load(x[g] + k), Vec::load(y[g] + k), acc[g]);
  }
  if (!WHOLE && whole < a.d) {
    const int n = clamp_width(a.d - whole);
    for (int g = 0; g < G; ++g)
      if (FULL || g < gv)
        acc[g] = Vec::fma(Vec::loadn(x[g] + whole, n), Vec::loadn(y[g] + whole, n), acc[g]);
  }
  float sums[G];
  sum_accumulators<FULL>(acc, gv, sums);
  for (int g = 0; g < gv; ++g) o[p0 + g] = sums[g];
}

template <bool WHOLE>
void interact_rows(const InteractArgs& a, int64_t begin, int64_t end) {
  constexpr int G = kGemvRows;
  for (int64_t b = begin; b < end; ++b) {
    const float* bottom = a.bottom + b * a.d;
    const int64_t* ids = a.ids + b * a.F;
    float* o = a.out + b * (a.d + a.P);
    for (int64_t k = 0; k < a.d; ++k) o[k] = bottom[k];
    float* dots = o + a.d;
    for (int64_t p0 = 0; p0 < a.P; p0 += G) {
      const int64_t gv = imin(G, a.P - p0);
      if (gv == G) {
        interact_pairs<true, WHOLE>(a, bottom, ids, p0, gv, dots);
      } else {
        interact_pairs<false, WHOLE>(a, bottom, ids, p0, gv, dots);
      }
    }
  }
}

void interact(const InteractArgs& a, int64_t begin, int64_t end) {
  if (a.d % Vec::W == 0) {
    interact_rows<true>(a, begin, end);
  } else {
    interact_rows<false>(a, begin, end);
  }
}

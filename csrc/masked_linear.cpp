// CPU kernels of the masked linear op family (masked_linear*): y = act(x @ (W * M)^T + b).
//
// The mask is read at tile granularity: a tile is one mask block, or several small blocks
// merged up to at least 16x16 (an element-wise mask uses 16x16 tiles), and a tile whose mask
// entries are all zero is skipped. When few tiles remain, the non-zero tiles of W * M are packed
// into the block-sparse kernels' operand layout, as a GEMM packs its operands, and the
// block-sparse kernels run; W * M is never formed as a whole. When most tiles are non-zero the
// op routes to torch's dense GEMM instead (the product is then as dense as the weight): the
// block-sparse kernel's advantage is the skipped work, and at high tile density MKL's dense
// GEMM is faster than any sparse schedule.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "block_gemm.h"
#include "checks.h"
#include "cpu_isa.h"

namespace adsparse {
namespace {

// Above this share of non-zero tiles the dense GEMM route is faster (benchmarks/RESULTS.md).
constexpr double kDenseTileFraction = 0.7;

struct TilePlan {
  int64_t tn = 0, tk = 0;  // tile size (multiples of the mask block)
  int64_t TR = 0, TC = 0;  // tile grid
  at::Tensor nz;           // [TR, TC] bool: the tile has a non-zero mask entry
  int64_t count = 0;
  bool dense = true;       // take the dense GEMM route
  bool ones = false;       // every mask entry is exactly 1: W * M is W itself
};

void check_mask(const at::Tensor& mask, int64_t bn, int64_t bk, int64_t N, int64_t K) {
  check_float_cpu(mask, "mask");
  TORCH_CHECK_VALUE(bn >= 1 && bk >= 1, "block size must be >= 1, got (", bn, ", ", bk, ")");
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == ceil_div(N, bn) &&
                        mask.size(1) == ceil_div(K, bk),
                    "mask must be [", ceil_div(N, bn), ", ", ceil_div(K, bk), "] for weight [", N,
                    ", ", K, "] and block (", bn, ", ", bk, "), got ", mask.sizes());
}

void check_weight(const at::Tensor& weight) {
  check_float_cpu(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.dim(), "-D");
}

TilePlan plan_tiles(const at::Tensor& mask, int64_t bn, int64_t bk, int64_t N, int64_t K,
                    int64_t B) {
  TilePlan p;
  if (B == 0 || N == 0 || K == 0) return p;
  // A hard mask at density 1.0 is all ones; then the dense route is exactly nn.Linear's GEMMs,
  // with no pass over W to apply the mask.
  p.ones = mask.eq(1).all().item<bool>();
  if (p.ones) return p;
  const int64_t fr = bn >= 16 ? 1 : ceil_div(16, bn), fc = bk >= 16 ? 1 : ceil_div(16, bk);
  p.tn = bn * fr;
  p.tk = bk * fc;
  const int64_t MRb = mask.size(0), MCb = mask.size(1);
  p.TR = ceil_div(MRb, fr);
  p.TC = ceil_div(MCb, fc);
  at::Tensor nzb = mask.ne(0);
  if (fr == 1 && fc == 1) {
    p.nz = nzb.contiguous();
  } else {
    at::Tensor padded = at::constant_pad_nd(nzb.to(at::kByte),
                                            {0, p.TC * fc - MCb, 0, p.TR * fr - MRb}, 0);
    p.nz = padded.view({p.TR, fr, p.TC, fc}).amax({1, 3}).ne(0).contiguous();
  }
  p.count = p.nz.sum().item<int64_t>();
  p.dense = static_cast<double>(p.count) > kDenseTileFraction * static_cast<double>(p.TR * p.TC);
  return p;
}

// Non-zero tiles in row-major (by_rows) or column-major order, as CSR over the outer dimension.
struct TileList {
  std::vector<int64_t> offsets, outer, inner;  // outer/inner: tile row/col (or col/row)
};

TileList list_tiles(const TilePlan& p, bool by_rows) {
  TileList t;
  const int64_t outer_n = by_rows ? p.TR : p.TC, inner_n = by_rows ? p.TC : p.TR;
  const bool* nz = p.nz.data_ptr<bool>();
  t.offsets.assign(outer_n + 1, 0);
  t.outer.reserve(p.count);
  t.inner.reserve(p.count);
  for (int64_t o = 0; o < outer_n; ++o) {
    for (int64_t i = 0; i < inner_n; ++i) {
      if (nz[by_rows ? o * p.TC + i : i * p.TC + o]) {
        t.outer.push_back(o);
        t.inner.push_back(i);
      }
    }
    t.offsets[o + 1] = static_cast<int64_t>(t.outer.size());
  }
  return t;
}

// Calls f(n, k, m) for every weight of tile (r, c) inside [N, K], with m its mask value; walks
// the mask block by block so the inner loop has no division.
template <typename F>
inline void for_tile(const float* mask, int64_t MC, int64_t bn, int64_t bk, int64_t N, int64_t K,
                     int64_t n0, int64_t k0, int64_t tn, int64_t tk, F f) {
  const int64_t nv = std::min(tn, N - n0), kv = std::min(tk, K - k0);
  for (int64_t n = 0; n < nv; ++n) {
    const float* mrow = mask + ((n0 + n) / bn) * MC;
    int64_t kb = k0 / bk, kin = 0;  // k0 is a multiple of tk, itself a multiple of bk
    for (int64_t k = 0; k < kv; ++k) {
      f(n, k, mrow[kb]);
      if (++kin == bk) {
        kin = 0;
        ++kb;
      }
    }
  }
}

// (W * M) of the listed tiles, packed [nt, tn, tk] or transposed [nt, tk, tn]; zero-padded.
at::Tensor pack_tiles(const at::Tensor& w, const at::Tensor& mask, int64_t bn, int64_t bk,
                      const TilePlan& p, const TileList& t, bool by_rows, bool transposed) {
  const int64_t N = w.size(0), K = w.size(1), nt = static_cast<int64_t>(t.outer.size());
  const int64_t tn = p.tn, tk = p.tk, tsz = tn * tk, MC = mask.size(1);
  at::Tensor out = at::empty({nt, transposed ? tk : tn, transposed ? tn : tk}, w.options());
  const float* wp = w.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nt, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = by_rows ? t.outer[j] : t.inner[j], c = by_rows ? t.inner[j] : t.outer[j];
      const int64_t n0 = r * tn, k0 = c * tk;
      float* o = op + j * tsz;
      if (n0 + tn > N || k0 + tk > K) std::fill(o, o + tsz, 0.0f);
      const float* wt = wp + n0 * K + k0;
      if (transposed) {
        for_tile(mp, MC, bn, bk, N, K, n0, k0, tn, tk,
                 [&](int64_t n, int64_t k, float m) { o[k * tn + n] = wt[n * K + k] * m; });
      } else {
        for_tile(mp, MC, bn, bk, N, K, n0, k0, tn, tk,
                 [&](int64_t n, int64_t k, float m) { o[n * tk + k] = wt[n * K + k] * m; });
      }
    }
  });
  return out;
}

// W * M as a dense tensor, for the dense route only.
at::Tensor masked_dense(const at::Tensor& w, const at::Tensor& mask, int64_t bn, int64_t bk,
                        bool ones) {
  if (ones) return w;
  const int64_t N = w.size(0), K = w.size(1);
  if (bn == 1 && bk == 1) return w * mask;
  const int64_t R = mask.size(0), C = mask.size(1);
  if (N == R * bn && K == C * bk) {
    return (w.view({R, bn, C, bk}) * mask.view({R, 1, C, 1})).view({N, K});
  }
  return w * mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1).narrow(0, 0, N).narrow(1, 0, K);
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const std::optional<at::Tensor>& bias, int64_t bn, int64_t bk,
                             int64_t activation) {
  check_float_cpu(x, "x");
  check_weight(weight);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == weight.size(1),
                    "x must be [B, K] with K = weight.size(1) = ", weight.size(1), ", got ",
                    x.sizes());
  const int64_t B = x.size(0), N = weight.size(0), K = weight.size(1);
  check_mask(mask, bn, bk, N, K);
  TORCH_CHECK_VALUE(activation == 0 || activation == 1,
                    "activation must be 0 (none) or 1 (relu), got ", activation);
  const at::Tensor b = checked_bias(bias, N);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), mc = mask.contiguous();
  const TilePlan p = plan_tiles(mc, bn, bk, N, K, B);
  if (p.dense) {
    const at::Tensor w = masked_dense(wc, mc, bn, bk, p.ones);
    at::Tensor y = b.defined() ? at::addmm(b, xc, w.t()) : at::mm(xc, w.t());
    if (activation == 1) y.relu_();
    return y;
  }
  const TileList t = list_tiles(p, /*by_rows=*/true);
  at::Tensor y = at::empty({B, N}, x.options());
  const KernelTable& kt = selected_kernels();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool gemv = B <= kGemvMaxBatch;
  const at::Tensor packed = pack_tiles(wc, mc, bn, bk, p, t, true, /*transposed=*/!gemv);
  if (gemv) {
    forward_gemv(kt, xc, packed, t.offsets.data(), t.inner.data(), p.TR, bp,
                 static_cast<int>(activation), y);
  } else {
    forward_spmm(kt, xc, packed, t.offsets.data(), t.inner.data(), p.TR, bp,
                 static_cast<int>(activation), y);
  }
  return y;
}

at::Tensor masked_linear_backward_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                            const at::Tensor& mask, int64_t bn, int64_t bk) {
  check_float_cpu(grad, "grad");
  check_weight(weight);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(1) == weight.size(0),
                    "grad must be [B, N] with N = weight.size(0) = ", weight.size(0), ", got ",
                    grad.sizes());
  const int64_t B = grad.size(0), N = weight.size(0), K = weight.size(1);
  check_mask(mask, bn, bk, N, K);
  const at::Tensor gc = grad.contiguous(), wc = weight.contiguous(), mc = mask.contiguous();
  const TilePlan p = plan_tiles(mc, bn, bk, N, K, B);
  if (p.dense) return at::mm(gc, masked_dense(wc, mc, bn, bk, p.ones));
  const TileList t = list_tiles(p, /*by_rows=*/false);
  const at::Tensor packed = pack_tiles(wc, mc, bn, bk, p, t, false, /*transposed=*/false);
  at::Tensor dx = at::empty({B, K}, grad.options());
  backward_input_spmm(selected_kernels(), gc, packed, t.offsets.data(), t.inner.data(), nullptr,
                      p.TC, dx);
  return dx;
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward_params_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    int64_t bn, int64_t bk, bool need_weight, bool need_mask) {
  check_float_cpu(grad, "grad");
  check_float_cpu(x, "x");
  check_weight(weight);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(1) == N, "grad must be [B, ", N, "], got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K && x.size(0) == grad.size(0),
                    "x must be [", grad.size(0), ", ", K, "], got ", x.sizes());
  check_mask(mask, bn, bk, N, K);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous(),
                   mc = mask.contiguous();
  at::Tensor dw = at::empty({0}, grad.options()), dm = at::empty({0}, grad.options());
  if (!need_weight && !need_mask) return {dw, dm};
  const TilePlan p = plan_tiles(mc, bn, bk, N, K, grad.size(0));
  if (need_mask || p.dense) {
    // dM needs dy^T x at every weight (soft masks are never exactly zero): a dense GEMM.
    const at::Tensor G = at::mm(gc.t(), xc);
    if (need_weight) dw = masked_dense(G, mc, bn, bk, p.ones);
    if (need_mask) {
      const at::Tensor gw = G * wc;
      if (bn == 1 && bk == 1) {
        dm = gw;
      } else {
        const int64_t R = mask.size(0), C = mask.size(1);
        const at::Tensor padded =
            at::constant_pad_nd(gw, {0, C * bk - K, 0, R * bn - N}, 0);
        dm = padded.view({R, bn, C, bk}).sum({1, 3});
      }
    }
    return {dw, dm};
  }
  // Sparse route: dy^T x only at the non-zero tiles, then scaled by M into a zero dW.
  const TileList t = list_tiles(p, /*by_rows=*/true);
  const int64_t nt = static_cast<int64_t>(t.outer.size());
  at::Tensor dv = at::empty({nt, p.tn, p.tk}, grad.options());
  if (nt > 0) {
    backward_weight_sddmm(selected_kernels(), gc, xc, t.outer.data(), t.inner.data(), nt, p.tn,
                          p.tk, dv);
  }
  dw = at::zeros({N, K}, grad.options());
  const float* dvp = dv.data_ptr<float>();
  const float* mp = mc.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  const int64_t MC = mc.size(1), tn = p.tn, tk = p.tk;
  at::parallel_for(0, nt, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n0 = t.outer[j] * tn, k0 = t.inner[j] * tk;
      const float* d = dvp + j * tn * tk;
      float* o = dwp + n0 * K + k0;
      for_tile(mp, MC, bn, bk, N, K, n0, k0, tn, tk,
               [&](int64_t n, int64_t k, float m) { o[n * K + k] = d[n * tk + k] * m; });
    }
  });
  return {dw, dm};
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward_input", &masked_linear_backward_input_cpu);
  m.impl("masked_linear_backward_params", &masked_linear_backward_params_cpu);
}

}  // namespace adsparse

// CPU kernel of dot_interaction: the DLRM's pairwise-dot interaction for inference, read straight
// from the embedding tables. out[b] = [bottom[b], <v_i, v_j> for each pair p], where the F + 1
// vectors of row b are v_0 = bottom[b] and v_{f+1} = tables[f][ids[b, f]], and pair p is
// (i, j) = divmod(pair_index[p], F + 1). It replaces F lookups, a stack of the [B, F+1, d]
// vectors, a batched Gram matrix, an index_select of its upper triangle and a concatenation by one
// pass that keeps each row's vectors in L1.
//
// No autograd: python/adsparse/interaction.py registers a backward that raises (training keeps
// the composite path, whose gradients reach the tables).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

namespace adsparse {
namespace {

// The kernel's work list for one pair list (InteractArgs::tiles): every tile of
// rows x cols entries of the Gram matrix that holds a pair asked for. <v_i, v_j> is symmetric,
// so a pair is the entry (max, min): the lower triangle holds them all.
struct InteractPlan {
  std::vector<int64_t> tiles;
  std::vector<int64_t> repeats;  // (dst, src) pairs
  int64_t padded = 0;
};

InteractPlan plan_interaction(const std::vector<int64_t>& pi, const std::vector<int64_t>& pj,
                              int64_t V, int rows, int cols) {
  const int64_t nbi = (V + rows - 1) / rows, nbj = (V + cols - 1) / cols, G = rows * cols;
  InteractPlan plan;
  plan.padded = std::max(nbi * rows, nbj * cols);
  std::vector<int64_t> cell(static_cast<size_t>(nbi * nbj * G), -1);
  for (size_t p = 0; p < pi.size(); ++p) {
    const int64_t i = std::max(pi[p], pj[p]), j = std::min(pi[p], pj[p]);
    int64_t& slot = cell[((i / rows) * nbj + j / cols) * G + (i % rows) * cols + j % cols];
    if (slot < 0) {
      slot = static_cast<int64_t>(p);
    } else {
      plan.repeats.push_back(static_cast<int64_t>(p));
      plan.repeats.push_back(slot);
    }
  }
  for (int64_t t = 0; t < nbi * nbj; ++t) {
    const auto first = cell.begin() + t * G, last = first + G;
    if (std::all_of(first, last, [](int64_t s) { return s < 0; })) continue;
    plan.tiles.push_back(t / nbj * rows);
    plan.tiles.push_back(t % nbj * cols);
    plan.tiles.insert(plan.tiles.end(), first, last);
  }
  return plan;
}

at::Tensor dot_interaction_cpu(const at::Tensor& bottom_in, const at::Tensor& ids_in,
                               at::TensorList tables_in, const at::Tensor& pair_index_in) {
  check_float_cpu(bottom_in, "bottom");
  TORCH_CHECK_VALUE(bottom_in.dim() == 2, "bottom must be [B, d], got ", bottom_in.sizes());
  const int64_t B = bottom_in.size(0), d = bottom_in.size(1);
  TORCH_CHECK_VALUE(ids_in.device().is_cpu() && ids_in.scalar_type() == at::kLong,
                    "ids must be a CPU int64 tensor, got ", ids_in.scalar_type(), " on ",
                    ids_in.device());
  TORCH_CHECK_VALUE(ids_in.dim() == 2 && ids_in.size(0) == B, "ids must be [", B,
                    ", F], got ", ids_in.sizes());
  const int64_t F = ids_in.size(1);
  TORCH_CHECK_VALUE(F + 1 <= kMaxInteractVectors, "dot_interaction takes at most ",
                    kMaxInteractVectors - 1, " fields, got ", F);
  TORCH_CHECK_VALUE(static_cast<int64_t>(tables_in.size()) == F, "ids have ", F,
                    " fields but there are ", tables_in.size(), " tables");
  check_index(pair_index_in, "pair_index");
  const at::Tensor ids = ids_in.contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();
  std::vector<at::Tensor> tables;
  std::vector<const float*> bases;
  tables.reserve(F);
  bases.reserve(F);
  for (int64_t f = 0; f < F; ++f) {
    const at::Tensor& t = tables_in[f];
    check_float_cpu(t, "tables");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == d, "tables[", f, "] must be [rows, ", d,
                      "], got ", t.sizes());
    const int64_t rows = t.size(0);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t id = idp[b * F + f];
      TORCH_CHECK_VALUE(id >= 0 && id < rows, "ids[", b, ", ", f, "] = ", id,
                        " is out of range [0, ", rows, ") of tables[", f, "]");
    }
    tables.push_back(t.contiguous());
    bases.push_back(tables.back().data_ptr<float>());
  }
  const at::Tensor pair_index = pair_index_in.contiguous();
  const int64_t P = pair_index.numel(), V = F + 1;
  const int64_t* pp = pair_index.data_ptr<int64_t>();
  std::vector<int64_t> pi(P), pj(P);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK_VALUE(pp[p] >= 0 && pp[p] < V * V, "pair_index[", p, "] = ", pp[p],
                      " is out of range [0, ", V * V, ") for ", V, " vectors");
    pi[p] = pp[p] / V;
    pj[p] = pp[p] % V;
  }
  const at::Tensor bottom = bottom_in.contiguous();
  at::Tensor out = at::empty({B, d + P}, bottom.options());
  if (B == 0) return out;
  const KernelTable& kt = selected_kernels();
  const InteractPlan plan =
      plan_interaction(pi, pj, V, kt.interact_tile[0], kt.interact_tile[1]);
  const int64_t stride = 2 + kt.interact_tile[0] * kt.interact_tile[1];
  const InteractArgs args{bottom.data_ptr<float>(),
                          B,
                          d,
                          F,
                          bases.data(),
                          idp,
                          plan.tiles.data(),
                          static_cast<int64_t>(plan.tiles.size()) / stride,
                          plan.padded,
                          plan.repeats.data(),
                          static_cast<int64_t>(plan.repeats.size()) / 2,
                          P,
                          out.data_ptr<float>()};
  // A row is ~P * d FMAs (351 x 64 at the wide preset): 16 rows a task amortise the fork.
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) { kt.interact(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) { m.impl("dot_interaction", &dot_interaction_cpu); }

}  // namespace adsparse

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

#include <vector>

#include "checks.h"
#include "cpu_isa.h"

namespace adsparse {
namespace {

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
  const InteractArgs args{bottom.data_ptr<float>(), B, d, F, bases.data(), idp,
                          pi.data(), pj.data(), P, out.data_ptr<float>()};
  const KernelTable& kt = selected_kernels();
  // A row is ~P * d FMAs (351 x 64 at the wide preset): 16 rows a task amortise the fork.
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) { kt.interact(args, begin, end); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) { m.impl("dot_interaction", &dot_interaction_cpu); }

}  // namespace adsparse

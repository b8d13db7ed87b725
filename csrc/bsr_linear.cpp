// CPU kernels of the block-sparse linear op family (bsr_linear*): argument checks, then the
// vectorised kernels of block_gemm.h on the ISA chosen by cpu_isa.h.
//
// Forward: y = act(x @ W^T + b). For B > kGemvMaxBatch, x is packed into panels of MR rows and
// the blocks are transposed once per call (nnzb*bn*bk floats, small next to B*nnzb*bn*bk FMAs),
// then each (panel, block row) tile is computed in registers with bias and ReLU in the epilogue.
// Input gradient: dx = dy @ W through the transposed index, each block column of dx owned by
// one task (no atomics). Weight gradient: dy^T x at the stored blocks only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "block_gemm.h"
#include "checks.h"
#include "cpu_isa.h"

namespace adsparse {
namespace {

void check_values(const at::Tensor& values) {
  check_float_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 3, "values must be [nnzb, bn, bk], got ", values.dim(), "-D");
  TORCH_CHECK_VALUE(values.size(1) >= 1 && values.size(2) >= 1,
                    "values: block size must be >= 1, got (", values.size(1), ", ",
                    values.size(2), ")");
}

void check_grad_2d(const at::Tensor& t, const char* name) {
  check_float_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                          const at::Tensor& row_offsets_in, const at::Tensor& col_indices_in,
                          const at::Tensor& t_row_offsets, const at::Tensor& t_col_indices,
                          const at::Tensor& t_block_ids, const std::optional<at::Tensor>& bias,
                          int64_t N, int64_t activation) {
  // Indices are read through raw pointers: a strided or expanded view is made dense first.
  const at::Tensor row_offsets = row_offsets_in.contiguous();
  const at::Tensor col_indices = col_indices_in.contiguous();
  check_grad_2d(x, "x");
  check_values(values);
  TORCH_CHECK_VALUE(N >= 0, "out_features must be >= 0, got ", N);
  TORCH_CHECK_VALUE(activation == 0 || activation == 1,
                    "activation must be 0 (none) or 1 (relu), got ", activation);
  const int64_t B = x.size(0), K = x.size(1);
  const int64_t bn = values.size(1), bk = values.size(2);
  const int64_t R = ceil_div(N, bn);
  check_compressed_index(row_offsets, col_indices, R, ceil_div(K, bk), "row_offsets",
                         "col_indices");
  TORCH_CHECK_VALUE(values.size(0) == col_indices.numel(), "values has ", values.size(0),
                    " blocks but col_indices has ", col_indices.numel());
  const at::Tensor b = checked_bias(bias, N);
  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const KernelTable& kt = selected_kernels();
  const at::Tensor xc = x.contiguous(), vc = values.contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t* ro = row_offsets.data_ptr<int64_t>();
  const int64_t* ci = col_indices.data_ptr<int64_t>();
  if (B <= kGemvMaxBatch) {
    forward_gemv(kt, xc, vc, ro, ci, R, bp, static_cast<int>(activation), y);
  } else {
    forward_spmm(kt, xc, transpose_blocks(kt, vc), ro, ci, R, bp, static_cast<int>(activation),
                 y);
  }
  return y;
}

at::Tensor bsr_linear_backward_input_cpu(const at::Tensor& grad, const at::Tensor& values,
                                         const at::Tensor& t_row_offsets_in,
                                         const at::Tensor& t_col_indices_in,
                                         const at::Tensor& t_block_ids_in, int64_t K) {
  const at::Tensor t_row_offsets = t_row_offsets_in.contiguous(),
                   t_col_indices = t_col_indices_in.contiguous(),
                   t_block_ids = t_block_ids_in.contiguous();
  check_grad_2d(grad, "grad");
  check_values(values);
  TORCH_CHECK_VALUE(K >= 0, "in_features must be >= 0, got ", K);
  const int64_t B = grad.size(0), N = grad.size(1);
  const int64_t bn = values.size(1), bk = values.size(2), nnzb = values.size(0);
  const int64_t C = ceil_div(K, bk);
  check_compressed_index(t_row_offsets, t_col_indices, C, ceil_div(N, bn), "t_row_offsets",
                         "t_col_indices");
  check_index(t_block_ids, "t_block_ids");
  TORCH_CHECK_VALUE(t_block_ids.numel() == nnzb && t_col_indices.numel() == nnzb,
                    "t_block_ids and t_col_indices must have one entry per block (", nnzb,
                    "), got ", t_block_ids.numel(), " and ", t_col_indices.numel());
  const int64_t* tb = t_block_ids.data_ptr<int64_t>();
  for (int64_t j = 0; j < nnzb; ++j) {
    TORCH_CHECK_VALUE(tb[j] >= 0 && tb[j] < nnzb, "t_block_ids[", j, "] = ", tb[j],
                      " is out of range [0, ", nnzb, ")");
  }
  at::Tensor dx = at::empty({B, K}, grad.options());
  if (B == 0 || K == 0) return dx;
  backward_input_spmm(selected_kernels(), grad.contiguous(), values.contiguous(),
                      t_row_offsets.data_ptr<int64_t>(), t_col_indices.data_ptr<int64_t>(), tb, C,
                      dx);
  return dx;
}

at::Tensor bsr_linear_backward_weight_cpu(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& row_offsets_in,
                                          const at::Tensor& col_indices_in, int64_t bn,
                                          int64_t bk) {
  const at::Tensor row_offsets = row_offsets_in.contiguous();
  const at::Tensor col_indices = col_indices_in.contiguous();
  check_grad_2d(grad, "grad");
  check_grad_2d(x, "x");
  TORCH_CHECK_VALUE(bn >= 1 && bk >= 1, "block size must be >= 1, got (", bn, ", ", bk, ")");
  TORCH_CHECK_VALUE(grad.size(0) == x.size(0), "grad has ", grad.size(0), " rows but x has ",
                    x.size(0));
  const int64_t N = grad.size(1), K = x.size(1);
  const int64_t R = ceil_div(N, bn);
  check_compressed_index(row_offsets, col_indices, R, ceil_div(K, bk), "row_offsets",
                         "col_indices");
  const int64_t nnzb = col_indices.numel();
  at::Tensor dv = at::empty({nnzb, bn, bk}, grad.options());
  if (nnzb == 0) return dv;
  if (grad.size(0) == 0) return dv.zero_();
  const at::Tensor rows = expand_rows(row_offsets.data_ptr<int64_t>(), R, nnzb);
  backward_weight_sddmm(selected_kernels(), grad.contiguous(), x.contiguous(),
                        rows.data_ptr<int64_t>(), col_indices.data_ptr<int64_t>(), nnzb, bn, bk,
                        dv);
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) {
  m.impl("bsr_linear", &bsr_linear_cpu);
  m.impl("bsr_linear_backward_input", &bsr_linear_backward_input_cpu);
  m.impl("bsr_linear_backward_weight", &bsr_linear_backward_weight_cpu);
}

}  // namespace adsparse

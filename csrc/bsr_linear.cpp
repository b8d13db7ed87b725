// CPU kernels of the block-sparse linear op family (bsr_linear*). Reference version: correct,
// bounds-checked, built on ATen GEMMs per block; the vectorised kernels replace it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace adsparse {
namespace {

void check_bsr(const at::Tensor& values, const at::Tensor& row_offsets,
               const at::Tensor& col_indices, int64_t N, int64_t K) {
  check_float_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 3, "values must be [nnzb, bn, bk], got ", values.dim(), "-D");
  const int64_t bn = values.size(1), bk = values.size(2);
  TORCH_CHECK_VALUE(bn >= 1 && bk >= 1, "block size must be >= 1");
  check_compressed_index(row_offsets, col_indices, ceil_div(N, bn), ceil_div(K, bk),
                         "row_offsets", "col_indices");
  TORCH_CHECK_VALUE(values.size(0) == col_indices.numel(), "values has ", values.size(0),
                    " blocks but col_indices has ", col_indices.numel());
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                          const at::Tensor& row_offsets, const at::Tensor& col_indices,
                          const at::Tensor& t_row_offsets, const at::Tensor& t_col_indices,
                          const at::Tensor& t_block_ids, const std::optional<at::Tensor>& bias,
                          int64_t N, int64_t activation) {
  check_float_cpu(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [B, K], got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  check_bsr(values, row_offsets, col_indices, N, K);
  const int64_t bn = values.size(1), bk = values.size(2);
  at::Tensor y = at::zeros({x.size(0), N}, x.options());
  if (bias.has_value()) {
    check_float_cpu(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "]");
    y.add_(*bias);
  }
  const int64_t* ro = row_offsets.data_ptr<int64_t>();
  const int64_t* ci = col_indices.data_ptr<int64_t>();
  at::Tensor xc = x.contiguous();
  for (int64_t r = 0; r + 1 < row_offsets.numel(); ++r) {
    const int64_t n0 = r * bn, nr = std::min(bn, N - n0);
    for (int64_t j = ro[r]; j < ro[r + 1]; ++j) {
      const int64_t k0 = ci[j] * bk, nc = std::min(bk, K - k0);
      at::Tensor blk = values[j].narrow(0, 0, nr).narrow(1, 0, nc);
      y.narrow(1, n0, nr).addmm_(xc.narrow(1, k0, nc), blk.t());
    }
  }
  if (activation == 1) y.relu_();
  return y;
}

at::Tensor bsr_linear_backward_input_cpu(const at::Tensor& grad, const at::Tensor& values,
                                         const at::Tensor& t_row_offsets,
                                         const at::Tensor& t_col_indices,
                                         const at::Tensor& t_block_ids, int64_t K) {
  check_float_cpu(grad, "grad");
  check_float_cpu(values, "values");
  TORCH_CHECK_VALUE(grad.dim() == 2, "grad must be 2-D");
  const int64_t N = grad.size(1), bn = values.size(1), bk = values.size(2);
  check_compressed_index(t_row_offsets, t_col_indices, ceil_div(K, bk), ceil_div(N, bn),
                         "t_row_offsets", "t_col_indices");
  check_index(t_block_ids, "t_block_ids");
  TORCH_CHECK_VALUE(t_block_ids.numel() == values.size(0), "t_block_ids must have one entry per block");
  at::Tensor dx = at::zeros({grad.size(0), K}, grad.options());
  const int64_t* to = t_row_offsets.data_ptr<int64_t>();
  const int64_t* tc = t_col_indices.data_ptr<int64_t>();
  const int64_t* tb = t_block_ids.data_ptr<int64_t>();
  at::Tensor g = grad.contiguous();
  for (int64_t c = 0; c + 1 < t_row_offsets.numel(); ++c) {
    const int64_t k0 = c * bk, nc = std::min(bk, K - k0);
    for (int64_t j = to[c]; j < to[c + 1]; ++j) {
      TORCH_CHECK_VALUE(tb[j] >= 0 && tb[j] < values.size(0), "t_block_ids out of range");
      const int64_t n0 = tc[j] * bn, nr = std::min(bn, N - n0);
      at::Tensor blk = values[tb[j]].narrow(0, 0, nr).narrow(1, 0, nc);
      dx.narrow(1, k0, nc).addmm_(g.narrow(1, n0, nr), blk);
    }
  }
  return dx;
}

at::Tensor bsr_linear_backward_weight_cpu(const at::Tensor& grad, const at::Tensor& x,
                                          const at::Tensor& row_offsets,
                                          const at::Tensor& col_indices, int64_t bn, int64_t bk) {
  check_float_cpu(grad, "grad");
  check_float_cpu(x, "x");
  const int64_t N = grad.size(1), K = x.size(1);
  check_compressed_index(row_offsets, col_indices, ceil_div(N, bn), ceil_div(K, bk),
                         "row_offsets", "col_indices");
  at::Tensor dv = at::zeros({col_indices.numel(), bn, bk}, grad.options());
  const int64_t* ro = row_offsets.data_ptr<int64_t>();
  const int64_t* ci = col_indices.data_ptr<int64_t>();
  at::Tensor g = grad.contiguous(), xc = x.contiguous();
  for (int64_t r = 0; r + 1 < row_offsets.numel(); ++r) {
    const int64_t n0 = r * bn, nr = std::min(bn, N - n0);
    for (int64_t j = ro[r]; j < ro[r + 1]; ++j) {
      const int64_t k0 = ci[j] * bk, nc = std::min(bk, K - k0);
      dv[j].narrow(0, 0, nr).narrow(1, 0, nc).copy_(
          at::mm(g.narrow(1, n0, nr).t(), xc.narrow(1, k0, nc)));
    }
  }
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) {
  m.impl("bsr_linear", &bsr_linear_cpu);
  m.impl("bsr_linear_backward_input", &bsr_linear_backward_input_cpu);
  m.impl("bsr_linear_backward_weight", &bsr_linear_backward_weight_cpu);
}

}  // namespace adsparse

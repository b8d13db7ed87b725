// Shared drivers of the block-sparse products: packing, then the ISA kernels run in parallel
// with at::parallel_for (so torch.set_num_threads is obeyed). Both op families (bsr_linear,
// masked_linear) call these after validating their arguments; nothing here re-checks indices.
#pragma once
#include <ATen/ATen.h>

#include "kernels.h"

namespace adsparse {

// Batches up to this size take the matrix-vector kernel in the forward: packing x into panels
// and transposing the blocks would cost about as much as the product itself.
constexpr int64_t kGemvMaxBatch = 3;

// [nnzb, bn, bk] -> [nnzb, bk, bn]: the forward loads one row of W^T per depth step. The result
// lives in this thread's scratch memory: use it before the next call of this file's drivers.
at::Tensor transpose_blocks(const KernelTable& kt, const at::Tensor& values);

// y [B, N] = act(x [B, K] @ W^T + bias), W given as transposed blocks wt [nnzb, bk, bn] in CSR
// order over block rows (row_offsets [R+1], col_indices [nnzb]).
void forward_spmm(const KernelTable& kt, const at::Tensor& x, const at::Tensor& wt,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y);

// The same product over bf16 blocks wt [nnzb, bk, bn] (transposed once, when the layer was
// converted to its serving form); x is rounded to bf16 as it is packed, like the blocks were.
void forward_spmm_bf16(const KernelTable& kt, const at::Tensor& x, const at::Tensor& wt,
                       const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                       const float* bias, int relu, at::Tensor& y);

// Symmetric per-row int8 quantization (QKernelTable::quantize_row): qx [B, K] int8, sx [B].
void quantize_rows(const QKernelTable& qt, const at::Tensor& x, at::Tensor& qx, at::Tensor& sx);

// y [B, N] = act(sx[b] * sw[n] * (qx @ qw^T)[b, n] + bias[n]) from fp32 x (quantized per row on
// the fly, as quantize_rows does), qw packed as in kernels.h.
void forward_int8(const QKernelTable& qt, const at::Tensor& x,
                  const at::Tensor& w, const float* sw, int64_t bn, int64_t bk,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y);

// Same product for small B from blocks in their natural layout values [nnzb, bn, bk].
void forward_gemv(const KernelTable& kt, const at::Tensor& x, const at::Tensor& values,
                  const int64_t* row_offsets, const int64_t* col_indices, int64_t R,
                  const float* bias, int relu, at::Tensor& y);

// dx [B, K] = g [B, N] @ W, through the CSR over block columns (t_offsets [C+1], t_rows [nnzb],
// t_ids [nnzb] or nullptr when values are already in that order). One thread owns each
// block column of dx, so there are no atomics.
void backward_input_spmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& values,
                         const int64_t* t_offsets, const int64_t* t_rows, const int64_t* t_ids,
                         int64_t C, at::Tensor& dx);

// dv [nnzb, bn, bk] = g[:, rows(j)]^T @ x[:, cols(j)] at the stored blocks.
void backward_weight_sddmm(const KernelTable& kt, const at::Tensor& g, const at::Tensor& x,
                           const int64_t* block_row, const int64_t* block_col, int64_t nnzb,
                           int64_t bn, int64_t bk, at::Tensor& dv);

// Block row of every stored block, from CSR offsets.
at::Tensor expand_rows(const int64_t* offsets, int64_t R, int64_t nnzb);

}  // namespace adsparse

// CPU kernel of bsr_linear_serve: the inference-only block-sparse forward over a layer's packed
// serving form, y = act(x @ W^T + b), fp32 in and out. The weight's dtype says the form:
//
//   float32   [nnzb, bn, bk]               the trainable layout (the small-batch inference path of
//                                          BlockSparseLinear: gemv for B <= 3, else spmm)
//   bfloat16  [nnzb, bk, bn]               blocks transposed once at conversion; x is rounded to
//                                          bf16 (in the packed panels), fp32 accumulation
//   int8      [nnzb, ceil(bk/4), bn16, 4]  packed as kernels.h says, with `scales` [N] (fp32, one
//                                          per output channel); x is quantized per row, int32
//                                          accumulation, dequantized in the epilogue
//
// No autograd: ops.py registers a backward that raises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "block_gemm.h"
#include "bsr_serving.h"
#include "checks.h"
#include "cpu_isa.h"

namespace adsparse {
namespace {

// int32 accumulation of int8 products: K * 255 * 127 (the VNNI kernel's shifted activations)
// stays below 2^31 up to K = 66311.
constexpr int64_t kInt8MaxInFeatures = 65536;

void check_serving_weight(const at::Tensor& w, int64_t bn, int64_t bk, int64_t nnzb) {
  TORCH_CHECK_VALUE(w.device().is_cpu(), "weight must be a CPU tensor, got ", w.device());
  std::vector<int64_t> want;
  switch (w.scalar_type()) {
    case at::kFloat:
      want = {nnzb, bn, bk};
      break;
    case at::kBFloat16:
      want = {nnzb, bk, bn};
      break;
    case at::kChar:
      want = {nnzb, ceil_div(bk, kQGroup), ceil_div(bn, kQColPad) * kQColPad, kQGroup};
      break;
    default:
      TORCH_CHECK_VALUE(false, "weight must be float32, bfloat16 or int8, got ", w.scalar_type());
  }
  TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef(want), "weight of dtype ", w.scalar_type(),
                    " for ", nnzb, " blocks of (", bn, ", ", bk, ") must have shape ",
                    at::IntArrayRef(want), ", got ", w.sizes());
}

// The row quantization alone, as an op: the tests' reference and the Triton int8 form use it, so
// every backend quantizes activations exactly alike. Returns (qx [B, K] int8, sx [B] fp32).
std::tuple<at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x_in) {
  check_float_cpu(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be 2-D, got ", x_in.dim(), "-D");
  const at::Tensor x = x_in.contiguous();
  at::Tensor qx = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({x.size(0)}, x.options());
  if (x.size(0) > 0) quantize_rows(selected_qkernels(), x, qx, sx);
  return {qx, sx};
}

}  // namespace

at::Tensor bsr_linear_serve_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                const std::optional<at::Tensor>& scales,
                                const at::Tensor& row_offsets_in,
                                const at::Tensor& col_indices_in,
                                const std::optional<at::Tensor>& bias, int64_t N, int64_t bn,
                                int64_t bk, int64_t activation) {
  const at::Tensor row_offsets = row_offsets_in.contiguous();
  const at::Tensor col_indices = col_indices_in.contiguous();
  check_float_cpu(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() == 2, "x must be 2-D, got ", x_in.dim(), "-D");
  TORCH_CHECK_VALUE(N >= 0, "out_features must be >= 0, got ", N);
  TORCH_CHECK_VALUE(bn >= 1 && bk >= 1, "block size must be >= 1, got (", bn, ", ", bk, ")");
  TORCH_CHECK_VALUE(activation == 0 || activation == 1,
                    "activation must be 0 (none) or 1 (relu), got ", activation);
  const int64_t B = x_in.size(0), K = x_in.size(1);
  const int64_t R = ceil_div(N, bn);
  check_compressed_index(row_offsets, col_indices, R, ceil_div(K, bk), "row_offsets",
                         "col_indices");
  check_serving_weight(weight, bn, bk, col_indices.numel());
  const bool int8 = weight.scalar_type() == at::kChar;
  at::Tensor sw;
  if (int8) {
    TORCH_CHECK_VALUE(scales.has_value(), "an int8 weight needs scales [", N, "]");
    check_float_cpu(*scales, "scales");
    TORCH_CHECK_VALUE(scales->dim() == 1 && scales->size(0) == N, "scales must be [", N,
                      "], got ", scales->sizes());
    TORCH_CHECK_VALUE(K <= kInt8MaxInFeatures, "in_features = ", K, " is above ",
                      kInt8MaxInFeatures, ", where the int8 kernel's int32 sums could overflow");
    sw = scales->contiguous();
  } else {
    TORCH_CHECK_VALUE(!scales.has_value(), "scales are only for an int8 weight, got a ",
                      weight.scalar_type(), " weight");
  }
  const at::Tensor b = checked_bias(bias, N);
  at::Tensor y = at::empty({B, N}, x_in.options());
  if (B == 0 || N == 0) return y;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t* ro = row_offsets.data_ptr<int64_t>();
  const int64_t* ci = col_indices.data_ptr<int64_t>();
  const int relu = static_cast<int>(activation);
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  switch (w.scalar_type()) {
    case at::kFloat:
      if (B <= kGemvMaxBatch) {
        forward_gemv(selected_kernels(), x, w, ro, ci, R, bp, relu, y);
      } else {
        const KernelTable& kt = selected_kernels();
        forward_spmm(kt, x, transpose_blocks(kt, w), ro, ci, R, bp, relu, y);
      }
      break;
    case at::kBFloat16:
      forward_spmm_bf16(selected_kernels(), x, w, ro, ci, R, bp, relu, y);  // rounds x to bf16
      break;
    default:  // int8: x is quantized per row as the kernel packs it
      forward_int8(selected_qkernels(), x, w, sw.data_ptr<float>(), bn, bk, ro, ci, R, bp, relu,
                   y);
  }
  return y;
}

TORCH_LIBRARY_IMPL(adsparse, CPU, m) {
  m.impl("bsr_linear_serve", &bsr_linear_serve_cpu);
  m.impl("quantize_rows", &quantize_rows_cpu);
}

}  // namespace adsparse

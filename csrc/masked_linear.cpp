// CPU kernels of the masked linear op family (masked_linear*). Reference version built on ATen:
// correct but it materialises W * M; the tiled kernel replaces it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace adsparse {
namespace {

// The element-wise mask that a (possibly per-block) mask stands for, cut to [N, K].
at::Tensor expand_mask(const at::Tensor& mask, int64_t bn, int64_t bk, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(bn >= 1 && bk >= 1, "block size must be >= 1, got (", bn, ", ", bk, ")");
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == ceil_div(N, bn) &&
                        mask.size(1) == ceil_div(K, bk),
                    "mask must be [", ceil_div(N, bn), ", ", ceil_div(K, bk), "] for weight [", N,
                    ", ", K, "] and block (", bn, ", ", bk, "), got ", mask.sizes());
  if (bn == 1 && bk == 1) return mask;
  return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1).narrow(0, 0, N).narrow(1, 0, K);
}

at::Tensor masked_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const std::optional<at::Tensor>& bias, int64_t bn, int64_t bk,
                             int64_t activation) {
  check_float_cpu(x, "x");
  check_float_cpu(weight, "weight");
  check_float_cpu(mask, "mask");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
                    "x [B, K] and weight [N, K] do not match: ", x.sizes(), " vs ", weight.sizes());
  at::Tensor w = weight * expand_mask(mask, bn, bk, weight.size(0), weight.size(1));
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  if (activation == 1) y.relu_();
  return y;
}

at::Tensor masked_linear_backward_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                            const at::Tensor& mask, int64_t bn, int64_t bk) {
  at::Tensor w = weight * expand_mask(mask, bn, bk, weight.size(0), weight.size(1));
  return at::mm(grad, w);
}

std::tuple<at::Tensor, at::Tensor> masked_linear_backward_params_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
    int64_t bn, int64_t bk, bool need_weight, bool need_mask) {
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor G = at::mm(grad.t(), x);
  at::Tensor dw = need_weight ? G * expand_mask(mask, bn, bk, N, K) : at::empty({0}, grad.options());
  at::Tensor dm = at::empty({0}, grad.options());
  if (need_mask) {
    at::Tensor gw = G * weight;
    if (bn == 1 && bk == 1) {
      dm = gw;
    } else {
      const int64_t R = ceil_div(N, bn), C = ceil_div(K, bk);
      at::Tensor padded = at::zeros({R * bn, C * bk}, grad.options());
      padded.narrow(0, 0, N).narrow(1, 0, K).copy_(gw);
      dm = padded.view({R, bn, C, bk}).sum({1, 3});
    }
  }
  return {dw, dm};
}

}  // namespace

TORCH_LIBRARY_IMPL(adsparse, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward_input", &masked_linear_backward_input_cpu);
  m.impl("masked_linear_backward_params", &masked_linear_backward_params_cpu);
}

}  // namespace adsparse

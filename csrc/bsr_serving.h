// The serving kernel's entry points: the op's CPU implementation (bsr_serving.cpp), and the
// lean Python entry to it for eager inference (serving_entry.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

struct PyMethodDef;

namespace adsparse {

// y = act(x @ W^T + b) over a layer's packed serving form (fp32, bf16 or int8; see
// bsr_serving.cpp). Checks every argument; fp32 [B, N] out.
at::Tensor bsr_linear_serve_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& scales,
                                const at::Tensor& row_offsets, const at::Tensor& col_indices,
                                const std::optional<at::Tensor>& bias, int64_t N, int64_t bn,
                                int64_t bk, int64_t activation);

// The methods of the adsparse._C Python module (null-terminated), added by its PyInit.
PyMethodDef* serving_python_methods();

}  // namespace adsparse

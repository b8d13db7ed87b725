// Argument checks shared by the CPU kernels. They raise ValueError in Python (TORCH_CHECK_VALUE)
// naming the argument, so a corrupt index never reaches a kernel loop.
#pragma once
#include <ATen/ATen.h>

namespace adsparse {

inline void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, name, " must be float32, got ",
                    t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
}

// Offsets start at 0, never decrease, and end at nnz; every index lies in [0, bound).
inline void check_compressed_index(const at::Tensor& offsets, const at::Tensor& indices,
                                   int64_t num_rows, int64_t bound, const char* offsets_name,
                                   const char* indices_name) {
  check_index(offsets, offsets_name);
  check_index(indices, indices_name);
  TORCH_CHECK_VALUE(offsets.numel() == num_rows + 1, offsets_name, " must have ", num_rows + 1,
                    " entries, got ", offsets.numel());
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, offsets_name, "[0] must be 0, got ", o[0]);
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK_VALUE(o[r + 1] >= o[r], offsets_name, " must be non-decreasing (row ", r, ")");
  }
  TORCH_CHECK_VALUE(o[num_rows] == indices.numel(), offsets_name, "[-1] must equal the number of ",
                    "blocks ", indices.numel(), ", got ", o[num_rows]);
  const int64_t* c = indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK_VALUE(c[i] >= 0 && c[i] < bound, indices_name, "[", i, "] = ", c[i],
                      " is out of range [0, ", bound, ")");
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The optional fused bias: fp32 [N] on the CPU; contiguous, or undefined when absent.
inline at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  check_float_cpu(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ",
                    bias->sizes());
  return bias->contiguous();
}

}  // namespace adsparse

// The adsparse op schemas, defined once. Each op family registers its CPU kernels in its own
// translation unit (TORCH_LIBRARY_IMPL); the CUDA kernels (Triton), fake kernels and autograd
// are registered from Python (python/adsparse/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "bsr_serving.h"
#include "cpu_isa.h"

extern "C" {
// Importing adsparse._C loads this library, which runs the static registrations below. The
// module's own methods: the lean serving entry (serving_entry.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          adsparse::serving_python_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(adsparse, m) {
  // y = act(x @ W^T + b) with W block-sparse (BSR, blocks [bn, bk] packed in `values`).
  // activation: 0 = none, 1 = relu. The transposed index (t_*) is an input so that autograd
  // can reach it; the forward kernel does not read it.
  m.def(
      "bsr_linear(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, "
      "Tensor t_row_offsets, Tensor t_col_indices, Tensor t_block_ids, Tensor? bias, "
      "int out_features, int activation) -> Tensor");
  // dx = dy @ W through the transposed block index (no atomics). dy is already ReLU-gated.
  m.def(
      "bsr_linear_backward_input(Tensor grad, Tensor values, Tensor t_row_offsets, "
      "Tensor t_col_indices, Tensor t_block_ids, int in_features) -> Tensor");
  // dW at the stored blocks only: dvalues[b] = dy[:, rows(b)]^T @ x[:, cols(b)].
  m.def(
      "bsr_linear_backward_weight(Tensor grad, Tensor x, Tensor row_offsets, "
      "Tensor col_indices, int block_rows, int block_cols) -> Tensor");
  // y = act(x @ (W * M)^T + b); M is [N, K] (block 1x1) or per block [ceil(N/bn), ceil(K/bk)].
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias, int block_rows, "
      "int block_cols, int activation) -> Tensor");
  // dx = dy @ (W * M).
  m.def(
      "masked_linear_backward_input(Tensor grad, Tensor weight, Tensor mask, int block_rows, "
      "int block_cols) -> Tensor");
  // (dW, dM) with G = dy^T x: dW = G * M, dM = G * W (summed per block for a block mask).
  // An output that is not asked for comes back as an empty tensor of shape [0].
  m.def(
      "masked_linear_backward_params(Tensor grad, Tensor x, Tensor weight, Tensor mask, "
      "int block_rows, int block_cols, bool need_weight, bool need_mask) -> (Tensor, Tensor)");
  // Inference only: y = act(x @ W^T + b) over a layer's serving form, fp32 in and out. `weight` is
  // float32 [nnzb, bn, bk], bfloat16 [nnzb, bk, bn] or int8 [nnzb, ceil(bk/4), bn16, 4] with
  // per-output-channel `scales` [N] (activations quantized per row). See bsr_serving.cpp.
  m.def(
      "bsr_linear_serve(Tensor x, Tensor weight, Tensor? scales, Tensor row_offsets, "
      "Tensor col_indices, Tensor? bias, int out_features, int block_rows, int block_cols, "
      "int activation) -> Tensor");
  // Inference only: the DLRM interaction [bottom, <v_i, v_j> per pair] with v_0 = bottom [B, d]
  // and v_{f+1} = tables[f][ids[:, f]]; pair p is divmod(pair_index[p], F + 1). Output
  // [B, d + P], fp32. See interaction.cpp.
  m.def("dot_interaction(Tensor bottom, Tensor ids, Tensor[] tables, Tensor pair_index) -> Tensor");
  // Symmetric per-row int8 quantization of x [B, K]: (qx int8 [B, K], scale fp32 [B]).
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  // The instruction set the CPU kernels would use now: "avx512_bf16" (AVX-512 with VDPBF16PS for
  // the bf16 serving form), "avx512", "avx2" or "scalar". It honours
  // ADSPARSE_CPU_ISA (read on each call); a forced path the CPU lacks reports the fallback.
  // No tensor arguments, so the implementation is registered as a catch-all with the schema.
  m.def("selected_cpu_isa() -> str", &adsparse::selected_cpu_isa_op);
  // The same for the int8 kernels: "avx512_vnni", "avx2" or "scalar".
  m.def("selected_int8_isa() -> str", &adsparse::selected_int8_isa_op);
}

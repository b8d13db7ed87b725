// The lean Python entry to the serving kernel, adsparse._C.bsr_linear_serve_direct: what eager
// inference calls at small batch (BlockSparseLinear under torch.inference_mode, and the int8 and
// bf16 serving layers; python/adsparse/serving_ops.py decides when).
//
// A call through torch.ops.adsparse.bsr_linear_serve matches the schema, boxes the 10 arguments
// into IValues and goes through the dispatcher: a few microseconds, as long as the whole
// 1024x1024 product at batch 1 and density 0.1. This function takes the same arguments as
// Python objects (METH_FASTCALL, no tuple), unpacks them and calls the same kernel, with its
// argument checks, with the GIL released. Being no op, it has no fake kernel, no autograd and no
// profiler record: traced and compiled code (torch.compile, torch.export) and any input that is
// not a plain CPU tensor go through the op instead.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "bsr_serving.h"

namespace adsparse {
namespace {

constexpr Py_ssize_t kArgs = 10;
constexpr const char* kArgNames[kArgs] = {"x",           "weight", "scales",       "row_offsets",
                                          "col_indices", "bias",   "out_features", "block_rows",
                                          "block_cols",  "activation"};

const at::Tensor& tensor_arg(PyObject* const* args, int i) {
  TORCH_CHECK_TYPE(THPVariable_Check(args[i]), "bsr_linear_serve_direct: ", kArgNames[i],
                   " must be a Tensor, got ", Py_TYPE(args[i])->tp_name);
  return THPVariable_Unpack(args[i]);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* const* args, int i) {
  if (args[i] == Py_None) return std::nullopt;
  return tensor_arg(args, i);
}

int64_t int_arg(PyObject* const* args, int i) {
  TORCH_CHECK_TYPE(PyLong_Check(args[i]), "bsr_linear_serve_direct: ", kArgNames[i],
                   " must be an int, got ", Py_TYPE(args[i])->tp_name);
  const long long v = PyLong_AsLongLong(args[i]);
  if (v == -1 && PyErr_Occurred()) throw python_error();  // out of int64 range
  return static_cast<int64_t>(v);
}

PyObject* bsr_linear_serve_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kArgs, "bsr_linear_serve_direct takes ", kArgs,
                   " positional arguments (the op's), got ", nargs);
  const at::Tensor& x = tensor_arg(args, 0);
  const at::Tensor& weight = tensor_arg(args, 1);
  const std::optional<at::Tensor> scales = optional_tensor_arg(args, 2);
  const at::Tensor& row_offsets = tensor_arg(args, 3);
  const at::Tensor& col_indices = tensor_arg(args, 4);
  const std::optional<at::Tensor> bias = optional_tensor_arg(args, 5);
  const int64_t N = int_arg(args, 6), bn = int_arg(args, 7), bk = int_arg(args, 8);
  const int64_t activation = int_arg(args, 9);
  at::Tensor y;
  {
    // Other Python threads (a serving pool) run while the kernel does; the Python objects
    // above stay alive: the caller holds them.
    pybind11::gil_scoped_release no_gil;
    y = bsr_linear_serve_cpu(x, weight, scales, row_offsets, col_indices, bias, N, bn, bk,
                             activation);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"bsr_linear_serve_direct",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bsr_linear_serve_direct)),
     METH_FASTCALL,
     "bsr_linear_serve_direct(x, weight, scales, row_offsets, col_indices, bias, out_features, "
     "block_rows, block_cols, activation) -> Tensor\n\nThe CPU kernel of "
     "torch.ops.adsparse.bsr_linear_serve without the dispatcher: eager inference only (no "
     "autograd, not traceable)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* serving_python_methods() { return kMethods; }

}  // namespace adsparse

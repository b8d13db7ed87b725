"""The adsparse ops: argument checks, fake kernels, autograd and backend dispatch.

The schemas live in ``csrc/registration.cpp`` (one definition each) and the CPU kernels in
``csrc/``. This module registers, once per op:

* a fake (meta) kernel, so the ops trace under ``torch.compile(fullgraph=True)``;
* autograd (``torch.library.register_autograd``), so gradients reach ``x``, the weight values,
  the mask and the bias;
* the CUDA kernels from ``adsparse_kernels`` (Triton). They are registered as plain kernels of
  the same opaque ops rather than through ``triton_op``: the op already has one schema shared with
  the C++ CPU kernel, and an opaque op keeps Inductor from re-tracing our tuned launch code.

Backend selection (read once, at import): ``ADSPARSE_BACKEND=triton`` also routes CPU tensors
through the Triton kernels (run them with ``TRITON_INTERPRET=1``); ``ADSPARSE_BACKEND=cpp``
forces the C++ kernels (CUDA tensors then raise); unset, the tensor's device decides. Any other
value does not break ``import adsparse``: the first call of an op (or of :func:`backend`) raises
a ``ValueError`` naming it (a typo must not silently run another backend), and the ``adsparse``
CLI refuses it up front.
"""

from __future__ import annotations

import os

import torch
from torch.utils import _python_dispatch

from adsparse import _C  # (loads the schemas and the CPU kernels)
from adsparse.checks import check_block_size
from adsparse.layout import BlockSparseWeight

__all__ = [
    "ACTIVATIONS",
    "backend",
    "backend_error",
    "bsr_linear",
    "bsr_linear_indexed",
    "masked_linear",
]

ACTIVATIONS = {None: 0, "none": 0, "relu": 1}
_OPS = torch.ops.adsparse
_BACKENDS = ("auto", "cpp", "triton")


def backend() -> str:
    """The backend chosen by ``ADSPARSE_BACKEND`` at import: ``auto``, ``cpp`` or ``triton``."""
    _check_backend()
    return _BACKEND


def backend_error(value: str | None) -> str | None:
    """Why ``value`` is not a valid ``ADSPARSE_BACKEND`` (``None`` if it is, or is unset)."""
    if value is None or value.strip().lower() in _BACKENDS + ("",):
        return None
    return f"ADSPARSE_BACKEND must be one of {', '.join(_BACKENDS)}, got {value!r}"


# A bad value must not make the import itself fail (a traceback in every program that merely
# imports adsparse): it is kept here and raised by the first op call (_check_backend).
_BACKEND_ERROR = backend_error(os.environ.get("ADSPARSE_BACKEND"))
_BACKEND = ("auto" if _BACKEND_ERROR else
            os.environ.get("ADSPARSE_BACKEND", "").strip().lower() or "auto")


def _check_backend() -> None:
    if _BACKEND_ERROR is not None:
        raise ValueError(f"{_BACKEND_ERROR} (read when adsparse was imported)")


#: Whether CPU tensors run on the C++ kernels: not under ADSPARSE_BACKEND=triton, which routes
#: them through Triton, nor with a bad value there, which must raise at the first op call.
CPP_CPU = _BACKEND != "triton" and _BACKEND_ERROR is None

#: The lean entry to the serving op's C++ kernel (csrc/serving_entry.cpp): the op's ten
#: arguments, no dispatcher, no autograd, not traceable; ~2 us less than the op of a ~9 us call
#: at B=1. It also computes the fp32 forward of a BlockSparseWeight (its forward index only),
#: bit for bit as ``bsr_linear`` does.
serve_direct = _C.bsr_linear_serve_direct

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct_ok(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a forward may skip the dispatcher for :data:`serve_direct`: CPU tensors on the
    C++ kernels, no gradient needed, and nothing that must see the op — eager (not Dynamo, not
    ``torch.jit.trace``), no dispatch mode (FakeTensor, ``make_fx``, FlopCounterMode...), no
    function mode, no functorch transform, no tensor subclass, no profiler (whose trace should
    name the op)."""
    return (CPP_CPU and x.is_cpu
            and (not torch.is_grad_enabled() or not (
                x.requires_grad or values.requires_grad
                or (bias is not None and bias.requires_grad)))
            and type(x) in _PLAIN and type(values) in _PLAIN
            and (bias is None or type(bias) in _PLAIN)
            and not torch.compiler.is_compiling()
            and not _python_dispatch._is_in_torch_dispatch_mode
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._get_tracing_state() is None
            and not torch._C._autograd._profiler_enabled())


def _activation_code(activation: str | None) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return ACTIVATIONS[activation]


def _check_operand(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}")


def _flatten_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., K]")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x.shape[-1] = {x.shape[-1]} does not match in_features K = {in_features}"
        )
    if x.dim() == 2:
        # The common case costs no reshape: at B=1 the two reshapes were 4.5 of the ~22 us a
        # module call took around a 7 us kernel (inference mode, one thread).
        return x.contiguous()
    # An explicit row count, not -1: reshape cannot infer it when K = 0 (nn.Linear(0, N) is valid).
    return x.reshape(x.shape[:-1].numel(), in_features).contiguous()


def _unflatten_output(y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def _check_bias(bias: torch.Tensor | None, n: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    _check_operand(bias, "bias", x, "x")
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")


# --------------------------------------------------------------------------- bsr_linear
def bsr_linear(
    x: torch.Tensor,
    weight: BlockSparseWeight,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` for a block-sparse ``W``; ``x`` is ``[..., K]``, result ``[..., N]``.

    Differentiable in ``x``, ``weight.values`` and ``bias``. ``activation`` is ``None`` or
    ``"relu"`` (fused into the kernel).
    """
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
    return bsr_linear_indexed(
        x, weight.values, weight.row_offsets, weight.col_indices, weight.t_row_offsets,
        weight.t_col_indices, weight.t_block_ids, weight.shape, bias, activation,
    )


def bsr_linear_indexed(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    t_row_offsets: torch.Tensor,
    t_col_indices: torch.Tensor,
    t_block_ids: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """:func:`bsr_linear` on the index tensors of a :class:`BlockSparseWeight` (module use).

    Only cheap metadata checks run here; the index itself was validated when the layout was
    built, and the kernels bound-check it again.
    """
    _check_backend()
    n, k = shape
    x2 = _flatten_input(x, k)
    _check_operand(values, "weight.values", x2, "x")
    _check_bias(bias, n, x2)
    if _direct_ok(x2, values, bias):
        # Inference outside inference_mode (no_grad, or nothing requiring grad): the same
        # forward through the lean entry. The op's dispatch and its autograd wrapper (Python)
        # were ~6 of a ~10 us call at B=1.
        y = serve_direct(x2, values, None, row_offsets, col_indices, bias, n,
                         values.shape[1], values.shape[2], _activation_code(activation))
    else:
        y = _OPS.bsr_linear(x2, values, row_offsets, col_indices, t_row_offsets,
                            t_col_indices, t_block_ids, bias, n, _activation_code(activation))
    return _unflatten_output(y, x, n)


@torch.library.register_fake("adsparse::bsr_linear")
def _bsr_linear_fake(x, values, row_offsets, col_indices, t_row_offsets, t_col_indices,
                     t_block_ids, bias, out_features, activation):
    torch._check(x.dim() == 2)
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("adsparse::bsr_linear_backward_input")
def _bsr_linear_backward_input_fake(grad, values, t_row_offsets, t_col_indices, t_block_ids,
                                    in_features):
    return grad.new_empty(grad.shape[0], in_features)


@torch.library.register_fake("adsparse::bsr_linear_backward_weight")
def _bsr_linear_backward_weight_fake(grad, x, row_offsets, col_indices, block_rows, block_cols):
    return grad.new_empty(col_indices.shape[0], block_rows, block_cols)


def _relu_gate(grad: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``dy'``: the incoming gradient gated by ``y > 0`` when the op fused a ReLU."""
    if out is None:
        return grad.contiguous()
    # threshold_backward is one fused pass: 0.08 ms against 2.2 ms for torch.where on a
    # 512x1024 float32 gradient (2 cores, measured by the kernel benchmark's author).
    return torch.ops.aten.threshold_backward(grad.contiguous(), out, 0)


def _bsr_setup_context(ctx, inputs, output):
    x, values, row_offsets, col_indices, t_row_offsets, t_col_indices, t_block_ids, bias, _, act = (
        inputs
    )
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, values, row_offsets, col_indices, t_row_offsets, t_col_indices,
                          t_block_ids, output if act else None)


def _bsr_backward(ctx, grad):
    x, values, row_offsets, col_indices, t_row_offsets, t_col_indices, t_block_ids, out = (
        ctx.saved_tensors
    )
    g = _relu_gate(grad, out)
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _OPS.bsr_linear_backward_input(g, values, t_row_offsets, t_col_indices, t_block_ids,
                                            x.shape[1])
    if ctx.needs_input_grad[1]:
        dvalues = _OPS.bsr_linear_backward_weight(g, x, row_offsets, col_indices,
                                                  values.shape[1], values.shape[2])
    if ctx.has_bias and ctx.needs_input_grad[7]:
        dbias = g.sum(0)
    return dx, dvalues, None, None, None, None, None, dbias, None, None


torch.library.register_autograd("adsparse::bsr_linear", _bsr_backward,
                                setup_context=_bsr_setup_context)


# --------------------------------------------------------------------------- masked_linear
def _block_dims(weight: torch.Tensor, mask: torch.Tensor,
                block_size: tuple[int, int] | None) -> tuple[int, int]:
    n, k = weight.shape
    if block_size is None:
        if tuple(mask.shape) != (n, k):
            raise ValueError(
                f"mask must be element-wise [{n}, {k}] (or give block_size for a block mask), "
                f"got {tuple(mask.shape)}"
            )
        return 1, 1
    bn, bk = check_block_size(block_size)
    grid = (-(-n // bn), -(-k // bk))
    if tuple(mask.shape) != grid:
        raise ValueError(
            f"block mask must be [{grid[0]}, {grid[1]}] for weight {(n, k)} and block {(bn, bk)}, "
            f"got {tuple(mask.shape)}"
        )
    return bn, bk


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    block_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``act(x @ (weight * M).T + bias)`` without materialising ``weight * M``.

    ``mask`` is element-wise ``[N, K]`` or, with ``block_size=(bn, bk)``, per block
    ``[ceil(N/bn), ceil(K/bk)]``; values are 0/1 or soft in [0, 1]. Differentiable in ``x``,
    ``weight``, ``bias`` and ``mask`` (the learned pruner trains through the mask).

    Tiles whose mask is all zero are skipped, so a NaN/inf in ``x`` or ``weight`` under a zero
    mask may or may not reach the output (it does on the dense route, not on the skipping one).
    """
    _check_backend()
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [N, K]")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a 2-D tensor")
    n, k = weight.shape
    x2 = _flatten_input(x, k)
    _check_operand(weight, "weight", x2, "x")
    _check_operand(mask, "mask", x2, "x")
    _check_bias(bias, n, x2)
    bn, bk = _block_dims(weight, mask, block_size)
    y = _OPS.masked_linear(x2, weight.contiguous(), mask.contiguous(), bias, bn, bk,
                           _activation_code(activation))
    return _unflatten_output(y, x, n)


@torch.library.register_fake("adsparse::masked_linear")
def _masked_linear_fake(x, weight, mask, bias, block_rows, block_cols, activation):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("adsparse::masked_linear_backward_input")
def _masked_linear_backward_input_fake(grad, weight, mask, block_rows, block_cols):
    return grad.new_empty(grad.shape[0], weight.shape[1])


@torch.library.register_fake("adsparse::masked_linear_backward_params")
def _masked_linear_backward_params_fake(grad, x, weight, mask, block_rows, block_cols,
                                        need_weight, need_mask):
    dw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    dm = mask.new_empty(mask.shape) if need_mask else mask.new_empty(0)
    return dw, dm


def _masked_setup_context(ctx, inputs, output):
    x, weight, mask, bias, bn, bk, act = inputs
    ctx.block = (bn, bk)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mask, output if act else None)


def _masked_backward(ctx, grad):
    x, weight, mask, out = ctx.saved_tensors
    bn, bk = ctx.block
    g = _relu_gate(grad, out)
    dx = dw = dm = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _OPS.masked_linear_backward_input(g, weight, mask, bn, bk)
    need_w, need_m = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if need_w or need_m:
        dw_, dm_ = _OPS.masked_linear_backward_params(g, x, weight, mask, bn, bk, need_w, need_m)
        dw = dw_ if need_w else None
        dm = dm_ if need_m else None
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = g.sum(0)
    return dx, dw, dm, dbias, None, None, None


torch.library.register_autograd("adsparse::masked_linear", _masked_backward,
                                setup_context=_masked_setup_context)


# --------------------------------------------------------------------------- no double backward
def _refuse_double_backward(op: str):
    """The backward of a backward kernel: raise, rather than let autograd's fallback treat the
    kernel as constant (a second derivative through ``values`` came out silently all zeros)."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"adsparse.{op}: double backward is not supported (the gradient of its gradient, "
            "e.g. autograd.grad(..., create_graph=True) then a second backward); use "
            "nn.Linear / torch.matmul for models that need second derivatives"
        )

    return backward


def _no_context(ctx, inputs, output) -> None:
    pass


for _name, _op in (("bsr_linear_backward_input", "bsr_linear"),
                   ("bsr_linear_backward_weight", "bsr_linear"),
                   ("masked_linear_backward_input", "masked_linear"),
                   ("masked_linear_backward_params", "masked_linear")):
    torch.library.register_autograd(f"adsparse::{_name}", _refuse_double_backward(_op),
                                    setup_context=_no_context)


# --------------------------------------------------------------------------- backends
_OP_NAMES = (
    "bsr_linear",
    "bsr_linear_backward_input",
    "bsr_linear_backward_weight",
    "masked_linear",
    "masked_linear_backward_input",
    "masked_linear_backward_params",
)


def _triton_kernel(name: str):
    """A kernel that imports ``adsparse_kernels`` (and so Triton) on first use only."""

    def kernel(*args):
        if _BACKEND == "cpp" and args[0].device.type != "cpu":
            raise RuntimeError(
                f"adsparse.{name}: ADSPARSE_BACKEND=cpp runs only the C++ CPU kernels, but the "
                f"input is on {args[0].device}"
            )
        import adsparse_kernels

        return getattr(adsparse_kernels, name)(*args)

    kernel.__name__ = f"{name}_triton"
    return kernel


_LIB = torch.library.Library("adsparse", "IMPL")  # kept alive for the process


def register_triton(name: str) -> None:
    """Run op ``name``'s Triton kernel (``adsparse_kernels.<name>``) on CUDA tensors, and on CPU
    tensors too under ``ADSPARSE_BACKEND=triton``."""
    _LIB.impl(name, _triton_kernel(name), "CUDA")
    if _BACKEND == "triton":
        # Replaces the C++ CPU kernel for this process: CPU tensors go through Triton
        # (under TRITON_INTERPRET=1), so the whole stack can be checked against it.
        _LIB.impl(name, _triton_kernel(name), "CPU", allow_override=True)


def register_inference_only(name: str, message: str) -> None:
    """Op ``name`` has no gradient: a backward through it raises ``RuntimeError(message)``;
    its Triton kernel is registered as :func:`register_triton` does."""

    def refuse(ctx, *grads):
        raise RuntimeError(message)

    torch.library.register_autograd(f"adsparse::{name}", refuse, setup_context=_no_context)
    register_triton(name)


for _name in _OP_NAMES:
    register_triton(_name)

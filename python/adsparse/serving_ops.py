"""The inference-only serving forms of block-sparse weights: their registry, packing and op.

A serving form is a layer's stored blocks converted once for inference (``adsparse.quantize_``
does it for whole models). Every form runs through one op, ``adsparse::bsr_linear_serve``, whose
CPU kernel (``csrc/bsr_serving.cpp``) reads the packed weight's dtype:

* ``"bf16"``: the blocks in bfloat16, transposed once to ``[nnzb, bk, bn]`` (the operand layout of
  the spmm kernel); activations rounded to bf16; products accumulated in fp32.
* ``"int8"``: symmetric per-output-channel int8 weights (``scale[n] = max|W[n, :]| / 127``),
  packed once to ``[nnzb, ceil(bk/4), bn16, 4]``; activations quantized per row at each call
  (``round(x * 127 / max|x[b]|)``, half to even, by the ``adsparse::quantize_rows`` op), int32
  accumulation, dequantized in the kernel's epilogue with the bias and ReLU.
* float32 (not a registry entry: no conversion): the trainable layout ``[nnzb, bn, bk]``;
  ``BlockSparseLinear`` takes this path under ``torch.inference_mode()`` (fewer op arguments and
  no autograd bookkeeping at small batch).

``SERVING_DTYPES`` is the one registry of the forms (read by ``quantize_``, its errors, the
benchmarks and the docs). The op has a fake kernel (``torch.compile``, ``torch.export``), an
autograd formula that raises (a serving form is not trainable) and, like every op, a Triton
kernel for CUDA tensors (``adsparse_kernels/serving.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adsparse import ops
from adsparse.layout import BlockSparseWeight, block_row_ids

__all__ = [
    "CPP_CPU",
    "SERVING_DTYPES",
    "ServingDtype",
    "bsr_linear_serve",
    "check_serving_dtype",
    "direct_call_ok",
    "output_rows",
    "pack_bf16",
    "pack_int8",
    "quantize_rows",
    "serve_direct",
    "unpack",
]

_OPS = torch.ops.adsparse
#: k per group and the column padding of the packed int8 layout (csrc/kernels.h).
INT8_GROUP, INT8_COL_PAD = 4, 16


def output_rows(row_offsets: torch.Tensor, bn: int) -> torch.Tensor:
    """``[nnzb, bn]``: the output row ``n`` of every row of every stored block (may be >= N in
    a tail block's padding)."""
    rows = block_row_ids(row_offsets)
    return rows[:, None] * bn + torch.arange(bn, device=row_offsets.device)[None]


def int8_weight_scales(w: BlockSparseWeight) -> torch.Tensor:
    """Per-output-channel scales ``max|W[n, :]| / 127`` (1 for an all-zero row), fp32 ``[N]``."""
    n = w.shape[0]
    rows = output_rows(w.row_offsets, w.block_size[0])
    amax = torch.zeros(n + w.block_size[0], dtype=torch.float32, device=w.values.device)
    if w.nnzb:
        block_max = w.values.detach().abs().amax(2).float()
        amax = amax.scatter_reduce(0, rows.flatten(), block_max.flatten(), "amax")
    scales = amax[:n] / 127
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def pack_int8(w: BlockSparseWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed int8 [nnzb, ceil(bk/4), bn16, 4], scales fp32 [N])`` of a block-sparse weight."""
    bn, bk = w.block_size
    scales = int8_weight_scales(w)
    rows = output_rows(w.row_offsets, w.block_size[0])
    padded = torch.cat([scales, scales.new_ones(bn)])[rows]  # [nnzb, bn]
    q = torch.round(w.values.detach().float() / padded[:, :, None]).clamp_(-127, 127)
    groups, bn16 = -(-bk // INT8_GROUP), -(-bn // INT8_COL_PAD) * INT8_COL_PAD
    out = torch.zeros(w.nnzb, groups * INT8_GROUP, bn16, dtype=torch.int8,
                      device=w.values.device)
    out[:, :bk, :bn] = q.to(torch.int8).transpose(1, 2)
    packed = out.view(w.nnzb, groups, INT8_GROUP, bn16).transpose(2, 3).contiguous()
    return packed, scales


def pack_bf16(w: BlockSparseWeight) -> tuple[torch.Tensor, None]:
    """``(bf16 blocks transposed to [nnzb, bk, bn], None)``."""
    return w.values.detach().to(torch.bfloat16).transpose(1, 2).contiguous(), None


def unpack(packed: torch.Tensor, scales: torch.Tensor | None,
           block_size: tuple[int, int]) -> torch.Tensor:
    """The fp32 blocks ``[nnzb, bn, bk]`` a packed serving weight stands for (dequantized)."""
    bn, bk = block_size
    if packed.dtype == torch.bfloat16:
        return packed.float().transpose(1, 2).contiguous()
    if packed.dtype == torch.int8:
        nnzb, groups, bn16, _ = packed.shape
        q = packed.transpose(2, 3).reshape(nnzb, groups * INT8_GROUP, bn16)[:, :bk, :bn]
        return q.transpose(1, 2).float()  # scales are applied per output row by the caller
    return packed


@dataclass(frozen=True)
class ServingDtype:
    """One serving form: its name, the packed weight's dtype and how a weight is packed."""

    name: str
    dtype: torch.dtype
    pack: Callable[[BlockSparseWeight], tuple[torch.Tensor, torch.Tensor | None]]
    description: str


#: The serving forms by name (``adsparse.quantize_(model, dtype=...)``).
SERVING_DTYPES: dict[str, ServingDtype] = {
    "int8": ServingDtype("int8", torch.int8, pack_int8,
                         "int8 weights (per output channel) and activations (per row), int32 sums"),
    "bf16": ServingDtype("bf16", torch.bfloat16, pack_bf16,
                         "bfloat16 weights and activations, fp32 sums"),
}


def check_serving_dtype(name: object) -> ServingDtype:
    """The registry entry of ``name``; ``ValueError`` naming the choices otherwise."""
    if not isinstance(name, str) or name not in SERVING_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SERVING_DTYPES)}, got {name!r}")
    return SERVING_DTYPES[name]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qx int8 [B, K], scale fp32 [B])``: the per-row activation quantization of the int8 form.

    ``qx = round(x * (127 / max|x[b]|))`` (half to even, clamped to +-127), ``scale =
    max|x[b]| / 127``; a row with ``max|x[b]| < 1e-30`` (zero, or negligible) gets scale 0 and
    zeros, a row holding inf or NaN scale NaN.
    """
    return _OPS.quantize_rows(x)


CPP_CPU = ops.CPP_CPU  # (defined in ops: whether CPU tensors run on the C++ kernels)
serve_direct = ops.serve_direct  # (defined in ops: the serving kernel's lean entry)


def direct_call_ok(x: torch.Tensor, in_features: int) -> bool:
    """Whether a module may call :data:`serve_direct` on ``x``, skipping the dispatcher and
    :func:`bsr_linear_serve`'s flattening and checks: a 2-D CPU input of the layer's width, on
    the C++ kernels (which check everything else), that does not require grad (the op's
    autograd formula raises the clear "inference-only" error; the lean entry has none). Callers
    ask only in eager code: Dynamo traces :func:`bsr_linear_serve` instead."""
    return (CPP_CPU and x.is_cpu and not x.requires_grad and x.dim() == 2
            and x.shape[1] == in_features)


def bsr_linear_serve(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor | None,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    shape: tuple[int, int],
    block_size: tuple[int, int],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` over a packed serving weight; ``x`` is fp32 ``[..., K]``.

    Inference only (a backward through it raises). The kernel checks the packed layout, the
    index and the dtypes; this checks what only the caller knows: ``K``.
    """
    ops._check_backend()
    n, k = shape
    x2 = ops._flatten_input(x, k)
    y = _OPS.bsr_linear_serve(x2, packed, scales, row_offsets, col_indices, bias, n,
                              block_size[0], block_size[1], ops._activation_code(activation))
    return ops._unflatten_output(y, x, n)


@torch.library.register_fake("adsparse::bsr_linear_serve")
def _serve_fake(x, weight, scales, row_offsets, col_indices, bias, out_features, block_rows,
                block_cols, activation):
    torch._check(x.dim() == 2)
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("adsparse::quantize_rows")
def _quantize_rows_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0])


for _name in ("bsr_linear_serve", "quantize_rows"):
    # The Triton kernels: adsparse_kernels/serving.py.
    ops.register_inference_only(
        _name,
        "adsparse: a serving-form layer (adsparse.quantize_, or BlockSparseLinear under "
        "torch.inference_mode) is inference-only and has no gradient; train the "
        "BlockSparseLinear model and call quantize_ on it afterwards")

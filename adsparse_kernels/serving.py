"""Triton kernels of the serving forms: ``bsr_linear_serve`` and ``quantize_rows``.

The same packed weights as the C++ kernels (python/adsparse/serving_ops.py):

* float32 ``[nnzb, bn, bk]``, bfloat16 ``[nnzb, bk, bn]`` (transposed), or int8
  ``[nnzb, ceil(bk/4), bn16, 4]`` with per-output-channel fp32 ``scales [N]``.

One kernel serves the three: program = (block row ``r``, ``BLOCK_M`` rows of ``x``) as in the
training forward; the element address of ``W[n, k]`` in block ``j`` depends on the form. bf16
rounds the activations to bf16 and accumulates in fp32; int8 multiplies the per-row quantized
activations (``quantize_rows``, the same arithmetic as the C++ kernels) by the int8 weights with
int32 accumulation (on a GPU ``tl.dot`` on int8 where the block has >= 32 columns, as the int8
MMA needs; otherwise, and under the interpreter, each block's product is formed in fp32 (ieee),
exact since a block's sum stays below 2^24, then added as int32) and
dequantizes in the epilogue. Inference only: no backward kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adsparse_kernels._common import (
    CALLS,
    INTERPRET,
    check_epilogue,
    check_index,
    check_index_values,
    device_guard,
    dot_precision,
    mma,
    next_pow2,
)

__all__ = ["bsr_linear_serve", "quantize_rows"]

_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_TINY_ROW = 1e-30  # rows below quantize to zero (csrc/block_gemm.h, kQuantTinyRow)


@triton.jit
def _round_to_bf16(x):
    """Round to the nearest bf16, ties to even, NaN kept, by integer arithmetic (the C++
    kernels' rounding; the interpreter's own fp32 -> bf16 cast truncates)."""
    u = x.to(tl.uint32, bitcast=True)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    u = tl.where(nan, u | 0x400000, u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit(do_not_specialize=["B"])
def _serve_kernel(
    x_ptr, sx_ptr, w_ptr, sw_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    B, N, K, NNZB, NUM_ROWS, NUM_COLS, stride_x, stride_y, GROUPS, BN16,
    bn: tl.constexpr, bk: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_DOT: tl.constexpr,
    WIDEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid % NUM_ROWS
    pid_m = pid // NUM_ROWS
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < B
    w_ok = (rn[:, None] < bn) & (rk[None, :] < bk)
    if KIND == 2:
        w_off = (rk[None, :] // 4) * (BN16 * 4) + rn[:, None] * 4 + rk[None, :] % 4
        acc = tl.zeros([BLOCK_M, BN], dtype=tl.int32)
    elif KIND == 1:
        w_off = rk[None, :] * bn + rn[:, None]
        acc = tl.zeros([BLOCK_M, BN], dtype=tl.float32)
    else:
        w_off = rn[:, None] * bk + rk[None, :]
        acc = tl.zeros([BLOCK_M, BN], dtype=tl.float32)
    w_stride = GROUPS * BN16 * 4 if KIND == 2 else bn * bk
    start = tl.maximum(tl.load(row_offsets_ptr + r), 0)
    end = tl.minimum(tl.load(row_offsets_ptr + r + 1), NNZB)
    for j in range(start, end):
        c = tl.load(col_indices_ptr + j)
        cols = tl.where((c >= 0) & (c < NUM_COLS), c * bk, K) + rk
        x_mask = m_ok[:, None] & ((rk < bk) & (cols < K))[None, :]
        xt = tl.load(x_ptr + rm[:, None] * stride_x + cols[None, :], mask=x_mask, other=0)
        w = tl.load(w_ptr + j * w_stride + w_off, mask=w_ok, other=0)
        if KIND == 2:
            if USE_DOT and not WIDEN:
                acc = tl.dot(xt, tl.trans(w), acc)
            elif USE_DOT:
                part = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
                acc += part.to(tl.int32)
            else:
                acc += tl.sum(xt.to(tl.int32)[:, None, :] * w.to(tl.int32)[None, :, :], axis=2)
        else:
            if KIND == 1:
                xt = _round_to_bf16(xt)
            if USE_DOT:
                acc = mma(xt, tl.trans(w), acc, PRECISION)
            else:
                acc += tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    n_idx = r * bn + rn
    n_ok = (rn < bn) & (n_idx < N)
    if KIND == 2:
        sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
        sw = tl.load(sw_ptr + n_idx, mask=n_ok, other=0.0)
        out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    else:
        out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + n_idx, mask=n_ok, other=0.0)[None, :]
    if ACT == 1:
        out = tl.maximum(out, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + rm[:, None] * stride_y + n_idx[None, :], out,
             mask=m_ok[:, None] & n_ok[None, :])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization, the C++ kernels' arithmetic in torch ops: the product
    ``x * (127 / max|x|)`` is rounded to fp32 before the rounding half to even."""
    CALLS["quantize_rows"] += 1
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be 2-D float32, got {x.dim()}-D {x.dtype}")
    amax = x.abs().amax(1) if x.shape[1] else x.new_zeros(x.shape[0])
    finite = torch.isfinite(x).all(1)
    ok = finite & (amax >= _TINY_ROW)
    inv = 127.0 / torch.where(ok, amax, torch.ones_like(amax))
    q = torch.where(ok[:, None], torch.round(x * inv[:, None]), 0.0).clamp_(-127, 127)
    scale = torch.where(ok, amax / 127, torch.zeros_like(amax))
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q.to(torch.int8), scale


def bsr_linear_serve(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    block_rows: int,
    block_cols: int,
    activation: int,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` over a serving form (see the module docstring); fp32 in and out."""
    CALLS["bsr_linear_serve"] += 1
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be 2-D float32, got {x.dim()}-D {x.dtype}")
    if weight.dtype not in _KINDS:
        raise ValueError(f"weight must be float32, bfloat16 or int8, got {weight.dtype}")
    kind = _KINDS[weight.dtype]
    if (scales is None) != (kind != 2):
        raise ValueError("an int8 weight needs scales, and only an int8 weight takes them")
    n, bn, bk = int(out_features), int(block_rows), int(block_cols)
    b, k = x.shape
    rows, cols = -(-n // bn), -(-k // bk)
    check_index(row_offsets, "row_offsets", x, rows + 1)
    check_index(col_indices, "col_indices", x)
    check_index_values(row_offsets, col_indices, rows, cols, "row_offsets", "col_indices")
    check_epilogue(bias, n, activation, x)
    groups, bn16 = -(-bk // 4), -(-bn // 16) * 16
    y = torch.empty(b, n, device=x.device, dtype=torch.float32)
    if b == 0 or n == 0:
        return y
    if kind == 2:
        xq, sx = quantize_rows(x)
        sw = scales.contiguous()
    else:
        xq, sx, sw = x.contiguous(), x, x
    block_m = 16 if INTERPRET else 64
    grid = (rows * triton.cdiv(b, block_m),)
    with device_guard(x):
        _serve_kernel[grid](
            xq, sx, weight.contiguous(), sw, row_offsets, col_indices,
            bias if bias is not None else x, y,
            b, n, k, col_indices.numel(), rows, cols, xq.stride(0), y.stride(0), groups, bn16,
            bn=bn, bk=bk, BN=next_pow2(bn), BK=next_pow2(bk), KIND=kind,
            HAS_BIAS=bias is not None, ACT=int(activation), USE_DOT=bn >= 16 and bk >= 16,
            WIDEN=INTERPRET or next_pow2(bk) < 32, BLOCK_M=block_m,
            PRECISION=dot_precision(torch.float32 if kind == 0 else weight.dtype),
        )
    return y

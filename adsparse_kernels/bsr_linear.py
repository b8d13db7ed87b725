"""Triton kernels of the block-sparse linear family: ``y = act(x @ W.T + b)`` with ``W`` in BSR.

Layout (python/adsparse/layout.py): ``values [nnzb, bn, bk]`` with zero-padded tail blocks,
``row_offsets``/``col_indices`` over block rows, and the transposed index ``t_row_offsets``,
``t_col_indices`` (block row of each block) and ``t_block_ids`` over block columns; all int64.

Each kernel gives one program one output tile that no other program touches, so there are no
atomics and the results are deterministic:

* forward: program = (block row ``r``, ``BLOCK_M`` rows of ``x``); it walks the stored blocks of
  row ``r`` and accumulates ``x[:, cols] @ block.T`` in fp32; bias and ReLU in the epilogue.
* input gradient: program = (block column ``c``, ``BLOCK_M`` rows); it walks block column ``c``
  through the transposed index, ``dx[:, c] += dy[:, rows] @ block``.
* weight gradient: program = one stored block; ``dvalues[j] = dy[:, rows]^T @ x[:, cols]`` over
  the whole batch (a sampled dense-dense product: only stored blocks are computed).

Blocks whose sides are both >= 16 use ``tl.dot`` (tensor cores). Smaller blocks (1x16, 8x4,
1x1, ...) cannot feed ``tl.dot``; they take a generic path in the same kernels that multiplies
broadcast tiles and reduces with ``tl.sum`` (CUDA cores). It is correct for any block size but
is not where the speed is: unstructured sparsity belongs to ``masked_linear``.
Sides that are not powers of two are padded up to one inside the kernel and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adsparse_kernels._common import (
    CALLS,
    bucket,
    check_epilogue,
    check_float,
    check_index,
    check_index_values,
    configs,
    device_guard,
    dot_precision,
    first_only,
    mma,
    next_pow2,
)

__all__ = ["bsr_linear", "bsr_linear_backward_input", "bsr_linear_backward_weight"]


def _row_configs() -> list[triton.Config]:
    def cfg(bm: int, warps: int = 4, stages: int = 3) -> triton.Config:
        return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)

    # Output tiles are BLOCK_M x bn; the stored blocks of a row are few (density x K / bk), so
    # the tile height and the pipelining depth are what matter.
    tuned = [cfg(32, 4, 4), cfg(64, 4, 3), cfg(64, 8, 4), cfg(128, 4, 3), cfg(128, 8, 3),
             cfg(256, 8, 3)]
    return configs(tuned, [cfg(64), cfg(32)], [cfg(16, 4, 1)])


def _prune_row_configs(cfgs, named_args, **kwargs):
    """Small batches do not need tall tiles; tiny blocks (CUDA-core path) keep tiles short."""
    limit = 32 if not kwargs.get("USE_DOT", True) else max(32, named_args["B_BUCKET"])
    return first_only([c for c in cfgs if c.kwargs["BLOCK_M"] <= limit] or cfgs[-1:])


_ROW_KEY = ["B_BUCKET", "N", "K", "bn", "bk", "HAS_BIAS", "ACT"]


@triton.autotune(configs=_row_configs(), key=_ROW_KEY,
                 prune_configs_by={"early_config_prune": _prune_row_configs})
@triton.jit(do_not_specialize=["B"])
def _bsr_linear_fwd_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, bias_ptr, y_ptr,
    B, N, K, NNZB, NUM_ROWS, NUM_COLS, stride_x, stride_y, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Block rows vary fastest so that concurrent programs share the same rows of x in L2.
    pid = tl.program_id(0)
    r = pid % NUM_ROWS
    pid_m = pid // NUM_ROWS
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < B
    w_ok = (rn[:, None] < bn) & (rk[None, :] < bk)
    # Clamped so that a corrupt offset can at worst drop blocks, never read past values.
    start = tl.maximum(tl.load(row_offsets_ptr + r), 0)
    end = tl.minimum(tl.load(row_offsets_ptr + r + 1), NNZB)
    acc = tl.zeros([BLOCK_M, BN], dtype=tl.float32)
    for j in range(start, end):
        c = tl.load(col_indices_ptr + j)
        # A column index out of range points the tile past K, where every load is masked off.
        cols = tl.where((c >= 0) & (c < NUM_COLS), c * bk, K) + rk
        x_mask = m_ok[:, None] & ((rk < bk) & (cols < K))[None, :]
        xt = tl.load(x_ptr + rm[:, None] * stride_x + cols[None, :], mask=x_mask, other=0.0)
        w = tl.load(values_ptr + j * (bn * bk) + rn[:, None] * bk + rk[None, :], mask=w_ok,
                    other=0.0)
        if USE_DOT:
            acc = mma(xt, tl.trans(w), acc, PRECISION)
        else:
            prod = xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
    n_idx = r * bn + rn
    n_ok = (rn < bn) & (n_idx < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n_idx, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        # NaN stays NaN, as with torch.relu (a plain maximum would turn it into 0).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + rm[:, None] * stride_y + n_idx[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_row_configs(), key=["B_BUCKET", "N", "K", "bn", "bk"],
                 prune_configs_by={"early_config_prune": _prune_row_configs})
@triton.jit(do_not_specialize=["B"])
def _bsr_linear_bwd_input_kernel(
    grad_ptr, values_ptr, t_row_offsets_ptr, t_col_indices_ptr, t_block_ids_ptr, dx_ptr,
    B, N, K, NNZB, NUM_ROWS, NUM_COLS, stride_g, stride_dx, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid % NUM_COLS
    pid_m = pid // NUM_COLS
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < B
    w_ok = (rn[:, None] < bn) & (rk[None, :] < bk)
    start = tl.maximum(tl.load(t_row_offsets_ptr + c), 0)
    end = tl.minimum(tl.load(t_row_offsets_ptr + c + 1), NNZB)
    acc = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    for j in range(start, end):
        r = tl.load(t_col_indices_ptr + j)
        blk = tl.load(t_block_ids_ptr + j)
        ok = (r >= 0) & (r < NUM_ROWS) & (blk >= 0) & (blk < NNZB)
        # A corrupt entry reads block 0 against an all-zero gradient tile: no stray reads.
        rows = tl.where(ok, r * bn, N) + rn
        blk = tl.where(ok, blk, 0)
        g_mask = m_ok[:, None] & ((rn < bn) & (rows < N))[None, :]
        g = tl.load(grad_ptr + rm[:, None] * stride_g + rows[None, :], mask=g_mask, other=0.0)
        w = tl.load(values_ptr + blk * (bn * bk) + rn[:, None] * bk + rk[None, :],
                    mask=w_ok, other=0.0)
        if USE_DOT:
            acc = mma(g, w, acc, PRECISION)
        else:
            acc += tl.sum(g.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    k_idx = c * bk + rk
    k_ok = (rk < bk) & (k_idx < K)
    tl.store(dx_ptr + rm[:, None] * stride_dx + k_idx[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


def _block_configs() -> list[triton.Config]:
    def cfg(bb: int, warps: int = 4, stages: int = 3) -> triton.Config:
        return triton.Config({"BLOCK_B": bb}, num_warps=warps, num_stages=stages)

    tuned = [cfg(32, 4, 4), cfg(64, 4, 3), cfg(64, 8, 3), cfg(128, 8, 3)]
    return configs(tuned, [cfg(64), cfg(32)], [cfg(16, 4, 1)])


def _prune_block_configs(cfgs, named_args, **kwargs):
    """The CUDA-core path of tiny blocks holds a [BLOCK_B, BN, BK] product: keep it short."""
    if not kwargs.get("USE_DOT", True):
        cfgs = [c for c in cfgs if c.kwargs["BLOCK_B"] <= 32] or cfgs[-1:]
    return first_only(cfgs)


@triton.autotune(configs=_block_configs(), key=["B_BUCKET", "N", "K", "bn", "bk"],
                 prune_configs_by={"early_config_prune": _prune_block_configs})
@triton.jit(do_not_specialize=["B"])
def _bsr_linear_bwd_weight_kernel(
    grad_ptr, x_ptr, row_offsets_ptr, col_indices_ptr, dvalues_ptr,
    B, N, K, NUM_ROWS, NUM_COLS, LOG_ROWS, stride_g, stride_x, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    # The block row of block j: the largest r with row_offsets[r] <= j, by binary search
    # (invariant row_offsets[lo] <= j < row_offsets[hi]); saves a host-side index tensor.
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + NUM_ROWS
    for _ in range(LOG_ROWS):
        mid = (lo + hi) // 2
        below = tl.load(row_offsets_ptr + mid) <= j
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    r = lo
    c = tl.load(col_indices_ptr + j)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rows = r * bn + rn
    cols = tl.where((c >= 0) & (c < NUM_COLS), c * bk, K) + rk
    n_ok = (rn < bn) & (rows < N)
    k_ok = (rk < bk) & (cols < K)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_ok = rb < B
        g = tl.load(grad_ptr + rb[:, None] * stride_g + rows[None, :],
                    mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rb[:, None] * stride_x + cols[None, :],
                     mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            acc = mma(tl.trans(g), xt, acc, PRECISION)
        else:
            acc += tl.sum(g.to(tl.float32)[:, :, None] * xt.to(tl.float32)[:, None, :], axis=0)
    # Padding rows/columns of the block come out zero (their operands were masked to zero).
    tl.store(dvalues_ptr + j * (bn * bk) + rn[:, None] * bk + rk[None, :],
             acc.to(dvalues_ptr.dtype.element_ty),
             mask=(rn[:, None] < bn) & (rk[None, :] < bk))


# --------------------------------------------------------------------------- wrappers
def _block_meta(values: torch.Tensor) -> dict:
    bn, bk = int(values.shape[1]), int(values.shape[2])
    if bn < 1 or bk < 1:
        raise ValueError(f"block size must be >= 1, got {(bn, bk)}")
    return {"bn": bn, "bk": bk, "BN": next_pow2(bn), "BK": next_pow2(bk),
            "USE_DOT": bn >= 16 and bk >= 16, "PRECISION": dot_precision(values.dtype)}


def bsr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    t_row_offsets: torch.Tensor,
    t_col_indices: torch.Tensor,
    t_block_ids: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    activation: int,
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` for ``W`` in the packed BSR layout; ``x`` is ``[B, K]``.

    The transposed index is accepted for the op schema (autograd saves it) but not read.
    """
    CALLS["bsr_linear"] += 1
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [B, K], got {x.dim()}-D")
    check_float(values, "values", x)
    if values.dim() != 3:
        raise ValueError(f"values must be [nnzb, bn, bk], got {tuple(values.shape)}")
    meta = _block_meta(values)
    n, k, b = int(out_features), int(x.shape[1]), int(x.shape[0])
    rows, cols = triton.cdiv(n, meta["bn"]), triton.cdiv(k, meta["bk"])
    check_index(row_offsets, "row_offsets", x, rows + 1)
    check_index(col_indices, "col_indices", x)
    if values.shape[0] != col_indices.numel():
        raise ValueError(f"values has {values.shape[0]} blocks but col_indices has "
                         f"{col_indices.numel()}")
    check_index_values(row_offsets, col_indices, rows, cols, "row_offsets", "col_indices")
    check_epilogue(bias, n, activation, x)
    y = torch.empty(b, n, dtype=x.dtype, device=x.device)
    if b == 0 or n == 0:
        return y
    # The kernels walk every operand through raw pointers: views must be made dense first.
    x, values = x.contiguous(), values.contiguous()
    row_offsets, col_indices = row_offsets.contiguous(), col_indices.contiguous()
    bias_arg = bias.contiguous() if bias is not None else x

    def grid(cfg):
        return (rows * triton.cdiv(b, cfg["BLOCK_M"]),)

    with device_guard(x):
        _bsr_linear_fwd_kernel[grid](
            x, values, row_offsets, col_indices, bias_arg, y,
            b, n, k, values.shape[0], rows, cols, x.stride(0), y.stride(0), bucket(b),
            HAS_BIAS=bias is not None, ACT=int(activation), **meta,
        )
    return y


def bsr_linear_backward_input(
    grad: torch.Tensor,
    values: torch.Tensor,
    t_row_offsets: torch.Tensor,
    t_col_indices: torch.Tensor,
    t_block_ids: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``dx = grad @ W`` (``[B, K]``) through the transposed block index; ``grad`` is gated."""
    CALLS["bsr_linear_backward_input"] += 1
    check_float(grad, "grad")
    if grad.dim() != 2:
        raise ValueError(f"grad must be 2-D [B, N], got {grad.dim()}-D")
    check_float(values, "values", grad, "grad")
    meta = _block_meta(values)
    b, n, k = int(grad.shape[0]), int(grad.shape[1]), int(in_features)
    rows, cols = triton.cdiv(n, meta["bn"]), triton.cdiv(k, meta["bk"])
    check_index(t_row_offsets, "t_row_offsets", grad, cols + 1)
    check_index(t_col_indices, "t_col_indices", grad, values.shape[0])
    check_index(t_block_ids, "t_block_ids", grad, values.shape[0])
    check_index_values(t_row_offsets, t_col_indices, cols, rows, "t_row_offsets",
                       "t_col_indices")
    check_index_values(None, t_block_ids, 0, values.shape[0], "", "t_block_ids")
    dx = torch.empty(b, k, dtype=grad.dtype, device=grad.device)
    if b == 0 or k == 0:
        return dx
    grad, values = grad.contiguous(), values.contiguous()
    t_row_offsets, t_col_indices = t_row_offsets.contiguous(), t_col_indices.contiguous()
    t_block_ids = t_block_ids.contiguous()

    def grid(cfg):
        return (cols * triton.cdiv(b, cfg["BLOCK_M"]),)

    with device_guard(grad):
        _bsr_linear_bwd_input_kernel[grid](
            grad, values, t_row_offsets, t_col_indices, t_block_ids, dx,
            b, n, k, values.shape[0], rows, cols, grad.stride(0), dx.stride(0), bucket(b),
            **meta,
        )
    return dx


def bsr_linear_backward_weight(
    grad: torch.Tensor,
    x: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    block_rows: int,
    block_cols: int,
) -> torch.Tensor:
    """``dvalues[j] = grad[:, rows(j)]^T @ x[:, cols(j)]`` at the stored blocks only."""
    CALLS["bsr_linear_backward_weight"] += 1
    check_float(grad, "grad")
    check_float(x, "x", grad, "grad")
    if grad.dim() != 2 or x.dim() != 2 or grad.shape[0] != x.shape[0]:
        raise ValueError(f"grad [B, N] and x [B, K] do not match: {tuple(grad.shape)} vs "
                         f"{tuple(x.shape)}")
    bn, bk = int(block_rows), int(block_cols)
    meta = _block_meta(grad.new_empty(0, bn, bk))
    b, n, k = int(grad.shape[0]), int(grad.shape[1]), int(x.shape[1])
    rows, cols = triton.cdiv(n, bn), triton.cdiv(k, bk)
    check_index(row_offsets, "row_offsets", grad, rows + 1)
    check_index(col_indices, "col_indices", grad)
    check_index_values(row_offsets, col_indices, rows, cols, "row_offsets", "col_indices")
    nnzb = int(col_indices.numel())
    if nnzb == 0 or b == 0:
        return torch.zeros(nnzb, bn, bk, dtype=grad.dtype, device=grad.device)
    dvalues = torch.empty(nnzb, bn, bk, dtype=grad.dtype, device=grad.device)
    grad, x = grad.contiguous(), x.contiguous()
    row_offsets, col_indices = row_offsets.contiguous(), col_indices.contiguous()
    with device_guard(grad):
        _bsr_linear_bwd_weight_kernel[(nnzb,)](
            grad, x, row_offsets, col_indices, dvalues,
            b, n, k, rows, cols, max(rows, 1).bit_length(), grad.stride(0), x.stride(0),
            bucket(b), **meta,
        )
    return dvalues

"""Triton kernels of the masked linear family: ``y = act(x @ (W * M).T + b)`` for dense ``W``.

``M`` is element-wise ``[N, K]`` (block 1x1) or per block ``[ceil(N/bn), ceil(K/bk)]``, 0/1 or
soft. The kernels are tiled over the dense weight with tiles of at least 16 per side, so every
mask granularity (1x1, 1x16, 8x4, 16, 64, ...) runs on ``tl.dot``: each tile gathers its mask
values (``M[n // bn, k // bk]``), multiplies them into the weight tile in registers (``W * M`` is
never written to memory) and skips the tile when its mask is all zero.

* forward: program = ``(BLOCK_M, BLOCK_N)`` output tile, loop over K tiles.
* input gradient ``dx = dy @ (W * M)``: program = ``(BLOCK_M, BLOCK_K)`` tile, loop over N tiles.
* parameter gradients with ``G = dy^T x``: program = ``(BLOCK_N, BLOCK_K)`` tile of ``G``, loop
  over the batch; ``dW = G * M`` and ``dM = G * W``, summed per mask block for a block mask.
  When only ``dW`` is asked for, tiles with an all-zero mask are skipped (``dW`` is zero
  there); ``dM`` needs ``G`` everywhere, since the learned pruner revives masked-out groups.
  Power-of-two mask blocks up to 128 per side are summed inside the tile (the tile is then a
  multiple of the block); other block shapes write ``G * W`` in fp32 and torch sums the blocks.
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
    configs,
    device_guard,
    dot_precision,
    first_only,
    mma,
)

__all__ = ["masked_linear", "masked_linear_backward_input", "masked_linear_backward_params"]

_MAX_TILE = 128


def _tile_configs(outer: str, inner: str) -> list[triton.Config]:
    """Configs over an output tile ``(BLOCK_M, outer)`` and a reduction step ``inner``."""

    def cfg(bm: int, bo: int, bi: int, warps: int = 4, stages: int = 3) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, outer: bo, inner: bi}, num_warps=warps,
                             num_stages=stages)

    tuned = [cfg(32, 64, 64, 4, 4), cfg(64, 64, 64), cfg(64, 128, 64),
             cfg(128, 64, 64), cfg(128, 128, 64, 8)]
    return configs(tuned, [cfg(64, 64, 64)], [cfg(16, 32, 32, 4, 1)])


def _prune_tiles(cfgs, named_args, **kwargs):
    """Tall tiles only pay off for large batches."""
    limit = max(32, named_args["B_BUCKET"])
    return first_only([c for c in cfgs if c.kwargs["BLOCK_M"] <= limit] or cfgs[:1])


@triton.jit
def _load_mask(mask_ptr, rn, rk, N, K, MASK_COLS, bn: tl.constexpr, bk: tl.constexpr):
    """The ``[len(rn), len(rk)]`` element view of the mask, fp32, zero outside ``[N, K]``."""
    ok = (rn < N)[:, None] & (rk < K)[None, :]
    ptrs = mask_ptr + (rn // bn)[:, None] * MASK_COLS + (rk // bk)[None, :]
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.autotune(configs=_tile_configs("BLOCK_N", "BLOCK_K"),
                 key=["B_BUCKET", "N", "K", "bn", "bk", "HAS_BIAS", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["B"])
def _masked_linear_fwd_kernel(
    x_ptr, w_ptr, mask_ptr, bias_ptr, y_ptr,
    B, N, K, MASK_COLS, stride_x, stride_w, stride_y, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < B
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        m = _load_mask(mask_ptr, rn, rk, N, K, MASK_COLS, bn, bk)
        if tl.max(tl.abs(m)) > 0:
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wm = (w.to(tl.float32) * m).to(x_ptr.dtype.element_ty)
            xt = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma(xt, tl.trans(wm), acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        # NaN stays NaN, as with torch.relu (a plain maximum would turn it into 0).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_tile_configs("BLOCK_K", "BLOCK_N"),
                 key=["B_BUCKET", "N", "K", "bn", "bk"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["B"])
def _masked_linear_bwd_input_kernel(
    grad_ptr, w_ptr, mask_ptr, dx_ptr,
    B, N, K, MASK_COLS, stride_g, stride_w, stride_dx, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_k = pid % num_k
    pid_m = pid // num_k
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    m_ok = rm < B
    k_ok = rk < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # rn * stride_w can pass 2**31
        m = _load_mask(mask_ptr, rn, rk, N, K, MASK_COLS, bn, bk)
        if tl.max(tl.abs(m)) > 0:
            n_ok = rn < N
            w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wm = (w.to(tl.float32) * m).to(grad_ptr.dtype.element_ty)
            g = tl.load(grad_ptr + rm[:, None] * stride_g + rn[None, :],
                        mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(g, wm, acc, PRECISION)
    tl.store(dx_ptr + rm[:, None] * stride_dx + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


def _param_configs() -> list[triton.Config]:
    def cfg(bn: int, bk: int, bb: int, warps: int = 4, stages: int = 3) -> triton.Config:
        return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_B": bb}, num_warps=warps,
                             num_stages=stages)

    tuned = [cfg(32, 32, 32), cfg(64, 64, 32), cfg(64, 64, 64), cfg(128, 64, 32, 8),
             cfg(64, 128, 32, 8), cfg(128, 128, 32, 8)]
    # Without tuning, the pruner keeps the first tile (smallest first) that holds a mask block.
    fixed = [cfg(64, 64, 32), cfg(128, 64, 32, 8), cfg(64, 128, 32, 8), cfg(128, 128, 32, 8)]
    interpret = [cfg(bn, bk, 16, 4, 1) for bn, bk in ((32, 32), (64, 64), (128, 128))]
    return configs(tuned, fixed, interpret)


def _prune_param_configs(cfgs, named_args, **kwargs):
    """With in-tile block sums the tile must hold whole mask blocks."""
    if kwargs.get("REDUCE") == 1:
        bn, bk = kwargs["bn"], kwargs["bk"]
        cfgs = [c for c in cfgs if c.kwargs["BLOCK_N"] >= bn and c.kwargs["BLOCK_K"] >= bk]
    return first_only(cfgs)


@triton.autotune(configs=_param_configs(),
                 key=["B_BUCKET", "N", "K", "bn", "bk", "NEED_WEIGHT", "NEED_MASK"],
                 prune_configs_by={"early_config_prune": _prune_param_configs})
@triton.jit(do_not_specialize=["B"])
def _masked_linear_bwd_params_kernel(
    grad_ptr, x_ptr, w_ptr, mask_ptr, dw_ptr, dm_ptr,
    B, N, K, MASK_ROWS, MASK_COLS, stride_g, stride_x, stride_w, B_BUCKET,
    bn: tl.constexpr, bk: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_MASK: tl.constexpr,
    REDUCE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_k = pid % num_k
    pid_n = pid // num_k
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    n_ok = rn < N
    k_ok = rk < K
    nk_ok = n_ok[:, None] & k_ok[None, :]
    m = _load_mask(mask_ptr, rn, rk, N, K, MASK_COLS, bn, bk)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # Without dM, a tile whose mask is all zero has dW = 0: skip the batch loop.
    b_end = B
    if not NEED_MASK:
        b_end = tl.where(tl.max(tl.abs(m)) > 0, B, 0)
    for b0 in range(0, b_end, BLOCK_B):
        rb = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_ok = rb < B
        g = tl.load(grad_ptr + rb[:, None] * stride_g + rn[None, :],
                    mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rb[:, None] * stride_x + rk[None, :],
                     mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mma(tl.trans(g), xt, acc, PRECISION)
    elem = rn[:, None] * K + rk[None, :]
    if NEED_WEIGHT:
        tl.store(dw_ptr + elem, (acc * m).to(dw_ptr.dtype.element_ty), mask=nk_ok)
    if NEED_MASK:
        w = tl.load(w_ptr + rn[:, None] * stride_w + rk[None, :], mask=nk_ok, other=0.0)
        gw = acc * w.to(tl.float32)
        if REDUCE == 1:
            # Whole mask blocks lie in this tile (power-of-two block, tile a multiple of it).
            s = tl.sum(tl.reshape(gw, [BLOCK_N // bn, bn, BLOCK_K // bk, bk]), axis=3)
            s = tl.sum(s, axis=1)
            rr = pid_n * (BLOCK_N // bn) + tl.arange(0, BLOCK_N // bn)
            cc = pid_k * (BLOCK_K // bk) + tl.arange(0, BLOCK_K // bk)
            tl.store(dm_ptr + rr[:, None] * MASK_COLS + cc[None, :],
                     s.to(dm_ptr.dtype.element_ty),
                     mask=(rr < MASK_ROWS)[:, None] & (cc < MASK_COLS)[None, :])
        else:
            # Element mask (dM = G * W) or the fp32 scratch that torch sums per block.
            tl.store(dm_ptr + elem, gw.to(dm_ptr.dtype.element_ty), mask=nk_ok)


# --------------------------------------------------------------------------- wrappers
def _check_masked(first: torch.Tensor, first_name: str, weight: torch.Tensor,
                  mask: torch.Tensor, block_rows: int, block_cols: int) -> tuple[int, int]:
    check_float(first, first_name)
    if first.dim() != 2:
        raise ValueError(f"{first_name} must be 2-D, got {first.dim()}-D")
    check_float(weight, "weight", first, first_name)
    check_float(mask, "mask", first, first_name)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got {weight.dim()}-D")
    bn, bk = int(block_rows), int(block_cols)
    if bn < 1 or bk < 1:
        raise ValueError(f"block size must be >= 1, got {(bn, bk)}")
    n, k = weight.shape
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    if mask.dim() != 2 or tuple(mask.shape) != grid:
        raise ValueError(f"mask must be [{grid[0]}, {grid[1]}] for weight {(n, k)} and block "
                         f"{(bn, bk)}, got {tuple(mask.shape)}")
    return bn, bk


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    block_rows: int,
    block_cols: int,
    activation: int,
) -> torch.Tensor:
    """``act(x @ (weight * M).T + bias)``; ``M`` per element (block 1x1) or per block."""
    CALLS["masked_linear"] += 1
    bn, bk = _check_masked(x, "x", weight, mask, block_rows, block_cols)
    b, k = x.shape
    n = int(weight.shape[0])
    if weight.shape[1] != k:
        raise ValueError(f"x [B, K] and weight [N, K] do not match: {tuple(x.shape)} vs "
                         f"{tuple(weight.shape)}")
    check_epilogue(bias, n, activation, x)
    y = torch.empty(b, n, dtype=x.dtype, device=x.device)
    if b == 0 or n == 0:
        return y
    x, weight, mask = x.contiguous(), weight.contiguous(), mask.contiguous()
    bias_arg = bias.contiguous() if bias is not None else x

    def grid(cfg):
        return (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(b, cfg["BLOCK_M"]),)

    with device_guard(x):
        _masked_linear_fwd_kernel[grid](
            x, weight, mask, bias_arg, y, b, n, k, mask.shape[1], x.stride(0), weight.stride(0),
            y.stride(0), bucket(b), bn=bn, bk=bk, HAS_BIAS=bias is not None,
            ACT=int(activation), PRECISION=dot_precision(x.dtype),
        )
    return y


def masked_linear_backward_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    block_rows: int,
    block_cols: int,
) -> torch.Tensor:
    """``dx = grad @ (weight * M)`` (``[B, K]``); ``grad`` is already ReLU-gated."""
    CALLS["masked_linear_backward_input"] += 1
    bn, bk = _check_masked(grad, "grad", weight, mask, block_rows, block_cols)
    b, n = grad.shape
    k = int(weight.shape[1])
    if weight.shape[0] != n:
        raise ValueError(f"grad [B, N] and weight [N, K] do not match: {tuple(grad.shape)} vs "
                         f"{tuple(weight.shape)}")
    dx = torch.empty(b, k, dtype=grad.dtype, device=grad.device)
    if b == 0 or k == 0:
        return dx
    grad, weight, mask = grad.contiguous(), weight.contiguous(), mask.contiguous()

    def grid(cfg):
        return (triton.cdiv(k, cfg["BLOCK_K"]) * triton.cdiv(b, cfg["BLOCK_M"]),)

    with device_guard(grad):
        _masked_linear_bwd_input_kernel[grid](
            grad, weight, mask, dx, b, n, k, mask.shape[1], grad.stride(0), weight.stride(0),
            dx.stride(0), bucket(b), bn=bn, bk=bk, PRECISION=dot_precision(grad.dtype),
        )
    return dx


def _is_pow2(v: int) -> bool:
    return v & (v - 1) == 0


def masked_linear_backward_params(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    block_rows: int,
    block_cols: int,
    need_weight: bool,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dW, dM)`` with ``G = grad^T x``: ``dW = G * M``, ``dM = G * W`` (per-block sums).

    An output not asked for comes back as an empty ``[0]`` tensor, as the op schema says.
    """
    CALLS["masked_linear_backward_params"] += 1
    bn, bk = _check_masked(grad, "grad", weight, mask, block_rows, block_cols)
    check_float(x, "x", grad, "grad")
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != grad.shape[0] or grad.shape[1] != n or x.shape[1] != k:
        raise ValueError(f"grad {tuple(grad.shape)}, x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)} do not match")
    b = int(grad.shape[0])
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    element = bn == 1 and bk == 1
    reduce = 0 if element else (1 if _is_pow2(bn) and _is_pow2(bk)
                                and max(bn, bk) <= _MAX_TILE else 2)
    if not need_mask:
        dm = mask.new_empty(0)
    elif reduce == 2:
        dm = torch.empty(n, k, dtype=torch.float32, device=grad.device)  # scratch G * W
    else:
        dm = torch.empty_like(mask)
    if (need_weight or need_mask) and n and k:
        grad, x = grad.contiguous(), x.contiguous()
        weight, mask = weight.contiguous(), mask.contiguous()

        def grid(cfg):
            return (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]),)

        with device_guard(grad):
            _masked_linear_bwd_params_kernel[grid](
                grad, x, weight, mask, dw if need_weight else grad,
                dm if need_mask else grad, b, n, k, mask.shape[0], mask.shape[1],
                grad.stride(0), x.stride(0), weight.stride(0), bucket(b), bn=bn, bk=bk,
                NEED_WEIGHT=bool(need_weight), NEED_MASK=bool(need_mask), REDUCE=reduce,
                PRECISION=dot_precision(grad.dtype),
            )
    if need_mask and reduce == 2:
        rows, cols = mask.shape
        padded = dm.new_zeros(rows * bn, cols * bk)
        padded[:n, :k] = dm
        dm = padded.view(rows, bn, cols, bk).sum((1, 3)).to(mask.dtype)
    return dw, dm

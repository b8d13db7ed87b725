"""Triton kernel of ``dot_interaction``: the DLRM's pairwise-dot interaction for inference.

The op's arguments are the bottom output ``[B, d]``, the ids ``[B, F]``, the F embedding
tables and the flat pair index into the ``(F+1) x (F+1)`` Gram matrix (csrc/interaction.cpp
says what it computes). A Triton kernel cannot take a list of tensors, so the rows are gathered
into ``[B, F+1, d]`` by torch first; the kernel then forms each output row in one program:
``BLOCK_P`` pairs at a time, each pair's two vectors loaded from the gathered rows and reduced
along ``d`` in fp32. Inference only: no backward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adsparse_kernels._common import CALLS, check_index, device_guard, next_pow2

__all__ = ["dot_interaction"]


@triton.jit(do_not_specialize=["B"])
def _interaction_kernel(v_ptr, pi_ptr, pj_ptr, out_ptr, B, P, D, NV, stride_out,
                        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    base = v_ptr + b * NV * D
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # The bottom output first (vector 0 of the row).
    bottom = tl.load(base + offs_d, mask=dmask, other=0.0)
    tl.store(out_ptr + b * stride_out + offs_d, bottom, mask=dmask)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        i = tl.load(pi_ptr + offs_p, mask=pmask, other=0)
        j = tl.load(pj_ptr + offs_p, mask=pmask, other=0)
        m = pmask[:, None] & dmask[None, :]
        x = tl.load(base + i[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        y = tl.load(base + j[:, None] * D + offs_d[None, :], mask=m, other=0.0)
        dots = tl.sum(x * y, axis=1)
        tl.store(out_ptr + b * stride_out + D + offs_p, dots, mask=pmask)


def dot_interaction(bottom: torch.Tensor, ids: torch.Tensor, tables: list[torch.Tensor],
                    pair_index: torch.Tensor) -> torch.Tensor:
    """``[bottom, <v_i, v_j> per pair]``, ``v_0 = bottom``, ``v_{f+1} = tables[f][ids[:, f]]``."""
    CALLS["dot_interaction"] += 1
    if bottom.dtype != torch.float32 or bottom.dim() != 2:
        raise ValueError(f"bottom must be float32 [B, d], got {bottom.dtype} "
                         f"{tuple(bottom.shape)}")
    b, d = bottom.shape
    if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != b:
        raise ValueError(f"ids must be int64 [{b}, F], got {ids.dtype} {tuple(ids.shape)}")
    f = ids.shape[1]
    if len(tables) != f:
        raise ValueError(f"ids have {f} fields but there are {len(tables)} tables")
    for n, t in enumerate(tables):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != d or t.device != bottom.device:
            raise ValueError(f"tables[{n}] must be float32 [rows, {d}] on {bottom.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    check_index(pair_index, "pair_index", bottom)
    nv = f + 1
    if pair_index.device.type == "cpu" and pair_index.numel():
        bad = ((pair_index < 0) | (pair_index >= nv * nv)).nonzero()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(f"pair_index[{k}] = {int(pair_index[k])} is out of range "
                             f"[0, {nv * nv}) for {nv} vectors")
    # F.embedding checks the ids against each table (the C++ kernel's range check).
    vectors = torch.stack([bottom, *(torch.nn.functional.embedding(ids[:, n], t)
                                     for n, t in enumerate(tables))], dim=1).contiguous()
    p = pair_index.numel()
    out = torch.empty(b, d + p, device=bottom.device, dtype=torch.float32)
    if b == 0:
        return out
    pi = torch.div(pair_index, nv, rounding_mode="floor").contiguous()
    pj = torch.remainder(pair_index, nv).contiguous()
    with device_guard(bottom):
        _interaction_kernel[(b,)](vectors, pi, pj, out, b, p, d, nv, out.stride(0),
                                  BLOCK_P=min(64, next_pow2(p)), BLOCK_D=next_pow2(d))
    return out

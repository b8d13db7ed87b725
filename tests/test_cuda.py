"""The ops on CUDA tensors (the Triton kernels), against float64 references; skipped without CUDA.

Same rule as the CPU tests: a result's max error against float64 is at most 4x the error of
PyTorch's own CUDA computation of the reference in the same dtype (cuBLAS; tf32 as torch has
it), with a floor of two ulps of the largest reference value. Also: ``opcheck``,
``torch.compile(fullgraph=True)``, the tf32 switch, no re-tuning for a repeated shape, and a
second GPU. ``benchmarks/gpu_check.sh`` runs this file with ``ADSPARSE_TRITON_AUTOTUNE=0``
(one config per kernel) to keep compile time down.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dtype_reference import compare_to_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


# --------------------------------------------------------------------------- helpers
def _bsr_weight(n: int, k: int, block: tuple[int, int], density: float = 0.5):
    from adsparse.layout import BlockSparseWeight

    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    mask = torch.rand(rows, cols) < density
    if rows > 1 and cols > 1:  # an empty block row and an empty block column
        mask[rows // 2] = False
        mask[:, cols // 2] = False
    dense = torch.randn(n, k) / math.sqrt(k)
    return BlockSparseWeight.from_dense(dense, block, mask=mask).to(DEV)


def _expand(mask: torch.Tensor, block: tuple[int, int] | None, n: int, k: int) -> torch.Tensor:
    if block is None:
        return mask
    return mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.relu(y) if activation == "relu" else y


def _bsr_case(n, k, b, block, dtype, bias=True, activation="relu", density=0.5) -> None:
    from adsparse.ops import bsr_linear

    w = _bsr_weight(n, k, block, density)

    def op(x, values, bias):
        return bsr_linear(x, w.with_values(values), bias, activation)

    def ref(x, values, bias):
        return _act(F.linear(x, w.with_values(values).to_dense(), bias), activation)

    inputs = {"x": torch.randn(b, k, device=DEV), "values": w.values,
              "bias": torch.randn(n, device=DEV) if bias else None}
    compare_to_reference(op, ref, inputs, ("x", "values", "bias"), dtype)


def _masked_case(n, k, b, block, dtype, soft=True, bias=True, activation="relu") -> None:
    from adsparse.ops import masked_linear

    grid = (n, k) if block is None else (-(-n // block[0]), -(-k // block[1]))
    mask = torch.rand(grid, device=DEV)
    if not soft:
        mask = (mask < 0.5).float()
    mask[: grid[0] // 3] = 0  # whole zero tiles: the skipping path

    def op(x, weight, mask, bias):
        return masked_linear(x, weight, mask, bias, activation, block)

    def ref(x, weight, mask, bias):
        return _act(F.linear(x, weight * _expand(mask, block, n, k), bias), activation)

    inputs = {"x": torch.randn(b, k, device=DEV), "mask": mask,
              "weight": torch.randn(n, k, device=DEV) / math.sqrt(k),
              "bias": torch.randn(n, device=DEV) if bias else None}
    compare_to_reference(op, ref, inputs, ("x", "weight", "mask", "bias"), dtype)


# --------------------------------------------------------------------------- correctness
BSR_CASES = [
    *[(torch.float32, blk) for blk in [(16, 16), (32, 32), (64, 64), (16, 32), (8, 4), (1, 16)]],
    *[(dt, blk) for dt in (torch.bfloat16, torch.float16) for blk in [(16, 32), (64, 64)]],
]


@pytest.mark.parametrize("dtype,block", BSR_CASES, ids=[f"{d}-{b}" for d, b in BSR_CASES])
def test_bsr_linear_cuda(dtype: torch.dtype, block: tuple[int, int]) -> None:
    _bsr_case(300, 257, 77, block, dtype)


def test_bsr_linear_cuda_no_bias_no_act() -> None:
    _bsr_case(129, 95, 33, (32, 32), torch.float32, bias=False, activation=None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bsr_linear_cuda_benchmark_shape(dtype: torch.dtype) -> None:
    """The benchmark's kind of shape (density 0.1, block 64) with a tall batch."""
    _bsr_case(1024, 1024, 512, (64, 64), dtype, density=0.1)


MASKED_CASES = [
    (torch.float32, None), (torch.float32, (16, 16)), (torch.float32, (32, 64)),
    (torch.float32, (8, 4)), (torch.float32, (24, 20)), (torch.float32, (1, 16)),
    (torch.bfloat16, None), (torch.bfloat16, (32, 64)), (torch.float16, (16, 16)),
]


@pytest.mark.parametrize("dtype,block", MASKED_CASES, ids=[f"{d}-{b}" for d, b in MASKED_CASES])
def test_masked_linear_cuda(dtype: torch.dtype, block: tuple[int, int] | None) -> None:
    _masked_case(300, 257, 77, block, dtype)


def test_masked_linear_cuda_hard_mask_no_bias() -> None:
    _masked_case(129, 95, 33, (16, 16), torch.float32, soft=False, bias=False, activation=None)


def test_masked_all_zero_mask_gives_bias() -> None:
    from adsparse.ops import masked_linear

    x, w = torch.randn(65, 97, device=DEV), torch.randn(70, 97, device=DEV)
    bias = torch.randn(70, device=DEV)
    y = masked_linear(x, w, torch.zeros(5, 7, device=DEV), bias, None, (16, 16))
    assert torch.equal(y, bias.expand(65, 70))


def test_tf32_follows_torch() -> None:
    """fp32 uses tf32 exactly when torch allows it; either way within torch's own error."""
    from adsparse_kernels._common import dot_precision

    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee"
        _bsr_case(300, 257, 77, (32, 32), torch.float32)
        _masked_case(300, 257, 77, (32, 32), torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------- the op contract
def test_opcheck_cuda() -> None:
    ops = torch.ops.adsparse
    w = _bsr_weight(70, 45, (16, 16))
    x = torch.randn(9, 45, device=DEV, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(70, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.bsr_linear, (x, values, w.row_offsets, w.col_indices,
                                           w.t_row_offsets, w.t_col_indices, w.t_block_ids,
                                           bias, 70, 1))
    weight = torch.randn(70, 45, device=DEV, requires_grad=True)
    for mask, bn, bk in ((torch.rand(70, 45, device=DEV), 1, 1),
                         (torch.rand(5, 3, device=DEV), 16, 16)):
        torch.library.opcheck(ops.masked_linear,
                              (x, weight, mask.requires_grad_(), bias, bn, bk, 0))


def test_torch_compile_fullgraph_cuda() -> None:
    from adsparse.ops import bsr_linear, masked_linear

    w = _bsr_weight(70, 45, (16, 16))
    weight = torch.randn(33, 70, device=DEV)
    mask = torch.rand(3, 5, device=DEV, requires_grad=True)

    def f(x, values):
        h = bsr_linear(x, w.with_values(values), None, "relu")
        return masked_linear(h, weight, mask, None, None, (16, 16)).sum()

    x = torch.randn(9, 45, device=DEV, requires_grad=True)
    values = w.values.clone().requires_grad_()
    eager = f(x, values)
    grads = torch.autograd.grad(eager, (x, values, mask))
    compiled = torch.compile(f, fullgraph=True)(x, values)
    cgrads = torch.autograd.grad(compiled, (x, values, mask))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


def test_no_retuning_for_repeated_shape() -> None:
    import importlib

    from adsparse.ops import bsr_linear
    from adsparse_kernels._common import AUTOTUNE

    kernel = importlib.import_module("adsparse_kernels.bsr_linear")._bsr_linear_fwd_kernel
    w = _bsr_weight(256, 192, (32, 32)).to(torch.bfloat16)
    x = torch.randn(100, 192, device=DEV, dtype=torch.bfloat16)
    bsr_linear(x, w)
    tuned = dict(kernel.cache)
    bsr_linear(x, w)
    bsr_linear(x[:90], w)  # same power-of-two batch bucket: the same tuned config
    assert kernel.cache == tuned
    if AUTOTUNE:
        assert len(tuned) >= 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu() -> None:
    from adsparse.ops import bsr_linear

    w = _bsr_weight(100, 64, (16, 16)).to("cuda:1")
    x = torch.randn(7, 64, device="cuda:1")
    y = bsr_linear(x, w)
    torch.testing.assert_close(y, x @ w.to_dense().T, atol=1e-4, rtol=1e-4)

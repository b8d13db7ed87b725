"""masked_linear against ``F.linear(x, W * expanded(M), b)`` in float64; errors; opcheck; compile.

The compile test also covers bsr_linear: one function chains both ops under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    apply_activation,
    assert_f32_close,
    check_against_reference,
    expand_block_mask,
    random_block_mask,
    random_bsr,
)

from adsparse.ops import bsr_linear, masked_linear

OPS = torch.ops.adsparse


def _grid(n: int, k: int, block: tuple[int, int] | None) -> tuple[int, int]:
    if block is None:
        return n, k
    return -(-n // block[0]), -(-k // block[1])


def make_mask(n: int, k: int, block: tuple[int, int] | None, kind: str) -> torch.Tensor:
    """A float32 mask on the element or block grid.

    ``binary``: 0/1, density 0.3, scattered; ``soft``: values in [0, 1] with 30% exact zeros;
    ``clustered`` / ``clustered_soft``: non-zeros only inside a random quarter of 48 x 48 regions
    of the weight, so that whole kernel tiles are empty and the tile-skipping path runs (a
    scattered mask leaves no tile empty); ``zeros``; ``ones``.
    """
    grid = _grid(n, k, block)
    if kind.startswith("clustered"):
        bn, bk = block or (1, 1)
        regions = random_block_mask((-(-n // 48), -(-k // 48)), 0.25)
        rows = torch.arange(grid[0]) * bn // 48
        cols = torch.arange(grid[1]) * bk // 48
        inside = regions[rows][:, cols]
        values = torch.rand(grid) if kind == "clustered_soft" else (torch.rand(grid) < 0.6).float()
        return values * inside
    if kind == "binary":
        return random_block_mask(grid, 0.3).float()
    if kind == "soft":
        soft = torch.rand(grid)
        soft[torch.rand(grid) < 0.3] = 0.0  # soft masks in training also hold exact zeros
        return soft
    return torch.zeros(grid) if kind == "zeros" else torch.ones(grid)


def _op_fn(block, activation):
    def fn(x, weight, mask, bias):
        return masked_linear(x, weight, mask, bias, activation, block_size=block)

    return fn


def _ref_fn(block, activation):
    def fn(x, weight, mask, bias):
        n, k = weight.shape
        full = mask if block is None else expand_block_mask(mask, block, n, k)
        return apply_activation(F.linear(x, weight * full, bias), activation)

    return fn


def _check(x, weight, mask, bias, block, activation,
           wrt=("x", "weight", "mask", "bias")) -> None:
    wrt = tuple(name for name in wrt if name != "bias" or bias is not None)
    check_against_reference(_op_fn(block, activation), _ref_fn(block, activation),
                            {"x": x, "weight": weight, "mask": mask, "bias": bias}, wrt)


# (N, K, B, block_size or None for an element mask, mask kind, bias, activation)
CASES = [
    *[(13, 7, 3, None, kind, kind != "soft", "relu" if kind in ("binary", "ones") else None)
      for kind in ("binary", "soft", "zeros", "ones")],
    (13, 7, 3, (8, 4), "binary", True, "relu"),
    (13, 7, 3, (8, 4), "soft", False, None),
    (100, 77, 5, (16, 16), "soft", True, "relu"),
    (100, 77, 5, (1, 16), "binary", False, None),
    (100, 77, 5, (3, 5), "ones", True, None),
    (1000, 513, 17, (16, 16), "binary", True, "relu"),
    (1000, 513, 17, None, "soft", False, "relu"),
    (1000, 513, 17, (32, 32), "zeros", True, None),
    (64, 48, 1, (32, 32), "ones", False, "relu"),
    (64, 48, 1, (16, 16), "soft", True, None),
    # Tile-skipping path: element masks and every block size, 0/1 and soft, several batches.
    (200, 150, 3, None, "clustered", True, "relu"),
    (200, 150, 7, None, "clustered_soft", False, None),
    (1000, 513, 17, None, "clustered", False, "relu"),
    (1000, 513, 17, (16, 16), "clustered_soft", True, None),
    (200, 150, 13, (8, 4), "clustered", True, None),
    (200, 150, 1, (3, 5), "clustered_soft", True, "relu"),
    (200, 150, 25, (1, 16), "clustered", False, "relu"),
    (200, 150, 5, (32, 32), "clustered", True, "relu"),
    (200, 150, 4, (17, 33), "clustered_soft", False, None),
]


@pytest.mark.parametrize(("n", "k", "b", "block", "kind", "has_bias", "activation"), CASES)
def test_forward_backward_matches_dense_reference(n, k, b, block, kind, has_bias, activation):
    _check(torch.randn(b, k), torch.randn(n, k) / k**0.5, make_mask(n, k, block, kind),
           torch.randn(n) if has_bias else None, block, activation)


@pytest.mark.parametrize(("n", "k", "b", "block"), [(13, 7, 3, (8, 4)), (13, 7, 3, None),
                                                    (100, 77, 5, (16, 16)),
                                                    (100, 77, 5, (32, 32))])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("kind", ["soft", "clustered_soft"])
def test_every_cpu_path(cpu_isa, n, k, b, block, activation, kind):
    _check(torch.randn(b, k), torch.randn(n, k), make_mask(n, k, block, kind),
           torch.randn(n), block, activation)


@pytest.mark.parametrize("kind", ["soft", "clustered"])
@pytest.mark.parametrize("block", [None, (8, 4)])
def test_gradient_reaches_mask_only_when_it_requires_grad(block, kind):
    # Each subset of inputs needing grad takes its own route through the backward kernels.
    n, k = 100, 110
    x, weight, mask = torch.randn(6, k), torch.randn(n, k), make_mask(n, k, block, kind)
    for wrt in [("x",), ("weight",), ("mask",), ("weight", "mask"), ("x", "bias")]:
        _check(x, weight, mask, torch.randn(n), block, "relu", wrt=wrt)
    w = weight.clone().requires_grad_()
    m = mask.clone()
    masked_linear(x, w, m, block_size=block).sum().backward()
    assert m.grad is None and w.grad is not None
    m.requires_grad_()
    masked_linear(x, weight, m, block_size=block).sum().backward()
    assert m.grad is not None and m.grad.shape == mask.shape


def test_block_mask_gradient_is_summed_per_block():
    """dM of a block mask equals the element-wise dM (from the same op) summed over each block."""
    n, k, block = 13, 11, (5, 4)
    x, weight = torch.randn(6, k), torch.randn(n, k)
    mask = make_mask(n, k, block, "soft").requires_grad_()
    element = expand_block_mask(mask.detach(), block, n, k).clone().requires_grad_()
    grad = torch.randn(6, n)
    masked_linear(x, weight, mask, block_size=block).backward(grad)
    masked_linear(x, weight, element).backward(grad)
    padded = torch.zeros(15, 12, dtype=torch.float64)
    padded[:n, :k] = element.grad.double()
    summed = padded.view(3, 5, 3, 4).sum(dim=(1, 3))
    torch.testing.assert_close(mask.grad.double(), summed, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- input shapes/strides
@pytest.mark.parametrize("lead", [(), (2, 5), (3, 1, 4)])
def test_batched_input_shapes(lead):
    x = torch.randn(*lead, 7)
    weight, mask = torch.randn(13, 7), make_mask(13, 7, (8, 4), "soft")
    assert masked_linear(x, weight, mask, block_size=(8, 4)).shape == (*lead, 13)
    _check(x, weight, mask, torch.randn(13), (8, 4), "relu")


def test_non_contiguous_operands():
    n, k, b = 37, 29, 6
    block = (8, 4)
    rows, cols = _grid(n, k, block)
    op, ref = _op_fn(block, "relu"), _ref_fn(block, "relu")

    # x sliced, weight and mask transposed, bias strided: views are taken inside the functions.
    def views(x, weight, mask, bias):
        return x[1::2, ::3], weight.t(), mask.t(), bias[::2]

    check_against_reference(
        lambda **t: op(*views(**t)), lambda **t: ref(*views(**t)),
        {"x": torch.randn(2 * b + 1, 3 * k), "weight": torch.randn(k, n),
         "mask": make_mask(cols, rows, None, "soft"), "bias": torch.randn(2 * n)},
        ("x", "weight", "mask", "bias"),
    )


def test_empty_batch():
    weight = torch.randn(13, 7, requires_grad=True)
    mask = make_mask(13, 7, (8, 4), "soft").requires_grad_()
    bias = torch.randn(13, requires_grad=True)
    x = torch.randn(0, 7, requires_grad=True)
    y = masked_linear(x, weight, mask, bias, "relu", block_size=(8, 4))
    assert y.shape == (0, 13)
    y.sum().backward()
    assert x.grad.shape == (0, 7)
    for t in (weight, mask, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("block", [None, (2, 2)])
@pytest.mark.parametrize(("n", "k"), [(5, 0), (0, 7), (0, 0)])
def test_zero_features(n, k, block):
    _check(torch.randn(3, k), torch.randn(n, k), make_mask(n, k, block, "soft"), torch.randn(n),
           block, "relu")


@pytest.mark.parametrize("activation", [None, "relu"])
def test_nan_propagates(activation):
    n, k = 20, 9
    x, weight, bias = torch.randn(4, k), torch.randn(n, k), torch.randn(n)
    x[2, 5] = float("nan")
    y = masked_linear(x, weight, torch.ones(3, 3), bias, activation, block_size=(8, 4))
    # A dense mask: every output of row 2 reads x[2, 5]; the other rows are untouched.
    assert bool(torch.isnan(y[2]).all())
    clean = torch.cat([x[:2], x[3:]])
    ref = apply_activation(F.linear(clean.double(), weight.double(), bias.double()), activation)
    base = apply_activation(F.linear(clean, weight, bias), activation)
    assert_f32_close(torch.cat([y[:2], y[3:]]), ref, base, name="rows without NaN")


# --------------------------------------------------------------------------- errors
def test_bad_arguments_raise_naming_the_argument():
    x, weight = torch.randn(3, 7), torch.randn(13, 7)
    mask, block_mask = torch.ones(13, 7), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"mask must be element-wise \[13, 7\]"):
        masked_linear(x, weight, torch.ones(13, 6))
    with pytest.raises(ValueError, match=r"block mask must be \[2, 2\]"):
        masked_linear(x, weight, torch.ones(2, 3), block_size=(8, 4))
    with pytest.raises(ValueError, match=r"block mask must be \[2, 2\]"):
        masked_linear(x, weight, mask, block_size=(8, 4))
    for bad_block in [(0, 4), (8, -1)]:
        with pytest.raises(ValueError, match=r"block_size must be integers in \[1, "):
            masked_linear(x, weight, block_mask, block_size=bad_block)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        masked_linear(x, torch.randn(7), mask)
    with pytest.raises(ValueError, match="mask must be a 2-D"):
        masked_linear(x, weight, torch.ones(13 * 7))
    with pytest.raises(ValueError, match="mask has dtype"):
        masked_linear(x, weight, mask.bool())
    with pytest.raises(ValueError, match="weight has dtype"):
        masked_linear(x, weight.double(), mask)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\] = 8"):
        masked_linear(torch.randn(3, 8), weight, mask)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        masked_linear(torch.tensor(2.0), weight, mask)
    with pytest.raises(ValueError, match=r"bias must be \[13\]"):
        masked_linear(x, weight, mask, torch.randn(7))
    with pytest.raises(ValueError, match="activation"):
        masked_linear(x, weight, mask, activation="tanh")


def test_float64_rejected_by_the_cpu_kernel():
    with pytest.raises(ValueError, match="float32"):
        masked_linear(torch.randn(3, 7).double(), torch.randn(13, 7).double(),
                      torch.ones(13, 7).double())


def test_kernel_rejects_bad_mask_shape_and_block_passed_directly():
    x, weight = torch.randn(3, 7), torch.randn(13, 7)
    with pytest.raises(ValueError, match="mask"):
        OPS.masked_linear(x, weight, torch.ones(2, 3), None, 8, 4, 0)
    with pytest.raises(ValueError, match="block size"):
        OPS.masked_linear(x, weight, torch.ones(2, 2), None, 0, 4, 0)
    g = torch.randn(3, 13)
    with pytest.raises(ValueError, match="mask"):
        OPS.masked_linear_backward_input(g, weight, torch.ones(13, 6), 1, 1)
    with pytest.raises(ValueError, match="mask"):
        OPS.masked_linear_backward_params(g, x, weight, torch.ones(3, 2), 8, 4, True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="weight is on"):
        masked_linear(torch.randn(3, 7, device="cuda"), torch.randn(13, 7), torch.ones(13, 7))


# --------------------------------------------------------------------------- opcheck
def _samples():
    out = []
    for n, k, b, block, kind, has_bias, act in [
        (13, 7, 3, None, "binary", True, 1), (13, 7, 3, (8, 4), "soft", False, 0),
        (40, 37, 5, (16, 16), "zeros", True, 0), (20, 11, 1, (3, 5), "ones", False, 1),
        (13, 7, 0, (8, 4), "soft", True, 1),
    ]:
        bn, bk = block or (1, 1)
        out.append((torch.randn(b, k), torch.randn(n, k), make_mask(n, k, block, kind),
                    torch.randn(n) if has_bias else None, bn, bk, act))
    return out


def test_opcheck_masked_linear():
    for i, (x, weight, mask, bias, bn, bk, act) in enumerate(_samples()):
        mask_grad = i % 2 == 1  # the learned pruner's case on half the samples
        args = (x.clone().requires_grad_(), weight.clone().requires_grad_(),
                mask.clone().requires_grad_(mask_grad),
                None if bias is None else bias.clone().requires_grad_(), bn, bk, act)
        torch.library.opcheck(OPS.masked_linear.default, args)


def test_opcheck_masked_linear_backward_ops():
    # Every (need_weight, need_mask) combination, each on another sample (opcheck is slow here).
    needs = [(True, True), (True, False), (False, True), (False, False), (True, True)]
    for (x, weight, mask, _, bn, bk, _), (need_weight, need_mask) in zip(_samples(), needs):
        g = torch.randn(x.shape[0], weight.shape[0])
        torch.library.opcheck(OPS.masked_linear_backward_input.default, (g, weight, mask, bn, bk))
        torch.library.opcheck(OPS.masked_linear_backward_params.default,
                              (g, x, weight, mask, bn, bk, need_weight, need_mask))


# --------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_matches_eager():
    """Both ops in one compiled graph (Inductor, dynamic shapes): same outputs and gradients as
    eager, for two batch shapes served by the same graph."""
    w = random_bsr(37, 29, (8, 4), 0.5)

    def model(x, values, b1, weight, mask, b2):
        h = bsr_linear(x, w.with_values(values), b1, "relu")
        return masked_linear(h, weight, mask, b2, block_size=(3, 4))

    compiled = torch.compile(model, fullgraph=True, backend="inductor", dynamic=True)
    # Batch sizes that equal no weight dimension, so duck sizing does not specialise on them.
    for batch in [(13, 3), (19, 7)]:
        inputs = [torch.randn(*batch, 29), w.values, torch.randn(37), torch.randn(11, 37),
                  torch.rand(4, 10), torch.randn(11)]
        grad = torch.randn(*batch, 11)
        results = []
        for fn in (model, compiled):
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = fn(*leaves)
            y.backward(grad)
            results.append((y.detach(), [t.grad for t in leaves]))
        (y_eager, g_eager), (y_comp, g_comp) = results
        torch.testing.assert_close(y_comp, y_eager)
        for name, a, b in zip(["x", "values", "b1", "weight", "mask", "b2"], g_comp, g_eager):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")

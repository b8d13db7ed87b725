"""The CPU kernels' instruction-set paths: selection (ADSPARSE_CPU_ISA, selected_cpu_isa) and
every path's results for both op families, forward and both backward ops, against float64.

The shapes are odd on purpose: tails in N, K and B on every path, batches that take the
matrix-vector kernel (B <= 3) and the panel kernel, and blocks narrower and wider than a vector.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_ISAS, assert_f32_close, expand_block_mask, random_bsr

OPS = torch.ops.adsparse

SHAPES = [  # (N, K, B, block)
    (13, 7, 3, (8, 4)),
    (13, 7, 3, (1, 16)),
    (100, 77, 5, (16, 16)),
    (100, 77, 5, (32, 32)),
    (100, 77, 1, (16, 16)),
    (37, 45, 29, (16, 16)),
    (70, 90, 14, (32, 32)),
]


def _best_isa() -> str:
    return OPS.selected_cpu_isa()


@pytest.fixture(params=CPU_ISAS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ADSPARSE_CPU_ISA", request.param)
    if OPS.selected_cpu_isa() != request.param:
        pytest.skip(f"this CPU has no {request.param} path")
    return request.param


# --------------------------------------------------------------------------- selection
def test_selected_cpu_isa_default_and_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADSPARSE_CPU_ISA", raising=False)
    best = _best_isa()
    assert best in CPU_ISAS
    monkeypatch.setenv("ADSPARSE_CPU_ISA", "auto")
    assert _best_isa() == best
    monkeypatch.setenv("ADSPARSE_CPU_ISA", "SCALAR")  # case-insensitive
    assert _best_isa() == "scalar"
    order = list(reversed(CPU_ISAS))  # scalar < avx2 < avx512 < avx512_bf16
    for want in CPU_ISAS:
        monkeypatch.setenv("ADSPARSE_CPU_ISA", want)
        got = _best_isa()
        # A path the CPU lacks falls back to the best one it has, never to a better one.
        expected = want if order.index(want) <= order.index(best) else best
        assert got == expected


def test_selected_cpu_isa_rejects_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADSPARSE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ADSPARSE_CPU_ISA"):
        OPS.selected_cpu_isa()


def test_paths_switch_within_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every available path gives the same forward result on one input (read on each call)."""
    w = random_bsr(50, 40, (16, 16), 0.5)
    x = torch.randn(9, 40)
    args = (x, w.values, w.row_offsets, w.col_indices, w.t_row_offsets, w.t_col_indices,
            w.t_block_ids, None, 50, 1)
    ref = torch.relu(x.double() @ w.to_dense().double().T)
    for isa in CPU_ISAS:
        monkeypatch.setenv("ADSPARSE_CPU_ISA", isa)
        if OPS.selected_cpu_isa() != isa:
            continue
        torch.testing.assert_close(OPS.bsr_linear(*args).double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bsr_linear
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.4, 1.0])
def test_bsr_linear_path(isa: str, shape, density: float) -> None:
    n, k, b, block = shape
    w = random_bsr(n, k, block, density)
    x = torch.randn(b, k)
    bias = torch.randn(n)
    dense = w.to_dense()
    # forward with bias + ReLU
    y = OPS.bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.t_row_offsets,
                       w.t_col_indices, w.t_block_ids, bias, n, 1)
    ref = torch.relu(torch.addmm(bias.double(), x.double(), dense.double().T))
    base = torch.relu(torch.addmm(bias, x, dense.T))
    assert_f32_close(y, ref, base, name=f"{isa} forward")
    # backward input: dx = g @ W
    g = torch.randn(b, n)
    dx = OPS.bsr_linear_backward_input(g, w.values, w.t_row_offsets, w.t_col_indices,
                                       w.t_block_ids, k)
    assert_f32_close(dx, g.double() @ dense.double(), g @ dense, name=f"{isa} dx")
    # backward weight at the stored blocks: compare through to_dense of the gradient blocks
    dv = OPS.bsr_linear_backward_weight(g, x, w.row_offsets, w.col_indices, *block)
    assert dv.shape == w.values.shape
    got = w.with_values(dv).to_dense()
    keep = expand_block_mask(w.block_mask(), block, n, k)
    ref_dw = (g.double().T @ x.double()) * keep
    assert_f32_close(got, ref_dw, (g.T @ x) * keep, name=f"{isa} dW")
    # padding of tail blocks stays zero
    full = w.with_values(dv)
    assert float(dv.abs().sum()) == pytest.approx(float(full.to_dense().abs().sum()), rel=1e-5)


def test_bsr_linear_nan_and_empty(isa: str) -> None:
    w = random_bsr(40, 33, (16, 16), 1.0)
    for b in (2, 8):  # matrix-vector and panel kernels
        x = torch.randn(b, 33)
        x[1, 5] = float("nan")
        y = OPS.bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.t_row_offsets,
                           w.t_col_indices, w.t_block_ids, None, 40, 1)
        assert bool(torch.isnan(y[1]).all()) and not bool(torch.isnan(y[0]).any())
    empty = OPS.bsr_linear(torch.empty(0, 33), w.values, w.row_offsets, w.col_indices,
                           w.t_row_offsets, w.t_col_indices, w.t_block_ids, None, 40, 1)
    assert empty.shape == (0, 40)


# --------------------------------------------------------------------------- masked_linear
def _masked_ref(x, weight, m_elem, bias):
    y = x @ (weight * m_elem).T
    return y + bias if bias is not None else y


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.25, 1.0])  # the sparse route and the dense route
@pytest.mark.parametrize("granularity", ["block", "element"])
@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
def test_masked_linear_path(isa: str, shape, density: float, granularity: str,
                            soft: bool) -> None:
    n, k, b, block = shape
    bn, bk = block if granularity == "block" else (1, 1)
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    keep = torch.rand(grid) < density if density < 1 else torch.ones(grid, dtype=torch.bool)
    # soft: values in (0, 1], zero outside the kept blocks; hard: 0/1 (all ones at density 1)
    mask = torch.rand(grid).clamp_min(0.05) * keep if soft else keep.float()
    m_elem = expand_block_mask(mask, (bn, bk), n, k)
    weight = torch.randn(n, k) / math.sqrt(k)
    x, bias, g = torch.randn(b, k), torch.randn(n), torch.randn(b, n)
    y = OPS.masked_linear(x, weight, mask, bias, bn, bk, 1)
    ref = torch.relu(_masked_ref(x.double(), weight.double(), m_elem.double(), bias.double()))
    base = torch.relu(_masked_ref(x, weight, m_elem, bias))
    assert_f32_close(y, ref, base, name=f"{isa} masked forward")
    dx = OPS.masked_linear_backward_input(g, weight, mask, bn, bk)
    wm64 = weight.double() * m_elem.double()
    assert_f32_close(dx, g.double() @ wm64, g @ (weight * m_elem), name=f"{isa} masked dx")
    G64, G32 = g.double().T @ x.double(), g.T @ x
    for need_mask in (False, True):
        dw, dm = OPS.masked_linear_backward_params(g, x, weight, mask, bn, bk, True, need_mask)
        assert_f32_close(dw, G64 * m_elem.double(), G32 * m_elem, name=f"{isa} masked dW")
        if need_mask:
            def per_block(t):
                pad = t.new_zeros(grid[0] * bn, grid[1] * bk)
                pad[:n, :k] = t
                return pad.view(grid[0], bn, grid[1], bk).sum((1, 3))

            assert_f32_close(dm, per_block(G64 * weight.double()), per_block(G32 * weight),
                             name=f"{isa} masked dM")
        else:
            assert dm.numel() == 0
    dw, dm = OPS.masked_linear_backward_params(g, x, weight, mask, bn, bk, False, True)
    assert dw.numel() == 0 and dm.shape == mask.shape


def test_masked_linear_bad_input() -> None:
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="mask"):
        OPS.masked_linear(x, w, torch.ones(3, 2), None, 4, 4, 0)
    with pytest.raises(ValueError, match="activation"):
        OPS.masked_linear(x, w, torch.ones(5, 8), None, 1, 1, 7)
    with pytest.raises(ValueError, match="bias"):
        OPS.masked_linear(x, w, torch.ones(5, 8), torch.ones(4), 1, 1, 0)

"""Shared test helpers: seeded random data, float64 references, float32 error bounds, ISA paths.

The op tests hold a float32 kernel to a small multiple of the error that PyTorch's own float32
computation of the same reference makes against float64 (the flash-attention rule), with a floor
of two ulps of the largest reference value, so that a PyTorch result that is exact by luck (short
sums) does not demand bit-exactness from a kernel that sums in another order. PyTorch's error
already grows with the reduction length, so the bound scales with it without a formula here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import pytest
import torch

from adsparse.layout import BlockSparseWeight

EPS32 = torch.finfo(torch.float32).eps
CPU_ISAS = ("avx512_bf16", "avx512", "avx2", "scalar")


@pytest.fixture(autouse=True)
def _seed_per_test(request: pytest.FixtureRequest) -> None:
    """Every test gets its own reproducible seed, derived from its id (fresh data per test)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# --------------------------------------------------------------------------- random data
def random_block_mask(grid: tuple[int, int], density: float) -> torch.Tensor:
    """Boolean ``grid`` mask with exactly ``round(density * numel)`` blocks set, at random."""
    rows, cols = grid
    total = rows * cols
    keep = round(density * total)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total)[:keep]] = True
    return mask.view(rows, cols)


def random_bsr(
    n: int, k: int, block_size: tuple[int, int], density: float
) -> BlockSparseWeight:
    """A float32 ``BlockSparseWeight`` with random values and a random pattern of that density."""
    bn, bk = block_size
    dense = torch.randn(n, k) / math.sqrt(max(k, 1))
    mask = random_block_mask((math.ceil(n / bn), math.ceil(k / bk)), density)
    return BlockSparseWeight.from_dense(dense, block_size, mask=mask)


def expand_block_mask(mask: torch.Tensor, block_size: tuple[int, int], n: int, k: int):
    """The element-wise ``[n, k]`` mask a per-block mask stands for (differentiable)."""
    bn, bk = block_size
    return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.relu(y) if activation == "relu" else y


# --------------------------------------------------------------------------- run + compare
def forward_backward(
    fn: Callable[..., torch.Tensor],
    inputs: Mapping[str, torch.Tensor | None],
    wrt: tuple[str, ...],
    grad_out: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``fn(**inputs)`` with fresh leaf copies in ``dtype``; return output and grads of ``wrt``.

    ``grad_out`` is the upstream gradient (same for every run, cast to ``dtype``); with
    ``None`` only the forward runs.
    """
    leaves: dict[str, torch.Tensor | None] = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        leaf = t.detach().to(dtype) if t.is_floating_point() else t
        leaves[name] = leaf.clone().requires_grad_(name in wrt and grad_out is not None)
    out = fn(**leaves)
    grads: dict[str, torch.Tensor] = {}
    if grad_out is not None:
        out.backward(grad_out.to(dtype))
        for name in wrt:
            leaf = leaves[name]
            assert leaf is not None
            assert leaf.grad is not None, f"no gradient reached {name}"
            grads[name] = leaf.grad
    return out.detach(), grads


def assert_f32_close(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    base32: torch.Tensor,
    *,
    factor: float = 4.0,
    name: str = "result",
) -> None:
    """``actual`` (float32) is within ``factor`` x PyTorch's float32 error against ``ref64``.

    ``base32`` is PyTorch's float32 computation of the reference. The bound is
    ``max(factor * max|base32 - ref64|, 2 * eps32 * max|ref64|)``; NaN must appear exactly where
    the reference has NaN.
    """
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}, expected float32"
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    ref_nan = torch.isnan(ref64)
    assert torch.equal(torch.isnan(actual), ref_nan), f"{name}: NaN pattern differs from reference"
    finite = ~ref_nan
    if not bool(finite.any()):
        return
    act, ref, base = actual.double()[finite], ref64[finite], base32.double()[finite]
    err = float((act - ref).abs().max())
    base_err = float((base - ref).abs().max())
    floor = 2 * EPS32 * float(ref.abs().max())
    bound = max(factor * base_err, floor)
    assert err <= bound, (
        f"{name}: max abs error {err:.3e} > bound {bound:.3e} "
        f"(torch float32 error {base_err:.3e}, floor {floor:.3e})"
    )


def check_against_reference(
    op_fn: Callable[..., torch.Tensor],
    ref_fn: Callable[..., torch.Tensor],
    inputs: Mapping[str, torch.Tensor | None],
    wrt: tuple[str, ...],
    *,
    backward: bool = True,
    factor: float = 4.0,
) -> None:
    """Compare ``op_fn`` in float32 against ``ref_fn`` in float64, bounded by ``ref_fn`` in float32.

    The same random upstream gradient is used for every run.
    """
    out64, _ = forward_backward(ref_fn, inputs, wrt, None, torch.float64)
    grad_out = torch.randn(out64.shape, dtype=torch.float64) if backward else None
    out, grads = forward_backward(op_fn, inputs, wrt, grad_out, torch.float32)
    ref, ref_grads = forward_backward(ref_fn, inputs, wrt, grad_out, torch.float64)
    base, base_grads = forward_backward(ref_fn, inputs, wrt, grad_out, torch.float32)
    assert_f32_close(out, ref, base, factor=factor, name="output")
    for name in grads:
        assert_f32_close(grads[name], ref_grads[name], base_grads[name], factor=factor,
                         name=f"grad of {name}")


# --------------------------------------------------------------------------- ISA paths
@pytest.fixture(params=("default",) + CPU_ISAS)
def cpu_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on every CPU kernel path this machine has (``ADSPARSE_CPU_ISA``).

    ``default`` leaves the variable unset (the kernels pick the best path). It runs only where
    ``selected_cpu_isa`` is missing, so the op tests still run there; elsewhere the path it
    would pick is one of the forced ones, and running it twice only costs time.
    """
    isa = request.param
    has_selector = hasattr(torch.ops.adsparse, "selected_cpu_isa")
    if isa == "default":
        monkeypatch.delenv("ADSPARSE_CPU_ISA", raising=False)
        if has_selector:
            pytest.skip(f"default path = {torch.ops.adsparse.selected_cpu_isa()}, tested forced")
        return isa
    if not has_selector:
        pytest.skip("torch.ops.adsparse.selected_cpu_isa is not registered by this build")
    monkeypatch.setenv("ADSPARSE_CPU_ISA", isa)
    selected = torch.ops.adsparse.selected_cpu_isa()
    if selected != isa:
        pytest.skip(f"ADSPARSE_CPU_ISA={isa} not available here (kernels selected {selected!r})")
    return isa


@pytest.fixture
def one_thread():
    """Tiny shapes run on one thread. On the shared 2-core machine, two threads made a
    128x40x40 masked_linear 80x slower (64 ms vs 0.8 ms, measured) from oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (the folder is not a package here)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module

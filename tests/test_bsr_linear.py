"""bsr_linear: forward and gradients against a float64 dense reference, edge cases, errors, opcheck.

The reference is ``act(F.linear(x, W.to_dense(), bias))`` on the same packed values, differentiated
by autograd in float64 (gradients reach ``values`` through ``to_dense``, so padding gets zero).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    apply_activation,
    assert_f32_close,
    check_against_reference,
    random_bsr,
)

from adsparse import ops
from adsparse.layout import BlockSparseWeight
from adsparse.ops import bsr_linear

OPS = torch.ops.adsparse


def _op_fn(w: BlockSparseWeight, activation: str | None):
    def fn(x, values, bias):
        return bsr_linear(x, w.with_values(values), bias, activation)

    return fn


def _ref_fn(w: BlockSparseWeight, activation: str | None):
    def fn(x, values, bias):
        return apply_activation(F.linear(x, w.with_values(values).to_dense(), bias), activation)

    return fn


def _check(w: BlockSparseWeight, x: torch.Tensor, bias: torch.Tensor | None,
           activation: str | None, wrt: tuple[str, ...] = ("x", "values", "bias")) -> None:
    wrt = tuple(name for name in wrt if name != "bias" or bias is not None)
    check_against_reference(_op_fn(w, activation), _ref_fn(w, activation),
                            {"x": x, "values": w.values, "bias": bias}, wrt)


# (N, K, B, block, density, bias, activation): odd shapes x every block size x every density,
# a sensible subset rather than the full product (the reference kernels are slow at N=1000).
CASES = [
    *[(13, 7, 3, blk, d, d != 0.5, "relu" if d in (0.05, 1.0) else None)
      for blk in [(16, 16), (32, 32), (1, 16), (8, 4)] for d in (0.0, 0.05, 0.5, 1.0)],
    (1000, 513, 17, (16, 16), 0.05, True, "relu"),
    (1000, 513, 17, (16, 16), 0.5, False, None),
    (1000, 513, 17, (32, 32), 1.0, True, None),
    (1000, 513, 17, (1, 16), 0.05, False, "relu"),
    (1000, 513, 17, (8, 4), 0.05, True, None),
    (1000, 513, 17, (32, 32), 0.0, True, "relu"),
    (64, 48, 1, (16, 16), 0.5, True, "relu"),
    (64, 48, 1, (32, 32), 0.05, False, None),
    (64, 48, 1, (1, 16), 1.0, False, "relu"),
    (64, 48, 1, (8, 4), 0.0, True, None),
    (100, 77, 5, (3, 5), 0.5, True, "relu"),
]


@pytest.mark.parametrize(("n", "k", "b", "block", "density", "has_bias", "activation"), CASES)
def test_forward_backward_matches_dense_reference(n, k, b, block, density, has_bias, activation):
    w = random_bsr(n, k, block, density)
    x = torch.randn(b, k)
    bias = torch.randn(n) if has_bias else None
    _check(w, x, bias, activation)


@pytest.mark.parametrize(("n", "k", "b", "block"), [(13, 7, 3, (8, 4)), (13, 7, 3, (1, 16)),
                                                    (100, 77, 5, (16, 16)),
                                                    (100, 77, 5, (32, 32))])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_every_cpu_path(cpu_isa, n, k, b, block, activation):
    w = random_bsr(n, k, block, 0.5)
    _check(w, torch.randn(b, k), torch.randn(n), activation)


@pytest.mark.parametrize("b", [2, 4, 25])
@pytest.mark.parametrize("block", [(16, 16), (17, 33), (64, 64), (2, 48)])
def test_batch_and_block_sizes_around_kernel_tiles(cpu_isa, b, block):
    """Batches on both sides of the kernels' gemv/panel switch and of their row-panel sizes, and
    blocks that take one, several or partial vectors (wider than 32 columns, odd widths)."""
    w = random_bsr(130, 100, block, 0.5)
    _check(w, torch.randn(b, 100), torch.randn(130), "relu")


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("block", [(16, 4), (16, 8), (16, 16), (8, 32), (16, 64)])
def test_small_batch_whole_blocks(cpu_isa, b, block):
    """K a multiple of the block depth: the gemv kernel's unmasked paths (blocks exactly one or
    two vectors deep, per ISA), its general path for other depths, and a partial group of rows
    (N = 130)."""
    k = 4 * block[1]
    w = random_bsr(130, k, block, 0.5)
    _check(w, torch.randn(b, k), torch.randn(130), "relu")


def _op_forward(w: BlockSparseWeight, x: torch.Tensor, bias, activation) -> torch.Tensor:
    """The op itself, through the dispatcher (what bsr_linear calls when it needs autograd)."""
    return OPS.bsr_linear(x, w.values, w.row_offsets, w.col_indices, w.t_row_offsets,
                          w.t_col_indices, w.t_block_ids, bias, w.shape[0],
                          ops.ACTIVATIONS[activation])


@pytest.fixture
def direct_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the forwards that take the lean entry (ops.serve_direct)."""
    calls = []
    real = ops.serve_direct

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "serve_direct", counting)
    return calls


@pytest.mark.parametrize(("n", "k", "b", "block", "has_bias", "activation"), [
    (13, 7, 3, (8, 4), True, "relu"), (100, 77, 1, (16, 16), False, None),
    (130, 100, 25, (17, 33), True, None), (64, 48, 2, (32, 32), False, "relu"),
])
def test_no_grad_forward_takes_the_lean_entry_bit_for_bit(cpu_isa, direct_calls, n, k, b, block,
                                                          has_bias, activation):
    """Without autograd (no_grad, or nothing requiring grad) ``bsr_linear`` skips the
    dispatcher for the serving kernel's lean entry: the same bits as the op, on every path."""
    w = random_bsr(n, k, block, 0.5)
    x, bias = torch.randn(b, k), torch.randn(n) if has_bias else None
    want = _op_forward(w, x, bias, activation)
    with torch.no_grad():
        assert torch.equal(bsr_linear(x, w, bias, activation), want)
        got3 = bsr_linear(x.reshape(1, b, k), w, bias, activation)
    assert torch.equal(got3, want.reshape(1, b, n))
    assert torch.equal(bsr_linear(x, w, bias, activation), want)  # grad on, nothing requires it
    assert len(direct_calls) == 3
    values = w.values.clone().requires_grad_(True)
    y = bsr_linear(x, w.with_values(values), bias, activation)  # training: the op and autograd
    assert y.requires_grad and len(direct_calls) == 3
    with torch.no_grad():
        y = bsr_linear(x, w.with_values(values), bias, activation)
    assert not y.requires_grad and len(direct_calls) == 4


def test_no_grad_forward_is_seen_by_modes_and_tracers(direct_calls) -> None:
    """Whatever must see the op keeps it: a dispatch mode, a make_fx trace, a function mode,
    torch.jit.trace and the profiler all record adsparse.bsr_linear, and vmap batches it, with
    no lean call."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    w = random_bsr(40, 24, (8, 8), 0.5)
    x, bias = torch.randn(3, 24), torch.randn(40)
    seen = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def f(x):
        return bsr_linear(x, w, bias, "relu")

    with torch.no_grad():
        with Recording():
            f(x)
        assert any("adsparse.bsr_linear" in name for name in seen)
        graph = make_fx(f)(x).graph
        assert any("adsparse.bsr_linear" in str(node.target) for node in graph.nodes)
        with Passing():
            f(x)
        traced = torch.jit.trace(f, x, check_trace=False)  # (a check re-runs f eagerly)
        assert "adsparse::bsr_linear" in str(traced.graph)
        with torch.profiler.profile() as prof:
            f(x)
        assert any(e.key == "adsparse::bsr_linear" for e in prof.key_averages())
        xs = torch.randn(2, 3, 24)
        batched = torch.vmap(f)(xs)  # a functorch transform: the op and its batching rule
        assert not direct_calls
        assert torch.equal(batched[1], f(xs[1]))
        assert torch.equal(traced(x), f(x))
    assert len(direct_calls) == 2  # the two eager calls the results are compared with


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = random_bsr(200, 150, (16, 16), 0.3)
        _check(w, torch.randn(33, 150), torch.randn(200), "relu")
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_from_several_threads():
    """The kernels keep packed and transposed temporaries per calling thread, reused across
    calls: threads calling at once, with shapes that grow and shrink, must not see each other's."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for n, k, b in [(300, 200, 40), (64, 48, 7), (520, 130, 90), (96, 300, 33)]:
        w = random_bsr(n, k, (16, 16), 0.4)
        x, g = torch.randn(b, k), torch.randn(b, n)
        dense = w.to_dense().double()
        # Alone, each call matches the float64 reference; concurrently, it must match itself.
        y_ref = bsr_linear(x, w)
        torch.testing.assert_close(y_ref.double(), F.linear(x.double(), dense), rtol=1e-4,
                                   atol=1e-5)
        dv_ref = OPS.bsr_linear_backward_weight(g, x, w.row_offsets, w.col_indices, 16, 16)
        torch.testing.assert_close(w.with_values(dv_ref).to_dense().double(),
                                   (g.double().t() @ x.double()) * (dense != 0), rtol=1e-4,
                                   atol=1e-4)
        cases.append((w, x, g, y_ref, dv_ref))

    def run(i: int) -> bool:
        w, x, g, y_ref, dv_ref = cases[i % len(cases)]
        for _ in range(5):
            y = bsr_linear(x, w)
            dv = OPS.bsr_linear_backward_weight(g, x, w.row_offsets, w.col_indices, 16, 16)
            if not (torch.equal(y, y_ref) and torch.equal(dv, dv_ref)):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(16)))


def test_requires_grad_subsets():
    w = random_bsr(40, 30, (8, 4), 0.5)
    x = torch.randn(6, 30)
    for wrt in [("x",), ("values",), ("bias",), ("x", "bias")]:
        _check(w, x, torch.randn(40), "relu", wrt=wrt)
    # Only what requires grad gets a gradient.
    values = w.values.clone().requires_grad_()
    xr = x.clone()
    bsr_linear(xr, w.with_values(values), torch.randn(40)).sum().backward()
    assert values.grad is not None and xr.grad is None


def test_values_as_parameter():
    w = random_bsr(40, 30, (16, 16), 0.5)
    values = torch.nn.Parameter(w.values.clone())
    bsr_linear(torch.randn(4, 30), w.with_values(values), activation="relu").pow(2).sum().backward()
    assert values.grad is not None and values.grad.shape == values.shape


# --------------------------------------------------------------------------- input shapes/strides
@pytest.mark.parametrize("lead", [(), (2, 5), (3, 1, 4)])
def test_batched_input_shapes(lead):
    w = random_bsr(13, 7, (8, 4), 0.5)
    x = torch.randn(*lead, 7)
    assert bsr_linear(x, w).shape == (*lead, 13)
    _check(w, x, torch.randn(13), "relu")


@pytest.mark.parametrize("layout", ["sliced", "transposed", "expanded"])
def test_non_contiguous_input(layout):
    n, k, b = 37, 29, 6
    w = random_bsr(n, k, (8, 4), 0.5)
    # The leaf is a different tensor from the op's input: the view is taken inside the function.
    view = {"sliced": lambda t: t[1::2, ::3], "transposed": lambda t: t.t(),
            "expanded": lambda t: t.expand(b, k)}[layout]
    leaf = {"sliced": torch.randn(2 * b + 1, 3 * k), "transposed": torch.randn(k, b),
            "expanded": torch.randn(1, k)}[layout]
    assert not view(leaf).is_contiguous()
    op, ref = _op_fn(w, "relu"), _ref_fn(w, "relu")
    check_against_reference(
        lambda x, values, bias: op(view(x), values, bias),
        lambda x, values, bias: ref(view(x), values, bias),
        {"x": leaf, "values": w.values, "bias": torch.randn(n)}, ("x", "values", "bias"),
    )


def test_non_contiguous_values_and_bias():
    n, k = 37, 29
    w = random_bsr(n, k, (8, 4), 0.5)
    op, ref = _op_fn(w, None), _ref_fn(w, None)
    # values stored column-major inside each block; bias a strided slice.
    check_against_reference(
        lambda x, values, bias: op(x, values.transpose(1, 2), bias[::2]),
        lambda x, values, bias: ref(x, values.transpose(1, 2), bias[::2]),
        {"x": torch.randn(5, k), "values": w.values.transpose(1, 2).contiguous(),
         "bias": torch.randn(2 * n)},
        ("x", "values", "bias"),
    )


def test_empty_batch():
    w = random_bsr(13, 7, (8, 4), 0.5)
    values = w.values.clone().requires_grad_()
    x = torch.randn(0, 7, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    y = bsr_linear(x, w.with_values(values), bias, "relu")
    assert y.shape == (0, 13)
    y.sum().backward()
    assert x.grad.shape == (0, 7)
    assert torch.equal(values.grad, torch.zeros_like(values))
    assert torch.equal(bias.grad, torch.zeros(13))
    assert bsr_linear(torch.randn(2, 0, 7), w).shape == (2, 0, 13)


@pytest.mark.parametrize(("n", "k"), [(5, 0), (0, 7), (0, 0)])
def test_zero_features(n, k):
    """nn.Linear allows in/out_features = 0: the result is the bias (or empty), grads flow."""
    w = random_bsr(n, k, (2, 2), 1.0)
    _check(w, torch.randn(3, k), torch.randn(n), "relu")
    assert bsr_linear(torch.randn(2, 3, k), w).shape == (2, 3, n)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize(("density", "b"), [(0.5, 2), (1.0, 5)])
def test_nan_propagates(cpu_isa, density, b, activation):
    """Per path, since a vector max() used for the fused ReLU may drop NaN (operand order)."""
    n, k = 40, 30
    w = random_bsr(n, k, (8, 4), density)
    x = torch.randn(b, k)
    bias = torch.randn(n)
    # A column read by at least one stored block, so some outputs must turn NaN.
    nan_row, nan_col = 1, min(int(w.col_indices[w.nnzb // 2]) * 4 + 1, k - 1)
    x[nan_row, nan_col] = float("nan")
    y = bsr_linear(x, w, bias, activation)
    # NaN reaches exactly the outputs whose stored blocks read x[:, nan_col] (and ReLU keeps it).
    expected_nan = torch.zeros(b, n, dtype=torch.bool)
    touches = w.block_mask()[:, nan_col // 4].repeat_interleave(8)[:n]
    expected_nan[nan_row] = touches
    clean = x.clone()
    clean[nan_row, nan_col] = 0
    ref = apply_activation(F.linear(clean.double(), w.to_dense().double(), bias.double()),
                           activation)
    base = apply_activation(F.linear(clean, w.to_dense(), bias), activation)
    ref[expected_nan] = float("nan")
    base[expected_nan] = float("nan")
    assert bool(touches.any())
    assert_f32_close(y, ref, base, name="output with NaN input")


# --------------------------------------------------------------------------- errors
def test_bad_arguments_raise_naming_the_argument():
    w = random_bsr(13, 7, (8, 4), 0.5)
    x = torch.randn(3, 7)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        bsr_linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 8"):
        bsr_linear(torch.randn(3, 8), w)
    with pytest.raises(ValueError, match=r"weight\.values has dtype torch\.float32 but x"):
        bsr_linear(x.double(), w)
    with pytest.raises(ValueError, match=r"bias must be \[13\]"):
        bsr_linear(x, w, torch.randn(12))
    with pytest.raises(ValueError, match=r"bias must be \[13\]"):
        bsr_linear(x, w, torch.randn(1, 13))
    with pytest.raises(ValueError, match="bias has dtype"):
        bsr_linear(x, w, torch.randn(13, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation"):
        bsr_linear(x, w, activation="gelu")
    with pytest.raises(TypeError, match="weight must be a BlockSparseWeight"):
        bsr_linear(x, w.to_dense())
    with pytest.raises(TypeError, match="x must be a Tensor"):
        bsr_linear([[1.0] * 7], w)


def test_float64_rejected_by_the_cpu_kernel():
    w = random_bsr(13, 7, (8, 4), 0.5).to(torch.float64)
    with pytest.raises(ValueError, match="float32"):
        bsr_linear(torch.randn(3, 7, dtype=torch.float64), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch_raises():
    w = random_bsr(13, 7, (8, 4), 0.5)
    with pytest.raises(ValueError, match=r"weight\.values is on"):
        bsr_linear(torch.randn(3, 7, device="cuda"), w)


def _op_args(w: BlockSparseWeight, x: torch.Tensor, **override):
    args = {"x": x, "values": w.values, "row_offsets": w.row_offsets,
            "col_indices": w.col_indices, "t_row_offsets": w.t_row_offsets,
            "t_col_indices": w.t_col_indices, "t_block_ids": w.t_block_ids, "bias": None,
            "out_features": w.shape[0], "activation": 0}
    args.update(override)
    return args


def _with(t: torch.Tensor, index: int, value: int) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def test_kernel_rejects_corrupt_index_passed_directly():
    """The C++ kernels re-check the index: corrupt metadata raises, never reads out of bounds."""
    w = random_bsr(13, 11, (5, 4), 1.0)  # 3 x 3 grid, every block stored
    x = torch.randn(2, 11)
    ro, ci = w.row_offsets, w.col_indices
    for name, value, pattern in [
        ("col_indices", _with(ci, 4, 3), r"col_indices\[4\] = 3 is out of range"),
        ("col_indices", _with(ci, 0, -1), "col_indices"),
        ("row_offsets", torch.tensor([0, 5, 4, 9]), "row_offsets must be non-decreasing"),
        ("row_offsets", torch.tensor([1, 3, 6, 9]), r"row_offsets\[0\] must be 0"),
        ("row_offsets", torch.tensor([0, 3, 6, 8]), r"row_offsets\[-1\]"),
        ("row_offsets", torch.tensor([0, 3, 9]), "row_offsets must have 4 entries"),
        ("col_indices", ci.int(), "col_indices must be int64"),
        ("values", w.values[:-1], "values has 8 blocks"),
        ("values", w.values.flatten(1), "values must be"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            OPS.bsr_linear(**_op_args(w, x, **{name: value}))
    g = torch.randn(2, 13)
    t_args = (w.t_row_offsets, w.t_col_indices, w.t_block_ids)
    for i, value, pattern in [(1, _with(w.t_col_indices, 0, 3), "t_col_indices"),
                              (2, _with(w.t_block_ids, 0, 9), "t_block_ids"),
                              (2, _with(w.t_block_ids, 0, -1), "t_block_ids"),
                              (0, torch.tensor([0, 3, 2, 9]), "t_row_offsets")]:
        args = list(t_args)
        args[i] = value
        with pytest.raises(ValueError, match=pattern):
            OPS.bsr_linear_backward_input(g, w.values, *args, 11)
    with pytest.raises(ValueError, match="col_indices"):
        OPS.bsr_linear_backward_weight(g, x, ro, _with(ci, 8, 3), 5, 4)
    with pytest.raises(ValueError, match="row_offsets"):
        OPS.bsr_linear_backward_weight(g, x, torch.tensor([0, 5, 4, 9]), ci, 5, 4)


def test_corrupted_weight_never_reaches_a_kernel_loop():
    """A weight mutated in place after validation is still stopped (by the kernel's checks)."""
    w = random_bsr(13, 11, (5, 4), 1.0)
    w.col_indices[2] = 40
    with pytest.raises(ValueError, match="col_indices"):
        bsr_linear(torch.randn(2, 11), w)
    with pytest.raises(ValueError, match="col_indices"):
        w.validate()


def test_backward_weight_rejects_mismatched_batch():
    w = random_bsr(13, 11, (5, 4), 1.0)
    with pytest.raises((ValueError, RuntimeError)):
        OPS.bsr_linear_backward_weight(torch.randn(3, 13), torch.randn(2, 11), w.row_offsets,
                                       w.col_indices, 5, 4)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider tensor)."""
    return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]


@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_kernels_handle_non_contiguous_index(kind):
    """Index views passed straight to the ops: read through their strides (a raw-pointer walk
    would read garbage, or outside the storage of an expanded view), or rejected as such."""
    if kind == "strided":
        w = random_bsr(40, 30, (8, 4), 0.5)
        view = _strided
    else:  # one block column, all stored: col_indices is all zeros, so a stride-0 view equals it
        w = random_bsr(40, 4, (8, 4), 1.0)

        def view(t):
            return t[:1].expand(t.numel()) if bool((t == t[0]).all()) else _strided(t)

    x, g = torch.randn(3, w.shape[1]), torch.randn(3, w.shape[0])
    names = ("row_offsets", "col_indices", "t_row_offsets", "t_col_indices", "t_block_ids")
    index = {name: getattr(w, name) for name in names}
    views = {name: view(t) for name, t in index.items()}
    assert not any(t.is_contiguous() for t in views.values())
    calls = [
        lambda ix: OPS.bsr_linear(**_op_args(w, x, **ix)),
        lambda ix: OPS.bsr_linear_backward_input(g, w.values, ix["t_row_offsets"],
                                                 ix["t_col_indices"], ix["t_block_ids"],
                                                 w.shape[1]),
        lambda ix: OPS.bsr_linear_backward_weight(g, x, ix["row_offsets"], ix["col_indices"],
                                                  *w.block_size),
    ]
    for call in calls:
        expected = call(index)
        try:
            got = call(views)
        except ValueError as err:
            # Rejecting it is fine, but only as such: any other error means garbage was read.
            assert "contiguous" in str(err), str(err)
            continue
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    samples = []
    for n, k, b, block, density, has_bias, act in [
        (13, 7, 3, (8, 4), 0.5, True, 1), (13, 7, 3, (1, 16), 1.0, False, 0),
        (40, 37, 5, (16, 16), 0.5, True, 0), (64, 48, 1, (32, 32), 0.0, False, 1),
        (20, 11, 4, (3, 5), 0.5, False, 1), (13, 7, 0, (8, 4), 0.5, True, 1),
    ]:
        w = random_bsr(n, k, block, density)
        bias = torch.randn(n) if has_bias else None
        samples.append((w, torch.randn(b, k), bias, act))
    return samples


def test_opcheck_bsr_linear():
    for i, (w, x, bias, act) in enumerate(_opcheck_samples()):
        grad = i != 0  # one sample without autograd inputs, the rest check autograd too
        args = _op_args(w, x.clone().requires_grad_(grad),
                        values=w.values.clone().requires_grad_(grad),
                        bias=None if bias is None else bias.clone().requires_grad_(grad),
                        activation=act)
        torch.library.opcheck(OPS.bsr_linear.default, tuple(args.values()))


def test_opcheck_bsr_linear_backward_ops():
    for w, x, _, _ in _opcheck_samples():
        g = torch.randn(x.shape[0], w.shape[0])
        torch.library.opcheck(
            OPS.bsr_linear_backward_input.default,
            (g, w.values, w.t_row_offsets, w.t_col_indices, w.t_block_ids, w.shape[1]),
        )
        torch.library.opcheck(
            OPS.bsr_linear_backward_weight.default,
            (g, x, w.row_offsets, w.col_indices, *w.block_size),
        )


def test_weight_built_from_strided_index_views():
    w = random_bsr(40, 30, (8, 4), 0.5)
    ci = torch.stack([w.col_indices, w.col_indices.flip(0)], 1)[:, 0]
    ro = torch.stack([w.row_offsets, w.row_offsets], 1)[:, 1]
    w2 = BlockSparseWeight(w.values, ro, ci, w.shape)
    x = torch.randn(3, 30)
    assert torch.equal(bsr_linear(x, w2), bsr_linear(x, w))


# --------------------------------------------------------------------------- reliability
@pytest.mark.parametrize("wrt", ["values", "x"])
def test_double_backward_raises_instead_of_zero_gradients(wrt):
    from adsparse.ops import masked_linear

    torch.manual_seed(30)
    w = random_bsr(32, 32, (16, 16), 0.5)
    values = w.values.clone().requires_grad_()
    x = torch.randn(4, 32, requires_grad=True)
    y = bsr_linear(x, w.with_values(values), None, "relu")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="bsr_linear: double backward is not supported"):
        torch.autograd.grad(gx.sum(), values if wrt == "values" else x)
    weight = torch.randn(32, 32, requires_grad=True)
    y = masked_linear(x, weight, torch.ones(2, 2), block_size=(16, 16))
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="masked_linear: double backward is not supported"):
        torch.autograd.grad(gx.sum(), weight if wrt == "values" else x)
    # First-order gradients with create_graph=True (and without) still work.
    y = bsr_linear(x, w.with_values(values))
    (gv,) = torch.autograd.grad(y.sum(), values, create_graph=True)
    assert gv.abs().sum() > 0


def test_bad_backend_env_fails_at_first_use_not_at_import():
    import os
    import subprocess
    import sys

    code = ("import adsparse, torch\n"
            "layer = adsparse.SparseLinear(4, 4, block_size=2)\n"
            "try:\n    layer(torch.randn(2, 4))\n"
            "except ValueError as err:\n    print('refused:', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ADSPARSE_BACKEND": "bogus"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: ADSPARSE_BACKEND must be one of" in proc.stdout and "'bogus'" in proc.stdout
    assert "Traceback" not in proc.stderr

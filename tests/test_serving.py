"""Serving forms (int8, bf16) of block-sparse layers: kernels against float64 references on every
CPU path, saturation and edge cases, errors, and the module's life (state_dict, save/load,
deepcopy, compile, export, no training).

References: int8 is checked twice, (1) against the float64 product of the *dequantized* operands
(the quantization re-implemented here, independently of the kernel), to fp32 epilogue rounding,
and (2) against the float64 product of the *unquantized* operands, within the bound that
symmetric rounding guarantees (|dx| <= sx/2, |dw| <= sw/2 per element, the kind of bound
FBGEMM's documentation gives). bf16 is checked against the float64 product of the bf16-rounded
operands, bounded by PyTorch's own fp32 error on them (conftest's rule).
"""

from __future__ import annotations

import concurrent.futures
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import apply_activation, assert_f32_close, random_bsr
from torch import nn

import adsparse
from adsparse.nn import BlockSparseLinear
from adsparse.quantize import ServingBlockSparseLinear, quantize_
from adsparse.serving_ops import (
    SERVING_DTYPES,
    bsr_linear_serve,
    direct_call_ok,
    pack_int8,
    quantize_rows,
    serve_direct,
)

OPS = torch.ops.adsparse
EPS32 = torch.finfo(torch.float32).eps
INT8_PATHS = {"avx512": "avx512_vnni", "avx2": "avx2", "scalar": "scalar"}


@pytest.fixture(params=tuple(INT8_PATHS))
def int8_isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every int8 kernel path this CPU has (AVX-512 means AVX-512 VNNI here)."""
    monkeypatch.setenv("ADSPARSE_CPU_ISA", request.param)
    selected = OPS.selected_int8_isa()
    if selected != INT8_PATHS[request.param]:
        pytest.skip(f"ADSPARSE_CPU_ISA={request.param}: this CPU runs the {selected!r} int8 "
                    "kernel instead (no AVX-512 VNNI / AVX2)")
    return request.param


# --------------------------------------------------------------------------- references
def ref_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row quantization, re-implemented: round half to even of x * (127 / max|x|)."""
    amax = x.abs().amax(1) if x.shape[1] else torch.zeros(x.shape[0])
    finite = torch.isfinite(x).all(1)
    normal = amax >= torch.tensor(1e-30)  # smaller rows quantize to zero (scale 0)
    inv = torch.tensor(127.0) / torch.where(normal & finite, amax, torch.ones_like(amax))
    q = torch.round(x * inv[:, None]).clamp(-127, 127)
    q[~(normal & finite)] = 0
    scale = torch.where(normal, amax / 127, torch.zeros_like(amax))
    scale[~finite] = float("nan")
    return q.to(torch.int8), scale


def layer_pair(n: int, k: int, block, density: float, has_bias: bool, activation, form: str):
    w = random_bsr(n, k, block, density)
    bias = torch.randn(n) if has_bias else None
    layer = BlockSparseLinear(w, bias, activation)
    return layer, ServingBlockSparseLinear.from_block_sparse(layer, form)


def check_int8(layer: BlockSparseLinear, served: ServingBlockSparseLinear, x: torch.Tensor):
    y = served(x)
    q, sx = ref_quantize_rows(x)
    wq = served.dequantized(torch.float64).to_dense()
    bias = torch.zeros(layer.out_features) if layer.bias is None else layer.bias.detach()
    # (1) the dequantized computation in float64: only the fp32 epilogue rounds.
    dot = (q.double() * sx.double()[:, None]) @ wq.T
    ref = apply_activation(dot + bias.double(), layer.activation)
    bound = 4 * EPS32 * (dot.abs() + bias.double().abs()) + 1e-38
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN pattern differs"
    err = (y.double() - ref).abs()[finite]
    assert bool((err <= bound[finite]).all()), f"int8 vs dequantized: max err {err.max():.3e}"
    # (2) the unquantized computation: |x w - x' w'| <= |x||dw| + |dx||w'| per product.
    w = layer.weight().to_dense().double()
    sw = (served.scales.double() if served.scales is not None else torch.zeros(w.shape[0]))
    present = (layer.weight().to_dense() != 0).double()  # where the kernel multiplies
    xs = x.double()
    exact = apply_activation(xs @ w.T + bias.double(), layer.activation)
    qbound = (0.5 * (xs.abs() @ present.T) * sw[None]
              + 0.5 * sx.double()[:, None] * (wq.abs().sum(1))[None]) * (1 + 1e-6) + bound
    rows = torch.isfinite(sx)
    err = (y.double() - exact).abs()[rows]
    assert bool((err <= qbound[rows]).all()), (
        f"int8 vs float64: max err {err.max():.3e}, bound there "
        f"{qbound[rows].flatten()[err.flatten().argmax()]:.3e}"
    )


def check_bf16(layer: BlockSparseLinear, served: ServingBlockSparseLinear, x: torch.Tensor):
    y = served(x)
    xb = x.bfloat16().float()
    wb = layer.weight().with_values(layer.values.detach().bfloat16().float()).to_dense()
    bias = layer.bias.detach() if layer.bias is not None else None
    ref = apply_activation(F.linear(xb.double(), wb.double(),
                                    None if bias is None else bias.double()), layer.activation)
    base = apply_activation(F.linear(xb, wb, bias), layer.activation)
    assert_f32_close(y, ref, base, name="bf16 output")


# (N, K, B, block, density, bias, activation)
CASES = [
    (13, 7, 3, (8, 4), 0.5, True, "relu"),
    (13, 7, 1, (1, 16), 1.0, False, None),
    (100, 77, 5, (3, 5), 0.5, True, "relu"),
    (130, 100, 25, (17, 33), 0.5, True, None),
    (130, 100, 4, (2, 48), 0.5, False, "relu"),
    (64, 48, 1, (32, 32), 0.5, True, "relu"),
    (64, 48, 2, (16, 16), 0.0, True, None),
    (200, 150, 33, (16, 16), 0.3, True, "relu"),
    (40, 30, 16, (16, 16), 1.0, True, None),
]


@pytest.mark.parametrize(("n", "k", "b", "block", "density", "has_bias", "activation"), CASES)
def test_int8_every_path(int8_isa, one_thread, n, k, b, block, density, has_bias, activation):
    layer, served = layer_pair(n, k, block, density, has_bias, activation, "int8")
    check_int8(layer, served, torch.randn(b, k))


@pytest.mark.parametrize(("n", "k", "b", "block", "density", "has_bias", "activation"), CASES)
def test_bf16_every_path(cpu_isa, one_thread, n, k, b, block, density, has_bias, activation):
    layer, served = layer_pair(n, k, block, density, has_bias, activation, "bf16")
    check_bf16(layer, served, torch.randn(b, k))


@pytest.mark.parametrize("form", sorted(SERVING_DTYPES))
def test_large_layer_two_threads(form):
    layer, served = layer_pair(1000, 513, (16, 16), 0.1, True, "relu", form)
    x = torch.randn(70, 513)
    (check_int8 if form == "int8" else check_bf16)(layer, served, x)


def test_quantize_rows_matches_reference_exactly():
    x = torch.randn(50, 37) * torch.logspace(-36, 36, 50)[:, None]
    x[3] = 0
    x[4] = 1e-40  # subnormal only
    x[9] = 5e-37  # 127 / max would overflow fp32
    x[10] = 2e-30
    x[5, 2] = float("inf")
    x[6, 0] = float("nan")
    x[7] = 2.5  # all equal
    x[8, ::2] = 0.5  # ties: 0.5 * 127 / 0.5... exact
    q, s = quantize_rows(x)
    rq, rs = ref_quantize_rows(x)
    assert torch.equal(q, rq)
    assert torch.equal(torch.isnan(s), torch.isnan(rs))
    assert torch.equal(s[~torch.isnan(s)], rs[~torch.isnan(rs)])
    assert bool((q[7] == 127).all()) and bool((q[3] == 0).all()) and bool((q[4] == 0).all())


def test_round_half_to_even_matches():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5]])
    q, _ = quantize_rows(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 4]]


# --------------------------------------------------------------------------- saturation
def test_int8_saturation_cases(int8_isa, one_thread):
    """Extremes of both operands: activations at +-max and all equal (the VNNI kernel's shifted
    bytes hit 255), weights at +-127, large K; zero, subnormal, huge and non-finite rows."""
    n, k = 48, 4096
    w = random_bsr(n, k, (16, 16), 1.0)
    w = w.with_values(torch.where(w.values >= 0, 1.0, -1.0) * 3.0)  # every weight at +-127
    layer = BlockSparseLinear(w, torch.randn(n), None)
    served = ServingBlockSparseLinear.from_block_sparse(layer, "int8")
    x = torch.randn(9, k)
    x[0] = 7.0          # all equal, positive: shifted activations all 255
    x[1] = -7.0         # all equal, negative
    x[2] = 0.0          # zero row: the output is the bias
    x[3] = 1e-40        # subnormal row: quantized to zero
    x[4] *= 1e30        # huge activations
    x[5, 17] = float("inf")
    x[6, 3] = float("nan")
    x[7] = torch.where(torch.rand(k) < 0.5, 1.0, -1.0) * 1e-3
    y = served(x)
    assert torch.equal(y[2], layer.bias.detach()) and torch.equal(y[3], layer.bias.detach())
    assert bool(torch.isnan(y[5]).all()) and bool(torch.isnan(y[6]).all())
    exact = x[[0, 1]].double() @ w.to_dense().double().T + layer.bias.detach().double()
    assert torch.allclose(y[[0, 1]].double(), exact, rtol=4 * EPS32, atol=0)
    keep = [0, 1, 2, 3, 4, 7, 8]
    check_int8(layer, served, x[keep])


def test_bf16_nan_and_large_values(cpu_isa):
    layer, served = layer_pair(40, 30, (8, 4), 1.0, True, "relu", "bf16")
    x = torch.randn(5, 30)
    x[1, 4] = float("nan")
    x[2] *= 1e30
    y = served(x)
    assert bool(torch.isnan(y[1]).any())
    check_bf16(layer, served, x[[0, 2, 3, 4]])


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("entry", ["op", "direct"])
def test_bad_arguments_raise(entry):
    """The op and its lean entry (same kernel, same checks) refuse the same arguments alike."""
    layer, served = layer_pair(40, 30, (8, 4), 0.5, True, None, "int8")
    args = dict(x=torch.randn(3, 30), weight=served.weight, scales=served.scales,
                row_offsets=served.row_offsets, col_indices=served.col_indices, bias=served.bias,
                out_features=40, block_rows=8, block_cols=4, activation=0)

    def call(**over):
        if entry == "op":
            return OPS.bsr_linear_serve(**{**args, **over})
        return serve_direct(*{**args, **over}.values())  # the schema's order

    with pytest.raises(ValueError, match="needs scales"):
        call(scales=None)
    with pytest.raises(ValueError, match=r"scales must be \[40\]"):
        call(scales=torch.ones(39))
    with pytest.raises(ValueError, match="must have shape"):
        call(weight=served.weight[:, :, :8])
    with pytest.raises(ValueError, match="row_offsets must have"):
        call(block_rows=16)
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        call(weight=served.weight.to(torch.int16))
    with pytest.raises(ValueError, match="x must be float32"):
        call(x=torch.randn(3, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match="only for an int8 weight"):
        call(weight=layer.values.detach())
    with pytest.raises(ValueError, match="col_indices"):
        call(col_indices=served.col_indices + 100)
    with pytest.raises(ValueError, match="activation"):
        call(activation=2)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 31"):
        served(torch.randn(3, 31))
    big = random_bsr(16, 65600, (16, 16), 0.001)
    big_served = ServingBlockSparseLinear.from_block_sparse(BlockSparseLinear(big), "int8")
    with pytest.raises(ValueError, match="int32 sums could overflow"):
        big_served(torch.randn(1, 65600))
    with pytest.raises(ValueError, match=r"dtype must be one of \['bf16', 'int8'\]"):
        quantize_(nn.Sequential(layer), dtype="fp8")
    with pytest.raises(ValueError, match="float32 layers"):
        ServingBlockSparseLinear.from_block_sparse(copy.deepcopy(layer).double(), "int8")


def test_backward_and_optimizer_refused():
    layer, served = layer_pair(40, 30, (8, 4), 0.5, True, "relu", "int8")
    assert list(served.parameters()) == []
    x = torch.randn(3, 30, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        served(x).sum().backward()
    model = quantize_(nn.Sequential(copy.deepcopy(layer)), "bf16")
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(model.parameters(), lr=0.1)


# --------------------------------------------------------------------------- module life
def _model(form: str) -> tuple[nn.Module, nn.Module]:
    dense = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40), nn.Linear(40, 8))
    sparse = adsparse.sparsify_(copy.deepcopy(dense), density=0.5, block_size=(16, 8))
    return sparse, quantize_(copy.deepcopy(sparse), form)


@pytest.mark.parametrize("form", sorted(SERVING_DTYPES))
def test_quantize_model_state_dict_save_load_deepcopy(form):
    sparse, served = _model(form)
    assert all(isinstance(served[i], ServingBlockSparseLinear) for i in (0, 2, 3))
    x = torch.randn(7, 48)
    y = served(x)
    assert (y - sparse(x)).abs().max() < 0.05 * sparse(x).abs().max()
    # state_dict into a freshly quantized model of the same sparse structure
    other = quantize_(copy.deepcopy(sparse), form)
    other.load_state_dict(served.state_dict())
    assert torch.equal(other(x), y)
    buf = io.BytesIO()
    torch.save(served, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)
    assert torch.equal(copy.deepcopy(served)(x), y)
    # a checkpoint of another form or pattern does not load silently
    wrong = quantize_(copy.deepcopy(sparse), "bf16" if form == "int8" else "int8")
    with pytest.raises(RuntimeError, match="ServingBlockSparseLinear"):
        wrong.load_state_dict(served.state_dict())


def test_quantize_filter_and_shared_layers():
    shared = BlockSparseLinear(random_bsr(16, 16, (8, 8), 0.5))
    other = BlockSparseLinear(random_bsr(4, 16, (4, 4), 1.0))
    model = nn.Sequential(shared, nn.ReLU(), shared, other)
    quantize_(model, "int8", filter_fn=lambda m, fqn: fqn != "3")
    assert model[0] is model[2] and isinstance(model[0], ServingBlockSparseLinear)
    assert isinstance(model[3], BlockSparseLinear)
    assert isinstance(quantize_(shared, "bf16"), ServingBlockSparseLinear)


@pytest.mark.parametrize("form", sorted(SERVING_DTYPES))
def test_compile_and_export(form):
    _, served = _model(form)
    x = torch.randn(5, 48)
    with torch.no_grad():
        y = served(x)
        compiled = torch.compile(served, fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x), y)
    exported = torch.export.export(served, (x,))
    assert torch.equal(exported.module()(x), y)
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    buf.seek(0)
    assert torch.equal(torch.export.load(buf).module()(x), y)


# --------------------------------------------------------------------------- opcheck
def test_opcheck_serving_ops():
    for form, (n, k, b, block) in [("int8", (13, 7, 3, (8, 4))), ("bf16", (40, 37, 5, (16, 16))),
                                   ("int8", (20, 11, 0, (3, 5))), ("bf16", (20, 11, 1, (3, 5)))]:
        layer, served = layer_pair(n, k, block, 0.5, True, "relu", form)
        args = (torch.randn(b, k), served.weight, served.scales, served.row_offsets,
                served.col_indices, served.bias, n, *block, 1)
        torch.library.opcheck(OPS.bsr_linear_serve.default, args)
        fp32 = (args[0], layer.values.detach(), None, *args[3:])
        torch.library.opcheck(OPS.bsr_linear_serve.default, fp32)
    torch.library.opcheck(OPS.quantize_rows.default, (torch.randn(4, 9),))


# --------------------------------------------------------------------------- inference path
@pytest.mark.parametrize("b", [1, 3, 4, 17])
def test_block_sparse_linear_inference_path_matches_training_path(cpu_isa, b):
    layer = BlockSparseLinear(random_bsr(100, 77, (16, 16), 0.4), torch.randn(100), "relu")
    x = torch.randn(b, 77)
    y = layer(x)
    with torch.inference_mode():
        y_inf = layer(x)
        assert layer(x.view(1, b, 77)).shape == (1, b, 100)
    assert torch.equal(y_inf, y.detach())


def test_int8_packing_layout():
    """The packed layout the kernels read: [nnzb][ceil(bk/4)][bn16][4], zero padded."""
    w = random_bsr(5, 6, (5, 6), 1.0)
    packed, scales = pack_int8(w)
    assert packed.shape == (1, 2, 16, 4) and packed.dtype == torch.int8
    q = torch.round(w.values[0] / scales[:, None]).to(torch.int8)  # [5, 6]
    for n in range(16):
        for kk in range(8):
            want = int(q[n, kk]) if n < 5 and kk < 6 else 0
            assert int(packed[0, kk // 4, n, kk % 4]) == want
    assert math.isclose(float(scales.max()), float(w.values.abs().amax(2).max()) / 127,
                        rel_tol=1e-6)


@pytest.mark.parametrize("form", sorted(SERVING_DTYPES))
def test_serving_module_direct_call_matches_the_op_wrapper(form):
    """A 2-D input of the layer's width takes the direct op call; other inputs the wrapper."""
    _, served = layer_pair(40, 30, (8, 4), 0.5, True, "relu", form)
    x = torch.randn(6, 30)
    ref = bsr_linear_serve(x, served.weight, served.scales, served.row_offsets,
                           served.col_indices, (40, 30), (8, 4), served.bias, "relu")
    assert direct_call_ok(x, 30) and not direct_call_ok(x.view(2, 3, 30), 30)
    assert not direct_call_ok(x, 29)
    assert torch.equal(served(x), ref)
    assert torch.equal(served(x.view(2, 3, 30)), ref.view(2, 3, 40))
    xt = torch.randn(30, 6).t()  # not contiguous
    assert torch.equal(served(xt), served(xt.contiguous()))
    with pytest.raises(ValueError, match="30"):
        served(torch.randn(6, 31))


def test_direct_entry_argument_types_and_threads():
    """The lean entry takes exactly the op's ten positional arguments; it releases the GIL, so
    a pool of threads calling it gets the same results as one thread."""
    _, served = layer_pair(40, 30, (8, 4), 0.5, True, "relu", "int8")
    args = [torch.randn(5, 30), served.weight, served.scales, served.row_offsets,
            served.col_indices, served.bias, 40, 8, 4, 1]
    want = OPS.bsr_linear_serve(*args)
    assert torch.equal(serve_direct(*args), want)
    with pytest.raises(TypeError, match="takes 10 positional arguments"):
        serve_direct(*args[:9])
    with pytest.raises(TypeError, match="weight must be a Tensor, got list"):
        serve_direct(args[0], [1], *args[2:])
    with pytest.raises(TypeError, match="block_rows must be an int, got float"):
        serve_direct(*args[:7], 8.0, *args[8:])
    with pytest.raises(TypeError, match="scales must be a Tensor"):
        serve_direct(args[0], args[1], 1.0, *args[3:])
    with pytest.raises(OverflowError):
        serve_direct(*args[:6], 2**70, *args[7:])
    xs = [torch.randn(4, 30) for _ in range(8)]
    wants = [OPS.bsr_linear_serve(x, *args[1:]) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: [serve_direct(x, *args[1:]) for _ in range(20)], xs))
    assert all(torch.equal(g, w) for gs, w in zip(got, wants) for g in gs)


@pytest.mark.parametrize("form", [None, *sorted(SERVING_DTYPES)])
def test_modules_take_the_direct_entry_when_they_may(monkeypatch, form):
    """Eager calls without autograd go through the lean entry (once per call, bitwise equal to
    the op); an input that requires grad through the op, whose backward raises."""
    layer, served = layer_pair(40, 30, (8, 4), 0.5, True, "relu", form or "int8")
    module = layer if form is None else served
    calls = []

    def counting(*a):
        calls.append(a[1].dtype)
        return serve_direct(*a)

    monkeypatch.setattr(adsparse.serving_ops, "serve_direct", counting)
    x = torch.randn(2, 30)
    with torch.inference_mode():
        y = module(x)
    assert len(calls) == 1
    weight = module.values if form is None else module.weight
    assert torch.equal(y, bsr_linear_serve(x, weight.detach(), getattr(module, "scales", None),
                                           module.row_offsets, module.col_indices, (40, 30),
                                           (8, 4), module.bias, "relu"))
    if form is None:  # outside inference mode a BlockSparseLinear trains: bsr_linear
        module(x)
        assert len(calls) == 1
    else:
        module(x)
        assert len(calls) == 2
        module(x.requires_grad_())
        assert len(calls) == 2


def test_inference_path_under_compile_and_without_bias():
    layer = BlockSparseLinear(random_bsr(40, 30, (8, 4), 0.5), None, None)
    x = torch.randn(6, 30)
    y = layer(x).detach()
    with torch.inference_mode():
        assert torch.equal(layer(x), y)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x), y)
        with pytest.raises(ValueError, match="float32"):
            layer(x.double())
        with pytest.raises(ValueError, match=r"x.shape\[-1\] = 31"):
            layer(torch.randn(2, 31))


@pytest.mark.parametrize("b", [1, 2, 5, 15, 16, 17])
def test_bf16_small_batches_every_path(cpu_isa, b):
    """Partial panels of bf16 blocks run one-row tiles: every batch size around the panels."""
    layer, served = layer_pair(70, 50, (16, 16), 0.5, True, "relu", "bf16")
    check_bf16(layer, served, torch.randn(b, 50))


# --------------------------------------------------------------------------- bf16 dot product
@pytest.fixture
def bf16_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VDPBF16PS kernel (ADSPARSE_CPU_ISA=avx512_bf16): k-pairs of the blocks and of x."""
    monkeypatch.setenv("ADSPARSE_CPU_ISA", "avx512_bf16")
    selected = OPS.selected_cpu_isa()
    if selected != "avx512_bf16":
        pytest.skip(f"this CPU has no AVX512_BF16 (no vdpbf16ps): the kernels selected "
                    f"{selected!r} for ADSPARSE_CPU_ISA=avx512_bf16")


# (N, K, block): odd block depths (a k-pair never spans two block columns, the last pair of an
# odd depth has a zero high half), K tails of odd and even depth, blocks narrower and wider than
# a vector, bk = 1 (every step a half pair); with even bk and B >= 16, the vector pair packing
# of full panels with K below, at and past a multiple of its 32 columns.
DOT_SHAPES = [
    (30, 12, (8, 4)),
    (20, 64, (16, 16)),
    (36, 66, (12, 6)),
    (50, 37, (16, 7)),
    (33, 65, (5, 9)),
    (40, 31, (16, 16)),
    (70, 90, (32, 32)),
    (24, 5, (16, 1)),
    (130, 100, (17, 33)),
    (48, 64, (1, 2)),
    (20, 19, (24, 3)),
]


@pytest.mark.parametrize(("n", "k", "block"), DOT_SHAPES, ids=str)
@pytest.mark.parametrize("b", [1, 2, 7, 16, 17, 40])
@pytest.mark.parametrize(("has_bias", "activation"), [(True, "relu"), (False, None)])
def test_bf16_dot_kernel(bf16_dot, one_thread, n, k, block, b, has_bias, activation):
    layer, served = layer_pair(n, k, block, 0.6, has_bias, activation, "bf16")
    check_bf16(layer, served, torch.randn(b, k))


@pytest.mark.parametrize("b", [1, 64, 300])
def test_bf16_dot_kernel_two_threads_and_paths_agree(bf16_dot, monkeypatch, b):
    """A larger layer on two threads; the widening AVX-512 path gives the same result within
    fp32 summation-order error."""
    layer, served = layer_pair(512, 384, (16, 16), 0.1, True, "relu", "bf16")
    x = torch.randn(b, 384)
    check_bf16(layer, served, x)
    y = served(x)
    monkeypatch.setenv("ADSPARSE_CPU_ISA", "avx512")
    torch.testing.assert_close(y, served(x), rtol=1e-5, atol=1e-5)


def test_bf16_dot_kernel_nan_inf(bf16_dot):
    layer, served = layer_pair(40, 30, (8, 5), 1.0, True, "relu", "bf16")
    x = torch.randn(4, 30)
    x[1, 4] = float("nan")
    x[2, 7] = float("inf")
    y = served(x)
    assert bool(torch.isnan(y[1]).all())
    assert not bool(torch.isnan(y[[0, 3]]).any())
    check_bf16(layer, served, x[[0, 3]])

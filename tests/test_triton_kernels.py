"""The Triton kernels on CPU tensors through the Triton interpreter, against float64 references.

``TRITON_INTERPRET`` must be set before triton is imported and must not leak into the rest of the
test session, so every interpreter check runs in one subprocess: this file run as a script with
``TRITON_INTERPRET=1`` and ``ADSPARSE_BACKEND=triton``. That routes the public ops
(``adsparse.ops.bsr_linear`` / ``masked_linear``, autograd included) through ``adsparse_kernels``,
so most checks go through the whole stack; ``adsparse_kernels.CALLS`` proves the routing. The
script prints ``PASS name`` or ``FAIL name: why`` per check; the pytest tests assert on them.

Bounds (the flash-attention rule): a result's max error against float64 is at most 4x the error
of PyTorch's own computation of the reference in the same dtype, with a floor of two ulps of the
largest reference value. Shapes are small and odd (the interpreter runs each program in Python).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import traceback
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dtype_reference import assert_close_to_reference, compare_to_reference

CHECKS: dict[str, Callable[[], None]] = {}
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


# --------------------------------------------------------------------------- helpers
def _pattern(rows: int, cols: int) -> torch.Tensor:
    """Random block pattern with an empty block row and an empty block column."""
    mask = torch.rand(rows, cols) < 0.6
    if rows > 1 and cols > 1:
        mask[rows // 2] = False
        mask[:, cols // 2] = False
        mask[0, 0] = True
    return mask


def _bsr_weight(n: int, k: int, block: tuple[int, int]):
    from adsparse.layout import BlockSparseWeight

    bn, bk = block
    dense = torch.randn(n, k) / math.sqrt(k)
    return BlockSparseWeight.from_dense(dense, block, mask=_pattern(-(-n // bn), -(-k // bk)))


def _expand(mask: torch.Tensor, block: tuple[int, int], n: int, k: int) -> torch.Tensor:
    bn, bk = block
    return mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return torch.relu(y) if activation == "relu" else y


# --------------------------------------------------------------------------- bsr_linear
def _bsr_case(n: int, k: int, b: int, block: tuple[int, int], bias: bool, activation: str | None,
              dtype: torch.dtype = torch.float32) -> None:
    from adsparse.ops import bsr_linear

    w = _bsr_weight(n, k, block)

    def op(x, values, bias):
        return bsr_linear(x, w.with_values(values), bias, activation)

    def ref(x, values, bias):
        return _act(F.linear(x, w.with_values(values).to_dense(), bias), activation)

    inputs = {"x": torch.randn(b, k), "values": w.values, "bias": torch.randn(n) if bias else None}
    compare_to_reference(op, ref, inputs, ("x", "values", "bias"), dtype)


@check
def check_bsr_16x16():
    _bsr_case(37, 45, 5, (16, 16), True, "relu")


@check
def check_bsr_16x32_no_bias():
    _bsr_case(37, 45, 5, (16, 32), False, None)


@check
def check_bsr_32x16():
    _bsr_case(37, 45, 5, (32, 16), True, None)


@check
def check_bsr_24x20_not_pow2():
    _bsr_case(37, 45, 5, (24, 20), False, "relu")


@check
def check_bsr_8x4_small_block():
    _bsr_case(37, 45, 5, (8, 4), True, "relu")


@check
def check_bsr_1x16_small_block():
    _bsr_case(37, 45, 5, (1, 16), True, None)


@check
def check_bsr_1x1_element():
    _bsr_case(13, 7, 5, (1, 1), True, "relu")


@check
def check_bsr_fp16():
    _bsr_case(37, 45, 5, (16, 32), True, "relu", torch.float16)


@check
def check_bsr_bf16():
    _bsr_case(37, 45, 5, (16, 16), True, None, torch.bfloat16)


@check
def check_bsr_empty_and_corrupt_index():
    import adsparse_kernels as ak

    n, k, b = 37, 45, 5
    w = _bsr_weight(n, k, (16, 16))
    x, bias = torch.randn(b, k), torch.randn(n)
    # No stored block at all: the output is the bias, the weight gradient is empty.
    empty = torch.zeros(w.grid[0] + 1, dtype=torch.int64)
    none = torch.zeros(0, dtype=torch.int64)
    y = ak.bsr_linear(x, w.values[:0], empty, none, torch.zeros(w.grid[1] + 1, dtype=torch.int64),
                      none, none, bias, n, 0)
    assert torch.equal(y, bias.expand(b, n)), "nnzb=0 must give the bias"
    assert ak.bsr_linear_backward_weight(torch.randn(b, n), x, empty, none, 16, 16).shape == (
        0, 16, 16)
    assert ak.bsr_linear(x[:0], w.values, w.row_offsets, w.col_indices, w.t_row_offsets,
                         w.t_col_indices, w.t_block_ids, bias, n, 1).shape == (0, n)
    # A column index out of range: on CPU tensors the wrapper raises like the C++ kernel ...
    bad = w.col_indices.clone()
    bad[0] = 1 << 40
    args = (x, w.values, w.row_offsets, bad, w.t_row_offsets, w.t_col_indices, w.t_block_ids,
            None, n, 0)
    try:
        ak.bsr_linear(*args)
        raise AssertionError("a corrupt col_indices was not rejected")
    except ValueError as exc:
        assert "col_indices[0]" in str(exc), str(exc)
    # ... and on a GPU (no value check there) the kernel drops that block, reading nothing
    # outside x: run it with the CPU check switched off.
    module = sys.modules["adsparse_kernels.bsr_linear"]
    saved = module.check_index_values
    module.check_index_values = lambda *a, **k: None
    try:
        y = ak.bsr_linear(*args)
    finally:
        module.check_index_values = saved
    kept = w.values.clone()
    kept[0] = 0
    ref = (x.double() @ w.with_values(kept).to_dense().double().T)
    assert_close_to_reference(y, ref, (x @ w.with_values(kept).to_dense().T),
                              "corrupt index output")


@check
def check_views_are_read_through_strides():
    """Non-contiguous operands and index views give the same results as dense copies."""
    import adsparse_kernels as ak

    n, k, b = 37, 45, 5
    w = _bsr_weight(n, k, (16, 16))
    x = torch.randn(k, 2 * b).t()[::2]  # [b, k], strided both ways
    g = torch.randn(n, b).t()
    spread = {name: torch.stack([t, t], 1)[:, 0] for name, t in
              (("ro", w.row_offsets), ("ci", w.col_indices), ("tro", w.t_row_offsets),
               ("tci", w.t_col_indices), ("tb", w.t_block_ids))}
    assert not x.is_contiguous() and not spread["ci"].is_contiguous()
    pairs = [
        (ak.bsr_linear(x, w.values, spread["ro"], spread["ci"], spread["tro"], spread["tci"],
                       spread["tb"], None, n, 1),
         ak.bsr_linear(x.contiguous(), w.values, w.row_offsets, w.col_indices, w.t_row_offsets,
                       w.t_col_indices, w.t_block_ids, None, n, 1)),
        (ak.bsr_linear_backward_input(g, w.values, spread["tro"], spread["tci"], spread["tb"], k),
         ak.bsr_linear_backward_input(g.contiguous(), w.values, w.t_row_offsets,
                                      w.t_col_indices, w.t_block_ids, k)),
        (ak.bsr_linear_backward_weight(g, x, spread["ro"], spread["ci"], 16, 16),
         ak.bsr_linear_backward_weight(g.contiguous(), x.contiguous(), w.row_offsets,
                                       w.col_indices, 16, 16)),
    ]
    weight, mask = torch.randn(k, n).t(), torch.rand(k, n).t()
    pairs.append((ak.masked_linear(x, weight, mask, None, 1, 1, 0),
                  ak.masked_linear(x.contiguous(), weight.contiguous(), mask.contiguous(), None,
                                   1, 1, 0)))
    for i, (got, want) in enumerate(pairs):
        assert torch.equal(got, want), f"case {i}: a view was not read through its strides"


# --------------------------------------------------------------------------- masked_linear
def _masked_case(n: int, k: int, b: int, block: tuple[int, int] | None, soft: bool, bias: bool,
                 activation: str | None, dtype: torch.dtype = torch.float32) -> None:
    from adsparse.ops import masked_linear

    grid = (n, k) if block is None else (-(-n // block[0]), -(-k // block[1]))
    mask = torch.rand(grid) if soft else (torch.rand(grid) < 0.5).float()
    if grid[0] > 1 and grid[1] > 1:  # all-zero tiles exercise the skipping path
        mask[: grid[0] // 2 + 1] = 0
    mask[-1, -1] = 1

    def op(x, weight, mask, bias):
        return masked_linear(x, weight, mask, bias, activation, block)

    def ref(x, weight, mask, bias):
        m = mask if block is None else _expand(mask, block, n, k)
        return _act(F.linear(x, weight * m, bias), activation)

    inputs = {"x": torch.randn(b, k), "weight": torch.randn(n, k) / math.sqrt(k), "mask": mask,
              "bias": torch.randn(n) if bias else None}
    compare_to_reference(op, ref, inputs, ("x", "weight", "mask", "bias"), dtype)


@check
def check_masked_element_soft():
    _masked_case(13, 7, 5, None, True, True, "relu")


@check
def check_masked_element_01_larger():
    _masked_case(37, 45, 5, None, False, False, None)


@check
def check_masked_block_16x16_01():
    _masked_case(37, 45, 5, (16, 16), False, True, "relu")


@check
def check_masked_block_16x32_soft():
    _masked_case(37, 45, 5, (16, 32), True, False, None)


@check
def check_masked_block_8x4_soft():
    _masked_case(37, 45, 5, (8, 4), True, True, "relu")


@check
def check_masked_block_1x16_01():
    _masked_case(37, 45, 5, (1, 16), False, True, None)


@check
def check_masked_block_24x20_scratch():
    _masked_case(37, 45, 5, (24, 20), True, True, "relu")


@check
def check_masked_fp16():
    _masked_case(37, 45, 5, (16, 16), True, True, "relu", torch.float16)


@check
def check_masked_bf16():
    _masked_case(13, 7, 5, None, True, True, None, torch.bfloat16)


@check
def check_masked_params_flags():
    """need_weight / need_mask alone: the other output is empty [0], the asked one is right."""
    import adsparse_kernels as ak

    n, k, b, block = 37, 45, 5, (16, 16)
    grad, x, w = torch.randn(b, n), torch.randn(b, k), torch.randn(n, k)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    g64 = grad.double().T @ x.double()
    dw, dm = ak.masked_linear_backward_params(grad, x, w, mask, *block, True, False)
    assert dm.shape == (0,), f"dM not asked for, got shape {tuple(dm.shape)}"
    assert_close_to_reference(dw, g64 * _expand(mask.double(), block, n, k),
                              (grad.T @ x) * _expand(mask, block, n, k), "dW alone")
    dw, dm = ak.masked_linear_backward_params(grad, x, w, mask, *block, False, True)
    assert dw.shape == (0,), f"dW not asked for, got shape {tuple(dw.shape)}"
    padded = torch.zeros(48, 48, dtype=torch.float64)
    padded[:n, :k] = g64 * w.double()
    ref = padded.view(3, 16, 3, 16).sum((1, 3))
    base32 = torch.zeros(48, 48)
    base32[:n, :k] = (grad.T @ x) * w
    assert_close_to_reference(dm, ref, base32.view(3, 16, 3, 16).sum((1, 3)),
                              "dM alone (all-zero mask blocks too)")


@check
def check_relu_keeps_nan():
    """A NaN input gives NaN through the fused ReLU, as torch.relu does (both ops)."""
    from adsparse.ops import bsr_linear, masked_linear

    x = torch.randn(5, 45)
    x[2, 5] = float("nan")
    w = _bsr_weight(37, 45, (16, 16))  # block (0, 0) is stored: some outputs read x[:, 5]
    y = bsr_linear(x, w, None, "relu")
    reads_col0 = _expand(w.block_mask().float(), (16, 16), 37, 45)[:, 5] > 0
    assert bool(torch.isnan(y[2, reads_col0]).all()), "NaN lost by the bsr_linear ReLU"
    assert not bool(torch.isnan(y[[0, 1, 3, 4]]).any())
    y = masked_linear(x, torch.randn(37, 45), torch.ones(37, 45), None, "relu")
    assert bool(torch.isnan(y[2]).all()), "NaN lost by the masked_linear ReLU"


# --------------------------------------------------------------------------- the stack
# --------------------------------------------------------------------------- serving forms
def _serving_case(n: int, k: int, b: int, block: tuple[int, int], form: str,
                  activation: str | None) -> None:
    """A serving layer (adsparse.quantize_'s form) through the Triton kernel, against the
    float64 product of its dequantized operands (fp32 epilogue rounding only)."""
    import adsparse_kernels as ak
    from adsparse.nn import BlockSparseLinear
    from adsparse.quantize import ServingBlockSparseLinear

    w = _bsr_weight(n, k, block)
    bias = torch.randn(n)
    served = ServingBlockSparseLinear.from_block_sparse(BlockSparseLinear(w, bias, activation),
                                                        form)
    x = torch.randn(b, k)
    before = ak.CALLS["bsr_linear_serve"]
    y = served(x)
    assert ak.CALLS["bsr_linear_serve"] == before + 1, "the serving op did not run on Triton"
    if form == "int8":
        q, scale = ak.quantize_rows(x)
        xd = q.double() * scale.double()[:, None]
    else:
        xd = x.bfloat16().double()
    wd = served.dequantized(torch.float64).to_dense()
    dot = xd @ wd.T
    ref = _act(dot + bias.double(), activation)
    eps = torch.finfo(torch.float32).eps
    # int8 sums are exact (int32): only the epilogue rounds. bf16 sums in fp32: the worst-case
    # bound of a k-term fp32 sum, (k + 4) eps times the sum of the magnitudes.
    size = dot.abs() if form == "int8" else (k + 4) / 4 * (xd.abs() @ wd.abs().T)
    bound = 4 * eps * (size + bias.double().abs()) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"{form} {block}: max error {float(err.max()):.3e}"


@check
def check_serving_int8_16x16():
    _serving_case(37, 45, 5, (16, 16), "int8", "relu")


@check
def check_serving_int8_24x20_and_8x4():
    _serving_case(37, 45, 3, (24, 20), "int8", None)
    _serving_case(37, 45, 3, (8, 4), "int8", "relu")


@check
def check_serving_bf16_16x32_and_1x16():
    _serving_case(37, 45, 5, (16, 32), "bf16", "relu")
    _serving_case(37, 45, 2, (1, 16), "bf16", None)


@check
def check_serving_quantize_rows():
    import adsparse_kernels as ak

    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5], [0.0] * 7, [1e-31] * 7,
                      [1.0, float("inf"), 0, 0, 0, 0, 0]])
    q, scale = ak.quantize_rows(x)
    assert q.tolist()[:3] == [[127, 0, 2, 2, 0, -2, 4], [0] * 7, [0] * 7], q.tolist()
    assert scale[:3].tolist() == [1.0, 0.0, 0.0] and bool(torch.isnan(scale[3]))


@check
def check_dot_interaction():
    """The DLRM interaction (inference op) on Triton, pairs in any order, odd widths."""
    import adsparse_kernels as ak
    from adsparse.interaction import dot_interaction

    for b, d, rows in ((5, 13, [3, 9, 4]), (3, 16, [2] * 6), (2, 5, [4])):
        bottom = torch.randn(b, d)
        tables = [torch.randn(r, d) for r in rows]
        ids = torch.stack([torch.randint(0, r, (b,)) for r in rows], dim=1)
        n = len(rows) + 1
        i, j = torch.triu_indices(n, n, offset=1)
        pairs = torch.cat([(i * n + j)[torch.randperm(i.numel())], torch.tensor([0, n + 1])])
        before = ak.CALLS["dot_interaction"]
        out = dot_interaction(bottom, ids, tables, pairs)  # routed: ADSPARSE_BACKEND=triton
        assert ak.CALLS["dot_interaction"] == before + 1, "the op did not run on Triton"

        refs = []
        for dtype in (torch.float64, torch.float32):
            v = torch.stack([bottom.to(dtype)] + [t.to(dtype)[ids[:, f]]
                                                  for f, t in enumerate(tables)], dim=1)
            gram = (v @ v.transpose(1, 2)).flatten(1)
            refs.append(torch.cat([bottom.to(dtype), gram[:, pairs]], 1))
        assert_close_to_reference(out, refs[0], refs[1], f"dot_interaction {b}x{d}")
    bad = torch.zeros(2, 1, dtype=torch.long) + 4
    try:
        dot_interaction(torch.randn(2, 5), bad, [torch.randn(4, 5)], torch.tensor([1]))
    except (IndexError, RuntimeError, ValueError):
        pass
    else:
        raise AssertionError("an id past its table did not raise")


@check
def check_stack_routes_through_triton():
    """ADSPARSE_BACKEND=triton: the public ops and the modules run the Triton kernels."""
    import adsparse_kernels as ak
    from adsparse import BlockSparseLinear, SparseLinear, ops

    assert ops.backend() == "triton", f"backend is {ops.backend()!r}"
    before = dict(ak.CALLS)
    layer = SparseLinear(45, 37, block_size=(16, 16))
    x = torch.randn(5, 45, requires_grad=True)
    layer(x).sum().backward()
    serving = BlockSparseLinear.from_dense(layer)
    serving(x).sum().backward()
    assert x.grad is not None
    for name in ("masked_linear", "masked_linear_backward_input", "masked_linear_backward_params",
                 "bsr_linear", "bsr_linear_backward_input"):
        assert ak.CALLS[name] > before.get(name, 0), f"{name} did not run through Triton"
    ref = F.linear(x.detach().double(), layer.masked_weight().detach().double(),
                   layer.bias.detach().double())
    base = F.linear(x.detach(), layer.masked_weight().detach(), layer.bias.detach())
    assert_close_to_reference(serving(x).detach(), ref, base, "BlockSparseLinear output")


def _main() -> int:
    """Run every check (in this interpreter process) and print one line each."""
    failed = 0
    for name, fn in CHECKS.items():
        torch.manual_seed(zlib.crc32(name.encode()))
        try:
            fn()
            print(f"PASS {name}", flush=True)
        except Exception as exc:  # report every failure, keep going
            failed += 1
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            print(f"FAIL {name}: {detail.replace(chr(10), ' | ')}", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


# --------------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def interpreter_run() -> tuple[int, dict[str, str], str]:
    env = dict(os.environ, TRITON_INTERPRET="1", ADSPARSE_BACKEND="triton")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL"):
            name, _, why = rest.partition(": ")
            results[name] = why if status == "FAIL" else "PASS"
    return proc.returncode, results, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreter(interpreter_run, name: str) -> None:
    _, results, log = interpreter_run
    assert name in results, f"check {name} did not report; log tail:\n{log[-3000:]}"
    assert results[name] == "PASS", results[name]


def test_interpreter_process_ok(interpreter_run) -> None:
    rc, results, log = interpreter_run
    assert rc == 0 and len(results) == len(CHECKS), f"rc={rc}; log tail:\n{log[-3000:]}"


def test_interpreter_does_not_leak(interpreter_run) -> None:
    """The subprocess got the switch in its own environment; this process's is untouched."""
    assert os.environ.get("TRITON_INTERPRET") == _INTERPRET_AT_IMPORT


# One representative configuration per kernel and path, compiled to a cubin for an H100 (sm_90)
# by the Triton wheel's own ptxas: catches what the interpreter cannot (typing of the loops and
# branches, layouts, shared memory) on a machine without a GPU.
_COMPILE_CASES = [
    ("bsr_linear", "_bsr_linear_fwd_kernel", "bf16",
     dict(bn=64, bk=64, BN=64, BK=64, HAS_BIAS=True, ACT=1, USE_DOT=True, BLOCK_M=128)),
    ("bsr_linear", "_bsr_linear_fwd_kernel", "fp32",
     dict(bn=8, bk=4, BN=8, BK=4, HAS_BIAS=False, ACT=0, USE_DOT=False, BLOCK_M=32)),
    ("bsr_linear", "_bsr_linear_bwd_input_kernel", "fp16",
     dict(bn=16, bk=32, BN=16, BK=32, USE_DOT=True, BLOCK_M=64)),
    ("bsr_linear", "_bsr_linear_bwd_weight_kernel", "bf16",
     dict(bn=24, bk=20, BN=32, BK=32, USE_DOT=True, BLOCK_B=64)),
    ("masked_linear", "_masked_linear_fwd_kernel", "bf16",
     dict(bn=1, bk=1, HAS_BIAS=True, ACT=1, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)),
    ("masked_linear", "_masked_linear_bwd_input_kernel", "fp32",
     dict(bn=8, bk=4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PRECISION="tf32")),
    ("masked_linear", "_masked_linear_bwd_params_kernel", "bf16",
     dict(bn=16, bk=32, NEED_WEIGHT=True, NEED_MASK=True, REDUCE=1, BLOCK_N=64, BLOCK_K=64,
          BLOCK_B=32)),
    ("masked_linear", "_masked_linear_bwd_params_kernel", "fp32",
     dict(bn=1, bk=1, NEED_WEIGHT=True, NEED_MASK=False, REDUCE=0, BLOCK_N=64, BLOCK_K=64,
          BLOCK_B=32)),
    ("serving", "_serve_kernel", "fp32",
     dict(bn=16, bk=32, BN=16, BK=32, KIND=2, HAS_BIAS=True, ACT=1, USE_DOT=True, WIDEN=False,
          BLOCK_M=64, pointers={"x_ptr": "i8", "w_ptr": "i8"})),
    ("serving", "_serve_kernel", "fp32",
     dict(bn=16, bk=16, BN=16, BK=16, KIND=2, HAS_BIAS=False, ACT=0, USE_DOT=True, WIDEN=True,
          BLOCK_M=64, pointers={"x_ptr": "i8", "w_ptr": "i8"})),
    ("serving", "_serve_kernel", "fp32",
     dict(bn=32, bk=32, BN=32, BK=32, KIND=1, HAS_BIAS=False, ACT=0, USE_DOT=True, WIDEN=False,
          BLOCK_M=64, pointers={"w_ptr": "bf16"})),
    ("interaction", "_interaction_kernel", "fp32",
     dict(BLOCK_P=64, BLOCK_D=64, pointers={"pi_ptr": "i64", "pj_ptr": "i64"})),
]


@pytest.mark.slow
@pytest.mark.parametrize("module,kernel,dtype,consts", _COMPILE_CASES,
                         ids=[f"{c[1]}-{c[2]}"
                              + (f"-{c[3]['bn']}x{c[3]['bk']}" if "bn" in c[3] else "")
                              + (f"-kind{c[3]['KIND']}" if "KIND" in c[3] else "")
                              for c in _COMPILE_CASES])
def test_compiles_for_sm90(module: str, kernel: str, dtype: str, consts: dict) -> None:
    import importlib

    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this session runs Triton in interpreter mode")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = getattr(importlib.import_module(f"adsparse_kernels.{module}"), kernel)
    fn = jitted.fn if hasattr(jitted, "configs") else jitted  # an Autotuner wraps the kernel
    if "PRECISION" in fn.arg_names:
        consts = {"PRECISION": "ieee", **consts}
    pointers = consts.pop("pointers", {})  # pointer dtypes that differ from `dtype`
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        elif name.endswith("_ptr"):
            index = any(word in name for word in ("offsets", "indices", "block_ids"))
            signature[name] = "*i64" if index else f"*{dtype}"
        else:
            signature[name] = "i32"
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "num_stages": 3})
    except FileNotFoundError as exc:  # a Triton build without the NVIDIA toolchain
        pytest.skip(f"no ptxas: {exc}")
    assert compiled.asm.get("cubin"), "no cubin produced"
    assert compiled.metadata.shared <= 228 * 1024, "needs more shared memory than an H100 has"


def test_argument_errors() -> None:
    """Bad arguments raise ValueError naming the argument, before any launch (no interpreter)."""
    import adsparse_kernels as ak

    x, w, m = torch.randn(3, 7), torch.randn(5, 7), torch.ones(5, 7)
    with pytest.raises(ValueError, match="mask"):
        ak.masked_linear(x, w, torch.ones(5, 6), None, 1, 1, 0)
    with pytest.raises(ValueError, match="weight"):
        ak.masked_linear(x, w.double(), m, None, 1, 1, 0)
    with pytest.raises(ValueError, match="activation"):
        ak.masked_linear(x, w, m, None, 1, 1, 2)
    idx = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="row_offsets"):
        ak.bsr_linear(x, torch.randn(1, 16, 16), idx[:1], idx[:1], idx, idx[:1], idx[:1], None,
                      5, 0)
    with pytest.raises(ValueError, match="values"):
        ak.bsr_linear(x, torch.randn(1, 16), idx, idx[:1], idx, idx[:1], idx[:1], None, 5, 0)


if __name__ == "__main__":
    sys.exit(_main())

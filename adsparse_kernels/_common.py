"""Shared helpers of the Triton kernels: argument checks, dtypes, precision and tuning configs."""

from __future__ import annotations

import collections
import contextlib
import os

import torch
import triton
import triton.language as tl

# The interpreter runs every autotuning candidate in Python; one config keeps CPU tests fast.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# ADSPARSE_TRITON_AUTOTUNE=0 runs one fixed config per kernel and shape class: far fewer compiles
# (the CUDA tests use it); the benchmark and normal use tune.
AUTOTUNE = not INTERPRET and os.environ.get("ADSPARSE_TRITON_AUTOTUNE", "1") != "0"

# The interpreter's tl.dot mis-handles bfloat16 operands (it returned values off by 1e10 with
# triton 3.9), so under the interpreter operands are widened to fp32 first. Products of two
# 16-bit floats are exact in fp32, so this is the same arithmetic as the GPU's fp32-accumulating
# tensor-core dot, up to summation order.
_WIDEN_DOT = tl.constexpr(INTERPRET)

# How many times each public kernel ran in this process. Tests read it to prove that the public
# ops were routed through Triton (ADSPARSE_BACKEND=triton); it costs one dict update per call.
CALLS: collections.Counter[str] = collections.Counter()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_pow2(n: int) -> int:
    """``tl.arange`` needs power-of-two extents: tiles are padded up and masked."""
    return int(triton.next_power_of_2(max(int(n), 1)))


# The kernels are jitted with do_not_specialize=["B"]: the batch only bounds masks and loops,
# and specialising on its divisibility by 16 would compile again for ragged batch sizes.


def bucket(n: int) -> int:
    """Power-of-two bucket of a batch size, used as an autotune key.

    Keying on the exact batch would re-tune for every odd last mini-batch of a stream.
    """
    return next_pow2(n)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use tf32 (the new ``fp32_precision`` or ``allow_tf32``)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the legacy flag after a mix of both APIs
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: tf32 only for fp32 and only when torch allows it."""
    if dtype == torch.float32 and not INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def check_epilogue(bias: torch.Tensor | None, n: int, activation: int, x: torch.Tensor) -> None:
    """The fused epilogue's arguments: a bias of ``[n]`` like ``x``, activation 0 or 1."""
    if bias is not None:
        check_float(bias, "bias", x)
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if activation not in (0, 1):
        raise ValueError(f"activation must be 0 (none) or 1 (relu), got {activation}")


def check_float(t: torch.Tensor, name: str, like: torch.Tensor | None = None,
                like_name: str = "x") -> None:
    """Raise ``ValueError`` naming ``name`` unless it is a float tensor matching ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}")


def check_index(t: torch.Tensor, name: str, like: torch.Tensor, numel: int | None = None) -> None:
    """Raise ``ValueError`` unless ``t`` is a 1-D int64 tensor on ``like``'s device."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        what = f"{t.dtype} {t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be int64 and 1-D, got {what}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the operands are on {like.device}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} entries, got {t.numel()}")


def check_index_values(offsets: torch.Tensor | None, indices: torch.Tensor, num_rows: int,
                       bound: int, offsets_name: str, indices_name: str) -> None:
    """Value checks of a compressed index (the C++ kernels' messages), on CPU tensors only.

    On a GPU they would synchronise the device on every call; there the kernels mask every
    load by the index bounds instead, so a corrupt index gives wrong numbers, never a stray
    read. ``offsets=None`` checks only that ``indices`` lie in ``[0, bound)``.
    """
    if indices.device.type != "cpu":
        return
    if offsets is not None:
        if int(offsets[0]) != 0:
            raise ValueError(f"{offsets_name}[0] must be 0, got {int(offsets[0])}")
        falls = (offsets.diff() < 0).nonzero()
        if falls.numel():
            raise ValueError(f"{offsets_name} must be non-decreasing (row {int(falls[0])})")
        if int(offsets[num_rows]) != indices.numel():
            raise ValueError(f"{offsets_name}[-1] must equal the number of blocks "
                             f"{indices.numel()}, got {int(offsets[num_rows])}")
    bad = ((indices < 0) | (indices >= bound)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{indices_name}[{i}] = {int(indices[i])} is out of range [0, {bound})")


def configs(tuned: list[triton.Config], fixed: list[triton.Config],
            interpret: list[triton.Config]) -> list[triton.Config]:
    """The search space: ``tuned`` normally, ``fixed`` with autotuning off, ``interpret`` under
    ``TRITON_INTERPRET=1`` (where every candidate would run in Python)."""
    if INTERPRET:
        return interpret
    return tuned if AUTOTUNE else fixed


def first_only(cfgs: list[triton.Config]) -> list[triton.Config]:
    """End of a pruning function: without autotuning, the first surviving config runs (with one
    survivor the autotuner launches it without benchmarking)."""
    return cfgs if AUTOTUNE else cfgs[:1]


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (``tl.dot``; see ``_WIDEN_DOT``)."""
    if _WIDEN_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)

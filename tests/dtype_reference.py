"""Shared by the Triton and CUDA tests: an op in some dtype against a float64 reference.

Bound (the flash-attention rule): the op's max error against float64 is at most ``factor`` times
the error of PyTorch's own computation of the reference in the same dtype, with a floor of two
ulps of the largest reference value. The NaN check lives here too, so no test can pass on NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_close_to_reference(actual: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor,
                              name: str, factor: float = 4.0) -> None:
    """``actual`` is within ``factor`` x torch's same-dtype error (``base``) of ``ref64``."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}")
    assert actual.dtype == base.dtype, f"{name}: dtype {actual.dtype}, expected {base.dtype}"
    assert bool(torch.isfinite(actual).all()) or not bool(torch.isfinite(ref64).all()), (
        f"{name}: non-finite values")
    if ref64.numel() == 0:
        return
    err = float((actual.double() - ref64).abs().max())
    base_err = float((base.double() - ref64).abs().max())
    floor = 2 * torch.finfo(actual.dtype).eps * float(ref64.abs().max())
    bound = max(factor * base_err, floor)
    assert err <= bound, (f"{name}: max error {err:.3e} > bound {bound:.3e} "
                          f"(torch {actual.dtype} error {base_err:.3e})")


def run_with_grads(fn: Callable, inputs: dict, wrt: tuple[str, ...], grad_out: torch.Tensor,
                   dtype: torch.dtype):
    """``fn(**inputs)`` on fresh leaves cast to ``dtype``; output and grads of ``wrt``."""
    leaves = {}
    for key, t in inputs.items():
        if t is None or not t.is_floating_point():
            leaves[key] = t
        else:
            leaves[key] = t.detach().to(dtype).requires_grad_(key in wrt)
    out = fn(**leaves)
    out.backward(grad_out.to(dtype))
    return out.detach(), {key: leaves[key].grad for key in wrt}


def compare_to_reference(op_fn: Callable, ref_fn: Callable, inputs: dict, wrt: tuple[str, ...],
                         dtype: torch.dtype = torch.float32) -> None:
    """Op in ``dtype`` vs reference in float64, bounded by the reference run in ``dtype``."""
    wrt = tuple(k for k in wrt if inputs.get(k) is not None)
    with torch.no_grad():
        out64 = ref_fn(**{k: (v.double() if v is not None and v.is_floating_point() else v)
                          for k, v in inputs.items()})
    device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
    grad_out = torch.randn(out64.shape, dtype=torch.float64, device=device)
    out, grads = run_with_grads(op_fn, inputs, wrt, grad_out, dtype)
    ref, ref_grads = run_with_grads(ref_fn, inputs, wrt, grad_out, torch.float64)
    base, base_grads = run_with_grads(ref_fn, inputs, wrt, grad_out, dtype)
    assert_close_to_reference(out, ref, base, "output")
    for key in wrt:
        assert_close_to_reference(grads[key], ref_grads[key], base_grads[key], f"grad of {key}")

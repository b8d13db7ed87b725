"""The argument checks every layer of adsparse shares: one normalizer for ``block_size``, one
check for ``density``.

This module imports nothing from adsparse, so ``layout``, ``ops``, ``nn``, ``pruning``,
``online`` and the CLI can all use it. Both functions raise ``ValueError`` (never ``TypeError``
from deeper down, e.g. the C++ kernels) with a message that names the argument.

* :func:`check_block_size`: ``16``, ``(16, 8)``, ``[16, 8]``, ``"16"``, ``"16x8"`` or ``"16,8"``
  become ``(16, 8)``-style tuples of two Python ints in ``[1, MAX_BLOCK_DIM]``. Booleans,
  non-integral numbers and absurd sizes (``2**63``) are refused.
* :func:`check_density`: a real number in ``(0, 1]`` (the kept share of weights; 0 would keep
  nothing), returned as a Python float. Booleans and NaN are refused.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["MAX_BLOCK_DIM", "check_block_size", "check_density"]

#: Largest block side accepted: far above any useful block (the kernels tile 8..64), far below
#: what would overflow the int64 index arithmetic of the kernels (``bn * bk`` and grid sizes).
MAX_BLOCK_DIM = 1 << 20


def _side(value: Any, original: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be positive integers, got {original!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be positive integers (e.g. 16 or 16x16), got "
                             f"{original!r}") from None
    try:
        side = operator.index(value)  # ints, numpy/torch integers; not floats
    except TypeError:
        raise ValueError(f"{name} must be positive integers, got {original!r}") from None
    if not 1 <= side <= MAX_BLOCK_DIM:
        raise ValueError(f"{name} must be integers in [1, {MAX_BLOCK_DIM}], got {original!r}")
    return int(side)


def check_block_size(value: Any, name: str = "block_size") -> tuple[int, int]:
    """``(bn, bk)`` from an int (square block), a pair, or text ``"16"``/``"16x8"``/``"16,8"``.

    Raises ``ValueError`` for anything else: not two sides, a side that is not a positive
    integer, or a side above :data:`MAX_BLOCK_DIM`.
    """
    parts: Any = value
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
    elif isinstance(value, bool):
        raise ValueError(f"{name} must be positive integers, got {value!r}")
    elif not isinstance(value, (list, tuple)):
        try:
            side = operator.index(value)
        except TypeError:
            # e.g. a 2-element tensor or array: take its items
            try:
                parts = list(value)
            except TypeError:
                raise ValueError(f"{name} must be an int or two ints, got {value!r}") from None
        else:
            parts = (side, side)
    if len(parts) == 1:
        parts = (parts[0], parts[0])
    if len(parts) != 2:
        raise ValueError(f"{name} must be one int or two ints (rows, cols), got {value!r}")
    return _side(parts[0], value, name), _side(parts[1], value, name)


def check_density(value: Any, name: str = "density") -> float:
    """``value`` as a float in ``(0, 1]``; ``ValueError`` otherwise (0, NaN, bools, text)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    out = float(value)
    if not (math.isfinite(out) and 0.0 < out <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return out

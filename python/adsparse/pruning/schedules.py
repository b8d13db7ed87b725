"""Schedules over the steps of a transition: density (GMP) and temperature (learned)."""

from __future__ import annotations

import math

__all__ = ["cubic_density", "geometric_anneal"]


def cubic_density(step: int, total_steps: int, final_density: float,
                  initial_density: float = 1.0) -> float:
    """Zhu & Gupta's (2017) cubic schedule, written for density instead of sparsity.

    ``d(t) = d_f + (d_i - d_f) * (1 - t/T)^3`` for ``t`` in ``[0, T]``: pruning is fast at the
    start, while many redundant weights remain, and slows down as the target nears;
    ``d(T) = d_f`` exactly. ``total_steps == 0`` means one shot (``d_f``).
    """
    if total_steps < 0 or not 0 <= step <= max(total_steps, 0):
        raise ValueError(f"step {step} must lie in [0, {total_steps}]")
    if total_steps == 0:
        return final_density
    return final_density + (initial_density - final_density) * (1 - step / total_steps) ** 3


def geometric_anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at the last step (``total_steps - 1``), geometrically.

    A temperature spends as many steps between 0.5 and 0.25 as between 0.1 and 0.05: a linear
    schedule would rush through the small temperatures where the masks become hard.
    """
    if start <= 0 or end <= 0:
        raise ValueError(f"temperatures must be positive, got start={start}, end={end}")
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return math.exp(math.log(start) + frac * (math.log(end) - math.log(start)))

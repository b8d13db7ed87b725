"""The density schedule of the gradual methods (``gmp``, ``learned``; docs/pruning.md)."""

from __future__ import annotations

__all__ = ["cubic_density"]


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

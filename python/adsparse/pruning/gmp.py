"""Gradual magnitude pruning (Zhu & Gupta, 2017), the ``gmp`` method, for comparison.

Over ``steps`` training steps the density follows the cubic schedule from 1 to the target;
every ``update_every`` steps (and at the last step) each layer keeps its best groups at the
scheduled density (the same in every layer, as in the paper), and training continues through the
hard mask. Masks are nested: a group pruned once is never revived. Zhu & Gupta zero the pruned
weights to get that; here the weights are left as they are (the masked kernel gives them no
gradient) and dead groups are simply not eligible any more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from adsparse.pruning.allocation import select_uniform
from adsparse.pruning.schedules import cubic_density
from adsparse.pruning.scorers import TaylorScorer
from adsparse.pruning.targets import Target, TransitionSession, check_loss

__all__ = ["run_gmp"]


def run_gmp(session: TransitionSession, scores_fn: Callable[[Target], torch.Tensor],
            density: float, min_weights: list[float], steps: int, update_every: int,
            batches: Iterator[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
            optimizer: torch.optim.Optimizer, taylor: TaylorScorer | None,
            history: list[dict[str, float]]) -> list[torch.Tensor]:
    """Train ``steps`` steps while pruning on the cubic schedule; returns the final keep-masks."""
    if update_every < 1:
        raise ValueError(f"gmp update_every must be >= 1, got {update_every}")
    targets, proxies = session.targets, session.proxies
    sizes = [t.sizes for t in targets]
    masks = [torch.ones(t.grid, dtype=torch.bool, device=t.weight.device) for t in targets]
    total = sum(t.num_weights for t in targets)
    if steps == 0:  # no training: one shot at the target
        return select_uniform([scores_fn(t) for t in targets], sizes, density, min_weights)
    for step in range(1, steps + 1):
        scheduled = cubic_density(step, steps, density)
        if step % update_every == 0 or step == steps:
            masks = select_uniform([scores_fn(t) for t in targets], sizes, scheduled, min_weights,
                                   eligible=masks)
        for proxy, m in zip(proxies, masks):
            proxy.mask = m.to(proxy.weight.dtype).requires_grad_(taylor is not None)
        loss = check_loss(loss_fn(session.model, next(batches)), step - 1, "gmp transition")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if taylor is not None:
            for t, proxy in zip(targets, proxies):
                taylor.update(t.fqn, proxy.mask.grad)
        kept = sum(float((s.to(m.device) * m).sum()) for s, m in zip(sizes, masks))
        history.append({"step": step - 1, "loss": float(loss.detach()),
                        "scheduled_density": scheduled, "density": kept / total})
    return masks

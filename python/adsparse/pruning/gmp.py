"""Gradual magnitude pruning (Zhu & Gupta, 2017), the ``gmp`` method, for comparison.

Over ``steps`` training steps the density follows the cubic schedule from 1 to the target;
every ``gmp_update_every`` steps (and at the last step) each layer keeps its best groups at the
scheduled density (the same in every layer, as in the paper), and training continues through the
hard mask. Masks are nested: a group pruned once is never revived. Zhu & Gupta zero the pruned
weights to get that; here the weights are left as they are (the masked kernel gives them no
gradient) and dead groups are simply not eligible any more. See docs/pruning.md.
"""

from __future__ import annotations

import torch

from adsparse.pruning.allocation import select_allocation, select_uniform
from adsparse.pruning.schedules import cubic_density
from adsparse.pruning.targets import Context, check_loss

__all__ = ["run_gmp", "train_step"]


def train_step(ctx: Context, masks: list[torch.Tensor], step: int, phase: str) -> float:
    """One optimizer step of the target layers through hard ``masks``; feeds the Taylor scorer.

    Returns the task loss. Shared by the methods that train through hard masks.
    """
    taylor = ctx.taylor
    for proxy, m in zip(ctx.session.proxies, masks):
        proxy.mask = m.to(proxy.weight.dtype).requires_grad_(taylor is not None)
    loss = check_loss(ctx.loss_fn(ctx.session.model, next(ctx.batches)), step, phase)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    if taylor is not None:
        for t, proxy in zip(ctx.targets, ctx.session.proxies):
            taylor.update(t.fqn, proxy.mask.grad)
    for proxy in ctx.session.proxies:
        proxy.mask = proxy.mask.detach()
    return float(loss.detach())


def run_gmp(ctx: Context) -> list[torch.Tensor]:
    """Train ``ctx.steps`` steps while pruning on the cubic schedule; the final keep-masks."""
    update_every = ctx.pruner.gmp_update_every
    if update_every < 1:
        raise ValueError(f"gmp update_every must be >= 1, got {update_every}")
    targets = ctx.targets
    sizes = ctx.sizes
    masks = [torch.ones(t.grid, dtype=torch.bool, device=t.weight.device) for t in targets]
    total = sum(t.num_weights for t in targets)
    if ctx.steps == 0:  # no training: one shot at the target
        return select_uniform([ctx.scores(t) for t in targets], sizes, ctx.density,
                              ctx.min_weights)
    for step in range(1, ctx.steps + 1):
        scheduled = cubic_density(step, ctx.steps, ctx.density)
        if step % update_every == 0 or step == ctx.steps:
            want = [scheduled * t.num_weights for t in targets]
            if step == ctx.steps:  # the exact budget (rounding carried over layers)
                want = [ctx.density * t.num_weights for t in targets]
            masks = select_allocation([ctx.scores(t) for t in targets], sizes, want,
                                      ctx.min_weights, eligible=masks)
        loss = train_step(ctx, masks, step - 1, "gmp transition")
        kept = sum(float((s.to(m.device) * m).sum()) for s, m in zip(sizes, masks))
        ctx.history.append({"step": step - 1, "loss": loss, "scheduled_density": scheduled,
                            "density": kept / total})
    return masks

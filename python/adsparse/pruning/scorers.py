"""Group importance scores within a layer (docs/pruning.md): magnitude and Taylor.

Scores are per group, in the shape of the layer's mask grid (``[N, K]`` for elements, the block
grid for blocks); larger means more important.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from adsparse.layout import block_norms, block_weight_counts
from adsparse.pruning.targets import TransitionSession, check_loss

__all__ = ["SCORERS", "TaylorScorer", "group_sums", "magnitude_scores"]

SCORERS = ("magnitude", "taylor")


def magnitude_scores(weight: torch.Tensor, block_size: tuple[int, int] | None,
                     sizes: torch.Tensor | None = None) -> torch.Tensor:
    """``||W_g||_2 / sqrt(|g|)``: the RMS of each group (``|w|`` for elements), float32.

    Dividing by ``sqrt(|g|)`` makes a tail block (fewer real weights) comparable with a full one.
    ``sizes`` (real weights per group) is taken from the block geometry when not given.
    """
    w = weight.detach()
    if block_size is None:
        return w.abs().float()
    norms = block_norms(w, block_size)
    if sizes is None:
        sizes = block_weight_counts(tuple(w.shape), block_size)
    return norms / sizes.to(norms.device, torch.float32).sqrt()


def group_sums(x: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """Sum of ``x`` over each group: ``x`` itself for elements, per ``(bn, bk)`` block (tail
    blocks sum their real entries)."""
    if block_size is None:
        return x
    bn, bk = block_size
    n, k = x.shape
    rows, cols = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(x, (0, cols * bk - k, 0, rows * bn - n))
    return padded.reshape(rows, bn, cols, bk).sum(dim=(1, 3))


class TaylorScorer:
    """First-order Taylor importance ``|sum_g W * dL/dW|``, averaged over steps with an EMA.

    ``sum_g W * dL/dW_eff`` is exactly the gradient of the loss with respect to the group's
    mask entry (the masked kernel's ``dM``), so callers feed ``mask.grad`` to :meth:`update`.
    The absolute value is taken per step, before averaging, so that groups whose effect changes
    sign from batch to batch still count as important.
    """

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"taylor beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.ema: dict[str, torch.Tensor] = {}

    def update(self, fqn: str, mask_grad: torch.Tensor) -> None:
        """Fold one step's ``dL/dM`` of layer ``fqn`` into its average."""
        value = mask_grad.detach().abs().float()
        old = self.ema.get(fqn)
        # The first value initialises the average directly: no bias towards zero to correct.
        if old is not None:
            value = old.mul(self.beta).add_(value, alpha=1 - self.beta)
        self.ema[fqn] = value

    def observe(self, fqn: str, weight: torch.Tensor, grad: torch.Tensor,
                block_size: tuple[int, int] | None) -> None:
        """Fold ``sum_g W * dL/dW`` of a dense step (the ``dL/dM`` of an all-ones mask) in."""
        self.update(fqn, group_sums(weight.detach().float() * grad.detach().float(), block_size))

    def scores(self, fqn: str) -> torch.Tensor:
        if fqn not in self.ema:
            raise RuntimeError(f"no Taylor statistics for layer {fqn!r} yet")
        return self.ema[fqn]

    def calibrate(self, session: TransitionSession, batches: Iterator[Any],
                  loss_fn: Callable[[Any, Any], torch.Tensor], steps: int) -> None:
        """Average ``dL/dM`` over ``steps`` batches with all-ones masks; no weight changes."""
        if steps < 1:
            raise ValueError("the taylor scorer needs steps >= 1 batches to average gradients")
        for step in range(steps):
            masks = []
            for proxy in session.proxies:
                proxy.mask = torch.ones_like(proxy.mask, requires_grad=True)
                masks.append(proxy.mask)
            loss = check_loss(loss_fn(session.model, next(batches)), step, "taylor calibration")
            loss.backward()
            for t, m in zip(session.targets, masks):
                self.update(t.fqn, m.grad)
            for p in session.trainable():
                p.grad = None

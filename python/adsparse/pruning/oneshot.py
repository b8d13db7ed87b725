"""The one-shot baselines: ``uniform``, ``global`` and ``lamp`` (no training; docs/pruning.md).

Each reads the scorer's group importance once (the weights, or ``calibration_steps`` batches of
gradients with the ``taylor`` scorer) and cuts:

* ``uniform``: the same density in every layer (the hand-set allocation of most deployments);
* ``global``: one threshold on the raw scores over all layers;
* ``lamp``: one threshold on LAMP scores (Lee et al., 2021), which rescale each layer's scores
  so that every layer keeps its best group.
"""

from __future__ import annotations

import torch

from adsparse.pruning.allocation import lamp_scores, select_global, select_uniform
from adsparse.pruning.targets import Context

__all__ = ["run_global", "run_lamp", "run_uniform"]


def run_uniform(ctx: Context) -> list[torch.Tensor]:
    return select_uniform([ctx.scores(t) for t in ctx.targets], ctx.sizes, ctx.density,
                          ctx.min_weights)


def run_global(ctx: Context) -> list[torch.Tensor]:
    return select_global([ctx.scores(t) for t in ctx.targets], ctx.sizes, ctx.budget,
                         ctx.min_weights)


def run_lamp(ctx: Context) -> list[torch.Tensor]:
    return select_global([lamp_scores(ctx.scores(t)) for t in ctx.targets], ctx.sizes,
                         ctx.budget, ctx.min_weights)

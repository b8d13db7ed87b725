"""The one registry of pruning methods: name -> runner (docs/pruning.md).

Every runner has one signature, ``run(ctx: Context) -> list[bool mask]`` (the masks of
``ctx.targets``, in order, meeting ``ctx.budget`` to within one group). ``Pruner``, the CLI's
``--pruner`` choices and the docs all read :data:`METHODS`. A new method is one file with its
runner plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from adsparse.pruning.gmp import run_gmp
from adsparse.pruning.learned import run_learned
from adsparse.pruning.oneshot import run_global, run_lamp, run_uniform
from adsparse.pruning.targets import Context

__all__ = ["METHODS", "Method"]


class Method(NamedTuple):
    """A pruning method: its runner, whether it trains (needs ``batches``/``loss_fn`` and
    runs a transition of ``steps`` steps), and a one-line description."""

    run: Callable[[Context], list[torch.Tensor]]
    trains: bool
    summary: str


METHODS: dict[str, Method] = {
    "uniform": Method(run_uniform, False, "the same density in every layer, one shot"),
    "global": Method(run_global, False, "one threshold on the scores of all layers, one shot"),
    "lamp": Method(run_lamp, False, "one threshold on LAMP-rescaled scores, one shot"),
    "gmp": Method(run_gmp, True, "gradual magnitude pruning, the same density in every layer"),
    "learned": Method(run_learned, True, "per-layer densities that minimize the measured loss "
                      "(sensitivity profiles + knapsack), gradual"),
}

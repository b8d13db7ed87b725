"""Pruning that learns each layer's sparsity (the algorithm and its knobs: docs/pruning.md).

* :class:`Pruner`: the entry point (methods in the registry :data:`METHODS`: ``uniform``,
  ``global``, ``lamp``, ``gmp``, ``learned``; scorers ``magnitude``, ``taylor``; block or
  element granularity).
* ``registry``: name -> runner, one signature. ``learned``: sensitivity profiles and the
  knapsack allocation, gradual. ``gmp``: gradual magnitude pruning. ``oneshot``: uniform,
  global, LAMP. ``allocation``: budget-exact selection across layers, LAMP scores, the greedy
  knapsack. ``scorers``: group importance within a layer. ``schedules``: the cubic density
  schedule. ``targets``: layer discovery, the runners' context and the proxy-swapping session.
  ``permutation``: sorting hidden units by magnitude before a block mask is chosen.
"""

from adsparse.pruning.allocation import (
    allocate_removal,
    lamp_scores,
    select_allocation,
    select_global,
    select_uniform,
)
from adsparse.pruning.learned import LearnedConfig
from adsparse.pruning.permutation import (
    UnitOrder,
    apply_unit_orders_,
    permute_like,
    plan_unit_orders,
    sort_units_,
)
from adsparse.pruning.pruner import Pruner
from adsparse.pruning.registry import METHODS, Method
from adsparse.pruning.schedules import cubic_density
from adsparse.pruning.scorers import SCORERS, TaylorScorer, magnitude_scores

__all__ = [
    "METHODS",
    "SCORERS",
    "LearnedConfig",
    "Method",
    "Pruner",
    "TaylorScorer",
    "UnitOrder",
    "allocate_removal",
    "apply_unit_orders_",
    "cubic_density",
    "lamp_scores",
    "magnitude_scores",
    "permute_like",
    "plan_unit_orders",
    "select_allocation",
    "select_global",
    "select_uniform",
    "sort_units_",
]

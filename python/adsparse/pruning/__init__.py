"""Pruning that learns each layer's sparsity (DESIGN §5).

* :class:`Pruner`: the entry point (methods ``uniform``, ``global``, ``lamp``, ``gmp``,
  ``learned``; scorers ``magnitude``, ``taylor``; block or element granularity).
* ``scorers``: group importance. ``allocation``: budget-exact selection across layers and LAMP.
  ``learned``: the learned-threshold transition. ``gmp``: gradual magnitude pruning.
  ``schedules``: cubic density and temperature schedules. ``targets``: layer discovery and the
  proxy-swapping training session.
"""

from adsparse.pruning.allocation import lamp_scores, select_global, select_uniform
from adsparse.pruning.learned import LearnedConfig, LearnedThresholds
from adsparse.pruning.pruner import METHODS, Pruner
from adsparse.pruning.schedules import cubic_density, geometric_anneal
from adsparse.pruning.scorers import SCORERS, TaylorScorer, magnitude_scores

__all__ = [
    "METHODS",
    "SCORERS",
    "LearnedConfig",
    "LearnedThresholds",
    "Pruner",
    "TaylorScorer",
    "cubic_density",
    "geometric_anneal",
    "lamp_scores",
    "magnitude_scores",
    "select_global",
    "select_uniform",
]

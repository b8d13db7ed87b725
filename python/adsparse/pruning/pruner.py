"""``Pruner``: masks for a model's linear layers that meet one global weight budget.

    pruner = Pruner(model, target_density=0.1, method="learned", granularity="block")
    masks = pruner.prune(batches, loss_fn, steps=200)   # {fqn: bool mask}
    adsparse.sparsify_(model, masks=masks)

Methods (DESIGN §5): ``uniform``, ``global`` and ``lamp`` are one-shot (they read the weights,
plus ``calibration_steps`` batches of gradients with the ``taylor`` scorer); ``gmp`` and
``learned`` train for ``steps`` steps. Whose optimizer: ``prune(..., optimizer=opt)`` steps the
caller's optimizer (only the pruned layers get gradients, so it updates nothing else, though its
state for those layers moves on); without one a fresh ``Adam(lr)`` over the pruned layers'
weights and biases is used and thrown away. Apart from those weights and biases (and the mask of
a pruned ``SparseLinear``), the model is left exactly as it was: other parameters, their
gradients and ``requires_grad`` flags, buffers and the modules themselves. Transitions run in
the model's current mode (``train()``/``eval()``), which the pruner does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from adsparse.nn import SparseLinear
from adsparse.pruning.allocation import lamp_scores, select_global, select_uniform
from adsparse.pruning.gmp import run_gmp
from adsparse.pruning.learned import LearnedConfig, LearnedThresholds, run_learned
from adsparse.pruning.scorers import SCORERS, TaylorScorer, magnitude_scores
from adsparse.pruning.targets import (
    FilterFn,
    Target,
    TransitionSession,
    cycle_batches,
    find_targets,
)

__all__ = ["METHODS", "Pruner"]

METHODS = ("uniform", "global", "lamp", "gmp", "learned")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Pruner:
    """Chooses keep-masks for the selected linear layers of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module``; its ``nn.Linear``/``SparseLinear`` layers selected by
            ``filter_fn(module, fqn)`` (default: all) are pruned.
        target_density: kept share of the selected layers' weights, in (0, 1]. Met to within
            one group (padding of tail blocks is not counted).
        method: one of :data:`METHODS`.
        granularity: ``"block"`` (``block_size`` groups, what the kernels accelerate) or
            ``"element"``.
        min_layer_density: every layer keeps at least this share of its weights.
        scorer: ``"magnitude"`` or ``"taylor"``.
        lr: learning rate of the fresh Adam used when ``prune`` gets no optimizer.
        calibration_steps: batches that initialise the Taylor averages.
        gmp_update_every: steps between two mask updates of ``gmp``.
        learned: knobs of the learned transition.
    """

    def __init__(self, model: nn.Module, target_density: float = 0.1, method: str = "learned",
                 granularity: str = "block", block_size: tuple[int, int] = (16, 16),
                 min_layer_density: float = 0.02, filter_fn: FilterFn | None = None,
                 scorer: str = "magnitude", lr: float = 1e-3, calibration_steps: int = 8,
                 gmp_update_every: int = 1, learned: LearnedConfig | None = None):
        if not isinstance(target_density, (int, float)) or not 0.0 < target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {target_density}")
        if not 0.0 <= min_layer_density <= target_density:
            raise ValueError(f"min_layer_density must be in [0, target_density={target_density}],"
                             f" got {min_layer_density}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if granularity not in ("block", "element"):
            raise ValueError(f"granularity must be 'block' or 'element', got {granularity!r}")
        if isinstance(block_size, int):
            block_size = (block_size, block_size)
        if len(block_size) != 2 or min(block_size) < 1:
            raise ValueError(f"block_size must be two integers >= 1, got {block_size}")
        self.model = model
        self.target_density = float(target_density)
        self.method = method
        self.granularity = granularity
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.min_layer_density = float(min_layer_density)
        self.filter_fn = filter_fn
        self.scorer = scorer
        self.lr = lr
        self.calibration_steps = calibration_steps
        self.gmp_update_every = gmp_update_every
        self.learned_config = learned or LearnedConfig()
        self.thresholds = LearnedThresholds()
        self.history: list[dict[str, float]] = []
        self._masks: dict[str, torch.Tensor] = {}
        self._sizes: dict[str, torch.Tensor] = {}
        self._targets()  # fail early on a model that cannot be pruned

    # ------------------------------------------------------------------ public API
    def prune(self, batches: Iterable[Any] | None = None, loss_fn: LossFn | None = None,
              steps: int = 200, optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, torch.Tensor]:
        """Choose the masks; returns ``{fqn: bool mask}`` (block grid, or ``[N, K]``).

        ``batches`` (re-iterable, or an iterator that is cycled) feed ``loss_fn(model, batch)``,
        which returns the scalar task loss; they are needed by ``gmp``, ``learned`` and the
        ``taylor`` scorer. ``steps`` is the length of the ``gmp``/``learned`` transition
        (0: no training, ``learned`` then projects its current thresholds). Masks of pruned
        ``SparseLinear`` layers are also written into ``layer.mask``.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        targets = self._targets()
        needs_data = self.method in ("gmp", "learned") or self.scorer == "taylor"
        if needs_data and (batches is None or loss_fn is None):
            raise ValueError(f"method {self.method!r} with scorer {self.scorer!r} needs batches "
                             "and loss_fn")
        sizes = [t.sizes for t in targets]
        floors = [self.min_layer_density * t.num_weights for t in targets]
        budget = self.target_density * sum(t.num_weights for t in targets)
        self.history = []
        if not needs_data:
            masks = self._one_shot(targets, [self._magnitude(t) for t in targets], budget, floors)
        else:
            it = cycle_batches(batches)
            with TransitionSession(self.model, targets) as session:
                taylor = None
                if self.scorer == "taylor":
                    taylor = TaylorScorer()
                    taylor.calibrate(session, it, loss_fn, self.calibration_steps)

                def scores_fn(t: Target) -> torch.Tensor:
                    return taylor.scores(t.fqn) if taylor is not None else self._magnitude(t)

                if self.method in ("uniform", "global", "lamp"):
                    masks = self._one_shot(targets, [scores_fn(t) for t in targets], budget,
                                           floors)
                else:
                    opt = optimizer or torch.optim.Adam(session.trainable(), lr=self.lr)
                    if self.method == "gmp":
                        masks = run_gmp(session, scores_fn, self.target_density, floors, steps,
                                        self.gmp_update_every, it, loss_fn, opt, taylor,
                                        self.history)
                    else:
                        train = self.learned_config.train_weights
                        saved = self.thresholds.state_dict()
                        try:
                            margins = run_learned(session, self.thresholds, scores_fn,
                                                  self.target_density, floors, steps, it,
                                                  loss_fn, opt if train else None,
                                                  self.learned_config, taylor, self.history)
                        except BaseException:
                            self.thresholds.load_state_dict(saved)  # warm start stays valid
                            raise
                        masks = select_global(margins, sizes, budget, floors)
        self._check(targets, masks, budget)
        self._masks = {t.fqn: m for t, m in zip(targets, masks)}
        self._sizes = {t.fqn: t.sizes for t in targets}
        for t, m in zip(targets, masks):
            if isinstance(t.module, SparseLinear):
                t.module.set_mask(m)
        return dict(self._masks)

    def layer_densities(self) -> dict[str, float]:
        """Kept share of each pruned layer's weights, from the last ``prune``."""
        if not self._masks:
            raise RuntimeError("call prune() first")
        return {fqn: float(self._sizes[fqn][m.cpu()].sum() / self._sizes[fqn].sum())
                for fqn, m in self._masks.items()}

    def global_density(self) -> float:
        """Kept share of all pruned layers' weights, from the last ``prune``."""
        kept = sum(float(self._sizes[f][m.cpu()].sum()) for f, m in self._masks.items())
        return kept / sum(float(s.sum()) for s in self._sizes.values())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, learned thresholds and last masks."""
        return {
            "config": {"target_density": self.target_density, "method": self.method,
                       "granularity": self.granularity, "block_size": self.block_size,
                       "min_layer_density": self.min_layer_density, "scorer": self.scorer,
                       "learned": asdict(self.learned_config)},
            "thresholds": self.thresholds.state_dict(),
            "masks": {k: v.cpu().clone() for k, v in self._masks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore thresholds (the next ``learned`` prune warm-starts from them) and masks."""
        config = state["config"]
        if config["granularity"] != self.granularity or (
            tuple(config["block_size"]) != self.block_size
        ):
            raise ValueError(f"state is for granularity {config['granularity']!r} and block "
                             f"{tuple(config['block_size'])}, this pruner uses "
                             f"{self.granularity!r} and {self.block_size}")
        targets = {t.fqn: t for t in self._targets()}
        unknown = sorted((set(state["thresholds"]["log_thresholds"]) | set(state["masks"]))
                         - set(targets))
        if unknown:
            raise ValueError(f"state has thresholds or masks of layers this pruner does not "
                             f"prune: {unknown}")
        self.thresholds.load_state_dict(state["thresholds"])
        self._masks = {k: v.clone() for k, v in state["masks"].items()}
        self._sizes = {k: targets[k].sizes for k in self._masks}

    # ------------------------------------------------------------------ internals
    def _targets(self) -> list[Target]:
        return find_targets(self.model, self.granularity, self.block_size, self.filter_fn)

    def _magnitude(self, t: Target) -> torch.Tensor:
        return magnitude_scores(t.weight, t.block_size, t.sizes)

    def _one_shot(self, targets: list[Target], scores: list[torch.Tensor], budget: float,
                  floors: list[float]) -> list[torch.Tensor]:
        sizes = [t.sizes for t in targets]
        if self.method == "uniform":
            return select_uniform(scores, sizes, self.target_density, floors)
        if self.method == "lamp":
            scores = [lamp_scores(s) for s in scores]
        return select_global(scores, sizes, budget, floors)

    def _check(self, targets: list[Target], masks: list[torch.Tensor], budget: float) -> None:
        """The contract, checked on every result: budget within one group, layer floors."""
        kept = 0.0
        for t, m in zip(targets, masks):
            layer = float(t.sizes[m.cpu()].sum())
            kept += layer
            if layer < self.min_layer_density * t.num_weights - 1e-6:
                raise RuntimeError(f"layer {t.fqn!r} kept {layer:.0f} weights, below "
                                   f"min_layer_density={self.min_layer_density}")
        largest = max(float(t.sizes.max()) for t in targets)
        if abs(kept - budget) > largest + 1e-6:
            raise RuntimeError(f"the masks keep {kept:.0f} weights for a budget of {budget:.1f}, "
                               f"more than one group ({largest:.0f}) away")

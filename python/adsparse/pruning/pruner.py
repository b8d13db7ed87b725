"""``Pruner``: masks for a model's linear layers that meet one global weight budget.

    pruner = Pruner(model, 0.1, method="learned", granularity="block")
    masks = pruner.prune(batches, loss_fn, steps=200)   # {fqn: bool mask}
    adsparse.sparsify_(model, masks=masks)

Methods (the registry ``METHODS``, described in docs/pruning.md): ``uniform``, ``global`` and
``lamp`` are one-shot (they read the weights, plus ``calibration_steps`` batches of gradients
with the ``taylor`` scorer); ``gmp`` and ``learned`` train for ``steps`` steps. Whose optimizer:
``prune(..., optimizer=opt)`` steps the caller's optimizer (only the pruned layers get
gradients, so it updates nothing else, though its state for those layers moves on); without one
a fresh ``Adam(lr)`` over the pruned layers' weights and biases is used and thrown away. Apart
from those weights and biases (and the mask of a pruned ``SparseLinear``), the model is left
exactly as it was: other parameters, their gradients and ``requires_grad`` flags, buffers and
the modules themselves. Transitions run in the model's current mode (``train()``/``eval()``),
which the pruner does not change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from adsparse.checks import check_block_size, check_density
from adsparse.nn import SparseLinear
from adsparse.pruning.learned import LearnedConfig
from adsparse.pruning.registry import METHODS
from adsparse.pruning.scorers import SCORERS, TaylorScorer, magnitude_scores
from adsparse.pruning.targets import (
    Context,
    FilterFn,
    LossFn,
    Target,
    TransitionSession,
    cycle_batches,
    find_targets,
)

__all__ = ["Pruner"]


class Pruner:
    """Chooses keep-masks for the selected linear layers of ``model`` (see the module docstring).

    Args:
        model: any ``nn.Module``; its ``nn.Linear``/``SparseLinear`` layers selected by
            ``filter_fn(module, fqn)`` (default: all) are pruned.
        target_density: kept share of the selected layers' weights, in (0, 1]. Met to within
            one group (padding of tail blocks is not counted).
        method: a name in :data:`~adsparse.pruning.registry.METHODS`.
        granularity: ``"block"`` (``block_size`` groups, what the kernels accelerate) or
            ``"element"``.
        block_size: ``(rows, cols)`` of a block, or one int for square blocks.
        min_layer_density: every layer keeps at least this share of its weights (its
            ``min_weights``).
        scorer: ``"magnitude"`` or ``"taylor"``: which groups a layer keeps first.
        lr: learning rate of the fresh Adam used when ``prune`` gets no optimizer.
        calibration_steps: batches that initialise the Taylor averages (skipped when
            :meth:`observe` has fed them since the last ``prune``).
        gmp_update_every: steps between two mask updates of ``gmp``.
        learned: knobs of the learned transition (:class:`LearnedConfig`).
    """

    def __init__(self, model: nn.Module, target_density: float = 0.1, method: str = "learned",
                 granularity: str = "block", block_size: tuple[int, int] | int = (16, 16),
                 min_layer_density: float = 0.02, filter_fn: FilterFn | None = None,
                 scorer: str = "magnitude", lr: float = 1e-3, calibration_steps: int = 8,
                 gmp_update_every: int = 1, learned: LearnedConfig | None = None):
        target_density = check_density(target_density, "target_density")
        if not 0.0 <= min_layer_density <= target_density:
            raise ValueError(f"min_layer_density must be in [0, target_density={target_density}],"
                             f" got {min_layer_density}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if granularity not in ("block", "element"):
            raise ValueError(f"granularity must be 'block' or 'element', got {granularity!r}")
        self.model = model
        self.target_density = target_density
        self.method = method
        self.granularity = granularity
        self.block_size = check_block_size(block_size)
        self.min_layer_density = float(min_layer_density)
        self.filter_fn = filter_fn
        self.scorer = scorer
        self.lr = lr
        self.calibration_steps = calibration_steps
        self.gmp_update_every = gmp_update_every
        self.learned_config = learned or LearnedConfig()
        self.learned_config.validate()
        self.taylor = TaylorScorer() if scorer == "taylor" else None
        self._observed: set[str] = set()
        self.state: dict[str, dict[str, Any]] = {}  # per method, carried between prunes
        self.history: list[dict[str, Any]] = []
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
        (0: no training; ``learned`` then measures one round of sensitivity profiles, or, warm
        started, re-applies its learned allocation). Masks of pruned ``SparseLinear`` layers
        are also written into ``layer.mask``.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        targets = self._targets()
        method = METHODS[self.method]
        warm_learned = (self.method == "learned" and steps == 0
                        and all(t.fqn in self.state.get("learned", {}).get("densities", {})
                                for t in targets))
        needs_batches = (method.trains and not warm_learned) or (
            self.scorer == "taylor" and not self._observed >= {t.fqn for t in targets})
        if needs_batches and (batches is None or loss_fn is None):
            raise ValueError(f"method {self.method!r} with scorer {self.scorer!r} needs batches "
                             "and loss_fn")
        ctx = Context(targets, self.target_density,
                      self.target_density * sum(t.num_weights for t in targets),
                      [self.min_layer_density * t.num_weights for t in targets],
                      self._scores, steps, loss_fn=loss_fn,
                      state=dict(self.state.get(self.method, {})), pruner=self)
        self.history = ctx.history
        if not needs_batches:
            masks = method.run(ctx)
        else:
            ctx.batches = cycle_batches(batches)
            with TransitionSession(self.model, targets) as session:
                ctx.session = session
                if self.taylor is not None and not self._observed >= {t.fqn for t in targets}:
                    self.taylor.calibrate(session, ctx.batches, loss_fn, self.calibration_steps)
                if method.trains:
                    ctx.optimizer = optimizer or torch.optim.Adam(session.trainable(), lr=self.lr)
                masks = method.run(ctx)
                for proxy in session.proxies:
                    proxy.mask = proxy.mask.detach()
        self._check(targets, masks, ctx.budget)
        self.state[self.method] = ctx.state  # only after success: a failed prune keeps the old
        self._observed = set()
        self._masks = {t.fqn: m for t, m in zip(targets, masks)}
        self._sizes = {t.fqn: t.sizes for t in targets}
        for t, m in zip(targets, masks):
            if isinstance(t.module, SparseLinear):
                t.module.set_mask(m)
        return dict(self._masks)

    @torch.no_grad()
    def observe(self, model: nn.Module | None = None) -> None:
        """Fold the gradients of a dense training step into the scorer's statistics.

        Call it after ``loss.backward()`` (before or after ``optimizer.step()``) on ``model``
        (default: the pruner's model; any model with the same layer names, e.g. the dense model
        a transition's copy was made from). With the ``taylor`` scorer it updates the Taylor
        averages from the target layers' ``.grad`` (``sum_g W * dL/dW``, what ``dL/dM`` is for an
        all-ones mask), costing one multiply-add over the weights; the next ``prune`` then skips
        its calibration batches. With the ``magnitude`` scorer there are no statistics and this
        does nothing. Layers without a ``.grad`` are skipped.
        """
        if self.taylor is None:
            return
        model = self.model if model is None else model
        for t in self._targets():
            layer = model.get_submodule(t.fqn)
            if layer.weight.grad is None:
                continue
            self.taylor.observe(t.fqn, layer.weight, layer.weight.grad, t.block_size)
            self._observed.add(t.fqn)

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
        """Everything needed to resume: configuration, each method's warm-start state (for
        ``learned``: the last per-layer densities), the Taylor averages and the last masks.

        Only tensors and plain Python data (``torch.load(weights_only=True)`` reads it).
        """
        return {
            "config": {"target_density": self.target_density, "method": self.method,
                       "granularity": self.granularity, "block_size": list(self.block_size),
                       "min_layer_density": self.min_layer_density, "scorer": self.scorer,
                       "learned": asdict(self.learned_config)},
            "state": _plain(self.state),
            "taylor": ({} if self.taylor is None
                       else {k: v.detach().cpu().clone() for k, v in self.taylor.ema.items()}),
            "masks": {k: v.cpu().clone() for k, v in self._masks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the warm-start state (the next ``prune`` starts from it) and the masks."""
        config = state["config"]
        if config["granularity"] != self.granularity or (
            tuple(config["block_size"]) != self.block_size
        ):
            raise ValueError(f"state is for granularity {config['granularity']!r} and block "
                             f"{tuple(config['block_size'])}, this pruner uses "
                             f"{self.granularity!r} and {self.block_size}")
        targets = {t.fqn: t for t in self._targets()}
        method_state = state.get("state", {})
        named = set(state["masks"]) | set(state.get("taylor", {}))
        for entry in method_state.values():
            named |= set(entry.get("densities", {}))
        unknown = sorted(named - set(targets))
        if unknown:
            raise ValueError(f"state has statistics or masks of layers this pruner does not "
                             f"prune: {unknown}")
        self.state = _plain(method_state)
        if self.taylor is not None:
            self.taylor.ema = {k: v.detach().clone().float()
                               for k, v in state.get("taylor", {}).items()}
        self._masks = {k: v.clone() for k, v in state["masks"].items()}
        self._sizes = {k: targets[k].sizes for k in self._masks}

    # ------------------------------------------------------------------ internals
    def _targets(self) -> list[Target]:
        return find_targets(self.model, self.granularity, self.block_size, self.filter_fn)

    def _scores(self, t: Target) -> torch.Tensor:
        if self.taylor is not None:
            return self.taylor.scores(t.fqn)
        return magnitude_scores(t.weight, t.block_size, t.sizes)

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


def _plain(value: Any) -> Any:
    """A deep copy of nested dicts/lists of tensors and Python scalars (tensors on the CPU)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return value
